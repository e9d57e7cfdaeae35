"""Model core: shapes per preset family, identity at init, gradients, deformable attention, round trips, errors."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from piip_llava.layers.deform_attn import DeformableAttention
from piip_llava.models import (
    PiipLlavaConfig,
    PiipLlavaForConditionalGeneration,
    PiipVisionConfig,
    PiipVisionTower,
    load_preset,
    preset_names,
)

TINY = [n for n in preset_names() if n.startswith("tiny-")]


def _seeded_model(preset, gate_std=0.0, seed=0):
    """A tiny model; with gate_std > 0 the gates (and the zero-initialised offset/weight projections, which
    otherwise make attention independent of the query) are drawn at random so every parameter matters."""
    torch.manual_seed(seed)
    model = PiipLlavaForConditionalGeneration(load_preset(preset))
    if gate_std:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("ca_weight", "cffn_weight")):
                    p.normal_(0.0, gate_std)
                elif name.endswith(("sampling_offsets.weight", "attention_weights.weight")):
                    p.normal_(0.0, 0.05)
    return model


def _image_batch(model, batch, n_images, prefix=3, suffix=4, seed=0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        ids = torch.randint(3, 400, (prefix + suffix,), generator=g).tolist()
        if b < n_images:
            ids = ids[:prefix] + [cfg.image_token_id] * cfg.num_image_tokens + ids[prefix:]
        rows.append(ids)
    length = max(map(len, rows))
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding
        input_ids[i, length - len(r):] = torch.tensor(r)
        mask[i, length - len(r):] = 1
    size = cfg.vision_config.image_size
    pixels = torch.randn(n_images, 3, size, size, generator=g)
    return input_ids, mask, pixels


EXPECTED_MAPS = {
    "tiny-piip2_clip_64-128": [(64, 4, 4), (32, 8, 8)],
    "tiny-piip2_clip_normal_64-128": [(64, 4, 4), (32, 8, 8)],
    "tiny-piip3_clip_64-96-128": [(64, 4, 4), (48, 6, 6), (32, 8, 8)],
    "tiny-piip2_convnext_clip_64-128": [(96, 4, 4), (128, 4, 4)],
    "tiny-piip2_internvit_siglip_64-128": [(64, 4, 4), (32, 8, 8)],
    "tiny-llava15_clip_64": [(64, 4, 4)],
}


@pytest.mark.parametrize("preset", TINY)
def test_tiny_shapes(preset):
    model = _seeded_model(preset, gate_std=0.1).eval()
    cfg = model.config
    size = cfg.vision_config.image_size
    maps = model.vision_tower(torch.randn(2, 3, size, size))
    assert [tuple(m.shape[1:]) for m in maps] == EXPECTED_MAPS[preset]
    assert all(m.shape[0] == 2 for m in maps)
    feats = model.get_image_features(torch.randn(2, 3, size, size))
    assert feats.shape == (2, cfg.num_image_tokens, cfg.text_config.hidden_size)
    ids, mask, px = _image_batch(model, 3, 2)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=px)
    assert out.logits.shape == (3, ids.shape[1], cfg.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize(
    "preset, grids, tokens",
    [
        ("piip-llava_clip-bl_512-256_7B", [(1024, 16), (768, 32)], 1024),
        ("piip-llava_clip-bl_512-448_7B", [(1024, 28), (768, 32)], 1024),
        ("piip-llava_convnext-b_clip-l_640-224_7B", [(1024, 14), (1024, 20)], 400),
        ("piip-llava_convnext-b_clip-l_1024-336_7B", [(1024, 21), (1024, 32)], 1024),
        ("piip-llava_convnext-l_clip-l_1024-336_13B", [(1024, 21), (1536, 32)], 1024),
        ("llava-1.5_clip-l-336_7B", [(1024, 24)], 576),
    ],
)
def test_official_preset_shapes_on_meta(preset, grids, tokens):
    cfg = load_preset(preset)
    assert [(b.width, b.grid) for b in cfg.vision_config.branch_configs()] == grids
    assert cfg.num_image_tokens == tokens
    with torch.device("meta"):
        tower = PiipVisionTower(cfg.vision_config)
        maps = tower(torch.empty(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size))
    assert [(m.shape[1], m.shape[2]) for m in maps] == grids


def test_all_presets_parse_and_interactions_match():
    counts = {"piip-llava_convnext-b_clip-l_1024-336_13B": 24, "piip-llava_clip-bl_512-448_7B": 12,
              "piip-llava_clip-bl_512-256_7B": 2, "piip-llava_convnext-b_clip-l_640-224_7B": 2}
    for name in preset_names():
        cfg = load_preset(name)
        assert cfg.vision_config.num_branches >= 1
        if name in counts:
            assert cfg.vision_config.num_interactions == counts[name]


def test_zero_gates_equal_branches_run_alone():
    """With all gates at zero the tower equals each backbone run on its own (HF CLIP forward, no interactions),
    and drop path (train mode) changes nothing."""
    from transformers import CLIPVisionModel

    model = _seeded_model("tiny-piip2_clip_64-128")
    tower = model.vision_tower
    x = torch.randn(2, 3, 128, 128)
    tower.train()
    with torch.no_grad():
        train_maps = tower(x)
    tower.eval()
    with torch.no_grad():
        maps = tower(x)
    for a, b in zip(train_maps, maps):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for j, (cfg, branch) in enumerate(zip(tower.branch_cfgs, tower.branches)):
        hf = CLIPVisionModel(branch.model.config).eval()
        hf.load_state_dict(branch.model.state_dict())
        inp = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
        with torch.no_grad():
            ref = hf(pixel_values=inp, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
        ref_map = ref.transpose(1, 2).reshape(2, cfg.width, cfg.grid, cfg.grid)
        torch.testing.assert_close(maps[j], ref_map, rtol=1e-5, atol=1e-5)


def test_nonzero_gates_change_outputs():
    model = _seeded_model("tiny-piip2_clip_64-128").eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        base = model.vision_tower(x)
        for name, p in model.named_parameters():
            if name.endswith("ca_weight"):
                p.fill_(0.5)
        mixed = model.vision_tower(x)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(base, mixed))


# Parameters that exist in the backbones but are unused by the tower (spec 1.4, 1.9): no gradient expected.
UNUSED = ("post_layernorm", ".head.", "model.head", "layernorm.weight", "layernorm.bias")


@pytest.mark.parametrize("preset", ["tiny-piip2_clip_64-128", "tiny-piip3_clip_64-96-128",
                                    "tiny-piip2_convnext_clip_64-128", "tiny-piip2_internvit_siglip_64-128",
                                    "tiny-piip2_clip_normal_64-128"])
def test_gradients_reach_every_trainable_parameter(preset):
    model = _seeded_model(preset, gate_std=0.5)
    model.train()
    for m in model.modules():  # drop path (p=0.4) could drop a whole tiny batch: keep every path
        if m.__class__.__name__ == "DropPath":
            m.eval()
    ids, mask, px = _image_batch(model, 2, 2)
    labels = ids.masked_fill(ids == model.config.image_token_id, -100).masked_fill(mask == 0, -100)
    model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels).loss.backward()
    missing = [
        n for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
        and not any(u in n for u in UNUSED) and not n.startswith("vision_tower.branches.1.model.layernorm")
    ]
    assert missing == []


def _naive_deform(value, value_hw, loc, weights):
    """Independent reference: explicit bilinear interpolation with zero padding, loops over heads and points."""
    b, nv, m, dh = value.shape
    hv, wv = value_hw
    nq, k = loc.shape[1], loc.shape[3]
    out = torch.zeros(b, nq, m, dh, dtype=torch.float64)
    v = value.double().reshape(b, hv, wv, m, dh)
    for bi in range(b):
        for q in range(nq):
            for h in range(m):
                for p in range(k):
                    x = loc[bi, q, h, p, 0].item() * wv - 0.5
                    y = loc[bi, q, h, p, 1].item() * hv - 0.5
                    x0, y0 = math.floor(x), math.floor(y)
                    acc = torch.zeros(dh, dtype=torch.float64)
                    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                            if 0 <= yy < hv and 0 <= xx < wv:
                                acc += wy * wx * v[bi, yy, xx, h]
                    out[bi, q, h] += weights[bi, q, h, p].item() * acc
    return out.reshape(b, nq, m * dh)


def test_deformable_attention_matches_naive_reference():
    torch.manual_seed(0)
    attn = DeformableAttention(d_model=16, d_feat=16, num_heads=2, n_points=3, ratio=0.5)
    with torch.no_grad():  # random offsets, large enough that many samples fall outside the value map
        attn.sampling_offsets.weight.normal_(0, 2.0)
        attn.attention_weights.weight.normal_(0, 1.0)
    q_hw, v_hw = (3, 4), (5, 6)
    query = torch.randn(2, 12, 16)
    feat = torch.randn(2, 30, 16)
    out = attn(query, q_hw, feat, v_hw)
    # the same computation spelled out with the naive sampler
    from piip_llava.layers.deform_attn import reference_points

    value = attn.value_proj(feat).view(2, 30, 2, 4)
    offsets = attn.sampling_offsets(query).view(2, 12, 2, 3, 2)
    weights = attn.attention_weights(query).view(2, 12, 2, 3).softmax(-1)
    loc = reference_points(*q_hw, query.device)[None, :, None, None, :] + offsets / torch.tensor([6.0, 5.0])
    assert ((loc < 0) | (loc > 1)).any(), "test must exercise out-of-range samples"
    ref = attn.output_proj(_naive_deform(value.detach(), v_hw, loc.detach(), weights.detach()).float())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_deformable_init_ring():
    attn = DeformableAttention(d_model=32, d_feat=32, num_heads=16, n_points=4)
    bias = attn.sampling_offsets.bias.view(16, 4, 2)
    # head 0 points along +x at 1..4 cells, head 4 along +y
    torch.testing.assert_close(bias[0], torch.tensor([[1.0, 0], [2, 0], [3, 0], [4, 0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[4, :, 1], torch.tensor([1.0, 2, 3, 4]), atol=1e-6, rtol=0)
    assert attn.sampling_offsets.weight.abs().sum() == 0 and attn.attention_weights.weight.abs().sum() == 0


def test_save_load_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _seeded_model("tiny-piip3_clip_64-96-128", gate_std=0.3).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is PiipLlavaForConditionalGeneration
    assert loaded.config.vision_config.branches == model.config.vision_config.branches
    ids, mask, px = _image_batch(model, 2, 1)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask, pixel_values=px).logits,
            model(input_ids=ids, attention_mask=mask, pixel_values=px).logits, rtol=0, atol=0,
        )


def test_generate_with_and_without_cache_agree_and_mixed_batch():
    model = _seeded_model("tiny-piip2_clip_64-128", gate_std=0.3).eval()
    ids, mask, px = _image_batch(model, 3, 2)  # rows 0, 1 have images, row 2 is text-only
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        cached = model.generate(**kw)
        uncached = model.generate(**kw, use_cache=False)
    assert torch.equal(cached, uncached)
    # a left-padded batch equals each row generated alone
    with torch.no_grad():
        for row in range(3):
            keep = mask[row].bool()
            single = model.generate(input_ids=ids[row:row + 1, keep], attention_mask=mask[row:row + 1, keep],
                                    pixel_values=px[row:row + 1] if row < 2 else None, max_new_tokens=6, do_sample=False)
            assert torch.equal(single[0, -6:], cached[row, -6:])


def test_image_token_count_mismatch_is_a_clear_error():
    model = _seeded_model("tiny-piip2_clip_64-128").eval()
    ids, mask, px = _image_batch(model, 2, 2)
    with pytest.raises(ValueError, match="image-token positions but 1 images"):
        model(input_ids=ids, attention_mask=mask, pixel_values=px[:1])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids, attention_mask=mask)


def test_text_only_training_batch_touches_the_tower():
    """A text-only training batch still runs the tower (zero contribution) so DDP / ZeRO-3 ranks stay in step."""
    model = _seeded_model("tiny-piip2_clip_64-128").train()
    ids = torch.randint(3, 400, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    grad = model.multi_modal_projector.branches[0].linear_1.weight.grad
    assert grad is not None and grad.abs().sum() == 0


def _tiny_vision(**over):
    branches = copy.deepcopy(load_preset("tiny-piip2_clip_64-128").vision_config.branches)
    inter = dict(load_preset("tiny-piip2_clip_64-128").vision_config.interaction)
    for k, v in over.items():
        if k == "interaction":
            inter.update(v)
        else:
            idx, key = k.split("__")
            branches[int(idx)][key] = v
    return dict(branches=branches, interaction=inter)


@pytest.mark.parametrize(
    "over, message",
    [
        ({"0__type": "resnet"}, "unknown branch type 'resnet'"),
        ({"0__backbone": dict(hidden_size=66, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)},
         "hidden_size 66 is not divisible by num_attention_heads 4"),
        ({"0__interaction_indexes": [[0, 1], [2, 2]]}, "cover every block"),
        ({"0__interaction_indexes": [[0, 1], [3, 3]]}, "must be contiguous"),
        ({"1__interaction_indexes": [[0, 1]]}, "same, non-zero number of interaction ranges"),
        ({"0__image_size": 256}, "branch order"),
        ({"interaction": {"num_heads": 5}}, "not divisible by interaction num_heads 5"),
        ({"0__image_size": 72}, "not a multiple of patch_size 16"),
    ],
)
def test_bad_vision_configs_raise_clear_errors(over, message):
    with pytest.raises(ValueError, match=message):
        PiipVisionConfig(**_tiny_vision(**over))


def test_wrong_model_order_is_rejected():
    vision = _tiny_vision()
    vision["branches"][0]["backbone"], vision["branches"][1]["backbone"] = (
        vision["branches"][1]["backbone"], vision["branches"][0]["backbone"])
    vision["branches"][0]["interaction_indexes"], vision["branches"][1]["interaction_indexes"] = (
        vision["branches"][1]["interaction_indexes"], vision["branches"][0]["interaction_indexes"])
    with pytest.raises(ValueError, match="the largest model must take the lowest resolution"):
        PiipVisionConfig(**vision)


def test_bad_llava_config_errors():
    good = load_preset("tiny-piip2_clip_64-128")
    with pytest.raises(ValueError, match="projector_type"):
        PiipLlavaConfig(vision_config=good.vision_config.to_dict(), text_config=good.text_config.to_dict(),
                        projector_type="linear")
    with pytest.raises(ValueError, match="'mlp2x_gelu' is for single-branch"):
        PiipLlavaConfig(vision_config=good.vision_config.to_dict(), text_config=good.text_config.to_dict(),
                        projector_type="mlp2x_gelu")
    with pytest.raises(ValueError, match="unknown preset"):
        load_preset("no-such-preset")


def test_hooks_param_groups_and_no_weight_decay():
    model = _seeded_model("tiny-piip2_clip_64-128")
    groups = model.param_groups()
    total = sum(p.numel() for _, p in model.named_parameters())
    assert sum(p.numel() for g in groups.values() for _, p in g) == total
    assert all(n.startswith("model.vision_tower.interactions.") for n, _ in groups["interactions"])
    assert groups["projector"] and groups["llm"] and groups["branches"]
    nwd = model.no_weight_decay()
    assert any(n.endswith("ca_weight") for n in nwd) and not any(n.endswith("q_proj.weight") for n in nwd)
    model.gradient_checkpointing_enable()
    assert all(b.grad_checkpointing for b in model.vision_tower.branches)
    # checkpointed forward/backward gives the same gradients as the plain one
    model.train()
    for b in model.vision_tower.branches:
        b.grad_checkpointing = True
    ids, mask, px = _image_batch(model, 1, 1)
    torch.manual_seed(1)
    model.eval()  # no drop path randomness
    model.vision_tower.train()
    for m in model.vision_tower.modules():
        if m.__class__.__name__ == "DropPath":
            m.eval()
    model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=ids.masked_fill(ids >= 512, -100)).loss.backward()
    g1 = model.multi_modal_projector.branches[0].linear_1.weight.grad.clone()
    model.zero_grad()
    model.vision_tower.set_grad_checkpointing(False)
    model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=ids.masked_fill(ids >= 512, -100)).loss.backward()
    torch.testing.assert_close(g1, model.multi_modal_projector.branches[0].linear_1.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_items", [None, 7])
def test_training_loss_reads_the_lm_head_at_supervised_positions_only(num_items):
    """Training mode with labels: logits only where the next token is supervised, with the loss and the gradients of
    the full-vocabulary head at every position (mean per token, or a sum over `num_items_in_batch`)."""
    model = _seeded_model("tiny-piip2_clip_64-128", gate_std=0.1).train()
    ids, mask, px = _image_batch(model, 3, 2, suffix=6)
    labels = ids.clone()
    labels[:, :-4] = -100  # the last 4 tokens of each row are "the answer"
    labels[2, -2:] = -100
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}

    torch.manual_seed(1)  # the same drop-path draws in both passes
    out = model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels, **extra)
    out.loss.backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(1)
    hidden = model.model(input_ids=ids, attention_mask=mask, pixel_values=px).last_hidden_state
    full_logits = model.lm_head(hidden)
    ref = model.loss_function(logits=full_logits, labels=labels, vocab_size=model.config.text_config.vocab_size,
                              **extra)
    ref.backward()

    supervised = F.pad(labels, (0, 1), value=-100)[:, 1:] != -100
    vocab = model.config.text_config.vocab_size
    assert out.logits.shape == (int(supervised.sum()), vocab) == (4 + 4 + 2, vocab)
    torch.testing.assert_close(out.logits, full_logits[supervised])
    torch.testing.assert_close(out.loss, ref)
    assert fast.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in fast.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, msg=name)
    model.eval()
    assert model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels).logits.shape == (*ids.shape, vocab)
