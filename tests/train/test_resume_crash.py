"""Crash-safe checkpoints: a kill at any moment of a save leaves either a complete `checkpoint-N` or none, and
`--resume auto` takes the newest complete one (saying which it skipped and why), reproducing the uninterrupted run."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from piip_llava.train.checkpoints import (checkpoint_problems, find_resumable_checkpoint, publish_checkpoint,
                                          resolve_auto_resume, rotate_checkpoints)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESET = "tiny-piip2_clip_64-128"


def fake_checkpoint(path, step=1, deepspeed=False):
    """The files the Trainer writes for one checkpoint (small real safetensors / torch files)."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "piip_llava"}, f)
    save_file({"w": torch.ones(4, 4)}, os.path.join(path, "model.safetensors"))
    if deepspeed:
        os.makedirs(os.path.join(path, f"global_step{step}"))
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            torch.save({"x": torch.ones(3)}, os.path.join(path, f"global_step{step}", name))
        with open(os.path.join(path, "latest"), "w") as f:
            f.write(f"global_step{step}")
    else:
        torch.save({"state": {}}, os.path.join(path, "optimizer.pt"))
        torch.save({"last_epoch": step}, os.path.join(path, "scheduler.pt"))
    torch.save({"cpu": torch.get_rng_state()}, os.path.join(path, "rng_state.pth"))
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step, "log_history": []}, f)
    return path


def truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


@pytest.mark.parametrize("deepspeed", [False, True])
def test_complete_checkpoint_has_no_problems(tmp_path, deepspeed):
    assert checkpoint_problems(fake_checkpoint(str(tmp_path / "checkpoint-3"), 3, deepspeed)) == []


@pytest.mark.parametrize("damage,expected", [
    (lambda p: os.remove(os.path.join(p, "trainer_state.json")), "no trainer_state.json (the save was interrupted)"),
    (lambda p: os.remove(os.path.join(p, "model.safetensors")), "no model weights"),
    (lambda p: truncate(os.path.join(p, "model.safetensors")), "model.safetensors: truncated"),
    (lambda p: truncate(os.path.join(p, "optimizer.pt")), "optimizer.pt: truncated or damaged"),
    (lambda p: os.remove(os.path.join(p, "scheduler.pt")), "no scheduler.pt"),
    (lambda p: os.remove(os.path.join(p, "rng_state.pth")), "no rng_state*.pth"),
    (lambda p: open(os.path.join(p, "trainer_state.json"), "w").write('{"global_st'), "trainer_state.json is unreadable"),
])
def test_each_missing_or_cut_file_is_named(tmp_path, damage, expected):
    path = fake_checkpoint(str(tmp_path / "checkpoint-3"), 3)
    damage(path)
    problems = checkpoint_problems(path)
    assert any(expected in p for p in problems), problems


def test_deepspeed_state_must_match_latest(tmp_path):
    path = fake_checkpoint(str(tmp_path / "checkpoint-3"), 3, deepspeed=True)
    with open(os.path.join(path, "latest"), "w") as f:
        f.write("global_step9")
    assert any("global_step9/ lacks" in p for p in checkpoint_problems(path))


def test_auto_resume_skips_newer_incomplete_checkpoints_and_says_why(tmp_path, caplog):
    out = tmp_path / "out"
    fake_checkpoint(str(out / "checkpoint-20"), 20)
    configs_only = out / "checkpoint-40"
    os.makedirs(configs_only)
    shutil.copy(out / "checkpoint-20" / "config.json", configs_only)
    no_state = fake_checkpoint(str(out / "checkpoint-30"), 30)
    os.remove(os.path.join(no_state, "trainer_state.json"))
    os.makedirs(out / ".saving" / "checkpoint-50")
    caplog.set_level("INFO", logger="piip_llava.train.checkpoints")
    assert resolve_auto_resume(str(out)) == str(out / "checkpoint-20")
    text = caplog.text
    assert f"skipping {out / 'checkpoint-40'}, incomplete: no trainer_state.json" in text
    assert f"skipping {out / 'checkpoint-30'}, incomplete: no trainer_state.json" in text
    assert f"ignoring {out / '.saving' / 'checkpoint-50'}, a save interrupted" in text
    assert f"resuming from {out / 'checkpoint-20'}" in text


def test_no_complete_checkpoint_starts_fresh(tmp_path, caplog):
    os.makedirs(tmp_path / "checkpoint-5")
    caplog.set_level("INFO", logger="piip_llava.train.checkpoints")
    assert find_resumable_checkpoint(str(tmp_path))[0] is None
    assert resolve_auto_resume(str(tmp_path)) is None
    assert "no complete checkpoint" in caplog.text and "starts at step 0" in caplog.text


def test_explicit_resume_from_an_incomplete_folder_is_refused(tmp_path):
    from piip_llava.models.loading import CheckpointError
    from piip_llava.train.checkpoints import check_resume_folder

    path = fake_checkpoint(str(tmp_path / "checkpoint-7"), 7)
    os.remove(os.path.join(path, "optimizer.pt"))
    with pytest.raises(CheckpointError, match=r"--resume .*checkpoint-7: cannot resume from it: no optimizer\.pt"):
        check_resume_folder(path)


