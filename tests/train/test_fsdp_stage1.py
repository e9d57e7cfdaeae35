"""Stage 1 (projector only) under FSDP2 on the CPU (gloo, 2 processes, tiny preset): the projector save gathers its
shards (rank 0 writes), the file equals a DDP stage-1 run's and loads into stage 2 (`--pretrained_projector`)."""
import os

import pytest
import torch
from safetensors.torch import load_file

from test_training import model_args_for, run_script, train_logs, training_args_for, write_records


@pytest.mark.slow
def test_fsdp2_stage1_projector_equals_ddp_and_loads_into_stage2(tokenizer_dir, tmp_path):
    from piip_llava.train.checkpoints import checkpoint_problems
    from piip_llava.train.model_setup import build_training_model

    data = write_records(str(tmp_path / "data"))
    # FSDP_STATE_DICT=full: this run also covers the gathered checkpoint format (pytorch_model_fsdp.bin, optimizer.bin)
    common = dict(TOKENIZER_PATH=tokenizer_dir, DATA_PATH=data["stage1"], IMAGE_FOLDER=str(tmp_path / "data"),
                  LR="1e-2", MAX_STEPS=4, SAVE_STEPS=4)
    fsdp, ddp = str(tmp_path / "fsdp"), str(tmp_path / "ddp")
    out = run_script("pretrain_piip_llava.sh", ENGINE="fsdp", FSDP_STATE_DICT="full", OUTPUT_DIR=fsdp, **common)
    run_script("pretrain_piip_llava.sh", ZERO="none", OUTPUT_DIR=ddp, **common)
    assert "world size 2 (distributed), stage 1, tune projector" in out
    assert "FSDP2 units: CLIPEncoderLayer,InteractionBlock,LlamaDecoderLayer" in out
    checkpoint = os.path.join(fsdp, "checkpoint-4")
    assert os.path.isfile(os.path.join(checkpoint, "pytorch_model_fsdp.bin"))
    assert checkpoint_problems(checkpoint) == []  # resumable

    a, b = train_logs(fsdp), train_logs(ddp)
    assert [h["loss"] for h in a] == pytest.approx([h["loss"] for h in b], abs=1e-4)
    projector = load_file(os.path.join(fsdp, "mm_projector.safetensors"))
    reference = load_file(os.path.join(ddp, "mm_projector.safetensors"))
    assert projector.keys() == reference.keys() and all(k.startswith("multi_modal_projector.") for k in projector)
    for k in projector:  # whole tensors, not one rank's shard
        assert projector[k].shape == reference[k].shape, k
        assert torch.allclose(projector[k], reference[k], atol=1e-5), k
    assert not os.path.exists(os.path.join(fsdp, "mm_interactions.safetensors"))

    init = build_training_model(model_args_for(tokenizer_dir), training_args_for(tmp_path / "x", stage=1)).state_dict()
    assert all(not torch.equal(v, init["model." + k]) for k, v in projector.items())  # it trained
    stage2 = build_training_model(model_args_for(tokenizer_dir),
                                  training_args_for(tmp_path / "y", stage=2, pretrained_projector=fsdp)).state_dict()
    assert all(torch.equal(stage2["model." + k], v) for k, v in projector.items())
