"""The N-branch PIIP vision tower (spec 1.1-1.9): branch adapters and the whole tower forward.

Branches wrap unmodified transformers / timm backbones (CLIP, SigLIP, InternViT, ConvNeXt) and expose the same
three steps: `embed` (image -> tokens on a grid), `run_blocks` (a contiguous range of blocks) and `to_map`.
The tower resizes the image for each branch, then alternates block groups and interaction blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.interaction import InteractionBlock
from .configuration_piip_llava import BranchConfig, PiipVisionConfig


@dataclass
class BranchState:
    """Tokens of one branch between block groups: patch tokens (B, H*W, C), class token (B, 1, C) or None, grid."""

    tokens: torch.Tensor
    cls: torch.Tensor | None
    hw: tuple[int, int]


def create_vit_backbone(cfg: BranchConfig) -> nn.Module:
    """A transformers vision model built from the branch config (random init, no download)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    kwargs = dict(cfg.backbone, patch_size=cfg.patch_size)
    if cfg.type == "clip":
        if cfg.patch_stride in (None, cfg.patch_size):
            return CLIPVisionModel(CLIPVisionConfig(**kwargs))
        # the official CLIP wrapper's resized kernel: patch_size wide, applied at the pretrained stride, with the
        # pretrained position table (backbone["patch_size"] == patch_stride, checked by BranchConfig)
        model = CLIPVisionModel(CLIPVisionConfig(**dict(kwargs, patch_size=cfg.patch_stride)))
        emb = model.embeddings
        emb.patch_embedding = nn.Conv2d(emb.patch_embedding.in_channels, emb.embed_dim, cfg.patch_size,
                                        stride=cfg.patch_stride, bias=False)
        return model
    if cfg.type == "siglip":
        return SiglipVisionModel(SiglipVisionConfig(**kwargs))
    from transformers import InternVLVisionConfig, InternVLVisionModel

    kwargs["patch_size"] = [cfg.patch_size, cfg.patch_size]
    size = kwargs.get("image_size", 448)
    kwargs["image_size"] = size if isinstance(size, list | tuple) else [size, size]
    return InternVLVisionModel(InternVLVisionConfig(**kwargs))


class ViTBranch(nn.Module):
    """CLIP / SigLIP / InternViT branch. Position embeddings are bicubically interpolated from the pretrain grid to
    the run-time grid; the class token joins self-attention but never the interactions."""

    def __init__(self, cfg: BranchConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.type = cfg.type
        self.model = create_vit_backbone(cfg)
        self.pos_has_cls = self.type != "siglip"
        self.has_cls = self.type != "siglip" and cfg.use_cls_token
        size = cfg.backbone.get("image_size", 224)
        size = size[0] if isinstance(size, list | tuple) else size
        self.pretrain_grid = int(size) // (cfg.patch_stride or cfg.patch_size)
        self.grad_checkpointing = False

    @property
    def layers(self) -> nn.ModuleList:
        enc = self.model.encoder
        return enc.layer if self.type == "internvit" else enc.layers

    # -- parameters of the embedding, whatever the backbone calls them --
    def _patch_conv(self) -> nn.Conv2d:
        emb = self.model.embeddings
        return emb.patch_embeddings.projection if self.type == "internvit" else emb.patch_embedding

    def _pos_table(self) -> torch.Tensor | None:
        """(rows, C) with the class slot first when the backbone has one."""
        emb = self.model.embeddings
        if self.type == "internvit":
            return None if emb.position_embeddings is None else emb.position_embeddings[0]
        return emb.position_embedding.weight

    def _cls_embedding(self) -> torch.Tensor:
        emb = self.model.embeddings
        return emb.cls_token.reshape(1, 1, -1) if self.type == "internvit" else emb.class_embedding.reshape(1, 1, -1)

    def embed(self, pixel_values: torch.Tensor) -> BranchState:
        x = self._patch_conv()(pixel_values)  # (B, C, H, W)
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2).contiguous()
        table = self._pos_table()
        cls = None
        if table is not None:
            patch_pos = table[1:] if self.pos_has_cls else table
            g = self.pretrain_grid
            if (h, w) != (g, g):
                grid = patch_pos.float().reshape(1, g, g, c).permute(0, 3, 1, 2)
                grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
                patch_pos = grid.permute(0, 2, 3, 1).reshape(h * w, c).to(x.dtype)
            x = x + patch_pos
        if self.type != "siglip":
            cls = self._cls_embedding().to(x.dtype)
            if table is not None and self.pos_has_cls:
                cls = cls + table[:1]
            cls = cls.expand(b, -1, -1)
        if self.type == "clip":  # pre-LayerNorm over all tokens, class token included
            x = self.model.pre_layrnorm(torch.cat([cls, x], dim=1))
            cls, x = x[:, :1], x[:, 1:]
        return BranchState(x, cls if self.has_cls else None, (h, w))

    def _layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer(x) if self.type == "internvit" else layer(x, None)

    def run_blocks(self, state: BranchState, start: int, end: int) -> BranchState:
        x = state.tokens if state.cls is None else torch.cat([state.cls, state.tokens], dim=1)
        for layer in self.layers[start : end + 1]:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(self._layer, layer, x, use_reentrant=False)
            else:
                x = self._layer(layer, x)
        if state.cls is None:
            return BranchState(x, None, state.hw)
        return BranchState(x[:, 1:], x[:, :1], state.hw)

    def to_map(self, state: BranchState) -> torch.Tensor:
        b, n, c = state.tokens.shape
        return state.tokens.transpose(1, 2).reshape(b, c, *state.hw)


