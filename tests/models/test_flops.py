"""FLOPs / parameter counter on the meta device against the README table and spec §2/§6."""
import json
import resource
import time

import pytest

from piip_llava.models import load_preset
from piip_llava.models.configuration_piip_llava import PiipVisionConfig
from piip_llava.models.flops import README_GFLOPS, block_runs, count_vision_flops, main

# 7B rows of the README table (G). The official counter's grid quirk is part of these figures.
README_7B = {
    "llava-1.5_clip-l-336_7B": 191.0,
    "piip-llava_clip-bl_512-256_7B": 193.0,
    "piip-llava_convnext-b_clip-l_640-224_7B": 191.0,
    "piip-llava_clip-bl_512-448_7B": 422.0,
    "piip-llava_convnext-b_clip-l_1024-336_7B": 598.0,
    "piip-llava_convnext-l_clip-l_1024-336_7B": 1037.0,
}
# spec §2: parameter counts of the new modules, interactions / projector (M)
SPEC_PARAMS = {
    "piip-llava_clip-bl_512-256_7B": (8.8, 40.9),
    "piip-llava_clip-bl_512-448_7B": (52.8, 40.9),
    "piip-llava_clip-bl_512-448_13B": (52.8, 61.6),
    "piip-llava_convnext-b_clip-l_640-224_7B": (9.0, 42.0),
    "piip-llava_convnext-b_clip-l_1024-336_7B": (40.2, 42.0),
    "piip-llava_convnext-b_clip-l_1024-336_13B": (80.4, 63.0),
    "piip-llava_convnext-l_clip-l_1024-336_7B": (53.5, 44.1),
    "piip-llava_convnext-l_clip-l_1024-336_13B": (107.1, 65.6),
}

_CACHE: dict = {}


def flops(name: str, quirks: bool = False) -> dict:
    if (name, quirks) not in _CACHE:
        _CACHE[(name, quirks)] = count_vision_flops(load_preset(name), official_quirks=quirks, count_llm=False)
    return _CACHE[(name, quirks)]


@pytest.mark.parametrize("name", sorted(README_7B))
def test_readme_7b_figures_within_1_percent(name):
    r = flops(name)
    official = (r["total"] + r["quirk_delta"]) / 1e9  # what the official counter prints
    assert official == pytest.approx(README_7B[name], rel=0.01)
    assert README_GFLOPS[name] == README_7B[name]


def test_quirk_flag_and_correct_grids():
    name = "piip-llava_convnext-b_clip-l_1024-336_7B"
    default, quirky = flops(name), flops(name, quirks=True)
    assert quirky["quirk_delta"] == 0 and quirky["official_quirks"]
    assert quirky["total"] == default["total"] + default["quirk_delta"]
    # spec §6: the stride-4 grid makes the ConvNeXt-direction term 7.9G instead of 0.65G
    assert default["quirk_delta"] / 1e9 == pytest.approx(7.9 - 0.65, abs=0.15)
    assert default["total"] / 1e9 == pytest.approx(591.0, abs=0.5)
    # CLIP+CLIP towers use one grid for every interaction: no quirk
    assert flops("piip-llava_clip-bl_512-448_7B")["quirk_delta"] == 0


def test_spec_recomputed_figures():
    # spec §2 "FLOPs (ours)" (its analytic model includes the official grid quirk), within 0.5%
    for name, g in {"piip-llava_clip-bl_512-256_7B": 193.5, "piip-llava_convnext-b_clip-l_640-224_7B": 191.5,
                    "piip-llava_clip-bl_512-448_7B": 422.7}.items():
        assert flops(name)["total"] / 1e9 == pytest.approx(g, rel=0.005)


def test_baseline_counts_whole_clip_but_runs_23_layers():
    r = flops("llava-1.5_clip-l-336_7B")
    assert r["branches"][0]["skipped_layers"] == 1
    assert r["executed"] < r["total"]
    assert (r["total"] - r["executed"]) / 1e9 == pytest.approx(r["total"] / 1e9 / 24, rel=0.01)


@pytest.mark.parametrize("name", sorted(SPEC_PARAMS))
def test_interaction_and_projector_params(name):
    r = count_vision_flops(load_preset(name), count_llm=False) if "13B" in name else flops(name)
    inter, proj = SPEC_PARAMS[name]
    assert r["params"]["interactions"] / 1e6 == pytest.approx(inter, rel=0.01)
    assert r["params"]["projector"] / 1e6 == pytest.approx(proj, rel=0.01)


