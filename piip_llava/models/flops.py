"""Vision-encoder FLOPs and parameter counts of a PIIP-LLaVA architecture, without weights (spec §6).

The tower is built on the meta device (no memory, no download) and run once on a meta image of the
highest-resolution branch size; forward hooks count multiply-accumulates with the rules of the mmcv-style counter
the paper used (`llava/flops_counter.py` + `llava/get_flops_llava.py` in OpenGVLab/PIIP):

* `nn.Linear`: input elements x output features; `nn.Conv2d`: kernel MACs x output positions (+ one per output
  element for the bias); exact-type `nn.LayerNorm` / `nn.GroupNorm`: input elements (x2 with affine parameters).
  Subclasses (timm `LayerNorm` / `LayerNorm2d` in ConvNeXt) and activations (GELU) are not counted.
* Added by hand: ViT self-attention 2*N^2*d per layer run (N = patch tokens, class token excluded); deformable
  sampling 5*h*w*K*d per direction (h x w = query grid, K = sampling points, d = query width); plain cross-attention
  ('normal') 2*Nq*Nk*d per direction.

"FLOPs" are therefore MACs, as in the paper. Only the vision tower is counted (the paper's "FLOPs of the vision
encoder"); projector and LLM are reported as parameter counts.

Three conventions need a word:
* Official quirk (only with `official_quirks=True`): the official mix model (ConvNeXt branch) counts the deformable
  term of every interaction on the grid of the *first* interaction's range. By default the grid each interaction
  really uses is counted.
* Single-branch towers with `select_layer` (the LLaVA-1.5 baseline) stop early in our tower (23 of 24 layers run);
  the paper's figure counts the whole backbone, which the official LLaVA-1.5 tower runs before it selects a layer.
  `total` follows the paper (whole backbone); `executed` is what our tower runs.
* `strict_ranges=False` / `patch_stride` checkpoints: `total` = `executed`, each block run at its real tokens as the
  official tower runs it (a block in two ranges counts twice, one in no range nothing; docs/converter.md).

CLI: `python -m piip_llava.models.flops PRESET [PRESET ...] | --all [--official-quirks] [--json]`.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from ..layers.deform_attn import CrossAttention, DeformableAttention
from .configuration_piip_llava import BranchConfig, PiipLlavaConfig, PiipVisionConfig, load_preset, preset_names
from .modeling_piip_vision import PiipVisionTower, ViTBranch

# README multimodal table (vision-encoder FLOPs, G); the 13B ConvNeXt rows repeat the 12-interaction 7B figures.
README_GFLOPS = {
    "llava-1.5_clip-l-336_7B": 191.0,
    "llava-1.5_clip-l-336_13B": 191.0,
    "piip-llava_clip-bl_512-256_7B": 193.0,
    "piip-llava_convnext-b_clip-l_640-224_7B": 191.0,
    "piip-llava_clip-bl_512-448_7B": 422.0,
    "piip-llava_clip-bl_512-448_13B": 422.0,
    "piip-llava_convnext-b_clip-l_1024-336_7B": 598.0,
    "piip-llava_convnext-b_clip-l_1024-336_13B": 598.0,
    "piip-llava_convnext-l_clip-l_1024-336_7B": 1037.0,
    "piip-llava_convnext-l_clip-l_1024-336_13B": 1037.0,
    "piip-llava-plus_convnext-l_clip-l_1024-336_7B": 1037.0,
}


def _linear_macs(m: nn.Linear, inp: torch.Tensor, out: torch.Tensor) -> int:
    return inp.numel() * out.shape[-1]


def _conv_macs(m: nn.Conv2d, inp: torch.Tensor, out: torch.Tensor) -> int:
    positions = out.shape[0] * out.shape[2:].numel()
    kernel = m.kernel_size[0] * m.kernel_size[1] * m.in_channels * (m.out_channels // m.groups)
    return kernel * positions + (m.out_channels * positions if m.bias is not None else 0)


def _norm_macs(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    affine = getattr(m, "affine", False) or getattr(m, "elementwise_affine", False)
    return inp.numel() * (2 if affine else 1)


# Exact types only (type(m) in ..., not isinstance): subclasses such as timm's LayerNorm2d are not counted.
_COUNTED = {nn.Linear: _linear_macs, nn.Conv2d: _conv_macs, nn.LayerNorm: _norm_macs, nn.GroupNorm: _norm_macs}


def _vision_config(config: PiipLlavaConfig | PiipVisionConfig) -> PiipVisionConfig:
    return config.vision_config if isinstance(config, PiipLlavaConfig) else config


def _params(module: nn.Module | None) -> int | None:
    return None if module is None else sum(p.numel() for p in module.parameters())


def block_runs(cfg: BranchConfig) -> list[tuple[int, int, int]]:
    """(block, width, grid side of its output) of each block run, in the tower's order: the interaction ranges in
    turn (a block in two ranges appears twice, a block in none never), or blocks 0..select_layer of a single branch.

    ViT grids are the patch conv's real output, `(R - patch_size) // stride + 1` a side (`patch_stride` branches
    included); a ConvNeXt downsampling layer halves the grid only when it runs, as `BranchConfig.range_outputs`.
    """
    if cfg.interaction_indexes:
        ranges = cfg.interaction_indexes
    else:
        ranges = [[0, cfg.depth + cfg.select_layer if cfg.select_layer < 0 else cfg.select_layer]]
    blocks = [b for start, end in ranges for b in range(start, end + 1)]
    if cfg.type != "convnext":
        width, grid = cfg.range_outputs()[0]
        return [(b, width, grid) for b in blocks]
    strides, dims, grid, out = cfg.strides, cfg.out_dims, cfg.image_size // 4, []
    for b in blocks:
        if b > 0 and strides[b] != strides[b - 1]:  # the first block of a later stage is its downsampling layer
            grid //= 2
        out.append((b, dims[b], grid))
    return out


@torch.no_grad()
def count_vision_flops(
    config: PiipLlavaConfig | PiipVisionConfig, official_quirks: bool = False, count_llm: bool = True
) -> dict[str, Any]:
    """MACs of one image through the vision tower (batch 1, highest branch resolution) and parameter counts.

    Returns a dict with `total` (paper convention, see module docstring), `executed`, `quirk_delta` (what the
    official counter's grid quirk adds; 0 when `official_quirks`), `branches` (per branch: `modules`, `self_attn`,
    `total`, `skipped_layers`, `block_runs`, `never_run`, `run_twice_or_more`, `params`), `interactions` (`modules`,
    `attn` = deformable/cross-attention term, `total`, `per_interaction`, `params`), `params` (`branches`,
    `interactions`, `tower`, `projector`, `llm`; projector/LLM are None for a bare `PiipVisionConfig`),
    `image_size` and `official_quirks`.
    """
    vcfg = _vision_config(config)
    branch_cfgs = vcfg.branch_configs()
    with torch.device("meta"):
        tower = PiipVisionTower(vcfg)
    tower.eval()

    branch_macs: dict[int, int] = defaultdict(int)
    branch_attn: dict[int, int] = defaultdict(int)
    inter_macs: dict[int, int] = defaultdict(int)
    inter_attn: dict[int, int] = defaultdict(int)
    inter_attn_quirk: dict[int, int] = defaultdict(int)  # the same term on the official counter's grids
    layer_runs: dict[int, list[int]] = defaultdict(list)  # per ViT branch: MACs of each layer run (for the paper total)
    handles = []

    def owner(name: str) -> tuple[str, int]:
        parts = name.split(".")
        return parts[0], int(parts[1])

    # Grids the official mix model uses for every interaction's deformable term (quirk): the first interaction's. It
    # computes them as image // patch_size (ConvNeXt: // stride), equal to the tokens wherever its MSDeformAttn runs;
    # the token grid also holds for a resized CLIP kernel at its old stride ((R - p) // stride + 1, not R // stride).
    quirk_hw = [(c.range_outputs()[0][1],) * 2 if c.interaction_indexes else None for c in branch_cfgs]

    for name, module in tower.named_modules():
        if not name or "." not in name:
            continue
        kind, idx = owner(name)
        counter = _COUNTED.get(type(module))
        if counter is not None:
            bucket = branch_macs if kind == "branches" else inter_macs

            def hook(m, args, out, _c=counter, _b=bucket, _i=idx):
                _b[_i] += _c(m, args[0], out)

            handles.append(module.register_forward_hook(hook))
        if isinstance(module, DeformableAttention):
            # name: interactions.{i}.interaction_units_{a}{b}.branch{x}to{y}_injector.attn; query branch = y.
            unit, injector = name.split(".")[2], name.split(".")[3]
            first = int(unit[len("interaction_units_"):][0]) - 1  # 0-based index of the pair's branch "1"
            query_branch = first + (0 if injector.startswith("branch2to1") else 1)

            def deform_hook(m, args, out, _i=idx, _q=query_branch):
                query, (h, w), (qh, qw) = args[0], args[1], quirk_hw[_q]
                per_cell = 5 * m.n_points * query.shape[-1] * query.shape[0]
                inter_attn[_i] += per_cell * h * w
                inter_attn_quirk[_i] += per_cell * qh * qw

            handles.append(module.register_forward_hook(deform_hook))
        if isinstance(module, CrossAttention):

            def cross_hook(m, args, out, _i=idx):
                query, feat = args[0], args[2]
                macs = 2 * query.shape[1] * feat.shape[1] * query.shape[-1] * query.shape[0]
                inter_attn[_i] += macs
                inter_attn_quirk[_i] += macs

            handles.append(module.register_forward_hook(cross_hook))

    for j, branch in enumerate(tower.branches):
        if not isinstance(branch, ViTBranch):
            continue
        for layer in branch.layers:

            def sa_hook(m, args, out, _j=j, _cls=branch.has_cls):
                x = args[0]
                n = x.shape[1] - (1 if _cls else 0)
                macs = 2 * n * n * x.shape[-1] * x.shape[0]
                branch_attn[_j] += macs
                layer_runs[_j].append(macs)

            handles.append(layer.register_forward_hook(sa_hook))
            # Linear/LayerNorm MACs of each layer run, to extrapolate the layers after select_layer.
            for sub in layer.modules():
                counter = _COUNTED.get(type(sub))
                if counter is not None:
                    handles.append(sub.register_forward_hook(_pending_adder(layer_runs, j, counter)))

    size = vcfg.image_size
    tower(torch.empty(1, 3, size, size, device="meta"))
    for h in handles:
        h.remove()

    branches = []
    executed = 0
    paper_extra = 0
    for j, (cfg, branch) in enumerate(zip(branch_cfgs, tower.branches)):
        total_j = branch_macs[j] + branch_attn[j]
        executed += total_j
        planned = [b for b, _, _ in block_runs(cfg)]
        skipped = 0
        if isinstance(branch, ViTBranch) and not cfg.interaction_indexes:
            # layers after select_layer: the paper counts the whole backbone (identical layers, same tokens). Blocks
            # outside every interaction range are not such layers: the official tower never runs them either.
            runs = _finalise_runs(layer_runs[j])
            skipped = cfg.depth - len(planned)
            if skipped > 0 and runs:
                paper_extra += skipped * runs[-1]
        branches.append(
            {
                "type": cfg.type,
                "image_size": cfg.image_size,
                "pretrained": cfg.pretrained,
                "modules": branch_macs[j],
                "self_attn": branch_attn[j],
                "total": total_j,
                "skipped_layers": skipped,  # after select_layer: not run, counted in `total`
                "block_runs": len(planned),
                "never_run": sorted(set(range(cfg.depth)) - set(planned)) if cfg.interaction_indexes else [],
                "run_twice_or_more": sorted({b for b in planned if planned.count(b) > 1}),
                "params": _params(branch),
            }
        )
    quirk_delta = sum(inter_attn_quirk.values()) - sum(inter_attn.values())
    attn = inter_attn_quirk if official_quirks else inter_attn
    per_inter = [inter_macs[i] + attn[i] for i in range(len(tower.interactions))]
    inter_total = sum(per_inter)
    executed += inter_total

    proj_params = llm_params = None
    if isinstance(config, PiipLlavaConfig) and config.text_config is not None:
        from .modeling_piip_llava import build_projector

        with torch.device("meta"):
            proj_params = _params(build_projector(config, tower.out_dims))
            if count_llm:
                from transformers import AutoModelForCausalLM

                llm_params = _params(AutoModelForCausalLM.from_config(config.text_config))
    params = {
        "branches": [b["params"] for b in branches],
        "interactions": _params(tower.interactions),
        "tower": _params(tower),
        "projector": proj_params,
        "llm": llm_params,
    }
    return {
        "total": executed + paper_extra,
        "executed": executed,
        "image_size": size,
        "official_quirks": official_quirks,
        "quirk_delta": 0 if official_quirks else quirk_delta,  # official counter minus correct grids
        "branches": branches,
        "interactions": {
            "count": len(tower.interactions),
            "modules": sum(inter_macs.values()),
            "attn": sum(attn.values()),
            "total": inter_total,
            "per_interaction": per_inter,
            "params": params["interactions"],
        },
        "params": params,
    }


def _pending_adder(layer_runs: dict[int, list[int]], j: int, counter):
    """Forward hook for a module inside a ViT layer: adds its MACs to a pending slot of branch j (the layer's own
    hook, which fires after its children, closes the slot)."""

    def hook(m, args, out):
        runs = layer_runs[j]
        if not runs or not isinstance(runs[-1], list):
            runs.append([0])
        runs[-1][0] += counter(m, args[0], out)

    return hook


def _finalise_runs(runs: list) -> list[int]:
    """[[modules], sa, [modules], sa, ...] -> per-layer-run totals."""
    out: list[int] = []
    pending = 0
    for r in runs:
        if isinstance(r, list):
            pending += r[0]
        else:
            out.append(pending + r)
            pending = 0
    return out


# ---------------------------------------------------------------- CLI
def _g(x: float | int | None) -> str:
    return "-" if x is None else f"{x / 1e9:.1f}"


def _m(x: int | None) -> str:
    return "-" if x is None else f"{x / 1e6:.1f}M"


def format_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """One line per preset: our count, the official counter's count (its grid quirk), the README figure."""
    head = (
        f"{'preset':46} {'GFLOPs':>7} {'official':>8} {'README':>6} {'diff':>6} {'branches (G)':>13} {'inter.':>6} "
        f"{'branch params':>13} {'inter.':>6} {'proj.':>6} {'LLM':>7}"
    )
    lines = [head, "-" * len(head)]
    notes = []
    for name, r in rows:
        readme = README_GFLOPS.get(name)
        official = r["total"] + r["quirk_delta"]
        diff = "-" if readme is None else f"{100 * (official / 1e9 - readme) / readme:+.1f}%"
        br = "/".join(_g(b["total"]) for b in r["branches"])
        brp = "/".join(_m(b["params"]) for b in r["branches"])
        p = r["params"]
        lines.append(
            f"{name:46} {_g(r['total']):>7} {_g(official):>8} {('-' if readme is None else f'{readme:.0f}'):>6} "
            f"{diff:>6} {br:>13} {_g(r['interactions']['total']):>6} {brp:>13} {_m(p['interactions']):>6} "
            f"{_m(p['projector']):>6} {_m(p['llm']):>7}"
        )
        if r["executed"] != r["total"]:
            skipped = sum(b["skipped_layers"] for b in r["branches"])
            notes.append(
                f"{name}: whole backbone counted as in the paper; our tower stops at select_layer and skips "
                f"{skipped} layer(s): {_g(r['executed'])}G executed"
            )
        for j, b in enumerate(r["branches"]):
            if b["never_run"] or b["run_twice_or_more"]:
                notes.append(
                    f"{name}: branch {j} runs {b['block_runs']} block(s), never {b['never_run']}, more than once "
                    f"{b['run_twice_or_more']}; each run is counted ('official' too: get_flops_llava.py's "
                    "self-attention term would count every layer once)"
                )
        if r["quirk_delta"]:
            notes.append(
                f"{name}: the official counter takes the first interaction's grid for every deformable term "
                f"({r['quirk_delta'] / 1e9:+.1f}G); GFLOPs counts each interaction's own grid"
            )
        if readme is not None and name.endswith("_13B") and r["interactions"]["count"] == 24:
            notes.append(
                f"{name}: 24 interactions; the README's {readme:.0f}G is the 12-interaction 7B figure"
            )
    if notes:
        lines += ["", "notes:"] + [f"  {n}" for n in notes]
    lines += [
        "",
        "GFLOPs: multiply-accumulates of the vision tower for one image at the highest branch resolution (paper",
        "rules, spec §6); 'official': what OpenGVLab's get_flops_llava.py reports; diff: official vs README.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m piip_llava.models.flops", description=__doc__.split("\n")[0])
    parser.add_argument("presets", nargs="*", help="preset names or preset JSON paths")
    parser.add_argument("--all", action="store_true", help="every preset (tiny ones excluded unless --tiny)")
    parser.add_argument("--tiny", action="store_true", help="with --all: include the tiny test presets")
    parser.add_argument("--official-quirks", action="store_true",
                        help="reproduce the official counter's mix-model grid quirk (first interaction's stride)")
    parser.add_argument("--no-llm", action="store_true", help="skip the LLM parameter count")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    names = list(args.presets)
    if args.all:
        names += [n for n in preset_names() if args.tiny or not n.startswith("tiny-")]
    if not names:
        parser.error("give at least one preset or --all")
    rows = []
    for name in names:
        try:
            config = load_preset(name)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        rows.append((name, count_vision_flops(config, official_quirks=args.official_quirks, count_llm=not args.no_llm)))
    if args.json:
        print(json.dumps({name: r for name, r in rows}, indent=1))
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
