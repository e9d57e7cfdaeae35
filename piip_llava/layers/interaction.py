"""Cross-branch interaction unit (spec 1.6): two injectors exchanging information between adjacent branches.

Names match the official checkpoints: `branch2to1_proj`, `branch1to2_proj`, `branch2to1_injector`,
`branch1to2_injector`; inside an injector `query_norm`, `feat_norm`, `ffn_norm`, `attn`, `ca_weight`,
`cffn_weight`, `ffn.fc1`, `ffn.dwconv.dwconv`, `ffn.fc2`. "1" is the larger, lower-resolution branch of the pair.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .deform_attn import CrossAttention, DeformableAttention


@dataclass
class InteractionConfig:
    """Cross-branch interaction unit (spec 1.6-1.7). Lives with the layers it configures so that `layers/` never
    imports from `models/`; `PiipVisionConfig` stores it as a dict."""

    attn_type: Literal["deform", "normal"] = "deform"
    num_heads: int = 16
    n_points: int = 4
    deform_ratio: float = 0.5
    with_cffn: bool = True
    cffn_ratio: float = 0.25
    drop_path_rate: float = 0.4
    with_proj: bool = True
    norm: Literal["ln", "none"] = "ln"  # official `norm_layer`: LayerNorm, or none (identity) for all three norms
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.attn_type not in ("deform", "normal"):
            raise ValueError(f"interaction attn_type must be 'deform' or 'normal', got {self.attn_type!r}")
        if self.norm not in ("ln", "none"):
            raise ValueError(f"interaction norm must be 'ln' or 'none', got {self.norm!r}")
        if self.num_heads <= 0 or self.n_points <= 0:
            raise ValueError("interaction num_heads and n_points must be positive")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"interaction drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's `DropPath`, scale_by_keep=True), kept here so that checkpoints whose
    branches are all ViTs load without timm."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class DWConv(nn.Module):
    """Depth-wise 3x3 conv on tokens laid out on their (H, W) grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, hw[0], hw[1])
        return self.dwconv(x).flatten(2).transpose(1, 2).contiguous()


class ConvFFN(nn.Module):
    """fc2(GELU(DWConv3x3(fc1(x))))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), hw)))


class Injector(nn.Module):
    """q' = q + g_ca * Attn(LN(q), LN(f)); q'' = q' + g_ffn * DropPath(ConvFFN(LN(q'))). Gates start at zero.

    With `norm='none'` the three LNs are identities (official `norm_layer="none"`); without ConvFFN
    (`with_cffn=False`) the official module has no `ffn`, `ffn_norm` or `cffn_weight` parameters, nor does this one.
    """

    def __init__(self, dim: int, feat_dim: int, cfg: InteractionConfig) -> None:
        super().__init__()

        def norm(width: int) -> nn.Module:
            return nn.LayerNorm(width, eps=cfg.norm_eps) if cfg.norm == "ln" else nn.Identity()

        self.query_norm = norm(dim)
        self.feat_norm = norm(feat_dim)
        if cfg.attn_type == "deform":
            self.attn = DeformableAttention(dim, feat_dim, cfg.num_heads, cfg.n_points, cfg.deform_ratio)
        else:
            self.attn = CrossAttention(dim, feat_dim, cfg.num_heads)
        self.ca_weight = nn.Parameter(torch.zeros(dim))
        self.with_cffn = cfg.with_cffn
        if cfg.with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cfg.cffn_ratio))
            self.ffn_norm = norm(dim)
            self.cffn_weight = nn.Parameter(torch.zeros(dim))
            self.drop_path = DropPath(cfg.drop_path_rate) if cfg.drop_path_rate > 0 else nn.Identity()

    def forward(
        self, query: torch.Tensor, query_hw: tuple[int, int], feat: torch.Tensor, feat_hw: tuple[int, int]
    ) -> torch.Tensor:
        attn = self.attn(self.query_norm(query), query_hw, self.feat_norm(feat), feat_hw)
        query = query + self.ca_weight * attn
        if self.with_cffn:
            query = query + self.cffn_weight * self.drop_path(self.ffn(self.ffn_norm(query), query_hw))
        return query


class InteractionUnit(nn.Module):
    """Bidirectional exchange between branch "1" (large, low-res) and branch "2" (small, high-res).

    Both directions read the pre-update features, so they are simultaneous.
    """

    def __init__(self, dim1: int, dim2: int, cfg: InteractionConfig) -> None:
        super().__init__()
        self.with_proj = cfg.with_proj
        if cfg.with_proj:
            self.branch2to1_proj = nn.Linear(dim2, dim1)
            self.branch1to2_proj = nn.Linear(dim1, dim2)
        self.branch2to1_injector = Injector(dim1, dim1 if cfg.with_proj else dim2, cfg)
        self.branch1to2_injector = Injector(dim2, dim2 if cfg.with_proj else dim1, cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official init (spec 1.14): trunc-normal Linear, unit LayerNorm, He-normal depth-wise conv, then the
        deformable-attention reset; gates stay zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, DeformableAttention):
                m.reset_parameters()
        for inj in (self.branch2to1_injector, self.branch1to2_injector):
            nn.init.zeros_(inj.ca_weight)
            if inj.with_cffn:
                nn.init.zeros_(inj.cffn_weight)

    def forward(
        self, x1: torch.Tensor, hw1: tuple[int, int], x2: torch.Tensor, hw2: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        f21 = self.branch2to1_proj(x2) if self.with_proj else x2
        f12 = self.branch1to2_proj(x1) if self.with_proj else x1
        return self.branch2to1_injector(x1, hw1, f21, hw2), self.branch1to2_injector(x2, hw2, f12, hw1)


class InteractionBlock(nn.Module):
    """One interaction step for N branches: units between adjacent pairs, highest-resolution pair first.

    Units are named `interaction_units_12`, `interaction_units_23`, ... as in the official checkpoints.
    """

    def __init__(self, dims: list[int], cfg: InteractionConfig) -> None:
        super().__init__()
        self.num_pairs = len(dims) - 1
        for j in range(self.num_pairs):
            self.add_module(f"interaction_units_{j + 1}{j + 2}", InteractionUnit(dims[j], dims[j + 1], cfg))

    def unit(self, j: int) -> InteractionUnit:
        return getattr(self, f"interaction_units_{j + 1}{j + 2}")

    def forward(self, xs: list[torch.Tensor], hws: list[tuple[int, int]]) -> list[torch.Tensor]:
        xs = list(xs)
        for j in reversed(range(self.num_pairs)):  # e.g. 34 -> 23 -> 12
            xs[j], xs[j + 1] = self.unit(j)(xs[j], hws[j], xs[j + 1], hws[j + 1])
        return xs
