"""Convert a released OpenGVLab PIIP-LLaVA (or plain LLaVA-1.5) checkpoint into this project's format (spec §5).

Input: a LLaVA-style folder (`config.json` with `model_type: llava_llama`, safetensors or `.bin` shards with or
without an index, tokenizer files). Its `mm_vision_tower` names the official tower config, a Python file such as
`configs/piip-llava_clip-bl_512-256_7B.py`; that file is **read, never executed**: `ast` extracts the literal
`model = dict(...)` assignment. Keys it leaves out take the defaults of the official `PIIPTwoBranchConfig` (e.g.
`interact_attn_type='normal'`, `deform_num_heads=6`, `with_cffn=False`), as the official loader does.

Branch architectures come from, in this order: (a) a local folder named by the branch's `pretrained` entry
(relative to the `.py` file or the working directory) holding a Hugging Face CLIP `config.json` or a timm
`config.json`, (b) the built-in table of the official branch ids (taken from our presets), (c) the tensor shapes of
the checkpoint, with a `ConversionWarning` naming what shapes cannot tell (CLIP heads and activation). Everything the
official code builds and runs converts: `deform` and `normal` interactions, `norm_layer` `ln` / `none`, with or
without ConvFFN and interaction projections, the `gn` and `ln` projectors with or without `out_shape`, branch pairs
that break our own pyramid rules (warned, kept as `enforce_pyramid=False`), interaction ranges that leave blocks out,
overlap or are empty (run as given: `strict_ranges=False`, warned), and a CLIP whose `patch_size` differs from its
pretrained one (the resized kernel at the pretrained stride: `patch_stride`). Refused, with the reason: only what the
official code cannot build or run either (unknown `model_cls`, ConvNeXt in `2branch_v1`, no `projector` entry,
deformable-attention grids that disagree with the tokens).

Output: `PiipLlavaForConditionalGeneration.save_pretrained(DST)` (safetensors) + the tokenizer files. The load is
strict: any missing or unexpected key aborts with the full list.

    python -m piip_llava.models.convert_official SRC DST [--tower-config PATH]

(`--infer-from-weights` changes nothing: unknown architectures always come from the weights; see docs/converter.md.)
"""
from __future__ import annotations

import argparse
import ast
import glob
import json
import math
import os
import re
import shutil
import sys
import warnings
from typing import Any

import torch

from .configuration_piip_llava import PiipLlavaConfig, PiipVisionConfig, load_preset, preset_names
from .modeling_piip_llava import convert_legacy_key

TOWER_PREFIX = "model.vision_tower.vision_tower."
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
# Llama fields of the LLaVA config.json that make up our text config.
LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "hidden_act",
    "attention_bias", "mlp_bias", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
    "tie_word_embeddings", "head_dim",
)
# Non-persistent buffers that old transformers versions wrote into checkpoints; nothing else is dropped.
NON_PERSISTENT = (re.compile(r".*\.position_ids$"), re.compile(r".*rotary_emb\.inv_freq$"))
# TwoBranchMLP Sequential indices (llava/model/multimodal_projector/builder.py): gn = permute, linear, permute,
# GroupNorm, GELU, permute, linear, permute; ln = permute, linear, ReshapeAndLN (no parameters), GELU, permute,
# linear, permute.
PROJECTOR_PIIP = {"gn": {"1": "linear_1", "3": "norm", "6": "linear_2"}, "ln": {"1": "linear_1", "5": "linear_2"}}
PROJECTOR_MLP = {"0": "linear_1", "2": "linear_2"}  # LLaVA-1.5 mlp2x_gelu
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TIMM_CONVNEXT = {  # timm architecture name -> ConvNeXt kwargs (for a local timm config.json without model_args)
    "convnext_base": {"depths": [3, 3, 27, 3], "dims": [128, 256, 512, 1024]},
    "convnext_large": {"depths": [3, 3, 27, 3], "dims": [192, 384, 768, 1536]},
    "convnext_large_mlp": {"depths": [3, 3, 27, 3], "dims": [192, 384, 768, 1536], "head_hidden_size": 1536},
}
# Defaults of the official `PIIPTwoBranchConfig.__init__` (llava/model/multimodal_encoder/piip/
# configuration_piip_2branch.py): a key missing from a tower `.py` config takes these values in the official code.
OFFICIAL_BACKBONE_DEFAULTS: dict[str, Any] = {
    "n_points": 4, "deform_num_heads": 6, "with_cffn": False, "cffn_ratio": 0.25, "deform_ratio": 1.0,
    "interact_attn_type": "normal", "interaction_drop_path_rate": 0.3, "norm_layer": "ln", "interaction_proj": True,
}
# `PIIPVisionTower.load_model` (piip_encoder.py): the model class and the branch kinds each one can build.
OFFICIAL_MODEL_CLS = {"2branch_v1": ("clip_hf",), "2branch_mix": ("clip_hf", "convnext_timm")}
# Heads of the OpenCLIP ViTs whose heads are not 64 wide (ViT-H/14, ViT-g/14, ViT-bigG/14), by width.
CLIP_HEADS_BY_WIDTH = {1280: 16, 1408: 16, 1664: 16}


