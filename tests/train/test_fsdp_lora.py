"""LoRA under FSDP2 on the CPU (gloo, 2 processes, tiny preset): the LoRA matrices shard with the LLM decoder layers
they sit in, the run trains what DDP trains, the adapter folder (+ its base) restores the trained model and
`merge_lora` gives its logits."""
import os

import pytest
import torch
from safetensors.torch import load_file

from test_fsdp import logits_of
from test_training import run_script, train_logs, write_records


@pytest.mark.slow
def test_fsdp2_lora_adapter_and_merge_give_the_trained_logits(tokenizer_dir, tmp_path):
    from piip_llava.models import PiipLlavaForConditionalGeneration
    from piip_llava.train.merge_lora import load_adapter_model, merge_lora

    data = write_records(str(tmp_path / "data"))
    common = dict(TUNE="lora", LORA_R=8, LORA_ALPHA=16, TOKENIZER_PATH=tokenizer_dir, DATA_PATH=data["stage2"],
                  IMAGE_FOLDER=str(tmp_path / "data"), LR="1e-2", MAX_STEPS=3, SAVE_STEPS=3)
    fsdp, ddp = str(tmp_path / "fsdp"), str(tmp_path / "ddp")
    out = run_script("finetune_piip_llava.sh", ENGINE="fsdp", OUTPUT_DIR=fsdp, **common)
    run_script("finetune_piip_llava.sh", ZERO="none", OUTPUT_DIR=ddp, **common)
    # peft's modules_to_save wrappers replace the interaction blocks in their ModuleList: those stay in the root unit
    assert "FSDP2 units: CLIPEncoderLayer,LlamaDecoderLayer" in out
    assert os.path.isfile(os.path.join(fsdp, "checkpoint-3", "pytorch_model_fsdp_0", ".metadata"))

    a, b = train_logs(fsdp), train_logs(ddp)
    assert [h["loss"] for h in a] == pytest.approx([h["loss"] for h in b], abs=1e-4)
    assert a[-1]["loss"] < a[0]["loss"] - 0.5, a
    adapter = load_file(os.path.join(fsdp, "adapter_model.safetensors"))
    reference = load_file(os.path.join(ddp, "adapter_model.safetensors"))
    assert adapter.keys() == reference.keys()
    assert any(".lora_A." in k for k in adapter) and any("multi_modal_projector" in k for k in adapter)
    assert all(adapter[k].shape == reference[k].shape and torch.allclose(adapter[k], reference[k], atol=1e-5)
               for k in adapter)

    trained = logits_of(load_adapter_model(ddp).eval())  # the model DDP trained, for the same data and seed
    loaded = logits_of(load_adapter_model(fsdp).eval())
    merged = logits_of(merge_lora(fsdp, str(tmp_path / "merged")).eval())
    reloaded = logits_of(PiipLlavaForConditionalGeneration.from_pretrained(str(tmp_path / "merged")).eval())
    base = logits_of(PiipLlavaForConditionalGeneration.from_pretrained(os.path.join(fsdp, "base")).eval())
    assert torch.allclose(loaded, trained, atol=1e-4)
    assert torch.allclose(merged, loaded, atol=1e-4) and torch.allclose(reloaded, merged, atol=1e-5)
    assert (loaded - base).abs().max() > 1e-2  # training changed the model, so the comparison means something
