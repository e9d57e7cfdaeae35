"""Official PIIP-LLaVA checkpoint -> our format, checked against an independent re-statement of the official forward.

The tiny official-format checkpoints are written here from the documented key layout (spec §5), with a tower config
`.py` in the official style. `OfficialReference` below recomputes the official tower (`PIIPTwoBranchModel` /
`PIIPTwoBranchMixModel`), projector (`TwoBranchMLP`) and LLM directly on the official key names with functional
PyTorch; it does not use any module of this project. Official defaults for keys a `.py` leaves out, `normal`
cross-attention (`wq`/`wk`/`wv`/`proj`), `norm_layer="none"`, the `ln` projector and `out_shape`, ConvNeXt-V2 blocks,
branch1 not seeing a smaller image, interaction ranges as Python slices (blocks outside every range never run) and a
CLIP kernel resized to a new patch size at the pretrained stride are restated there from the official code
(piip_modules.py, configuration_piip_2branch.py, modeling_piip_2branch*.py, clip_hf_wrapper.py,
multimodal_projector/builder.py);
`assert_matches_official` compares in float64.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from piip_llava.models import PiipLlavaForConditionalGeneration
from piip_llava.models.convert_official import (
    ConversionError,
    ConversionWarning,
    build_config,
    convert_official_state_dict,
    main,
    parse_tower_config,
    vision_config_from_official,
)

T = "model.vision_tower.vision_tower."
LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)

CLIP_CLIP_PY = """\
model = dict(
    backbone=dict(
        n_points=4,
        deform_num_heads=4,
        cffn_ratio=0.25,
        deform_ratio=0.5,
        with_cffn=True,
        interact_attn_type='deform',
        interaction_drop_path_rate=0.4,
        model_cls="2branch_v1",
        unfreeze="none",

        use_branch_merging=False,


        branch1=dict(
            model_type="clip_hf",
            img_size=64,
            patch_size=16,
            pretrain_patch_size=16,
            interaction_indexes=[[0, 1], [2, 3]],
            pretrained='pretrained/tiny-clip-l',
            use_cls_token=True,
        ),

        branch2=dict(
            model_type="clip_hf",
            img_size=128,
            patch_size=16,
            pretrain_patch_size=16,
            interaction_indexes=[[0, 0], [1, 1]],
            pretrained='pretrained/tiny-clip-b',
            use_cls_token=True,
        ),
    ),

    projector=dict(
        type="separate_2branch_v1",
        dim1=64,
        dim2=32,
        norm="gn",
    )
)
"""

MIX_PY = """\
model = dict(
    backbone=dict(
        n_points=4,
        deform_num_heads=4,
        cffn_ratio=0.25,
        deform_ratio=0.5,
        with_cffn=True,
        interact_attn_type='deform',
        interaction_drop_path_rate=0.4,
        model_cls="2branch_mix",
        unfreeze="none",

        use_branch_merging=False,


        branch1=dict(
            model_type="clip_hf",
            img_size=64,
            patch_size=16,
            pretrain_patch_size=16,
            interaction_indexes=[[0, 1], [2, 3]],
            pretrained='pretrained/tiny-clip-l',
            use_cls_token=True,
        ),

        branch2=dict(
            model_type="convnext_timm",
            img_size=128,
            interaction_indexes=[
                [0, 2], [3, 7],
            ],
            downsample_ratios=[
                4,
                8, # downsampling layer
                8,
                16, # downsampling layer
                16, 16,
                32, # downsampling layer
                32,
            ],
            pretrained="pretrained/tiny-convnext",
        ),
    ),

    projector=dict(
        type="separate_2branch_v1",
        dim1=64,
        dim2=64,
        norm="gn",
    )
)
"""

CLIP_L = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=48,
              patch_size=16)  # pretrain grid 3x3, run at 64 px -> 4x4 (position interpolation matters)
CLIP_B = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
              patch_size=16)  # pretrain grid 4x4, run at 128 px -> 8x8
CONVNEXT = dict(depths=[1, 1, 2, 1], dims=[8, 16, 32, 64])


# ---------------------------------------------------------------------------------------------------------------
# Official-format checkpoint writer (documented key layout, spec §5)
# ---------------------------------------------------------------------------------------------------------------
class Gen:
    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.sd: dict[str, torch.Tensor] = {}

    def w(self, key, *shape, std=0.1, mean=0.0):
        self.sd[key] = torch.randn(*shape, generator=self.g) * std + mean

    def linear(self, key, out_f, in_f, bias=True, std=None):
        self.w(key + ".weight", out_f, in_f, std=std or 1 / math.sqrt(in_f))
        if bias:
            self.w(key + ".bias", out_f, std=0.05)

    def norm(self, key, dim):
        self.w(key + ".weight", dim, std=0.1, mean=1.0)
        self.w(key + ".bias", dim, std=0.05)


def write_clip(gen: Gen, prefix: str, a: dict, kernel: int | None = None) -> None:
    """`kernel`: the patch_size the official wrapper resized the pretrained kernel to (position table unchanged)."""
    d, f, grid = a["hidden_size"], a["intermediate_size"], a["image_size"] // a["patch_size"]
    gen.w(prefix + "embeddings.class_embedding", d)
    kernel = kernel or a["patch_size"]
    gen.w(prefix + "embeddings.patch_embedding.weight", d, 3, kernel, kernel, std=0.05)
    gen.w(prefix + "embeddings.position_embedding.weight", grid * grid + 1, d)
    gen.norm(prefix + "pre_layrnorm", d)
    for i in range(a["num_hidden_layers"]):
        p = f"{prefix}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            gen.linear(p + "self_attn." + n, d, d)
        gen.norm(p + "layer_norm1", d)
        gen.linear(p + "mlp.fc1", f, d)
        gen.linear(p + "mlp.fc2", d, f)
        gen.norm(p + "layer_norm2", d)
    gen.norm(prefix + "post_layernorm", d)


def write_convnext(gen: Gen, prefix: str, a: dict) -> None:
    dims = a["dims"]
    gen.w(prefix + "stem.0.weight", dims[0], 3, 4, 4, std=0.1)
    gen.w(prefix + "stem.0.bias", dims[0], std=0.05)
    gen.norm(prefix + "stem.1", dims[0])
    for s, (depth, c) in enumerate(zip(a["depths"], dims)):
        if s > 0:
            gen.norm(f"{prefix}stages.{s}.downsample.0", dims[s - 1])
            gen.w(f"{prefix}stages.{s}.downsample.1.weight", c, dims[s - 1], 2, 2, std=1 / math.sqrt(4 * dims[s - 1]))
            gen.w(f"{prefix}stages.{s}.downsample.1.bias", c, std=0.05)
        for b in range(depth):
            p = f"{prefix}stages.{s}.blocks.{b}."
            gen.w(p + "conv_dw.weight", c, 1, 7, 7, std=0.1)
            gen.w(p + "conv_dw.bias", c, std=0.05)
            gen.norm(p + "norm", c)
            gen.linear(p + "mlp.fc1", 4 * c, c)
            if a.get("use_grn"):  # ConvNeXt-V2 (GlobalResponseNormMlp), without layer scale
                gen.norm(p + "mlp.grn", 4 * c)
            gen.linear(p + "mlp.fc2", c, 4 * c)
            if a.get("ls_init_value", 1e-6) is not None:
                gen.w(p + "weight", c, std=0.2, mean=0.5)  # the layer scale timm calls `gamma`
    gen.norm(prefix + "head.norm", dims[-1])


def write_interaction(gen: Gen, prefix: str, d1: int, d2: int, heads=4, points=4, ratio=0.5, attn="deform",
                      cffn=True, norm="ln", proj=True) -> None:
    """One `BidirectionalInteractionUnit` as piip_modules.py builds it (module names are the weight names)."""
    if proj:
        gen.linear(prefix + "branch2to1_proj", d1, d2)
        gen.linear(prefix + "branch1to2_proj", d2, d1)
    for name, d, d_feat in (("branch2to1_injector", d1, d1 if proj else d2),
                            ("branch1to2_injector", d2, d2 if proj else d1)):
        p = f"{prefix}{name}."
        if norm == "ln":  # norm_layer="none" -> nn.Identity, no parameters
            gen.norm(p + "query_norm", d)
            gen.norm(p + "feat_norm", d_feat)
        if attn == "deform":  # MSDeformAttn, one level
            gen.w(p + "attn.sampling_offsets.weight", heads * points * 2, d, std=0.3)
            gen.w(p + "attn.sampling_offsets.bias", heads * points * 2, std=1.5)  # some points fall outside the map
            gen.linear(p + "attn.attention_weights", heads * points, d, std=0.3)
            gen.linear(p + "attn.value_proj", int(d * ratio), d_feat)
            gen.linear(p + "attn.output_proj", d, int(d * ratio))
        else:  # CrossAttention(qkv_bias=False)
            gen.linear(p + "attn.wq", d, d, bias=False)
            gen.linear(p + "attn.wk", d, d_feat, bias=False, std=0.5)  # sharp enough that the softmax is not uniform
            gen.linear(p + "attn.wv", d, d_feat, bias=False)
            gen.linear(p + "attn.proj", d, d)
        gen.w(p + "ca_weight", d, std=0.2, mean=0.5)  # non-zero gates: interactions matter
        if cffn:  # else cffn_weight is an nn.Identity: no key
            gen.w(p + "cffn_weight", d, std=0.2, mean=0.5)
            if norm == "ln":
                gen.norm(p + "ffn_norm", d)
            h = int(d * 0.25)
            gen.linear(p + "ffn.fc1", h, d)
            gen.w(p + "ffn.dwconv.dwconv.weight", h, 1, 3, 3, std=0.3)
            gen.w(p + "ffn.dwconv.dwconv.bias", h, std=0.05)
            gen.linear(p + "ffn.fc2", d, h)


def write_llama(gen: Gen) -> None:
    c = LLAMA
    d, f = c["hidden_size"], c["intermediate_size"]
    gen.w("model.embed_tokens.weight", c["vocab_size"], d, std=0.5)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            gen.linear(p + "self_attn." + n, d, d, bias=False)
        gen.linear(p + "mlp.gate_proj", f, d, bias=False)
        gen.linear(p + "mlp.up_proj", f, d, bias=False)
        gen.linear(p + "mlp.down_proj", d, f, bias=False)
        gen.w(p + "input_layernorm.weight", d, std=0.1, mean=1.0)
        gen.w(p + "post_attention_layernorm.weight", d, std=0.1, mean=1.0)
    gen.w("model.norm.weight", d, std=0.1, mean=1.0)
    gen.linear("lm_head", c["vocab_size"], d, bias=False)


def write_projector(gen: Gen, dims: list[int], norm: str = "gn") -> None:
    """TwoBranchMLP: gn = Sequential(permute, linear, permute, GroupNorm, GELU, permute, linear, permute);
    ln = Sequential(permute, linear, ReshapeAndLN, GELU, permute, linear, permute)."""
    D = LLAMA["hidden_size"]
    for j, d in enumerate(dims, start=1):
        gen.linear(f"model.mm_projector.branch{j}.1", D, d)
        if norm == "gn":
            gen.norm(f"model.mm_projector.branch{j}.3", D)
        gen.linear(f"model.mm_projector.branch{j}.{6 if norm == 'gn' else 5}", D, D)


def llava_config(tower: str, **extra) -> dict:
    return {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "mm_vision_tower": tower,
            "vision_tower_name": tower, "mm_hidden_size": 64, "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat",
            "image_aspect_ratio": "pad", "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
            "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "use_mm_proj": True,
            "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "tie_word_embeddings": False, "torch_dtype": "float32", **LLAMA, **extra}


def write_checkpoint(root, kind: str, fmt: str, seed: int = 0, extra_keys=None, drop_keys=(), py=None,
                     convnext=CONVNEXT, proj_norm="gn") -> tuple[str, dict]:
    """A tiny official-format checkpoint folder; returns (folder, official state dict)."""
    src = root / f"{kind}-{fmt}"
    (src / "configs").mkdir(parents=True)
    (src / "configs" / "pretrained" / "tiny-clip-l").mkdir(parents=True)
    (src / "configs" / "pretrained" / "tiny-clip-l" / "config.json").write_text(
        json.dumps({"model_type": "clip_vision_model", "hidden_act": "quick_gelu", **CLIP_L}))
    gen = Gen(seed)
    write_clip(gen, T + "branch1.clip_model.", CLIP_L)
    if kind == "clip":
        py = py or CLIP_CLIP_PY
        (src / "configs" / "pretrained" / "tiny-clip-b").mkdir(parents=True)
        (src / "configs" / "pretrained" / "tiny-clip-b" / "config.json").write_text(  # a full CLIPConfig
            json.dumps({"model_type": "clip", "text_config": {}, "vision_config": CLIP_B}))
        write_clip(gen, T + "branch2.clip_model.", CLIP_B)
        for i in range(2):
            write_interaction(gen, f"{T}interactions.{i}.interaction_units_12.", 64, 32)
        write_projector(gen, [64, 32], proj_norm)
    else:
        py = py or MIX_PY
        (src / "configs" / "pretrained" / "tiny-convnext").mkdir(parents=True)
        (src / "configs" / "pretrained" / "tiny-convnext" / "config.json").write_text(
            json.dumps({"architecture": "convnext_tiny_test", "num_classes": 0, "model_args": CONVNEXT}))
        write_convnext(gen, T + "branch2.convnext_model.", convnext)
        write_interaction(gen, f"{T}interactions.0.interaction_units_12.", 64, 16)  # ends at stride 8, 16 ch
        write_interaction(gen, f"{T}interactions.1.interaction_units_12.", 64, 64)  # ends at stride 32, 64 ch
        write_projector(gen, [64, 64], proj_norm)
    write_llama(gen)
    gen.sd[T + "branch1.clip_model.embeddings.position_ids"] = torch.arange(10)[None]  # old non-persistent buffer
    sd = {k: v for k, v in gen.sd.items() if k not in drop_keys}
    sd.update(extra_keys or {})
    save_official(src, f"configs/piip-llava_{kind}_tiny.py", py, sd, fmt)
    return str(src), sd


def save_official(src, tower: str, py: str, sd: dict, fmt: str = "safetensors") -> None:
    """config.json naming the tower `.py`, the `.py` itself, tokenizer placeholders, two weight shards + index."""
    (src / tower).parent.mkdir(parents=True, exist_ok=True)
    (src / tower).write_text(py)
    (src / "config.json").write_text(json.dumps(llava_config(tower)))
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    (src / "tokenizer.model").write_bytes(b"sentencepiece placeholder")
    keys = sorted(sd)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    if fmt == "safetensors":
        names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        for name, ks in zip(names, shards):
            save_file({k: sd[k].contiguous() for k in ks}, str(src / name))
        index = "model.safetensors.index.json"
    else:
        names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
        for name, ks in zip(names, shards):
            torch.save({k: sd[k] for k in ks}, str(src / name))
        index = "pytorch_model.bin.index.json"
    (src / index).write_text(json.dumps({"metadata": {}, "weight_map": {k: n for n, ks in zip(names, shards) for k in ks}}))


# ---------------------------------------------------------------------------------------------------------------
# Independent reference of the official forward, on official key names
# ---------------------------------------------------------------------------------------------------------------
# PIIPTwoBranchConfig.__init__ (llava/model/multimodal_encoder/piip/configuration_piip_2branch.py): what a key left
# out of the tower `.py` config is in the official model.
OFFICIAL_DEFAULTS = dict(n_points=4, deform_num_heads=6, with_cffn=False, cffn_ratio=0.25, deform_ratio=1.0,
                         interact_attn_type="normal", interaction_drop_path_rate=0.3, norm_layer="ln",
                         interaction_proj=True)


class OfficialReference:
    def __init__(self, sd: dict, tower_cfg: dict, clip_archs: dict, convnext_arch: dict | None = None) -> None:
        self.sd, self.cfg, self.clip_archs, self.convnext_arch = sd, tower_cfg["backbone"], clip_archs, convnext_arch
        self.opt = {**OFFICIAL_DEFAULTS, **{k: v for k, v in self.cfg.items() if k in OFFICIAL_DEFAULTS}}
        self.proj_norm = (tower_cfg.get("projector") or {}).get("norm")
        self.out_shape = (tower_cfg.get("projector") or {}).get("out_shape")

    def p(self, key):
        return self.sd[key]

    def lin(self, x, key, bias=True):
        return F.linear(x, self.p(key + ".weight"), self.p(key + ".bias") if bias else None)

    def ln(self, x, key, eps):
        return F.layer_norm(x, x.shape[-1:], self.p(key + ".weight"), self.p(key + ".bias"), eps)

    # ---- CLIP branch (CLIPHFWrapper + forward_embedding + CLIPEncoderLayer)
    def clip_embed(self, k, x):
        pre, a = f"{T}branch{k}.clip_model.", self.clip_archs[k]
        # the pretrained conv (stride = pretrain_patch_size) with whatever kernel the weights hold (CLIPHFWrapper
        # resizes it to patch_size without touching the stride)
        patch = F.conv2d(x, self.p(pre + "embeddings.patch_embedding.weight"), stride=a["patch_size"])
        b, d, H, W = patch.shape
        tokens = patch.flatten(2).transpose(1, 2)
        table = self.p(pre + "embeddings.position_embedding.weight")[None]
        g = a["image_size"] // a["patch_size"]
        pos = table[:, 1:].reshape(1, g, g, d).permute(0, 3, 1, 2).float()
        pos = F.interpolate(pos, size=(H, W), mode="bicubic", align_corners=False).reshape(1, d, H * W).permute(0, 2, 1)
        cls = self.p(pre + "embeddings.class_embedding").expand(b, 1, -1)
        x = torch.cat([cls, tokens], 1) + torch.cat([table[:, :1], pos], 1)
        x = self.ln(x, pre + "pre_layrnorm", 1e-5)
        return x[:, 1:], x[:, :1], H, W

    def clip_layer(self, k, i, x):
        p, heads = f"{T}branch{k}.clip_model.encoder.layers.{i}.", self.clip_archs[k]["num_attention_heads"]
        b, n, d = x.shape
        h = self.ln(x, p + "layer_norm1", 1e-5)
        q, kk, v = (self.lin(h, p + f"self_attn.{n_}").view(b, n, heads, d // heads).transpose(1, 2)
                    for n_ in ("q_proj", "k_proj", "v_proj"))
        att = ((q * (d // heads) ** -0.5) @ kk.transpose(-1, -2)).softmax(-1)
        x = x + self.lin((att @ v).transpose(1, 2).reshape(b, n, d), p + "self_attn.out_proj")
        h = self.lin(self.ln(x, p + "layer_norm2", 1e-5), p + "mlp.fc1")
        return x + self.lin(h * torch.sigmoid(1.702 * h), p + "mlp.fc2")  # quick_gelu

    # ---- ConvNeXt branch (timm ConvNeXt with the monkey-patched block: layer scale named `weight`)
    def ln2d(self, x, key):
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.p(key + ".weight"), self.p(key + ".bias"),
                            1e-6).permute(0, 3, 1, 2)

    def convnext_blocks(self):
        pre, blocks = f"{T}branch2.convnext_model.", []
        for s, depth in enumerate(self.convnext_arch["depths"]):
            if s > 0:
                blocks.append(("down", f"{pre}stages.{s}.downsample."))
            blocks += [("block", f"{pre}stages.{s}.blocks.{b}.") for b in range(depth)]
        return blocks

    def convnext_block(self, kind, p, x):
        if kind == "down":
            return F.conv2d(self.ln2d(x, p + "0"), self.p(p + "1.weight"), self.p(p + "1.bias"), stride=2)
        c = x.shape[1]
        y = F.conv2d(x, self.p(p + "conv_dw.weight"), self.p(p + "conv_dw.bias"), padding=3, groups=c)
        y = self.ln(y.permute(0, 2, 3, 1), p + "norm", 1e-6)
        y = F.gelu(self.lin(y, p + "mlp.fc1"))
        if p + "mlp.grn.weight" in self.sd:  # GlobalResponseNorm (channels last, eps 1e-6)
            g = y.norm(p=2, dim=(1, 2), keepdim=True)
            n = g / (g.mean(-1, keepdim=True) + 1e-6)
            y = y + self.p(p + "mlp.grn.bias") + self.p(p + "mlp.grn.weight") * (y * n)
        y = self.lin(y, p + "mlp.fc2").permute(0, 3, 1, 2)
        if p + "weight" not in self.sd:  # ls_init_value=None: no layer scale
            return x + y
        return x + y * self.p(p + "weight").reshape(1, -1, 1, 1)

    # ---- deformable attention (MSDeformAttn, one level, pure-PyTorch form of the CUDA kernel)
    def ms_deform_attn(self, p, query, ref, feat, shape):
        heads, points = self.opt["deform_num_heads"], self.opt["n_points"]
        n, lq, _ = query.shape
        hv, wv = shape
        value = self.lin(feat, p + "value_proj")
        dv = value.shape[-1] // heads
        value = value.view(n, hv * wv, heads, dv)
        off = self.lin(query, p + "sampling_offsets").view(n, lq, heads, 1, points, 2)
        aw = self.lin(query, p + "attention_weights").view(n, lq, heads, points).softmax(-1).view(n, lq, heads, 1, points)
        normalizer = torch.tensor([[wv, hv]], dtype=torch.float32)
        loc = ref[:, :, None, :, None, :] + off / normalizer[None, None, None, :, None, :]
        v = value.flatten(2).transpose(1, 2).reshape(n * heads, dv, hv, wv)
        grid = (2 * loc[:, :, :, 0] - 1).transpose(1, 2).flatten(0, 1)  # (n*heads, lq, points, 2)
        s = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        w = aw[:, :, :, 0].transpose(1, 2).reshape(n * heads, 1, lq, points)
        out = (s * w).sum(-1).view(n, heads * dv, lq).transpose(1, 2)
        return self.lin(out, p + "output_proj")

    @staticmethod
    def reference_points(h, w):
        ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, w - 0.5, w), indexing="ij")
        return torch.stack((rx.reshape(-1)[None] / w, ry.reshape(-1)[None] / h), -1)[:, :, None]

    # ---- CrossAttention (interact_attn_type="normal"): wq / wk / wv without bias, proj with bias
    def cross_attn(self, p, query, feat):
        heads = self.opt["deform_num_heads"]
        b, nq, c = query.shape
        q = F.linear(query, self.p(p + "wq.weight")).reshape(b, nq, heads, c // heads).permute(0, 2, 1, 3)
        k = F.linear(feat, self.p(p + "wk.weight")).reshape(b, -1, heads, c // heads).permute(0, 2, 1, 3)
        v = F.linear(feat, self.p(p + "wv.weight")).reshape(b, -1, heads, c // heads).permute(0, 2, 1, 3)
        attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
        return self.lin((attn @ v).transpose(1, 2).reshape(b, nq, c), p + "proj")

    def norm(self, x, key):  # norm_layer: "ln" -> LayerNorm(eps=1e-6), "none" -> nn.Identity
        return self.ln(x, key, 1e-6) if self.opt["norm_layer"] == "ln" else x

    def injector(self, p, query, ref, feat, shape, H, W):
        q, f = self.norm(query, p + "query_norm"), self.norm(feat, p + "feat_norm")
        if self.opt["interact_attn_type"] == "deform":
            att = self.ms_deform_attn(p + "attn.", q, ref, f, shape)
        else:
            att = self.cross_attn(p + "attn.", q, f)
        query = query + self.p(p + "ca_weight") * att
        if not self.opt["with_cffn"]:
            return query
        h = self.lin(self.norm(query, p + "ffn_norm"), p + "ffn.fc1")
        b, n, c = h.shape
        h = F.conv2d(h.transpose(1, 2).view(b, c, H, W), self.p(p + "ffn.dwconv.dwconv.weight"),
                     self.p(p + "ffn.dwconv.dwconv.bias"), padding=1, groups=c).flatten(2).transpose(1, 2)
        return query + self.p(p + "cffn_weight") * self.lin(F.gelu(h), p + "ffn.fc2")

    # ---- whole tower (PIIPTwoBranchModel / PIIPTwoBranchMixModel.forward)
    def tower(self, x):
        b1, b2 = self.cfg["branch1"], self.cfg["branch2"]
        scale = b1["img_size"] / b2["img_size"]
        x1 = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False) if scale < 1 else x.clone()
        t1, cls1, H1, W1 = self.clip_embed(1, x1)
        cls1 = cls1 if b1.get("use_cls_token", False) else None
        mix = b2.get("model_type") == "convnext_timm"
        if mix:
            m = F.conv2d(x, self.p(f"{T}branch2.convnext_model.stem.0.weight"),
                         self.p(f"{T}branch2.convnext_model.stem.0.bias"), stride=4)
            m = self.ln2d(m, f"{T}branch2.convnext_model.stem.1")
            H2, W2 = m.shape[-2:]
            t2, cls2 = m.flatten(2).transpose(1, 2), None
            blocks2 = self.convnext_blocks()
        else:
            t2, cls2, H2, W2 = self.clip_embed(2, x)
            cls2 = cls2 if b2.get("use_cls_token", False) else None
        layers1 = list(range(self.clip_archs[1]["num_hidden_layers"]))
        # forward(): each interaction runs blocks[r[0]:r[-1] + 1] (a Python slice), whatever blocks that leaves out
        for i, (r1, r2) in enumerate(zip(b1["interaction_indexes"], b2["interaction_indexes"])):
            y = t1 if cls1 is None else torch.cat([cls1, t1], 1)
            for layer in layers1[r1[0]:r1[-1] + 1]:
                y = self.clip_layer(1, layer, y)
            cls1, t1 = (None, y) if cls1 is None else (y[:, :1], y[:, 1:])
            if mix:
                m = t2.transpose(1, 2).reshape(1, -1, H2, W2)
                for kind, p in blocks2[r2[0]:r2[-1] + 1]:
                    m = self.convnext_block(kind, p, m)
                H2, W2 = m.shape[-2:]
                t2 = m.flatten(2).transpose(1, 2)
                r1, r2 = b1["patch_size"], b2["downsample_ratios"][r2[-1]]
            else:
                y = t2 if cls2 is None else torch.cat([cls2, t2], 1)
                for layer in list(range(self.clip_archs[2]["num_hidden_layers"]))[r2[0]:r2[-1] + 1]:
                    y = self.clip_layer(2, layer, y)
                cls2, t2 = (None, y) if cls2 is None else (y[:, :1], y[:, 1:])
                r1, r2 = b1["patch_size"], b2["patch_size"]
            # deform_inputs_1 / deform_inputs_2: grids from the sizes of the images the branches actually see
            g1, g2 = x1.shape[-1] // r1, x.shape[-1] // r2
            p = f"{T}interactions.{i}.interaction_units_12."
            if self.opt["interaction_proj"]:
                f21, f12 = self.lin(t2, p + "branch2to1_proj"), self.lin(t1, p + "branch1to2_proj")
            else:
                f21, f12 = t2, t1
            t1, t2 = (self.injector(p + "branch2to1_injector.", t1, self.reference_points(g1, g1), f21, (g2, g2), H1, W1),
                      self.injector(p + "branch1to2_injector.", t2, self.reference_points(g2, g2), f12, (g1, g1), H2, W2))
        return t1.transpose(1, 2).reshape(1, -1, H1, W1), t2.transpose(1, 2).reshape(1, -1, H2, W2)

    # ---- TwoBranchMLP (norm="gn": GroupNorm(32); norm="ln": ReshapeAndLN, F.layer_norm without affine, eps 1e-5)
    def projector(self, f1, f2):
        if self.out_shape is not None:  # both maps resized to out_shape x out_shape
            f1 = F.interpolate(f1, size=(self.out_shape,) * 2, mode="bilinear", align_corners=False)
            f2 = F.interpolate(f2, size=(self.out_shape,) * 2, mode="bilinear", align_corners=False)
        H2, W2 = f2.shape[-2:]
        f1 = F.interpolate(f1, size=(H2, W2), mode="bilinear", align_corners=False)
        out = 0
        for j, f in ((1, f1), (2, f2)):
            p = f"model.mm_projector.branch{j}."
            y = self.lin(f.permute(0, 2, 3, 1), p + "1")  # (B, H, W, D)
            if self.proj_norm == "gn":
                y = F.group_norm(y.permute(0, 3, 1, 2), 32, self.p(p + "3.weight"), self.p(p + "3.bias"), 1e-5)
                out = out + self.lin(F.gelu(y).permute(0, 2, 3, 1), p + "6").permute(0, 3, 1, 2)
            else:
                b, h, w, c = y.shape
                y = F.layer_norm(y.reshape(b, h * w, c), (c,)).reshape(b, h, w, c).permute(0, 3, 1, 2)
                out = out + self.lin(F.gelu(y).permute(0, 2, 3, 1), p + "5").permute(0, 3, 1, 2)
        return out.reshape(1, out.shape[1], H2 * W2).transpose(1, 2)

    # ---- LLaVA: visual tokens replace the <image> placeholder, then the Llama LM on the official keys
    def logits(self, before, after, visual):
        from transformers import LlamaConfig, LlamaForCausalLM

        llm = LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=False, attn_implementation="eager")).eval()
        llm.load_state_dict({k: v for k, v in self.sd.items() if k.startswith(("model.", "lm_head"))
                             and not k.startswith(("model.vision_tower", "model.mm_projector"))}, strict=True)
        emb = self.p("model.embed_tokens.weight")
        llm.to(emb.dtype)
        embeds = torch.cat([emb[before], visual[0], emb[after]])[None]
        return llm(inputs_embeds=embeds).logits


# ---------------------------------------------------------------------------------------------------------------
def assert_matches_official(src: str, dst: str, sd: dict, py: str, clip_archs: dict, convnext: dict | None = None):
    """Convert `src` with the CLI, load the result, and compare tower maps, visual tokens and logits with the
    reference, both in float64 so that 1e-5 bounds the difference of the two computations rather than rounding (the
    deformable sampling stays fp32 on our side); returns the loaded model (float64)."""
    assert main([src, dst]) == 0
    model = PiipLlavaForConditionalGeneration.from_pretrained(dst).eval().double()
    cfg = model.config
    assert cfg.image_token_id == LLAMA["vocab_size"]

    sd64 = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    ref = OfficialReference(sd64, parse_tower_config(py), clip_archs, convnext)
    pixel_values = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        ours = model.vision_tower(pixel_values)
        theirs = ref.tower(pixel_values)
        for a, b in zip(ours, theirs, strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        proj_ours = model.multi_modal_projector(ours)
        proj_ref = ref.projector(*theirs)
        torch.testing.assert_close(proj_ours, proj_ref, rtol=1e-5, atol=1e-5)

        before, after = torch.tensor([1, 5, 9, 17]), torch.tensor([33, 7, 2])
        n = cfg.num_image_tokens
        input_ids = torch.cat([before, torch.full((n,), cfg.image_token_id), after])[None]
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
        ref_logits = ref.logits(before, after, proj_ref)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    return model


@pytest.mark.parametrize("kind,fmt", [("clip", "safetensors"), ("mix", "bin")])
def test_converted_model_matches_official_forward(tmp_path, kind, fmt):
    src, sd = write_checkpoint(tmp_path, kind, fmt, seed=1 if kind == "clip" else 2)
    dst = str(tmp_path / "converted")
    py = os.path.join(src, f"configs/piip-llava_{kind}_tiny.py")
    model = assert_matches_official(src, dst, sd, py, {1: CLIP_L, 2: CLIP_B}, CONVNEXT if kind == "mix" else None)
    assert os.path.isfile(os.path.join(dst, "tokenizer.model")) and os.path.isfile(os.path.join(dst, "tokenizer_config.json"))
    assert model.config.projector_type == "piip_mlp" and model.config.projector_groups == 32
    assert model.config.vision_config.enforce_pyramid  # the released layouts keep our pyramid rules


# ---------------------------------------------------------------------------------------------------------------
# Every layout the official code writes and loads (issue 12 §2): one official-format checkpoint per case
# ---------------------------------------------------------------------------------------------------------------
CLIP_48 = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, image_size=48,
               patch_size=16)  # widths divisible by the official default of 6 heads
CLIP_24 = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=64,
               patch_size=16)
# CLIPs named by ids we do not know: their heads are 64 wide, as the converter assumes when it reads the shapes
CLIP_W64 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, image_size=64,
                patch_size=16)
CLIP_W128 = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=48,
                 patch_size=16)
CONVNEXT_V2 = dict(depths=[1, 1, 2, 1], dims=[8, 16, 32, 64], use_grn=True, ls_init_value=None)  # no layer scale

# branches: (img_size, interaction_indexes, pretrained, use_cls_token or None = key left out, arch, local config.json)
# inter: the interaction layout the official code builds from that .py (written into the weights);
# expect: the same facts in our interaction config.
OFFICIAL_CASES = {
    # no interaction key at all: normal attention, 6 heads, no ConvFFN, drop path 0.3 (PIIPTwoBranchConfig);
    # `ln` projector; branch2 leaves use_cls_token out (official default False)
    "normal-defaults": dict(
        backbone="", proj="ln",
        branches=[(64, [[0, 1], [2, 3]], "pretrained/clip-48", True, CLIP_48, True),
                  (128, [[0, 0], [1, 1]], "pretrained/clip-24", None, CLIP_24, True)],
        inter=dict(attn="normal", heads=6, ratio=1.0, cffn=False, norm="ln", proj=True),
        expect=dict(attn_type="normal", num_heads=6, deform_ratio=1.0, with_cffn=False, drop_path_rate=0.3,
                    norm="ln", with_proj=True)),
    # normal attention with ConvFFN and norm_layer="none" (identities instead of the three LayerNorms)
    "normal-cffn-no-norm": dict(
        backbone="interact_attn_type='normal', deform_num_heads=4, with_cffn=True, norm_layer='none', ", proj="gn",
        branches=[(64, [[0, 1], [2, 3]], "pretrained/tiny-clip-l", True, CLIP_L, True),
                  (128, [[0, 0], [1, 1]], "pretrained/tiny-clip-b", True, CLIP_B, True)],
        inter=dict(attn="normal", heads=4, ratio=1.0, cffn=True, norm="none", proj=True),
        expect=dict(attn_type="normal", num_heads=4, with_cffn=True, norm="none")),
    # deform named, everything else default (6 heads, deform_ratio 1.0, no ConvFFN), without the interaction
    # projections: each injector reads the other branch's width
    "deform-defaults-no-proj": dict(
        backbone="interact_attn_type='deform', interaction_proj=False, ", proj="ln",
        branches=[(64, [[0, 1], [2, 3]], "pretrained/clip-48", True, CLIP_48, True),
                  (128, [[0, 0], [1, 1]], "pretrained/clip-24", True, CLIP_24, True)],
        inter=dict(attn="deform", heads=6, ratio=1.0, cffn=False, norm="ln", proj=False),
        expect=dict(attn_type="deform", num_heads=6, deform_ratio=1.0, with_cffn=False, with_proj=False)),
    # the projector's `out_shape`: both maps resized to 6x6 -> 36 visual tokens instead of branch2's 8x8
    "ln-projector-out-shape": dict(
        backbone="interact_attn_type='deform', deform_num_heads=4, deform_ratio=0.5, with_cffn=True, ",
        proj="ln", proj_extra=", out_shape=6",
        branches=[(64, [[0, 1], [2, 3]], "pretrained/tiny-clip-l", True, CLIP_L, True),
                  (128, [[0, 0], [1, 1]], "pretrained/tiny-clip-b", True, CLIP_B, True)],
        inter=dict(attn="deform", heads=4, ratio=0.5, cffn=True, norm="ln", proj=True),
        expect=dict(attn_type="deform"), tokens=36),
    # both CLIPs unknown (a hub id and a cluster path): derived from the shapes, no flag; branch1 is the smaller
    # model and does not see a smaller image (img_size 160 >= 128: the official forward feeds it the 128 px image)
    "unknown-ids-against-our-pyramid": dict(
        backbone="interact_attn_type='deform', deform_num_heads=4, deform_ratio=0.5, with_cffn=True, ", proj="gn",
        branches=[(160, [[0, 0], [1, 1]], "someone/clip-w64", True, CLIP_W64, False),
                  (128, [[0, 0], [1, 1]], "/mnt/petrelfs/share/clip-w128", True, CLIP_W128, False)],
        inter=dict(attn="deform", heads=4, ratio=0.5, cffn=True, norm="ln", proj=True),
        expect=dict(attn_type="deform", num_heads=4),
        warns=[r"branch1\.pretrained 'someone/clip-w64' is neither a local folder",
               r"branch2\.pretrained '/mnt/petrelfs/share/clip-w128' is neither a local folder",
               r"branch1 sees the 128 px image", r"branch 0 \(clip, ~.*M params\) is smaller than branch 1",
               r"branch 0 \(clip, 128px\) must see a smaller image"]),
}


def write_case(root, name: str, spec: dict, seed: int) -> tuple[str, dict, str, dict]:
    """An official-format CLIP+CLIP checkpoint for one of OFFICIAL_CASES -> (folder, state dict, .py path, archs)."""
    src, gen, archs, branches = root / name, Gen(seed), {}, []
    for k, (img, indexes, pretrained, cls, arch, local, *patch) in enumerate(spec["branches"], start=1):
        patch = patch[0] if patch else arch["patch_size"]  # run-time patch_size (kernel); arch: the pretrained one
        if local:
            (src / "configs" / pretrained).mkdir(parents=True)
            (src / "configs" / pretrained / "config.json").write_text(
                json.dumps({"model_type": "clip_vision_model", "hidden_act": "quick_gelu", **arch}))
        write_clip(gen, f"{T}branch{k}.clip_model.", arch, kernel=patch)
        archs[k] = arch
        branches.append(f'dict(model_type="clip_hf", img_size={img}, patch_size={patch}, '
                        f'pretrain_patch_size={arch["patch_size"]}, '
                        f"interaction_indexes={indexes}, pretrained={pretrained!r}"
                        + ("" if cls is None else f", use_cls_token={cls}") + ")")
    d1, d2 = archs[1]["hidden_size"], archs[2]["hidden_size"]
    for i in range(len(spec["branches"][0][1])):
        write_interaction(gen, f"{T}interactions.{i}.interaction_units_12.", d1, d2, **spec["inter"])
    write_projector(gen, [d1, d2], spec["proj"])
    write_llama(gen)
    py = (f"model = dict(\n    backbone=dict({spec['backbone']}model_cls='2branch_v1', unfreeze='none',\n"
          f"        branch1={branches[0]},\n        branch2={branches[1]}),\n"
          f"    projector=dict(type='separate_2branch_v1', dim1={d1}, dim2={d2}, norm={spec['proj']!r}"
          f"{spec.get('proj_extra', '')}),\n)\n")
    save_official(src, "configs/tower.py", py, gen.sd)
    return str(src), gen.sd, str(src / "configs/tower.py"), archs


def convert_case_checking_warnings(tmp_path, name: str, spec: dict, seed: int):
    """Write the official case, convert it, check the forward against the official one and that every warning the
    case expects (`spec["warns"]` patterns) was given; returns the converted model."""
    src, sd, py, archs = write_case(tmp_path, name, spec, seed=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = assert_matches_official(src, str(tmp_path / "out"), sd, py, archs)
    messages = [str(w.message) for w in caught]
    for pattern in spec.get("warns", []):
        assert any(re.search(pattern, m) for m in messages), (pattern, messages)
    return model


@pytest.mark.parametrize("name", sorted(OFFICIAL_CASES))
def test_every_official_layout_gives_the_official_forward(tmp_path, name):
    spec = OFFICIAL_CASES[name]
    model = convert_case_checking_warnings(tmp_path, name, spec, seed=sorted(OFFICIAL_CASES).index(name) + 10)
    inter = model.config.vision_config.interaction
    assert {k: inter[k] for k in spec["expect"]} == spec["expect"]
    assert model.config.vision_config.enforce_pyramid == (not spec.get("warns"))
    assert model.config.num_image_tokens == spec.get("tokens", 64)


# ---------------------------------------------------------------------------------------------------------------
# Layouts the official code runs although our presets never write them: interaction ranges that leave blocks out,
# overlap or are empty (BranchConfig.strict_ranges False), and a CLIP kernel resized to a new patch_size at the
# pretrained stride (BranchConfig.patch_stride)
# ---------------------------------------------------------------------------------------------------------------
CLIP_L14 = dict(CLIP_L, image_size=42, patch_size=14)  # pretrained at patch 14 (3x3 grid)
CLIP_P14 = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=1, image_size=56,
                patch_size=14)  # pretrained at patch 14 (4x4 grid); one head of 24, as derived from the shapes

# as OFFICIAL_CASES, a branch tuple may end with the run-time patch_size (the kernel the weights hold); ranges: our
# interaction_indexes (None: the official ones tile the blocks); stride: our patch_stride per branch
BEYOND_PRESET_CASES = {
    # deform: branch1 skips blocks 1 and 3 (block 2 named as -2), its third range [3, 2] is empty; branch2 skips
    # block 0 first, then runs block 1 again, then [5, 9] (past its 2 blocks) runs nothing
    "ranges-skip-overlap-empty": dict(
        backbone="interact_attn_type='deform', deform_num_heads=4, deform_ratio=0.5, with_cffn=True, ", proj="gn",
        branches=[(64, [[0, 0], [-2, -2], [3, 2]], "pretrained/tiny-clip-l", True, CLIP_L, True),
                  (128, [[1, 1], [0, 1], [5, 9]], "pretrained/tiny-clip-b", True, CLIP_B, True)],
        inter=dict(attn="deform", heads=4, ratio=0.5, cffn=True, norm="ln", proj=True),
        ranges=[[[0, 0], [2, 2], [0, -1]], [[1, 1], [0, 1], [0, -1]]], stride=[None, None], tokens=64,
        warns=[r"branch1\.interaction_indexes .* blocks \[1, 3\] never run, 1 range\(s\) run no block",
               r"branch2\.interaction_indexes .* blocks \[1\] run more than once, 1 range\(s\) run no block"]),
    # branch2 pretrained at patch 14, run at patch_size 16: the 16x16 kernel at stride 14 gives (128 - 16) // 14 + 1
    # = 9 tokens a side (81 visual tokens). Normal attention (the official deformable grids would assume 8); the id
    # is unknown, so the shapes and pretrain_patch_size give the architecture
    "resized-kernel-old-stride": dict(
        backbone="", proj="gn",
        branches=[(64, [[0, 1], [2, 3]], "pretrained/clip-48", True, CLIP_48, True),
                  (128, [[0, 0], [1, 1]], "someone/clip-p14", True, CLIP_P14, False, 16)],
        inter=dict(attn="normal", heads=6, ratio=1.0, cffn=False, norm="ln", proj=True),
        ranges=None, stride=[None, 14], tokens=81, warns=[r"branch2\.pretrained 'someone/clip-p14' is neither"]),
    # branch1 pretrained at patch 14, run at 16 on 64 px: (64 - 16) // 14 + 1 = 4 = 64 // 16, so the official
    # deformable grids agree with the tokens and the official code runs it with deform attention
    "resized-kernel-deform": dict(
        backbone="interact_attn_type='deform', deform_num_heads=4, deform_ratio=0.5, with_cffn=True, ", proj="ln",
        branches=[(64, [[0, 1], [2, 3]], "pretrained/clip-l-p14", True, CLIP_L14, True, 16),
                  (128, [[0, 0], [1, 1]], "pretrained/tiny-clip-b", True, CLIP_B, True)],
        inter=dict(attn="deform", heads=4, ratio=0.5, cffn=True, norm="ln", proj=True),
        ranges=None, stride=[14, None], tokens=64, warns=[]),
}


@pytest.mark.parametrize("name", sorted(BEYOND_PRESET_CASES))
def test_official_layouts_beyond_our_presets_give_the_official_forward(tmp_path, name):
    spec = BEYOND_PRESET_CASES[name]
    model = convert_case_checking_warnings(tmp_path, name, spec, seed=sorted(BEYOND_PRESET_CASES).index(name) + 30)
    branches = model.config.vision_config.branch_configs()
    if spec["ranges"] is None:
        assert all(b.strict_ranges for b in branches)
    else:
        assert [b.interaction_indexes for b in branches] == spec["ranges"]
        assert not any(b.strict_ranges for b in branches)
    assert [b.patch_stride for b in branches] == spec["stride"]
    assert model.config.num_image_tokens == spec["tokens"]


def test_mix_ranges_that_leave_convnext_blocks_out(tmp_path):
    """ConvNeXt ranges [[0, 3], [5, 5]]: block 4 (stage 2) is skipped and the last stage never runs, so the branch
    ends at stride 16 with 32 channels (8x8 visual tokens, projector dim2 32), as in the official mix forward;
    branch1 (CLIP) skips block 2."""
    py = (MIX_PY.replace("[0, 2], [3, 7],", "[0, 3], [5, 5],").replace("[[0, 1], [2, 3]]", "[[0, 1], [3, 3]]")
          .replace("dim2=64", "dim2=32"))
    layout = Gen(11)
    for i in range(2):
        write_interaction(layout, f"{T}interactions.{i}.interaction_units_12.", 64, 32)
    write_projector(layout, [64, 32])
    src, sd = write_checkpoint(tmp_path, "mix", "safetensors", seed=8, py=py, extra_keys=layout.sd)
    path = os.path.join(src, "configs/piip-llava_mix_tiny.py")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = assert_matches_official(src, str(tmp_path / "out"), sd, path, {1: CLIP_L}, CONVNEXT)
    messages = " | ".join(str(w.message) for w in caught)
    assert re.search(r"branch2\.interaction_indexes .* blocks \[4, 6, 7\] never run", messages), messages
    assert re.search(r"branch1\.interaction_indexes .* blocks \[2\] never run", messages), messages
    b2 = model.config.vision_config.branch_configs()[1]
    assert (b2.interaction_indexes, b2.width, b2.grid, b2.strict_ranges) == ([[0, 3], [5, 5]], 32, 8, False)


@pytest.mark.parametrize("ranges,message", [
    ("[0, 2], [4, 7],", r"block 4 takes 32 channels but the blocks run before it leave 16"),  # skips a downsampling
    ("[0, 2], [3, 2],", r"\[3, 2\] runs no block; the official 2branch_mix forward fails"),
    ("[0, 2], [3, 9],", r"\[3, 9\] ends outside blocks 0\.\.7; the official 2branch_mix model fails to build"),
])
def test_mix_ranges_the_official_code_cannot_run(tmp_path, ranges, message):
    src, _ = write_checkpoint(tmp_path, "mix", "safetensors", py=MIX_PY.replace("[0, 2], [3, 7],", ranges))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)
        with pytest.raises(ValueError, match=message):
            build_config(src)


def test_range_and_stride_fields_of_our_own_configs():
    from piip_llava.models.configuration_piip_llava import BranchConfig

    with pytest.raises(ValueError, match="cover every block"):  # our presets: a gap is a typo
        BranchConfig(type="clip", image_size=64, backbone=CLIP_L, interaction_indexes=[[0, 1], [2, 2]])
    gaps = BranchConfig(type="clip", image_size=64, backbone=CLIP_L, interaction_indexes=[[0, 1], [3, 3], [0, -1]],
                        strict_ranges=False)
    assert BranchConfig(**json.loads(json.dumps(gaps.to_dict()))) == gaps  # config.json round trip
    with pytest.raises(ValueError, match=r"\[2, 5\] must satisfy 0 <= start <= end \+ 1 <= 4"):
        BranchConfig(type="clip", image_size=64, backbone=CLIP_L, interaction_indexes=[[2, 5]], strict_ranges=False)
    with pytest.raises(ValueError, match="patch_stride 14 other than patch_size 16 is for CLIP branches"):
        BranchConfig(type="clip", image_size=64, backbone=CLIP_L, patch_stride=14)  # backbone patch 16, not 14
    kept = BranchConfig(type="clip", image_size=128, backbone=CLIP_P14, patch_size=16, patch_stride=14)
    assert (kept.grid, kept.strides[-1]) == (9, 14)


_REMOTE_TOWER = r'''
from transformers import AutoModelForImageTextToText
ck, out = sys.argv[1], sys.argv[2]
model = AutoModelForImageTextToText.from_pretrained(ck, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    torch.save(model.get_image_features(x), out)
'''


def test_resized_kernel_and_skipped_blocks_load_as_remote_code(tmp_path):
    """The converted checkpoint (patch_stride, strict_ranges False) runs with transformers alone, as in-package."""
    from piip_llava.testing import run_without_package

    spec = dict(BEYOND_PRESET_CASES["resized-kernel-old-stride"])
    spec["branches"] = [(64, [[0, 0], [2, 2]], "pretrained/clip-48", True, CLIP_48, True),
                        (128, [[1, 1], [1, 1]], "pretrained/clip-p14", True, CLIP_P14, True, 16)]
    src, _, _, _ = write_case(tmp_path, "remote", spec, seed=40)
    dst = str(tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)
        assert main([src, dst]) == 0
    proc = run_without_package(_REMOTE_TOWER, [dst, str(tmp_path / "out.pt")], str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = PiipLlavaForConditionalGeneration.from_pretrained(dst).eval()
    b1, b2 = model.config.vision_config.branch_configs()
    assert (b1.strict_ranges, b2.strict_ranges, b2.patch_stride, model.config.num_image_tokens) == (False, False, 14, 81)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), model.get_image_features(x),
                                   rtol=0, atol=0)


def test_mix_with_an_unknown_convnext_v2_and_ln_projector(tmp_path):
    """ConvNeXt-V2 (GRN, no layer scale) under a timm tag we do not know: derived from the shapes, no flag."""
    py_text = MIX_PY.replace("pretrained/tiny-convnext", "convnextv2_tiny.unknown_tag").replace('norm="gn"', 'norm="ln"')
    src, sd = write_checkpoint(tmp_path, "mix", "safetensors", seed=7, py=py_text, convnext=CONVNEXT_V2,
                               proj_norm="ln")
    py = os.path.join(src, "configs/piip-llava_mix_tiny.py")
    with pytest.warns(ConversionWarning, match=r"branch2\.pretrained 'convnextv2_tiny\.unknown_tag' is neither"):
        model = assert_matches_official(src, str(tmp_path / "out"), sd, py, {1: CLIP_L}, CONVNEXT_V2)
    backbone = model.config.vision_config.branch_configs()[1].backbone
    assert backbone == {"depths": [1, 1, 2, 1], "dims": [8, 16, 32, 64], "ls_init_value": None, "use_grn": True}
    assert model.config.projector_norm == "ln"


def test_interactions_are_not_identities(tmp_path):
    src, sd = write_checkpoint(tmp_path, "clip", "safetensors", seed=3)
    tower_cfg = parse_tower_config(os.path.join(src, "configs/piip-llava_clip_tiny.py"))
    x = torch.randn(1, 3, 128, 128)
    gated = OfficialReference(sd, tower_cfg, {1: CLIP_L, 2: CLIP_B}).tower(x)
    zero = {k: (torch.zeros_like(v) if k.endswith(("ca_weight", "cffn_weight")) else v) for k, v in sd.items()}
    plain = OfficialReference(zero, tower_cfg, {1: CLIP_L, 2: CLIP_B}).tower(x)
    assert (gated[0] - plain[0]).abs().max() > 1e-2 and (gated[1] - plain[1]).abs().max() > 1e-2


def test_normal_attention_and_ln_projector_keys():
    wk, wv = torch.randn(6, 4), torch.randn(6, 4)
    a = f"{T}interactions.0.interaction_units_12.branch2to1_injector.attn."
    sd = {a + "wq.weight": torch.ones(6, 6), a + "wk.weight": wk, a + "wv.weight": wv,
          a + "proj.weight": torch.ones(6, 6), a + "proj.bias": torch.ones(6),
          "model.mm_projector.branch1.1.weight": torch.ones(1),
          "model.mm_projector.branch1.5.weight": torch.ones(1)}
    out = convert_official_state_dict(sd, build_config_for_norm("ln"))
    ours = "model.vision_tower.interactions.0.interaction_units_12.branch2to1_injector.attn."
    assert sorted(out) == sorted([ours + "q.weight", ours + "kv.weight", ours + "proj.weight", ours + "proj.bias",
                                  "model.multi_modal_projector.branches.0.linear_1.weight",
                                  "model.multi_modal_projector.branches.0.linear_2.weight"])
    assert torch.equal(out[ours + "kv.weight"], torch.cat([wk, wv]))  # CrossAttention.kv: k rows, then v rows
    lone = convert_official_state_dict({a + "wk.weight": wk})  # without its wv: kept, so a strict load names it
    assert list(lone) == ["model.vision_tower.interactions.0.interaction_units_12.branch2to1_injector.attn.wk.weight"]


def build_config_for_norm(norm: str):
    """A config whose only relevant facts here are the projector norm and one interaction block."""
    from piip_llava.models.configuration_piip_llava import PiipLlavaConfig

    branches = [dict(type="clip", image_size=64, backbone=CLIP_L, interaction_indexes=[[0, 3]]),
                dict(type="clip", image_size=128, backbone=CLIP_B, interaction_indexes=[[0, 1]])]
    return PiipLlavaConfig(vision_config={"branches": branches, "interaction": {"num_heads": 4}},
                           text_config=dict(LLAMA, model_type="llama"), projector_norm=norm)


def test_gamma_key_mapping_is_exact():
    sd = {f"{T}branch2.convnext_model.stages.1.blocks.0.weight": torch.ones(1),
          f"{T}branch2.convnext_model.stages.1.blocks.0.norm.weight": torch.ones(1),
          f"{T}branch2.convnext_model.stages.1.downsample.1.weight": torch.ones(1),
          f"{T}branch1.clip_model.embeddings.position_ids": torch.ones(1),
          "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(1),
          "model.mm_projector.branch2.3.bias": torch.ones(1),
          "model.mm_projector.2.weight": torch.ones(1),
          "lm_head.weight": torch.ones(1)}
    out = convert_official_state_dict(sd)
    assert sorted(out) == sorted([
        "model.vision_tower.branches.1.model.stages.1.blocks.0.gamma",
        "model.vision_tower.branches.1.model.stages.1.blocks.0.norm.weight",
        "model.vision_tower.branches.1.model.stages.1.downsample.1.weight",
        "model.multi_modal_projector.branches.1.norm.bias",
        "model.multi_modal_projector.linear_2.weight",
        "lm_head.weight",
    ])


def test_official_branch_ids_resolve_from_the_builtin_table(tmp_path):
    py = tmp_path / "cfg.py"
    py.write_text(MIX_PY.replace("pretrained/tiny-clip-l", "OpenGVLab/clip-vit-large-patch14to16-224")
                  .replace("pretrained/tiny-convnext", "convnext_base.clip_laiona_augreg_320")
                  .replace("img_size=64", "img_size=224").replace("img_size=128", "img_size=640")
                  .replace("[[0, 1], [2, 3]]", "[[0, 11], [12, 23]]").replace("[0, 2], [3, 7],", "[0, 19], [20, 38],")
                  .replace("deform_num_heads=4", "deform_num_heads=16"))
    vision, proj = vision_config_from_official(parse_tower_config(str(py)), [str(tmp_path)])
    b1, b2 = vision.branch_configs()
    assert (b1.backbone["hidden_size"], b1.backbone["num_hidden_layers"], b1.grid) == (1024, 24, 14)
    assert b2.backbone["dims"] == [128, 256, 512, 1024] and b2.grid == 20 and proj["norm"] == "gn"


def test_unknown_branch_id_comes_from_the_weights_without_a_flag(tmp_path):
    src, _ = write_checkpoint(tmp_path, "clip", "safetensors")
    py = os.path.join(src, "configs/piip-llava_clip_tiny.py")
    with open(py) as f:
        text = f.read()
    with open(py, "w") as f:
        f.write(text.replace("pretrained/tiny-clip-b", "someone/unknown-clip"))
    # without weights there is nothing to derive it from
    with pytest.raises(ConversionError, match=r"branch2\.pretrained 'someone/unknown-clip' is not a known.*no weights"):
        build_config(src)
    from piip_llava.models.convert_official import load_official_state_dict

    derived = r"branch2\.pretrained 'someone/unknown-clip' .*\(1 attention head\(s\) of 32, quick_gelu"
    with pytest.warns(ConversionWarning, match=derived):
        config = build_config(src, load_official_state_dict(src))
    b2 = config.vision_config.branch_configs()[1]
    assert (b2.backbone["hidden_size"], b2.backbone["num_hidden_layers"], b2.backbone["image_size"]) == (32, 2, 64)
    with pytest.warns(ConversionWarning, match=derived):
        assert main([src, str(tmp_path / "out")]) == 0


def test_convnext_architecture_from_weights(tmp_path):
    src, sd = write_checkpoint(tmp_path, "mix", "safetensors")
    py = os.path.join(src, "configs/piip-llava_mix_tiny.py")
    with open(py) as f:
        text = f.read()
    with open(py, "w") as f:
        f.write(text.replace("pretrained/tiny-convnext", "not/a-known-convnext"))
    from piip_llava.models.convert_official import load_official_state_dict

    with pytest.warns(ConversionWarning, match="not/a-known-convnext"):
        config = build_config(src, load_official_state_dict(src))
    assert config.vision_config.branch_configs()[1].backbone == CONVNEXT
    with pytest.warns(ConversionWarning, match="not/a-known-convnext"):
        assert main([src, str(tmp_path / "out"), "--infer-from-weights"]) == 0  # the old flag is still accepted


@pytest.mark.parametrize("edit,message", [
    (("deform_num_heads=4,", "deform_num_heads=4, model_cls_x=1,"), None),  # unknown keys: ignored, as officially
    (('model_cls="2branch_v1"', 'model_cls="3branch"'), r"model_cls '3branch' is not one of"),
    (('model_type="clip_hf",\n            img_size=128', 'model_type="convnext_timm",\n            img_size=128'),
     r"branch2\.model_type 'convnext_timm' is not one 2branch_v1 builds"),
    (("interact_attn_type='deform'", "interact_attn_type='window'"), r"interact_attn_type 'window'"),
    (("interact_attn_type='deform',", "interact_attn_type='deform', norm_layer='bn',"), r"norm_layer 'bn'"),
    (('norm="gn",', 'norm="bn",'), r"projector norm 'bn'"),
    # a resized kernel at the old stride with deformable attention: 7x7 tokens where MSDeformAttn is told 128 // 32
    (("patch_size=16,\n            pretrain_patch_size=16,\n            interaction_indexes=[[0, 0]",
      "patch_size=32,\n            pretrain_patch_size=16,\n            interaction_indexes=[[0, 0]"),
     r"branch2 gives 7x7 tokens at interaction 0, but the official deformable attention expects 128 // 32 = 4"),
])
def test_official_options_outside_what_the_official_code_runs(tmp_path, edit, message):
    """What the official loader itself cannot build (or what it builds and we cannot express) is a clear error."""
    assert edit[0] in CLIP_CLIP_PY
    src, _ = write_checkpoint(tmp_path, "clip", "safetensors", py=CLIP_CLIP_PY.replace(*edit))
    if message is None:
        build_config(src)
        return
    with pytest.raises(ConversionError, match=message):
        build_config(src)


def test_projector_entry_is_required(tmp_path):
    py = CLIP_CLIP_PY[: CLIP_CLIP_PY.index("    projector=dict(")] + ")\n"
    src, _ = write_checkpoint(tmp_path, "clip", "safetensors", py=py)
    with pytest.raises(ConversionError, match="no `projector=dict"):
        build_config(src)


def test_our_own_configs_still_refuse_a_broken_pyramid():
    from piip_llava.models.configuration_piip_llava import PiipVisionConfig

    branches = [dict(type="clip", image_size=128, backbone=CLIP_B, interaction_indexes=[[0, 1]]),
                dict(type="clip", image_size=64, backbone=CLIP_L, interaction_indexes=[[0, 3]])]
    inter = {"num_heads": 4}
    with pytest.raises(ValueError, match="must see a smaller image"):
        PiipVisionConfig(branches=branches, interaction=inter)
    with pytest.warns(UserWarning, match=r"must see a smaller image .*\(kept: enforce_pyramid is False"):
        vision = PiipVisionConfig(branches=branches, interaction=inter, enforce_pyramid=False)
    assert len(vision.pyramid_violations()) == 2
    with pytest.warns(UserWarning, match="kept: enforce_pyramid is False"):
        assert PiipVisionConfig(**vision.to_dict()).enforce_pyramid is False  # survives config.json


def test_missing_and_unexpected_keys_are_listed(tmp_path, capsys):
    drop = f"{T}interactions.1.interaction_units_12.branch1to2_injector.ffn.fc1.bias"
    src, _ = write_checkpoint(tmp_path, "clip", "safetensors", drop_keys=(drop,),
                              extra_keys={"model.vision_tower.vision_tower.branch1.clip_model.extra.weight": torch.ones(2)})
    assert main([src, str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "1 missing key(s)" in err and "interactions.1.interaction_units_12.branch1to2_injector.ffn.fc1.bias" in err
    assert "1 unexpected key(s)" in err and "vision_tower.branches.0.model.extra.weight" in err


def test_interaction_count_mismatch_is_a_clear_error(tmp_path):
    extra = {f"{T}interactions.2.interaction_units_12.branch2to1_proj.weight": torch.ones(64, 32)}
    src, _ = write_checkpoint(tmp_path, "clip", "safetensors", extra_keys=extra)
    with pytest.raises(ConversionError, match="3 interaction blocks .* declares 2"):
        from piip_llava.models.convert_official import convert_checkpoint

        convert_checkpoint(src, str(tmp_path / "out"))


def test_tower_config_is_parsed_without_executing(tmp_path):
    py = tmp_path / "evil.py"
    py.write_text("import os\nos.system('touch pwned')\nmodel = dict(backbone=dict(branch1=dict(img_size=8)))\n")
    assert parse_tower_config(str(py)) == {"backbone": {"branch1": {"img_size": 8}}}
    assert not (tmp_path / "pwned").exists()
    bad = tmp_path / "bad.py"
    bad.write_text("model = dict(backbone=make_backbone())\n")
    with pytest.raises(ConversionError, match="bad.py:1"):
        parse_tower_config(str(bad))


def test_plain_llava15_checkpoint(tmp_path):
    """LLaVA-1.5: CLIP tower named by a local folder, penultimate layer, patch tokens, mlp2x_gelu projector;
    a single safetensors file without index."""
    src = tmp_path / "llava15"
    (src / "clip-tiny").mkdir(parents=True)
    arch = dict(CLIP_L, image_size=64)
    (src / "clip-tiny" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", **arch}))
    gen = Gen(5)
    write_clip(gen, "model.vision_tower.vision_tower.vision_model.", arch)
    D = LLAMA["hidden_size"]
    gen.linear("model.mm_projector.0", D, 64)
    gen.linear("model.mm_projector.2", D, D)
    write_llama(gen)
    save_file(gen.sd, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(llava_config("clip-tiny")))
    dst = str(tmp_path / "out")
    assert main([str(src), dst]) == 0
    model = PiipLlavaForConditionalGeneration.from_pretrained(dst).eval()
    assert model.config.projector_type == "mlp2x_gelu" and model.config.num_image_tokens == 16

    sd = {k.replace("model.vision_tower.vision_tower.vision_model.", f"{T}branch1.clip_model."): v
          for k, v in gen.sd.items()}
    ref = OfficialReference(sd, {"backbone": {}}, {1: arch})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        t, cls, _, _ = ref.clip_embed(1, x)
        y = torch.cat([cls, t], 1)
        for i in range(arch["num_hidden_layers"] - 1):  # hidden_states[-2]
            y = ref.clip_layer(1, i, y)
        feats = y[:, 1:]  # select_feature "patch"
        visual = ref.lin(F.gelu(ref.lin(feats, "model.mm_projector.0")), "model.mm_projector.2")
        torch.testing.assert_close(model.get_image_features(x), visual, rtol=1e-4, atol=1e-4)


def test_inference_engine_loads_an_official_checkpoint_directly(tmp_path, tokenizer_dir):
    """`InferenceEngine.load(official_dir)` converts in memory: same logits as the converted checkpoint on disk."""
    import shutil

    from piip_llava.models.convert_official import load_official_checkpoint
    from piip_llava.serve.inference import ChatRequest, InferenceEngine

    src, _ = write_checkpoint(tmp_path, "clip", "safetensors", seed=3)
    for name in os.listdir(tokenizer_dir):  # a real SentencePiece tokenizer instead of the placeholder file
        shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(src, name))
    dst = str(tmp_path / "converted")
    assert main([src, dst]) == 0
    on_disk = PiipLlavaForConditionalGeneration.from_pretrained(dst).eval()
    in_memory = load_official_checkpoint(src)
    ids = torch.tensor([[1, 5, 9] + [on_disk.config.image_token_id] * on_disk.config.num_image_tokens + [7]])
    px = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(in_memory(input_ids=ids, pixel_values=px).logits,
                                   on_disk(input_ids=ids, pixel_values=px).logits, rtol=0, atol=0)
    engine = InferenceEngine.load(src, device="cpu", dtype="fp32")
    assert type(engine.model) is PiipLlavaForConditionalGeneration
    assert engine.prompt_ids(ChatRequest([{"role": "user", "content": "hi"}]))[0] == 1  # BOS from the copied tokenizer
