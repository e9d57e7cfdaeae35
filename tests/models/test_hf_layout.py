"""The HF multimodal layout: `PiipLlavaModel` / `PiipLlavaForConditionalGeneration`, weight names, old checkpoints."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageTextToText

from piip_llava.models import PiipLlavaForConditionalGeneration, PiipLlavaModel, load_preset
from piip_llava.models.modeling_piip_llava import convert_legacy_key


def _model(preset="tiny-piip2_clip_64-128", seed=0):
    torch.manual_seed(seed)
    return PiipLlavaForConditionalGeneration(load_preset(preset)).eval()


def _inputs(model, seed=1):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    n = cfg.num_image_tokens
    ids = torch.randint(3, 200, (2, 12), generator=g)
    ids = torch.cat([ids[:, :3], torch.full((2, n), cfg.image_token_id), ids[:, 3:]], dim=1)
    size = cfg.vision_config.image_size
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, size, size, generator=g),
            "attention_mask": torch.ones_like(ids)}


def test_weight_names_follow_hf():
    names = list(_model().state_dict())
    prefixes = ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head.")
    assert all(n.startswith(prefixes) for n in names), [n for n in names if not n.startswith(prefixes)][:5]
    for p in prefixes:
        assert any(n.startswith(p) for n in names), p
    assert not any(n.startswith("model.language_model.lm_head") for n in names)


def test_auto_classes_and_base_model_output(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path).eval()
    full = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(base) is PiipLlavaModel and type(full) is PiipLlavaForConditionalGeneration
    batch = _inputs(model)
    with torch.no_grad():
        hidden = base(**batch).last_hidden_state
        logits = full(**batch).logits
        ref = model(**batch).logits
    assert hidden.shape == (*batch["input_ids"].shape, model.config.text_config.hidden_size)
    torch.testing.assert_close(full.lm_head(hidden), logits, rtol=0, atol=0)
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)


def test_get_image_features_contract():
    model = _model()
    px = _inputs(model)["pixel_values"]
    with torch.no_grad():
        plain = model.get_image_features(px)
        out = model.get_image_features(px, return_dict=True)
    n, d = model.config.num_image_tokens, model.config.text_config.hidden_size
    assert plain.shape == (2, n, d)
    torch.testing.assert_close(out.pooler_output, plain, rtol=0, atol=0)
    torch.testing.assert_close(out.last_hidden_state, plain, rtol=0, atol=0)


def test_old_flat_layout_checkpoint_loads(tmp_path):
    """A checkpoint written before the split (`vision_tower.*`, `language_model.model.*`,
    `language_model.lm_head.*`) loads into the HF layout with identical logits."""
    model = _model(seed=3)
    model.save_pretrained(tmp_path / "new")
    sd = load_file(str(tmp_path / "new" / "model.safetensors"))
    old = {}
    for k, v in sd.items():
        if k.startswith("lm_head."):
            old["language_model." + k] = v
        elif k.startswith("model.language_model."):
            old["language_model.model." + k[len("model.language_model."):]] = v
        else:
            old[k[len("model."):]] = v
    assert all(convert_legacy_key(k) in sd for k in old) and len(old) == len(sd)
    os.makedirs(tmp_path / "old")
    save_file(old, str(tmp_path / "old" / "model.safetensors"), metadata={"format": "pt"})
    with open(tmp_path / "new" / "config.json") as f:
        cfg = json.load(f)
    cfg.pop("auto_map", None)
    with open(tmp_path / "old" / "config.json", "w") as f:
        json.dump(cfg, f)
    loaded = PiipLlavaForConditionalGeneration.from_pretrained(tmp_path / "old").eval()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    batch = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_tied_embeddings_follow_text_config():
    import piip_llava.models.configuration_piip_llava as c

    with open(os.path.join(c.PRESET_DIR, "tiny-piip2_clip_64-128.json")) as f:
        data = json.load(f)
    data.pop("_comment", None)
    data["text_config"]["tie_word_embeddings"] = True  # as Qwen2-0.5B's config says
    tied = PiipLlavaForConditionalGeneration(c.PiipLlavaConfig(**data))
    assert tied.lm_head.weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    untied = _model()
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("bad", [{"input_ids": None, "inputs_embeds": None}])
def test_forward_needs_ids_or_embeds(bad):
    with pytest.raises(ValueError, match="exactly one"):
        _model().model(**bad)
