"""config -> model with pretrained parts: branch backbones (transformers / timm) and the LLM.

`build_model(config, ...)` builds `PiipLlavaForConditionalGeneration` from a config and loads the pretrained
weights that the config names (`BranchConfig.pretrained`, the LLM path). The ViT patch-size change (e.g. CLIP-L/14
-> /16) resamples the patch kernel and the position grid bicubically (spec 1.4).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_piip_llava import BranchConfig, PiipLlavaConfig
from .modeling_piip_llava import PiipLlavaForConditionalGeneration

logger = logging.getLogger(__name__)


def resample_patch_embedding(weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, 3, p0, p0) -> (C, 3, p, p) by bicubic interpolation (align_corners=False, no magnitude rescaling)."""
    if weight.shape[-1] == patch_size:
        return weight
    return F.interpolate(weight.float(), size=(patch_size, patch_size), mode="bicubic", align_corners=False).to(weight.dtype)


def resample_position_grid(table: torch.Tensor, new_grid: int, has_cls: bool) -> torch.Tensor:
    """(rows, C) on a g0 x g0 grid (+ class slot first) -> the same on new_grid x new_grid (bicubic)."""
    cls, patch = (table[:1], table[1:]) if has_cls else (table[:0], table)
    g0 = int(round(patch.shape[0] ** 0.5))
    if g0 == new_grid:
        return table
    grid = patch.float().reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([cls.float(), grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1)]).to(table.dtype)


def load_vit_state_dict(cfg: BranchConfig) -> dict[str, torch.Tensor]:
    """Weights of a pretrained transformers vision model, adapted to the branch's patch size."""
    from transformers import AutoModel, CLIPVisionModel, InternVLVisionModel, SiglipVisionModel

    cls = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel, "internvit": InternVLVisionModel}[cfg.type]
    try:
        model = cls.from_pretrained(cfg.pretrained)
    except (ValueError, TypeError):  # a full CLIP / SigLIP / InternVL checkpoint: take its vision part
        model = AutoModel.from_pretrained(cfg.pretrained).vision_model
    state = model.state_dict()
    if cfg.type == "internvit":
        conv_key, pos_key = "embeddings.patch_embeddings.projection.weight", "embeddings.position_embeddings"
    else:
        conv_key, pos_key = "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight"
    if state[conv_key].shape[-1] != cfg.patch_size:
        size = cfg.backbone.get("image_size", 224)
        size = size[0] if isinstance(size, list | tuple) else size
        state[conv_key] = resample_patch_embedding(state[conv_key], cfg.patch_size)
        if pos_key in state:
            table = state[pos_key]
            flat = table[0] if table.ndim == 3 else table
            # a kept pretrained stride (patch_stride) keeps the pretrained grid: resampling is then the identity
            grid = int(size) // (cfg.patch_stride or cfg.patch_size)
            flat = resample_position_grid(flat, grid, has_cls=cfg.type != "siglip")
            state[pos_key] = flat[None] if table.ndim == 3 else flat
        logger.info("resampled %s patch embedding to %d and its position grid", cfg.pretrained, cfg.patch_size)
    return {k: v for k, v in state.items() if not k.endswith("position_ids")}


def load_convnext_state_dict(cfg: BranchConfig) -> dict[str, torch.Tensor]:
    import timm

    return timm.create_model(cfg.pretrained, pretrained=True, num_classes=0).state_dict()


def load_branch_weights(branch: nn.Module, cfg: BranchConfig) -> None:
    """Load `cfg.pretrained` into a built branch; every branch key must be matched."""
    state = load_convnext_state_dict(cfg) if cfg.type == "convnext" else load_vit_state_dict(cfg)
    missing, unexpected = branch.model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"pretrained branch {cfg.pretrained!r} does not match the branch architecture: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}"
        )


def build_model(
    config: PiipLlavaConfig,
    load_branches: bool = True,
    llm_path: str | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> PiipLlavaForConditionalGeneration:
    """Build PIIP-LLaVA from a config; load pretrained branch weights (`BranchConfig.pretrained`) and the LLM.

    Branches without `pretrained` and a missing `llm_path` keep their random initialisation (tiny presets).
    """
    from transformers import AutoModelForCausalLM

    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
        config.text_config._attn_implementation = attn_implementation
    model = PiipLlavaForConditionalGeneration(config)
    if load_branches:
        for cfg, branch in zip(model.vision_tower.branch_cfgs, model.vision_tower.branches):
            if cfg.pretrained:
                load_branch_weights(branch, cfg)
    if llm_path:
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=torch.float32, **kwargs)
        missing, unexpected = model.language_model.load_state_dict(llm.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"LLM {llm_path} does not match text_config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if dtype is not None:
        model = model.to(dtype)
    return model
