"""FSDP2 through the HF Trainer on the CPU (gloo, 2 processes, tiny preset): `ENGINE=fsdp` of the stage scripts
shards the model's `_no_split_modules` blocks, keeps the frozen tower bit-identical, and trains exactly what plain
DDP trains (same seed, same data order: same losses, same weights)."""
import os

import pytest
import torch
from safetensors.torch import load_file

from test_training import PRESET, model_args_for, run_script, train_logs, training_args_for, write_records


def test_wrap_classes_are_the_called_no_split_blocks(tokenizer_dir, tmp_path):
    from piip_llava.train.model_setup import build_training_model
    from transformers import PreTrainedModel

    from piip_llava.train.train import fsdp_wrap_classes

    model = build_training_model(model_args_for(tokenizer_dir), training_args_for(tmp_path, tune="projector+llm"))
    # CLIP lists CLIPVisionEmbeddings too, but the branch calls its patch/position embeddings directly: a unit
    # around it would never gather its shards, so it stays in the root unit
    listed = {n for m in model.modules() if isinstance(m, PreTrainedModel) for n in m._no_split_modules or ()}
    assert {"CLIPVisionEmbeddings", "SiglipEncoderLayer"} <= listed  # listed, but not blocks of this model
    assert fsdp_wrap_classes(model) == ["CLIPEncoderLayer", "InteractionBlock", "LlamaDecoderLayer"]


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_matches_ddp(tokenizer_dir, tmp_path):
    from piip_llava.models import PiipLlavaForConditionalGeneration
    from piip_llava.train.model_setup import build_training_model

    data = write_records(str(tmp_path / "data"))
    common = dict(TUNE="projector+llm", TOKENIZER_PATH=tokenizer_dir, DATA_PATH=data["stage2"],
                  IMAGE_FOLDER=str(tmp_path / "data"), LR="2e-3", MAX_STEPS=4, SAVE_STEPS=4)
    fsdp, ddp = str(tmp_path / "fsdp"), str(tmp_path / "ddp")
    out = run_script("finetune_piip_llava.sh", ENGINE="fsdp", OUTPUT_DIR=fsdp, **common)
    run_script("finetune_piip_llava.sh", ZERO="none", OUTPUT_DIR=ddp, **common)

    assert "world size 2 (distributed)" in out
    assert "FSDP2 units: CLIPEncoderLayer,InteractionBlock,LlamaDecoderLayer" in out
    # the checkpoint is FSDP's (optimizer and model state through accelerate), not DDP's
    assert os.path.isfile(os.path.join(fsdp, "checkpoint-4", "pytorch_model_fsdp.bin"))
    assert not os.path.exists(os.path.join(ddp, "checkpoint-4", "pytorch_model_fsdp.bin"))

    a, b = train_logs(fsdp), train_logs(ddp)
    assert [h["step"] for h in a] == [1, 2, 3, 4]
    assert a[-1]["loss"] < a[0]["loss"] - 1.0, a
    assert [h["loss"] for h in a] == pytest.approx([h["loss"] for h in b], abs=1e-4)

    init = build_training_model(model_args_for(tokenizer_dir),
                                training_args_for(tmp_path / "x", tune="projector+llm")).state_dict()
    saved = load_file(os.path.join(fsdp, "model.safetensors"))  # gathered full weights, not shards
    assert set(saved) == set(init) and all(saved[k].shape == init[k].shape for k in init)
    tower = [k for k in init if k.startswith("model.vision_tower.")]
    assert any(".interactions." in k for k in tower) and any(".encoder.layers." in k for k in tower)
    assert all(torch.equal(saved[k], init[k]) for k in tower)  # the frozen tower, sharded, is untouched
    trained = [k for k in init if k.startswith(("model.multi_modal_projector.", "model.language_model.", "lm_head."))]
    assert all(torch.isfinite(saved[k]).all() for k in trained)
    assert all(not torch.equal(saved[k], init[k]) for k in trained if k.startswith("model.multi_modal_projector."))
    reference = load_file(os.path.join(ddp, "model.safetensors"))
    assert all(torch.allclose(saved[k], reference[k], atol=1e-5) for k in init)

    model = PiipLlavaForConditionalGeneration.from_pretrained(fsdp).eval()
    ref = PiipLlavaForConditionalGeneration.from_pretrained(ddp).eval()
    cfg = model.config
    torch.manual_seed(0)
    ids = torch.tensor([[1] + [cfg.image_token_id] * cfg.num_image_tokens + [5, 6, 7, 8, 9]])
    pixels = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    with torch.no_grad():
        logits, ref_logits = model(input_ids=ids, pixel_values=pixels).logits, ref(input_ids=ids, pixel_values=pixels).logits
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, ref_logits, atol=1e-4)