class ConversionError(ValueError):
    """The source checkpoint cannot be converted; the message says which file / key / field and why."""


class ConversionWarning(UserWarning):
    """The checkpoint converts, but something was derived or differs from our own conventions; the message says what."""


# ------------------------------------------------------------------ the official .py tower config, without exec
def _literal(node: ast.AST, env: dict[str, Any], where: str) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e, env, where) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        return {_literal(k, env, where): _literal(v, env, where) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value, env, where) for kw in node.keywords if kw.arg is not None}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand, env, where)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Name) and node.id in env:
        return env[node.id]
    raise ConversionError(
        f"{where}:{getattr(node, 'lineno', '?')}: only literal values, dict(...) and earlier literal names are "
        f"allowed in a tower config (got {ast.dump(node)[:80]})"
    )


def parse_tower_config(path: str) -> dict[str, Any]:
    """Read the `model = dict(backbone=..., projector=...)` literal from an official tower config file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    env: dict[str, Any] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                env[stmt.targets[0].id] = _literal(stmt.value, env, path)
            except ConversionError:
                if stmt.targets[0].id == "model":
                    raise
    model = env.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("backbone"), dict):
        raise ConversionError(f"{path}: no literal `model = dict(backbone=dict(...), ...)` assignment found")
    return model


# ------------------------------------------------------------------ branch architectures
def _builtin_backbones() -> dict[str, tuple[str, dict[str, Any]]]:
    """Official branch ids -> (type, backbone kwargs), taken from the presets."""
    table: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in preset_names():
        if name.startswith("tiny-"):
            continue
        for b in load_preset(name).vision_config.branch_configs():
            if b.pretrained:
                table.setdefault(b.pretrained, (b.type, dict(b.backbone)))
    return table


def _local_backbone(pretrained: str, search_dirs: list[str]) -> tuple[str, dict[str, Any]] | None:
    for base in search_dirs:
        folder = pretrained if os.path.isabs(pretrained) else os.path.join(base, pretrained)
        cfg_path = os.path.join(folder, "config.json")
        if not os.path.isfile(cfg_path):
            continue
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        if "architecture" in cfg:  # timm
            args = dict(cfg.get("model_args") or {})
            arch = cfg["architecture"]
            known = TIMM_CONVNEXT.get(arch.split(".")[0])
            if "depths" not in args and known is None:
                raise ConversionError(f"{cfg_path}: timm architecture {arch!r} is not a known ConvNeXt and has no model_args")
            backbone = dict(known or {})
            backbone.update({k: args[k] for k in ("depths", "dims", "head_hidden_size") if k in args})
            return "convnext", backbone
        if cfg.get("model_type") in ("clip", "clip_vision_model") or "vision_config" in cfg:
            from transformers import CLIPVisionConfig

            vision = cfg.get("vision_config", cfg) if cfg.get("model_type") != "clip_vision_model" else cfg
            vc = CLIPVisionConfig(**{k: v for k, v in vision.items() if k not in ("model_type", "architectures")})
            keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                    "patch_size", "hidden_act", "layer_norm_eps", "projection_dim")
            return "clip", {k: getattr(vc, k) for k in keys}
        raise ConversionError(f"{cfg_path}: neither a Hugging Face CLIP config nor a timm config")
    return None


def _backbone_from_weights(
    kind: str, sd: dict[str, torch.Tensor], prefix: str, where: str, pretrain_patch_size: int | None = None
) -> tuple[dict[str, Any], str]:
    """Architecture from tensor shapes -> (backbone kwargs, what the shapes cannot tell, for the warning).

    A CLIP's patch size is the kernel's width unless the official `pretrain_patch_size` says otherwise: a kernel
    resized by the official wrapper keeps the pretrained position grid and stride."""
    if kind == "clip":
        try:
            hidden = sd[prefix + "embeddings.class_embedding"].shape[0]
            patch = pretrain_patch_size or sd[prefix + "embeddings.patch_embedding.weight"].shape[-1]
            rows = sd[prefix + "embeddings.position_embedding.weight"].shape[0]
            ff = sd[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]
        except KeyError as e:
            raise ConversionError(f"{where}: cannot infer the CLIP architecture, {e} is missing") from None
        layers = len({k.split(".")[len(prefix.split(".")) + 1] for k in sd if k.startswith(prefix + "encoder.layers.")})
        grid = math.isqrt(rows - 1)
        if grid * grid != rows - 1:
            raise ConversionError(
                f"{where}: {prefix}embeddings.position_embedding.weight has {rows} rows, not 1 + a square"
            )
        heads = CLIP_HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64))
        backbone = {"hidden_size": hidden, "intermediate_size": ff, "num_hidden_layers": layers,
                    "num_attention_heads": heads, "image_size": grid * patch, "patch_size": patch,
                    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
        assumed = f"{heads} attention head(s) of {hidden // heads}, quick_gelu and LayerNorm eps 1e-5 (OpenAI CLIP)"
        return backbone, assumed + " assumed"
    depths, dims, kernels = [], [], []
    for s in range(8):
        blocks = {int(k[len(prefix):].split(".")[3]) for k in sd if k.startswith(f"{prefix}stages.{s}.blocks.")}
        if not blocks:
            break
        depths.append(max(blocks) + 1)
        dw = sd[f"{prefix}stages.{s}.blocks.0.conv_dw.weight"]
        dims.append(dw.shape[0])
        kernels.append(dw.shape[-1])
    if not depths:
        raise ConversionError(f"{where}: cannot infer the ConvNeXt architecture, no {prefix}stages.*.blocks.* keys")
    stem = sd.get(prefix + "stem.0.weight")
    if stem is None or stem.shape[-1] != 4:
        raise ConversionError(f"{where}: {prefix}stem.0.weight is not the 4x4 patch stem of a ConvNeXt")
    backbone: dict[str, Any] = {"depths": depths, "dims": dims}
    block = prefix + "stages.0.blocks.0."
    if set(kernels) != {7}:
        backbone["kernel_sizes"] = kernels
    if block + "weight" not in sd:  # the layer scale (timm `gamma`, official `weight`): absent in ConvNeXt-V2
        backbone["ls_init_value"] = None
    if block + "mlp.grn.weight" in sd:
        backbone["use_grn"] = True
    if sd[block + "mlp.fc1.weight"].ndim == 4:
        backbone["conv_mlp"] = True
    if block + "conv_dw.bias" not in sd:
        backbone["conv_bias"] = False
    if prefix + "norm_pre.weight" in sd:
        backbone["head_norm_first"] = True
    if prefix + "head.pre_logits.fc.weight" in sd:
        backbone["head_hidden_size"] = sd[prefix + "head.pre_logits.fc.weight"].shape[0]
    return backbone, "timm ConvNeXt defaults (GELU, LayerNorm eps 1e-6) assumed"


def _official_ranges(k: int, b: dict[str, Any], depth: int, model_cls: str, where: str) -> list[list[int]]:
    """Each official range `r` runs `blocks[r[0]:r[-1] + 1]` (Python slice semantics, modeling_piip_2branch*.py
    forward) -> our inclusive [first, last] of that slice; an empty slice -> [0, -1]."""
    ranges, out = b.get("interaction_indexes", []), []
    for r in ranges:
        if not isinstance(r, (list, tuple)) or not r or not all(isinstance(i, int) for i in r):
            raise ConversionError(f"{where}: branch{k}.interaction_indexes entry {r!r} is not a list of block "
                                  "indexes (the official forward slices blocks[r[0]:r[-1] + 1])")
        if model_cls == "2branch_mix" and not -depth <= r[-1] < depth:  # out_dims[r[-1]] in its __init__
            raise ConversionError(f"{where}: branch{k}.interaction_indexes entry {r!r} ends outside blocks "
                                  f"0..{depth - 1}; the official 2branch_mix model fails to build (out_dims[{r[-1]}])")
        run = list(range(depth))[r[0]: r[-1] + 1]
        if not run and model_cls == "2branch_mix":  # forward_blocks returns 2 values where 4 are unpacked
            raise ConversionError(f"{where}: branch{k}.interaction_indexes entry {r!r} runs no block; the official "
                                  "2branch_mix forward fails on an empty range")
        out.append([run[0], run[-1]] if run else [0, -1])
    return out


def _tiles(ranges: list[list[int]], depth: int) -> bool:
    """Whether the ranges run blocks 0..depth-1 each once, in order, none empty (our configs' default rule)."""
    return all(e >= s for s, e in ranges) and [i for s, e in ranges for i in range(s, e + 1)] == list(range(depth))


def _branch_entry(
    k: int, b: dict[str, Any], builtin: dict[str, tuple[str, dict[str, Any]]], search_dirs: list[str],
    state_dict: dict[str, torch.Tensor] | None, where: str, model_cls: str = "2branch_v1",
) -> dict[str, Any]:
    """One official `branchK` dict -> our branch dict (the architecture resolved as the module docstring says)."""
    model_type = b.get("model_type", "clip_hf")
    kind = {"clip_hf": "clip", "convnext_timm": "convnext"}[model_type]
    pretrained = b.get("pretrained")
    found = _local_backbone(pretrained, search_dirs) if pretrained else None
    if found is None and pretrained in builtin:
        found = builtin[pretrained]
    if found is None and state_dict is not None:
        sub = "clip_model." if kind == "clip" else "convnext_model."
        pre = b.get("pretrain_patch_size") if kind == "clip" else None
        backbone, assumed = _backbone_from_weights(kind, state_dict, f"{TOWER_PREFIX}branch{k}.{sub}", where,
                                                   None if pre is None else int(pre))
        found = (kind, backbone)
        warnings.warn(
            f"{where}: branch{k}.pretrained {pretrained!r} is neither a local folder with a config.json (searched: "
            f"{', '.join(search_dirs)}) nor a known official id: its architecture comes from the checkpoint's shapes "
            f"({assumed}; a folder named like `pretrained` next to the .py config, holding the model's config.json, "
            "overrides this)", ConversionWarning, stacklevel=4,
        )
    if found is None:
        raise ConversionError(
            f"{where}: branch{k}.pretrained {pretrained!r} is not a known official branch id "
            f"({', '.join(sorted(builtin))}) nor a local folder with a config.json (searched: "
            f"{', '.join(search_dirs)}), and no weights were given to derive it from"
        )
    if found[0] != kind:
        raise ConversionError(f"{where}: branch{k} is {model_type} but {pretrained!r} describes a {found[0]} model")
    backbone = dict(found[1])
    depth = (int(backbone["num_hidden_layers"]) if kind == "clip"
             else sum(backbone["depths"]) + len(backbone["depths"]) - 1)
    entry: dict[str, Any] = {"type": kind, "image_size": int(b["img_size"]), "backbone": backbone,
                             "pretrained": pretrained,
                             "interaction_indexes": _official_ranges(k, b, depth, model_cls, where)}
    entry["strict_ranges"] = _tiles(entry["interaction_indexes"], depth)
    if not entry["strict_ranges"]:
        run = [i for start, end in entry["interaction_indexes"] for i in range(start, end + 1)]
        never = sorted(set(range(depth)) - set(run))
        twice = sorted({i for i in run if run.count(i) > 1})
        empty = sum(end < start for start, end in entry["interaction_indexes"])
        facts = ([f"blocks {never} never run"] if never else []) + \
            ([f"blocks {twice} run more than once"] if twice else []) + \
            ([f"{empty} range(s) run no block"] if empty else [])
        warnings.warn(
            f"{where}: branch{k}.interaction_indexes {b['interaction_indexes']} do not tile its {depth} blocks: "
            f"{', '.join(facts) or 'not in order'}, as in the official forward (blocks[r[0]:r[-1] + 1] before each "
            "interaction); saved with strict_ranges false", ConversionWarning, stacklevel=4,
        )
    if kind == "clip":
        pre_patch = int(backbone.get("patch_size", 16))
        pre = b.get("pretrain_patch_size")
        if pre is not None and int(pre) != pre_patch:  # CLIPHFWrapper asserts the same
            raise ConversionError(
                f"{where}: branch{k}.pretrain_patch_size {pre} differs from {pretrained!r}'s patch size {pre_patch}"
            )
        patch = int(b.get("patch_size", pre_patch))
        entry["patch_size"] = patch
        if patch != pre_patch:  # CLIPHFWrapper resizes the kernel's weight, not the conv's stride or position table
            entry["patch_stride"] = pre_patch
        entry["use_cls_token"] = bool(b.get("use_cls_token", False))  # official default: False
    return entry


def vision_config_from_official(
    tower_cfg: dict[str, Any],
    search_dirs: list[str],
    state_dict: dict[str, torch.Tensor] | None = None,
    infer_from_weights: bool = False,
    where: str = "tower config",
) -> tuple[PiipVisionConfig, str]:
    """Official `model` dict -> (PiipVisionConfig, the official projector dict, checked).

    Mirrors `PIIPVisionTower` / `PIIPTwoBranchModel` / `PIIPTwoBranchMixModel`: two branches, official defaults for
    missing keys, branch1 fed the full image when its `img_size` is not smaller than branch2's. Branch architectures
    unknown by id come from `state_dict`'s shapes whenever it is given (`infer_from_weights` changes nothing; it
    keeps existing calls valid).
    """
    del infer_from_weights
    bb = tower_cfg["backbone"]
    model_cls = bb.get("model_cls", "2branch_v1")
    if model_cls not in OFFICIAL_MODEL_CLS:
        raise ConversionError(f"{where}: model_cls {model_cls!r} is not one of {sorted(OFFICIAL_MODEL_CLS)}")
    for k in (1, 2):
        if not isinstance(bb.get(f"branch{k}"), dict):
            raise ConversionError(f"{where}: backbone has no branch{k} (the official towers have exactly two)")
        model_type = bb[f"branch{k}"].get("model_type", "clip_hf")
        if model_type not in OFFICIAL_MODEL_CLS[model_cls]:
            raise ConversionError(f"{where}: branch{k}.model_type {model_type!r} is not one {model_cls} builds "
                                  f"({', '.join(OFFICIAL_MODEL_CLS[model_cls])})")
    extra = sorted(key for key in bb if re.fullmatch(r"branch\d+", key) and key not in ("branch1", "branch2"))
    if extra:
        warnings.warn(f"{where}: {', '.join(extra)} ignored, as the official two-branch towers ignore them",
                      ConversionWarning, stacklevel=2)
    builtin = _builtin_backbones()
    branches = [_branch_entry(k, dict(bb[f"branch{k}"]), builtin, search_dirs, state_dict, where, model_cls)
                for k in (1, 2)]
    if branches[0]["image_size"] >= branches[1]["image_size"]:
        # forward(): x1 = interpolate(x, scale_factor=img1 / img2) only when that factor is < 1, else x.clone()
        warnings.warn(
            f"{where}: branch1.img_size {branches[0]['image_size']} is not smaller than branch2.img_size "
            f"{branches[1]['image_size']}; as in the official forward, branch1 sees the {branches[1]['image_size']} px "
            "image", ConversionWarning, stacklevel=2,
        )
        branches[0]["image_size"] = branches[1]["image_size"]

    opts = {key: bb.get(key, default) for key, default in OFFICIAL_BACKBONE_DEFAULTS.items()}
    if opts["interact_attn_type"] not in ("deform", "normal"):
        raise ConversionError(f"{where}: interact_attn_type {opts['interact_attn_type']!r} is not deform or normal")
    if opts["norm_layer"] not in ("ln", "none"):
        raise ConversionError(f"{where}: norm_layer {opts['norm_layer']!r} is not 'ln' or 'none'")
    interaction = {
        "attn_type": opts["interact_attn_type"],
        "num_heads": int(opts["deform_num_heads"]),
        "n_points": int(opts["n_points"]),
        "deform_ratio": float(opts["deform_ratio"]),
        "with_cffn": bool(opts["with_cffn"]),
        "cffn_ratio": float(opts["cffn_ratio"]),
        "drop_path_rate": float(opts["interaction_drop_path_rate"]),
        "with_proj": bool(opts["interaction_proj"]),
        "norm": opts["norm_layer"],
        "norm_eps": 1e-6,
    }
    proj = tower_cfg.get("projector")
    if not isinstance(proj, dict):  # build_vision_projector falls back to mm_projector_type, which cannot take 2 maps
        raise ConversionError(f"{where}: no `projector=dict(type='separate_2branch_v1', ...)` entry")
    if proj.get("type") != "separate_2branch_v1":
        raise ConversionError(f"{where}: projector type {proj.get('type')!r} is not separate_2branch_v1")
    if proj.get("norm") not in ("gn", "ln"):
        raise ConversionError(f"{where}: projector norm {proj.get('norm')!r} is not 'gn' or 'ln'")
    vision = PiipVisionConfig(branches=branches, interaction=interaction, enforce_pyramid=False)
    if interaction["attn_type"] == "deform":
        _check_deform_grids(vision, [bb["branch1"], bb["branch2"]], where)
    vision.enforce_pyramid = not vision.pyramid_violations()  # official inputs: our size rules only warn
    return vision, proj


def _check_deform_grids(vision: PiipVisionConfig, official: list[dict[str, Any]], where: str) -> None:
    """The official forward sizes each deformable attention's grids from the image size and the stride it assumes
    (`patch_size`, or ConvNeXt `downsample_ratios[r[-1]]`), not from the tokens; MSDeformAttn asserts that they agree.
    Where they do not (a resized CLIP kernel at its old stride, a skipped or repeated downsampling layer), the
    official code cannot run the checkpoint, so neither does the converter."""
    for k, (cfg, b) in enumerate(zip(vision.branch_configs(), official), start=1):
        for i, ((start, end), (_, grid)) in enumerate(zip(cfg.interaction_indexes, cfg.range_outputs())):
            ratios = b.get("downsample_ratios")
            if cfg.type == "clip":
                ratio = cfg.patch_size
            elif isinstance(ratios, list) and len(ratios) == cfg.depth:
                ratio = int(ratios[end])
            else:
                ratio = cfg.strides[end]
            if cfg.image_size // ratio != grid:
                raise ConversionError(
                    f"{where}: branch{k} gives {grid}x{grid} tokens at interaction {i}, but the official deformable "
                    f"attention expects {cfg.image_size} // {ratio} = {cfg.image_size // ratio} per side; its "
                    "MSDeformAttn shape assertion fails, so the official code cannot run this checkpoint (with "
                    "interact_attn_type='normal' it can)"
                )


def _resolve_tower_py(name: str, src: str, override: str | None) -> str:
    candidates = [override] if override else [os.path.join(src, name), os.path.join(os.getcwd(), name)]
    for c in candidates:
        if c and os.path.isfile(c):
            return c
    raise ConversionError(
        f"{os.path.join(src, 'config.json')}: mm_vision_tower {name!r} not found (looked in: "
        f"{', '.join(candidates)}); pass --tower-config PATH"
    )


def text_config_from_llava(llava_cfg: dict[str, Any]) -> dict[str, Any]:
    text = {k: llava_cfg[k] for k in LLAMA_FIELDS if k in llava_cfg}
    text["model_type"] = "llama"
    return text


def build_config(
    src: str,
    state_dict: dict[str, torch.Tensor] | None = None,
    tower_config: str | None = None,
    infer_from_weights: bool = False,
) -> PiipLlavaConfig:
    """PiipLlavaConfig for the checkpoint folder `src` (`state_dict`: its weights, from which branch architectures
    unknown by id are derived; `infer_from_weights` changes nothing)."""
    cfg_path = os.path.join(src, "config.json")
    with open(cfg_path, encoding="utf-8") as f:
        llava = json.load(f)
    if llava.get("model_type") not in ("llava_llama", "llava"):
        raise ConversionError(f"{cfg_path}: model_type {llava.get('model_type')!r}, expected 'llava_llama'")
    tower = llava.get("mm_vision_tower") or llava.get("vision_tower")
    if not tower:
        raise ConversionError(f"{cfg_path}: no mm_vision_tower field")
    aspect = llava.get("image_aspect_ratio", "pad")
    if aspect not in ("pad", "square"):
        raise ConversionError(f"{cfg_path}: image_aspect_ratio {aspect!r} is not supported (pad or square)")
    common = {"text_config": text_config_from_llava(llava), "image_aspect_ratio": aspect}
    if tower.endswith(".py"):
        py = _resolve_tower_py(tower, src, tower_config)
        vision, proj = vision_config_from_official(
            parse_tower_config(py), [os.path.dirname(os.path.abspath(py)), os.getcwd()], state_dict,
            infer_from_weights, where=py,
        )
        return PiipLlavaConfig(vision_config=vision, projector_type="piip_mlp", projector_norm=proj["norm"],
                               projector_groups=32, projector_out_shape=proj.get("out_shape"), **common)
    # plain LLaVA-1.5: a CLIP tower named by hub id or local folder, penultimate layer, patch features
    if llava.get("mm_vision_select_feature", "patch") != "patch":
        raise ConversionError(f"{cfg_path}: mm_vision_select_feature must be 'patch'")
    if llava.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConversionError(f"{cfg_path}: mm_projector_type {llava.get('mm_projector_type')!r} is not mlp2x_gelu")
    search = [src, os.getcwd()]
    probe = _local_backbone(tower, search) or _builtin_backbones().get(tower)
    if probe is None and state_dict is not None:
        backbone, assumed = _backbone_from_weights("clip", state_dict, TOWER_PREFIX + "vision_model.", cfg_path)
        probe = ("clip", backbone)
        warnings.warn(f"{cfg_path}: vision tower {tower!r} is neither a local folder with a config.json nor a known "
                      f"id: its architecture comes from the checkpoint's shapes ({assumed})", ConversionWarning,
                      stacklevel=2)
    if probe is None:
        raise ConversionError(f"{cfg_path}: vision tower {tower!r} is not a known CLIP id nor a local folder, and no "
                              "weights were given to derive it from")
    backbone = probe[1]
    branch = {"type": "clip", "image_size": backbone["image_size"], "backbone": backbone, "pretrained": tower,
              "patch_size": backbone["patch_size"], "use_cls_token": True, "interaction_indexes": [],
              "select_layer": int(llava.get("mm_vision_select_layer", -2))}
    mean, std = CLIP_MEAN, CLIP_STD  # LLaVA-1.5 normalises with the CLIP processor's statistics
    return PiipLlavaConfig(vision_config={"branches": [branch], "interaction": {}}, projector_type="mlp2x_gelu",
                           image_mean=mean, image_std=std, **common)


# ------------------------------------------------------------------ weights
def load_official_state_dict(src: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: safetensors or .bin shards, with or without an index file."""
    files: list[str] = []
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"), ("pytorch_model.bin.index.json", "*.bin")):
        index = os.path.join(src, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(src, x) for x in files]
            break
        found = sorted(glob.glob(os.path.join(src, pattern)))
        found = [x for x in found if os.path.basename(x) not in ("mm_projector.bin", "training_args.bin")]
        if found:
            files = found
            break
    if not files:
        raise ConversionError(f"{src}: no *.safetensors or *.bin weight files")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            part = load_file(path)
        else:
            part = torch.load(path, map_location="cpu", weights_only=True)
        dup = set(part) & set(state)
        if dup:
            raise ConversionError(f"{path}: keys also present in another shard: {sorted(dup)[:5]}")
        state.update(part)
    return state


def _convert_key(key: str, projector_norm: str = "gn") -> str:
    """Official name -> this project's flat name (`convert_legacy_key` then gives the HF layout)."""
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if key.startswith(TOWER_PREFIX):
        rest = key[len(TOWER_PREFIX):]
        m = re.match(r"branch(\d+)\.(clip_model|convnext_model)\.(.*)$", rest)
        if m:
            inner = m.group(3)
            if m.group(2) == "convnext_model":
                inner = re.sub(r"^(stages\.\d+\.blocks\.\d+)\.weight$", r"\1.gamma", inner)
            return f"vision_tower.branches.{int(m.group(1)) - 1}.model.{inner}"
        if rest.startswith("interactions."):
            return "vision_tower." + rest
        if rest.startswith("vision_model."):  # LLaVA-1.5 CLIPVisionTower
            return "vision_tower.branches.0.model." + rest[len("vision_model."):]
        return key  # unknown: reported as unexpected
    m = re.match(r"model\.mm_projector\.branch(\d+)\.(\d+)\.(weight|bias)$", key)
    indices = PROJECTOR_PIIP.get(projector_norm, {})
    if m and m.group(2) in indices:
        return f"multi_modal_projector.branches.{int(m.group(1)) - 1}.{indices[m.group(2)]}.{m.group(3)}"
    m = re.match(r"model\.mm_projector\.(\d+)\.(weight|bias)$", key)
    if m and m.group(1) in PROJECTOR_MLP:
        return f"multi_modal_projector.{PROJECTOR_MLP[m.group(1)]}.{m.group(2)}"
    if key.startswith("model.") and not key.startswith("model.mm_projector."):
        return "language_model." + key
    return key


def _fuse_cross_attention(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`normal` interactions: the official `CrossAttention` (piip_modules.py) has bias-free `wq`, `wk`, `wv` and a
    `proj`; ours has `q`, one `kv` whose output rows are [k; v], and `proj`: the same linear maps, renamed and stacked.
    A `wk` without its `wv` (or the reverse) keeps its name, so that the strict load reports it."""
    out = dict(state_dict)
    for key in state_dict:
        m = re.match(re.escape(TOWER_PREFIX) + r"(interactions\.\d+\..*\.attn\.)w([qkv])\.(weight|bias)$", key)
        if not m or key not in out:
            continue
        base, which, kind = TOWER_PREFIX + m.group(1), m.group(2), m.group(3)
        if which == "q":
            out[f"{base}q.{kind}"] = out.pop(key)
        elif f"{base}wk.{kind}" in out and f"{base}wv.{kind}" in out:
            out[f"{base}kv.{kind}"] = torch.cat([out.pop(f"{base}wk.{kind}"), out.pop(f"{base}wv.{kind}")], dim=0)
    return out


def convert_official_state_dict(
    state_dict: dict[str, torch.Tensor], config: PiipLlavaConfig | None = None
) -> dict[str, torch.Tensor]:
    """Official key names -> ours (spec §5). Only non-persistent buffers (`position_ids`, `inv_freq`) are dropped;
    keys with no mapping keep their name so that a strict load reports them. With `config`, the number of
    interactions in the weights is checked against it (the 13B ConvNeXt 24-vs-12 pitfall) and the projector's
    Sequential indices are those of its norm (`gn` without a config)."""
    norm = "gn"
    if config is not None:
        check_interaction_count(state_dict, config)
        norm = config.projector_norm
    out: dict[str, torch.Tensor] = {}
    for key, value in _fuse_cross_attention(state_dict).items():
        if any(p.match(key) for p in NON_PERSISTENT):
            continue
        new = convert_legacy_key(_convert_key(key, norm))
        if new in out:
            raise ConversionError(f"two checkpoint keys map to {new!r} (one is {key!r})")
        out[new] = value
    return out


def check_interaction_count(state_dict: dict[str, torch.Tensor], config: PiipLlavaConfig) -> None:
    found = {int(m.group(1)) for k in state_dict if (m := re.match(re.escape(TOWER_PREFIX) + r"interactions\.(\d+)\.", k))}
    expected = config.vision_config.num_interactions
    have = max(found) + 1 if found else 0
    if have != expected:
        raise ConversionError(
            f"the checkpoint has {have} interaction blocks (highest index {have - 1}) but the tower config declares "
            f"{expected} (interaction_indexes); use the config the checkpoint was trained with (the official 13B "
            "ConvNeXt configs declare 24 interactions, the 7B ones 12)"
        )


def load_converted(config: PiipLlavaConfig, state_dict: dict[str, torch.Tensor]):
    """Build the model on the meta device and assign the converted tensors; fail listing missing/unexpected keys."""
    from .modeling_piip_llava import PiipLlavaForConditionalGeneration

    with torch.device("meta"):
        model = PiipLlavaForConditionalGeneration(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing key(s):\n  " + "\n  ".join(missing))
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected key(s):\n  " + "\n  ".join(unexpected))
        raise ConversionError("converted weights do not match the model:\n" + "\n".join(lines))
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
           for k, v in state_dict.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ConversionError("shape mismatch (wrong architecture for these weights):\n  " + "\n  ".join(bad))
    model.load_state_dict(state_dict, strict=True, assign=True)
    # Non-persistent buffers (position ids, rotary frequencies) are still on the meta device: take them from a
    # fresh CPU copy of their (small, config-built) module.
    for name, module in model.named_modules():
        meta = [b for b, buf in module.named_buffers(recurse=False) if buf.is_meta]
        if meta:
            try:
                fresh = type(module)(config=module.config)
            except (AttributeError, TypeError) as e:
                raise ConversionError(f"cannot rebuild the buffers {meta} of {name} ({type(module).__name__}): {e}") from e
            for b in meta:
                module.register_buffer(b, getattr(fresh, b), persistent=False)
    return model.eval()


def load_official_checkpoint(src: str, tower_config: str | None = None, infer_from_weights: bool = False):
    """Official checkpoint folder -> `PiipLlavaForConditionalGeneration` in memory (nothing written)."""
    state = load_official_state_dict(src)
    config = build_config(src, state, tower_config, infer_from_weights)
    return load_converted(config, convert_official_state_dict(state, config))


def convert_checkpoint(
    src: str, dst: str, tower_config: str | None = None, infer_from_weights: bool = False
) -> PiipLlavaConfig:
    """Convert folder `src` into folder `dst` (model + tokenizer); returns the config written."""
    state = load_official_state_dict(src)
    config = build_config(src, state, tower_config, infer_from_weights)
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    converted = convert_official_state_dict(state, config)
    del state
    model = load_converted(config, converted)
    if len(dtypes) == 1:
        model.config.dtype = next(iter(dtypes))
    os.makedirs(dst, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    if any(os.path.isfile(os.path.join(dst, n)) for n in ("tokenizer.json", "tokenizer.model")):
        from ..data.tokenizer import load_tokenizer
        from .processing_piip_llava import save_processor

        try:
            save_processor(model.config, load_tokenizer(dst), dst)  # adds <image>, the chat template and the code
        except (OSError, ValueError) as e:
            print(f"warning: the tokenizer copied from {src} does not load ({e}); the processor files "
                  "(processor_config.json, chat_template.jinja) were not written", file=sys.stderr)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m piip_llava.models.convert_official", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="official checkpoint folder (config.json + weights + tokenizer)")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--tower-config", default=None, help="path of the official tower .py config (overrides mm_vision_tower)")
    parser.add_argument("--infer-from-weights", action="store_true",
                        help="no effect: unknown branches are always derived from the weights")
    parser.add_argument("--debug", action="store_true", help="a traceback instead of a one-line error (or PIIP_DEBUG=1)")
    args = parser.parse_args(argv)
    from .loading import check_checkpoint, cli_error

    try:
        check_checkpoint(args.src, "official", "src")  # a missing folder / config / weights, or one of ours
        config = convert_checkpoint(args.src, args.dst, args.tower_config, args.infer_from_weights)
    except (ValueError, OSError) as e:  # CheckpointError, ConversionError, invalid resulting config, unreadable files
        return cli_error(e, args.debug)
    vc = config.vision_config
    print(f"converted {args.src} -> {args.dst}: {vc.num_branches} branch(es), {vc.num_interactions} interaction(s), "
          f"{config.num_image_tokens} visual tokens, projector {config.projector_type}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