class ConvNeXtBranch(nn.Module):
    """timm ConvNeXt; each stage's downsampling layer is a block of its own (39 blocks for depths 3/3/27/3)."""

    def __init__(self, cfg: BranchConfig) -> None:
        super().__init__()
        try:
            from timm.models.convnext import ConvNeXt
        except ImportError as e:  # the only branch type that needs timm (also in remote-code checkpoints)
            raise ImportError("ConvNeXt branches need timm: pip install 'timm>=1.0.15'") from e

        self.cfg = cfg
        kwargs = dict(cfg.backbone)
        self.model = ConvNeXt(num_classes=0, **kwargs)
        blocks: list[nn.Module] = []
        for s, stage in enumerate(self.model.stages):
            if s > 0:
                blocks.append(stage.downsample)
            blocks.extend(stage.blocks)
        self.blocks = blocks  # plain list: the modules are registered (and named) inside self.model
        self.grad_checkpointing = False

    def embed(self, pixel_values: torch.Tensor) -> BranchState:
        x = self.model.stem(pixel_values)
        b, c, h, w = x.shape
        return BranchState(x.flatten(2).transpose(1, 2).contiguous(), None, (h, w))

    def run_blocks(self, state: BranchState, start: int, end: int) -> BranchState:
        b, n, c = state.tokens.shape
        x = state.tokens.transpose(1, 2).reshape(b, c, *state.hw)
        for block in self.blocks[start : end + 1]:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return BranchState(x.flatten(2).transpose(1, 2).contiguous(), None, (x.shape[-2], x.shape[-1]))

    def to_map(self, state: BranchState) -> torch.Tensor:
        b, n, c = state.tokens.shape
        return state.tokens.transpose(1, 2).reshape(b, c, *state.hw)


def build_branch(cfg: BranchConfig) -> nn.Module:
    return ConvNeXtBranch(cfg) if cfg.type == "convnext" else ViTBranch(cfg)


class PiipVisionTower(nn.Module):
    """pixel_values (B, 3, R, R) at the highest branch resolution -> one feature map per branch (B, C_j, H_j, W_j).

    Branch j sees the image bilinearly resized (align_corners=False, no antialiasing) to its own resolution.
    """

    def __init__(self, config: PiipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.branch_cfgs = config.branch_configs()
        inter = config.interaction_config()
        self.branches = nn.ModuleList(build_branch(c) for c in self.branch_cfgs)
        self.interactions = nn.ModuleList(
            InteractionBlock([c.range_widths[i] for c in self.branch_cfgs], inter)
            for i in range(config.num_interactions)
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for branch in self.branches:
            branch.grad_checkpointing = enable

    @property
    def out_dims(self) -> list[int]:
        return [c.width for c in self.branch_cfgs]

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        dtype = next(self.branches[0].parameters()).dtype
        image = pixel_values.float()
        states = []
        for cfg, branch in zip(self.branch_cfgs, self.branches):
            x = image
            if x.shape[-1] != cfg.image_size or x.shape[-2] != cfg.image_size:
                x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
            states.append(branch.embed(x.to(dtype)))

        if not self.interactions:  # single branch (e.g. the LLaVA-1.5 CLIP baseline): stop at select_layer
            cfg = self.branch_cfgs[0]
            states[0] = self.branches[0].run_blocks(states[0], 0, cfg.depth + cfg.select_layer if cfg.select_layer < 0 else cfg.select_layer)
        for i, block in enumerate(self.interactions):  # blocks outside every range never run (as officially)
            for j, (cfg, branch) in enumerate(zip(self.branch_cfgs, self.branches)):
                start, end = cfg.interaction_indexes[i]
                states[j] = branch.run_blocks(states[j], start, end)
            tokens = block([s.tokens for s in states], [s.hw for s in states])
            states = [BranchState(t, s.cls, s.hw) for t, s in zip(tokens, states)]
        return [branch.to_map(s) for branch, s in zip(self.branches, states)]