def test_13b_convnext_on_meta_is_fast_and_uses_no_memory():
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    r = count_vision_flops(load_preset("piip-llava_convnext-l_clip-l_1024-336_13B"))
    elapsed = time.perf_counter() - t
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert elapsed < 90  # ~10 s on an idle core; the machine is shared
    assert grown_mb < 500  # a materialised 13B model would need > 50 GB
    assert r["interactions"]["count"] == 24
    # spec §2: 1215G with the official counter for 24 interactions, not the README's 1037G
    assert (r["total"] + r["quirk_delta"]) / 1e9 == pytest.approx(1215.1, rel=0.005)
    assert r["params"]["llm"] / 1e9 == pytest.approx(13.0, rel=0.01)


def test_tiny_presets_and_cli(capsys):
    t = time.perf_counter()
    for name in ["tiny-piip2_clip_64-128", "tiny-piip2_convnext_clip_64-128", "tiny-piip3_clip_64-96-128",
                 "tiny-piip2_clip_normal_64-128", "tiny-piip2_internvit_siglip_64-128", "tiny-llava15_clip_64"]:
        r = count_vision_flops(load_preset(name))
        assert r["total"] > 0 and r["total"] == sum(b["total"] for b in r["branches"]) + r["interactions"]["total"] + (
            r["total"] - r["executed"])
        assert r["params"]["tower"] == sum(r["params"]["branches"]) + r["params"]["interactions"]
    assert time.perf_counter() - t < 30
    normal = count_vision_flops(load_preset("tiny-piip2_clip_normal_64-128"))
    assert normal["interactions"]["attn"] > 0
    assert main(["tiny-piip2_convnext_clip_64-128", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tiny-piip2_convnext_clip_64-128"]["interactions"]["count"] == 2
    assert main(["tiny-piip2_clip_64-128"]) == 0
    assert "tiny-piip2_clip_64-128" in capsys.readouterr().out
    assert main(["no-such-preset"]) == 2


def test_hook_counts_match_hand_computed_tiny_linear_terms():
    # tiny-piip2_clip_64-128 branch 0: CLIP d=64, mlp 128, 4 layers, 64px/16 -> 16 patches + cls = 17 tokens
    r = count_vision_flops(load_preset("tiny-piip2_clip_64-128"), count_llm=False)
    d, f, n, t = 64, 128, 16, 17
    per_layer = t * (4 * d * d + 2 * d * f) + 2 * (2 * t * d)  # linears + 2 affine LayerNorms
    patch = 3 * 16 * 16 * d * n
    pre_ln = 2 * t * d
    assert r["branches"][0]["modules"] == 4 * per_layer + patch + pre_ln
    assert r["branches"][0]["self_attn"] == 4 * 2 * n * n * d


# ---- official layouts our presets never write: ranges that skip/repeat blocks, a resized CLIP kernel ----
def _tiny_vision(edit) -> PiipVisionConfig:
    """tiny-piip2_clip_64-128 (branch 0: CLIP d=64, mlp 128, 4 layers, 64 px; branch 1: d=32, mlp 64, 2 layers,
    128 px; patch 16; deform interactions with 2 points) with `edit(branches)` applied."""
    vision = load_preset("tiny-piip2_clip_64-128").vision_config
    branches = json.loads(json.dumps(vision.branches))
    edit(branches)
    return PiipVisionConfig(branches=branches, interaction=vision.interaction)


def _clip_by_hand(d: int, f: int, n: int, p: int, runs: int) -> tuple[int, int]:
    """(modules, self_attn) MACs of a CLIP branch with n patch tokens (+ class token) and `runs` layer runs."""
    t = n + 1
    per_layer = t * (4 * d * d + 2 * d * f) + 2 * (2 * t * d)  # q, k, v, o, fc1, fc2 + 2 affine LayerNorms
    embed = 3 * p * p * d * n + 2 * t * d  # patch conv (no bias) + pre-LayerNorm
    return embed + runs * per_layer, runs * 2 * n * n * d


def _deform_by_hand(grids_and_widths: list[tuple[int, int]], n_points: int = 2) -> int:
    """Deformable term of one interaction: 5 * h * w * K * d per direction, queries on each branch's grid."""
    return sum(5 * g * g * n_points * d for g, d in grids_and_widths)


def test_ranges_that_skip_and_repeat_blocks_count_each_run():
    def edit(b):
        b[0].update(interaction_indexes=[[0, 0], [2, 2]], strict_ranges=False)  # blocks 1 and 3 never run
        b[1].update(interaction_indexes=[[1, 1], [0, 1]], strict_ranges=False)  # block 1 runs twice

    r = count_vision_flops(_tiny_vision(edit))
    assert [(b["modules"], b["self_attn"]) for b in r["branches"]] == [
        _clip_by_hand(64, 128, 16, 16, runs=2), _clip_by_hand(32, 64, 64, 16, runs=3)]
    b0, b1 = r["branches"]
    assert (b0["block_runs"], b0["never_run"], b0["run_twice_or_more"]) == (2, [1, 3], [])
    assert (b1["block_runs"], b1["never_run"], b1["run_twice_or_more"]) == (3, [], [1])
    assert b0["skipped_layers"] == b1["skipped_layers"] == 0
    # the official tower runs the same blocks: the paper total is what runs, nothing added for blocks in no range
    assert r["total"] == r["executed"] == b0["total"] + b1["total"] + r["interactions"]["total"]
    # widths and grids do not change with the ranges: the interactions cost what the tiling preset's do
    assert r["interactions"]["attn"] == 2 * _deform_by_hand([(4, 64), (8, 32)])
    assert r["interactions"]["total"] == flops("tiny-piip2_clip_64-128")["interactions"]["total"]
    assert r["quirk_delta"] == 0


def test_mix_ranges_that_skip_and_repeat_convnext_blocks():
    # tiny-piip2_convnext_clip_64-128 branch 1: ConvNeXt depths 1/1/2/1, dims 16/32/64/128 on 128 px; blocks
    # 0 (s0, grid 32) | 1 down, 2 (s1, grid 16) | 3 down, 4, 5 (s2, grid 8) | 6 down, 7 (s3, grid 4)
    vision = load_preset("tiny-piip2_convnext_clip_64-128").vision_config
    branches = json.loads(json.dumps(vision.branches))
    branches[0].update(interaction_indexes=[[0, 1], [3, 3]], strict_ranges=False)  # CLIP block 2 never runs
    branches[1].update(interaction_indexes=[[0, 2], [4, 4]], strict_ranges=False)  # 3 (down): widths do not fit
    with pytest.raises(ValueError, match="block 4 takes 64 channels"):
        PiipVisionConfig(branches=branches, interaction=vision.interaction)
    branches[1].update(interaction_indexes=[[0, 4], [4, 5]])  # block 4 twice; stage 3 (6, 7) never runs
    config = PiipVisionConfig(branches=branches, interaction=vision.interaction)
    # (block, width, grid) of each run: what train/memory.py sizes the activations from
    assert block_runs(config.branch_configs()[1]) == [
        (0, 16, 32), (1, 32, 16), (2, 32, 16), (3, 64, 8), (4, 64, 8), (4, 64, 8), (5, 64, 8)]
    r = count_vision_flops(config)

    def block(c: int, g: int) -> int:  # dwconv 7x7 + bias, fc1, fc2 (timm LayerNorm not counted)
        return g * g * c * (49 + 1) + 2 * g * g * c * 4 * c

    def down(ci: int, co: int, g: int) -> int:  # 2x2 stride-2 conv + bias on the output grid g
        return g * g * (4 * ci * co + co)

    stem = 32 * 32 * (16 * 48 + 16)
    by_hand = stem + block(16, 32) + down(16, 32, 16) + block(32, 16) + down(32, 64, 8) + 3 * block(64, 8)
    conv = r["branches"][1]
    assert (conv["modules"], conv["self_attn"]) == (by_hand, 0)
    assert (conv["never_run"], conv["run_twice_or_more"], conv["block_runs"]) == ([6, 7], [4], 7)
    assert (r["branches"][0]["modules"], r["branches"][0]["self_attn"]) == _clip_by_hand(96, 192, 16, 16, runs=3)
    assert r["total"] == r["executed"]
    # first interaction's queries on the ConvNeXt sit on grid 8 (stage 2), as the second's: no grid quirk
    assert r["quirk_delta"] == 0
    assert r["interactions"]["attn"] == 2 * _deform_by_hand([(4, 96), (8, 64)])


def test_resized_kernel_at_the_pretrained_stride():
    # branch 1: CLIP pretrained at patch 14 (4x4 grid at 56 px) run with a 16x16 kernel at stride 14 on 112 px:
    # (112 - 16) // 14 + 1 = 7 tokens a side (not 112 // 14 = 8, the grid of the stride alone)
    def edit(b):
        b[1]["backbone"].update(patch_size=14, image_size=56)
        b[1].update(image_size=112, patch_size=16, patch_stride=14)

    config = _tiny_vision(edit)
    assert block_runs(config.branch_configs()[1]) == [(0, 32, 7), (1, 32, 7)]
    r = count_vision_flops(config)
    assert (r["branches"][1]["modules"], r["branches"][1]["self_attn"]) == _clip_by_hand(32, 64, 49, 16, runs=2)
    assert (r["branches"][0]["modules"], r["branches"][0]["self_attn"]) == _clip_by_hand(64, 128, 16, 16, runs=4)
    assert r["total"] == r["executed"]
    assert r["interactions"]["attn"] == 2 * _deform_by_hand([(4, 64), (7, 32)])
    # one grid for every interaction: the official counter's first-interaction grid changes nothing
    assert r["quirk_delta"] == 0
