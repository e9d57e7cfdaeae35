"""FSDP2 through the HF Trainer on the CPU (gloo, 2 processes, tiny preset): `ENGINE=fsdp` of the stage scripts
shards the model's `_no_split_modules` blocks, keeps the frozen tower bit-identical, trains exactly what plain
DDP trains (same seed, same data order: same losses, same weights), and `--resume auto` from its sharded checkpoint
(model and optimizer shards through torch.distributed.checkpoint) continues the uninterrupted run exactly."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from test_training import model_args_for, run_script, train_logs, training_args_for, write_records


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


def test_qlora_with_fsdp_is_refused_early(tmp_path):
    with pytest.raises(ValueError, match="--qlora with --fsdp"):
        training_args_for(tmp_path, tune="lora", qlora=True, fsdp="full_shard", fsdp_config={"version": 2})


def fake_fsdp_checkpoint(path, sharded=True):
    from safetensors.torch import save_file

    os.makedirs(path)
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        f.write('{"global_step": 2}')
    save_file({"w": torch.zeros(2)}, os.path.join(path, "model.safetensors"))
    for name in ("scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"):
        torch.save({}, os.path.join(path, name))
    if sharded:
        for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
            os.makedirs(os.path.join(path, folder))
            for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
                open(os.path.join(path, folder, name), "wb").close()
    else:
        for name in ("pytorch_model_fsdp.bin", "optimizer.bin"):
            torch.save({}, os.path.join(path, name))
    return path


@pytest.mark.parametrize("sharded", [True, False])
def test_fsdp_checkpoints_are_complete_only_with_model_and_optimizer_state(tmp_path, sharded):
    from piip_llava.train.checkpoints import checkpoint_problems

    path = fake_fsdp_checkpoint(str(tmp_path / "checkpoint-2"), sharded)
    assert checkpoint_problems(path) == []
    if sharded:  # DCP writes .metadata after every rank's shards: without it the save was cut
        os.remove(os.path.join(path, "optimizer_0", ".metadata"))
        assert checkpoint_problems(path) == ["FSDP sharded state optimizer_0/ has no .metadata (its save was interrupted)"]
    else:
        os.remove(os.path.join(path, "optimizer.bin"))
        assert checkpoint_problems(path) == ["FSDP state without optimizer.bin"]


COMMON = dict(TUNE="projector+llm", LR="2e-3", MAX_STEPS=4, SAVE_STEPS=2, SAVE_TOTAL_LIMIT=2)


@pytest.fixture(scope="module")
def runs(tokenizer_dir, tmp_path_factory):
    """The same 4-step stage-2 run under FSDP2 (sharded checkpoints at steps 2 and 4) and under plain DDP."""
    root = tmp_path_factory.mktemp("fsdp")
    data = write_records(str(root / "data"))
    common = dict(COMMON, TOKENIZER_PATH=tokenizer_dir, DATA_PATH=data["stage2"], IMAGE_FOLDER=str(root / "data"))
    fsdp, ddp = str(root / "fsdp"), str(root / "ddp")
    log = run_script("finetune_piip_llava.sh", ENGINE="fsdp", OUTPUT_DIR=fsdp, **common)
    run_script("finetune_piip_llava.sh", ZERO="none", OUTPUT_DIR=ddp, **common)
    return {"fsdp": fsdp, "ddp": ddp, "log": log, "common": common, "root": str(root)}


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_matches_ddp(runs, tokenizer_dir, tmp_path):
    from piip_llava.models import PiipLlavaForConditionalGeneration
    from piip_llava.train.model_setup import build_training_model

    fsdp, ddp, out = runs["fsdp"], runs["ddp"], runs["log"]
    assert "world size 2 (distributed)" in out
    assert "FSDP2 units: CLIPEncoderLayer,InteractionBlock,LlamaDecoderLayer" in out
    # the checkpoint holds FSDP's sharded model and optimizer state (one DCP file per rank), not DDP's optimizer.pt
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        files = sorted(os.listdir(os.path.join(fsdp, "checkpoint-4", folder)))
        assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"], files
    assert not os.path.exists(os.path.join(fsdp, "checkpoint-4", "optimizer.pt"))
    assert not os.path.exists(os.path.join(ddp, "checkpoint-4", "pytorch_model_fsdp_0"))

    a, b = train_logs(fsdp), train_logs(ddp)
    assert [h["step"] for h in a] == [1, 2, 3, 4]
    assert a[-1]["loss"] < a[0]["loss"] - 1.0, a
    assert [h["loss"] for h in a] == pytest.approx([h["loss"] for h in b], abs=1e-4)

    init = build_training_model(model_args_for(tokenizer_dir),
                                training_args_for(tmp_path / "x", tune="projector+llm")).state_dict()
    saved = load_file(os.path.join(fsdp, "model.safetensors"))  # gathered full weights, not shards
    assert set(saved) == set(init) and all(saved[k].shape == init[k].shape for k in init)
    assert load_file(os.path.join(fsdp, "checkpoint-4", "model.safetensors")).keys() == saved.keys()
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
    logits, ref_logits = logits_of(model), logits_of(ref)
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, ref_logits, atol=1e-4)


def logits_of(model):
    cfg = model.config
    torch.manual_seed(0)
    ids = torch.tensor([[1] + [cfg.image_token_id] * cfg.num_image_tokens + [5, 6, 7, 8, 9]])
    pixels = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


def sharded_optimizer_state(checkpoint, scratch):
    """A DCP optimizer folder (one file per rank) -> one state dict of full tensors, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(os.path.join(checkpoint, "optimizer_0"), scratch)
    return torch.load(scratch, weights_only=False)["optimizer"]["state"]


@pytest.mark.slow
def test_fsdp2_resume_auto_continues_exactly(runs, tmp_path):
    from piip_llava.models import PiipLlavaForConditionalGeneration

    # an interrupted run: only its step-2 checkpoint exists; `RESUME=auto` (the default) continues from it
    full, resumed = runs["fsdp"], str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    out = run_script("finetune_piip_llava.sh", ENGINE="fsdp", OUTPUT_DIR=resumed, **runs["common"])
    assert f"resuming from {resumed}/checkpoint-2" in out

    a, b = train_logs(full), train_logs(resumed)
    assert [h["step"] for h in b] == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's state
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5), (a, b)
        assert x["learning_rate"] == pytest.approx(y["learning_rate"], rel=1e-6)
    # the sharded Adam moments went through the checkpoint: after two more steps they equal the uninterrupted run's
    sa, sb = (sharded_optimizer_state(os.path.join(d, "checkpoint-4"), str(tmp_path / f"optim{i}.pt"))
              for i, d in enumerate((full, resumed)))
    assert sa.keys() == sb.keys() and any("language_model" in k for k in sa)
    for name in sa:
        assert float(sa[name]["step"]) == float(sb[name]["step"]) == 4.0
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(sa[name][key], sb[name][key], rtol=1e-5, atol=1e-8), (name, key)
    # the weights saved at the end load and give the same logits
    wa = PiipLlavaForConditionalGeneration.from_pretrained(full).eval()
    wb = PiipLlavaForConditionalGeneration.from_pretrained(resumed).eval()
    assert torch.allclose(logits_of(wa), logits_of(wb), atol=1e-5)