def test_rotation_keeps_the_only_complete_checkpoint_and_drops_older_partial_ones(tmp_path):
    out = str(tmp_path)
    old_complete = fake_checkpoint(os.path.join(out, "checkpoint-10"), 10)
    older_partial = os.path.join(out, "checkpoint-15")
    os.makedirs(older_partial)
    newer_partial = os.path.join(out, "checkpoint-90")  # a crashed save of an abandoned longer run: left for a look
    os.makedirs(newer_partial)
    newest = fake_checkpoint(os.path.join(out, "checkpoint-20"), 20)
    os.utime(newest, (0, 0))  # modification times do not decide what is kept
    deleted = rotate_checkpoints(out, 2, newest)
    assert deleted == [older_partial]
    assert os.path.isdir(old_complete) and os.path.isdir(newest) and os.path.isdir(newer_partial)
    assert rotate_checkpoints(out, 1, newest) == [old_complete]


def test_publish_replaces_a_stale_folder(tmp_path):
    staged = fake_checkpoint(str(tmp_path / ".saving" / "checkpoint-4"), 4)
    final = tmp_path / "checkpoint-4"
    os.makedirs(final)
    (final / "stale.txt").write_text("from a crashed run")
    publish_checkpoint(staged, str(final))
    assert not os.path.exists(staged) and not (final / "stale.txt").exists()
    assert checkpoint_problems(str(final)) == []


# ------------------------------------------------------------------------------------------ real kills, real runs
def run_training(output_dir, tokenizer_dir, data_path, moment=None, step=4):
    args = ["--stage", "2", "--tune", "full", "--preset", PRESET, "--tokenizer_path", tokenizer_dir,
            "--data_path", data_path, "--output_dir", output_dir, "--per_device_train_batch_size", "4",
            "--max_steps", "6", "--learning_rate", "2e-3", "--logging_steps", "1", "--save_strategy", "steps",
            "--save_steps", "2", "--save_total_limit", "2", "--disable_tqdm", "true", "--seed", "42",
            "--report_to", "none", "--resume", "auto"]
    if moment:
        cmd = [sys.executable, os.path.join(REPO, "tests", "train", "kill_during_save.py"), moment, str(step), *args]
    else:
        cmd = [sys.executable, "-m", "piip_llava.train", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    return proc.returncode, proc.stdout + proc.stderr


def losses(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        return [(h["step"], h["loss"]) for h in json.load(f)["log_history"] if "loss" in h]


@pytest.mark.slow
def test_kills_during_saves_then_resume_equals_the_uninterrupted_run(tmp_path, tokenizer_dir):
    from test_training import write_records

    data = write_records(str(tmp_path / "data"))["stage2"]
    full, crashed = str(tmp_path / "full"), str(tmp_path / "crashed")
    rc, log = run_training(full, tokenizer_dir, data)
    assert rc == 0, log[-3000:]

    # 1. killed after the weights of checkpoint-4 were written, before its optimizer state: no checkpoint-4 appears
    rc, log = run_training(crashed, tokenizer_dir, data, "weights_written")
    assert rc == -9, log[-3000:]
    staged = os.path.join(crashed, ".saving", "checkpoint-4")
    assert os.path.isfile(os.path.join(staged, "model.safetensors")) and not os.path.exists(os.path.join(staged, "optimizer.pt"))
    assert not os.path.exists(os.path.join(crashed, "checkpoint-4"))
    assert checkpoint_problems(os.path.join(crashed, "checkpoint-2")) == []

    # 2. resumed from checkpoint-2, killed again before trainer_state.json (the Trainer's last file)
    rc, log = run_training(crashed, tokenizer_dir, data, "before_trainer_state")
    assert rc == -9, log[-3000:]
    assert f"ignoring {staged}, a save interrupted" in log and f"resuming from {crashed}/checkpoint-2" in log
    assert os.path.isfile(os.path.join(staged, "optimizer.pt")) and not os.path.exists(os.path.join(staged, "trainer_state.json"))
    assert not os.path.exists(os.path.join(crashed, "checkpoint-4"))

    # 3. killed right after checkpoint-4 was renamed into place: it is complete
    rc, log = run_training(crashed, tokenizer_dir, data, "after_publish")
    assert rc == -9, log[-3000:]
    assert checkpoint_problems(os.path.join(crashed, "checkpoint-4")) == []

    # partial folders under final names, as older code or an interrupted copy leaves them
    ck4 = os.path.join(crashed, "checkpoint-4")
    configs_only = os.path.join(crashed, "checkpoint-6")
    os.makedirs(configs_only)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ck4, name), configs_only)
    no_state = shutil.copytree(ck4, os.path.join(crashed, "checkpoint-5"))
    os.remove(os.path.join(no_state, "trainer_state.json"))
    cut_weights = shutil.copytree(ck4, os.path.join(crashed, "checkpoint-8"))
    truncate(os.path.join(cut_weights, "model.safetensors"))

    # 4. resume skips 8, 6 and 5 (with reasons), continues from checkpoint-4 and finishes
    rc, log = run_training(crashed, tokenizer_dir, data)
    assert rc == 0, log[-3000:]
    assert f"skipping {cut_weights}, incomplete: {cut_weights}/model.safetensors: truncated" in log
    assert f"skipping {configs_only}, incomplete: no trainer_state.json" in log and "no model weights" in log
    assert f"skipping {no_state}, incomplete: no trainer_state.json" in log
    assert f"resuming from {ck4}" in log

    a, b = losses(full), losses(crashed)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4, 5, 6]
    assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a, b)), (a, b)
    wa, wb = load_file(os.path.join(full, "model.safetensors")), load_file(os.path.join(crashed, "model.safetensors"))
    assert set(wa) == set(wb) and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    # the new checkpoint-6 replaced the partial one; checkpoint-5 (partial, older) is gone; no staging left behind
    assert checkpoint_problems(os.path.join(crashed, "checkpoint-6")) == []
    assert not os.path.exists(no_state) and not os.path.exists(os.path.join(crashed, ".saving"))
