"""Single-level multi-scale deformable attention (Deformable-DETR), pure PyTorch (`grid_sample`).

Token tensors handed to linear layers are row-major (`.contiguous()` after transposes): vLLM replaces `nn.Linear`
with kernels that require it when it serves a checkpoint through its Transformers backend.

No compiled extension: the sampling is one `grid_sample` over all heads and points, in fp32 as the official CUDA
kernel computes it. Parameter names match the official checkpoints (`sampling_offsets`, `attention_weights`,
`value_proj`, `output_proj`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def reference_points(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Cell centres of an H x W grid as (x, y) in [0, 1]: (H*W, 2), row-major."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)


def deformable_sample(
    value: torch.Tensor, value_hw: tuple[int, int], locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Bilinear sampling of `value` at `locations`, weighted and summed over points.

    value: (B, Hv*Wv, M, Dh); locations: (B, Nq, M, K, 2) as (x, y) in [0, 1] (zeros outside the map);
    weights: (B, Nq, M, K). Returns (B, Nq, M*Dh). Pixel coordinate of a location is loc * size - 0.5
    (grid_sample, align_corners=False).
    """
    b, _, m, dh = value.shape
    hv, wv = value_hw
    nq, k = locations.shape[1], locations.shape[3]
    v = value.permute(0, 2, 3, 1).reshape(b * m, dh, hv, wv)
    grid = (2 * locations - 1).permute(0, 2, 1, 3, 4).reshape(b * m, nq, k, 2)
    sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*M, Dh, Nq, K)
    w = weights.permute(0, 2, 1, 3).reshape(b * m, 1, nq, k)
    out = (sampled * w).sum(-1)  # (B*M, Dh, Nq)
    return out.view(b, m * dh, nq).transpose(1, 2).contiguous()  # row-major for the projection (vLLM kernels need it)


class DeformableAttention(nn.Module):
    """Deformable cross-attention from queries on a (Hq, Wq) grid to a value map on a (Hv, Wv) grid."""

    def __init__(self, d_model: int, d_feat: int, num_heads: int = 16, n_points: int = 4, ratio: float = 0.5) -> None:
        super().__init__()
        d_value = int(d_model * ratio)
        if d_value % num_heads:
            raise ValueError(f"deformable attention: value width {d_value} not divisible by {num_heads} heads")
        self.num_heads, self.n_points, self.d_value = num_heads, n_points, d_value
        self.sampling_offsets = nn.Linear(d_model, num_heads * n_points * 2)
        self.attention_weights = nn.Linear(d_model, num_heads * n_points)
        self.value_proj = nn.Linear(d_feat, d_value)
        self.output_proj = nn.Linear(d_value, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official init: zero offset weights, a ring of points 1..K cells out in M directions, uniform weights."""
        m, k = self.num_heads, self.n_points
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(m, dtype=torch.float32) * (2.0 * math.pi / m)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(m, 1, 2).repeat(1, k, 1)
        grid *= torch.arange(1, k + 1, dtype=torch.float32).view(1, k, 1)
        self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self, query: torch.Tensor, query_hw: tuple[int, int], feat: torch.Tensor, feat_hw: tuple[int, int]
    ) -> torch.Tensor:
        """query: (B, Hq*Wq, d_model); feat: (B, Hv*Wv, d_feat) -> (B, Hq*Wq, d_model)."""
        b, nq, _ = query.shape
        m, k = self.num_heads, self.n_points
        value = self.value_proj(feat).view(b, -1, m, self.d_value // m)
        offsets = self.sampling_offsets(query).view(b, nq, m, k, 2)
        weights = self.attention_weights(query).view(b, nq, m, k).float().softmax(-1)
        hv, wv = feat_hw
        offsets = offsets.float()
        offsets = torch.stack([offsets[..., 0] / wv, offsets[..., 1] / hv], dim=-1)  # in value-map cells; no host copy
        ref = reference_points(query_hw[0], query_hw[1], query.device)
        locations = ref[None, :, None, None, :] + offsets
        out = deformable_sample(value.float(), feat_hw, locations, weights).to(query.dtype)
        return self.output_proj(out)


class CrossAttention(nn.Module):
    """Plain multi-head cross-attention (`normal` interactions): no qkv bias, output projection with bias, scale
    1/sqrt(d/heads), no dropout. The official `CrossAttention` computes the same with separate `wq`, `wk`, `wv`;
    `kv` holds `wk` then `wv` stacked along the output rows (the converter stacks them)."""

    def __init__(self, d_model: int, d_feat: int, num_heads: int = 16) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"cross attention: width {d_model} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_feat, 2 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model)

    def reset_parameters(self) -> None:  # generic init (truncated normal) is applied by the interaction unit
        pass

    def forward(self, query, query_hw, feat, feat_hw):
        b, nq, d = query.shape
        h = self.num_heads
        q = self.q(query).view(b, nq, h, d // h).transpose(1, 2)
        k, v = self.kv(feat).view(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, nq, d))
