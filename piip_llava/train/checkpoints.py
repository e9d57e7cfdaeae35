"""Training checkpoints that are either complete or absent, and the choice of the one to resume from.

The HF Trainer writes `OUT/checkpoint-N/` file by file (model, optimizer, scheduler, RNG states, and
`trainer_state.json` last), so a kill during a save leaves a folder that looks like a checkpoint but cannot be resumed
from. `PiipTrainer` therefore saves into `OUT/.saving/checkpoint-N/` and, once every rank has finished writing,
renames it to `OUT/checkpoint-N` (`publish_checkpoint`, an atomic rename on one filesystem). `--resume auto` takes the
newest checkpoint that passes `checkpoint_problems` and logs every newer one it skipped with the reason; that check
also covers folders written by other tools or copied by hand.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil

from ..models.loading import CheckpointError, check_weight_file, weight_files

logger = logging.getLogger(__name__)

STAGING_DIR = ".saving"  # under OUT; not matched by the Trainer's `checkpoint-*` globs
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
# accelerate's FSDP checkpoint names (save_fsdp_model / save_fsdp_optimizer, model and optimizer index 0)
FSDP_MODEL_DCP, FSDP_OPTIMIZER_DCP = "pytorch_model_fsdp_0", "optimizer_0"
FSDP_MODEL_FILE, FSDP_OPTIMIZER_FILE = "pytorch_model_fsdp.bin", "optimizer.bin"


def checkpoint_step(name: str) -> int | None:
    m = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(name)))
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: str) -> list[str]:
    """`output_dir/checkpoint-N` folders, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(step, os.path.join(output_dir, n)) for n in os.listdir(output_dir)
             if (step := checkpoint_step(n)) is not None]
    return [p for _, p in sorted(found, reverse=True) if os.path.isdir(p)]


def _files_problem(files: list[str]) -> str | None:
    for f in files:
        try:
            check_weight_file(f)
        except CheckpointError as e:
            return str(e)
    return None


def _deepspeed_problem(path: str) -> str | None:
    """DeepSpeed engine state: the tag in `latest` names a `global_stepN/` folder with model and optimizer states."""
    latest = os.path.join(path, "latest")
    if not os.path.isfile(latest):
        return "DeepSpeed state without its `latest` file"
    with open(latest, encoding="utf-8") as f:
        tag = f.read().strip()
    folder = os.path.join(path, tag)
    states = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if not any(n.endswith("optim_states.pt") for n in states) or not any(n.endswith("model_states.pt") for n in states):
        return f"DeepSpeed state {tag}/ lacks its model or optimizer states"
    return _files_problem([os.path.join(folder, n) for n in states if n.endswith(".pt")])


def _fsdp_problem(path: str) -> str | None:
    """FSDP state as accelerate writes it: sharded (DCP folders `pytorch_model_fsdp_0/`, `optimizer_0/`, each
    complete once its `.metadata` exists: DCP writes it after every rank's shards) or full (`pytorch_model_fsdp.bin`,
    `optimizer.bin`)."""
    if os.path.isdir(os.path.join(path, FSDP_MODEL_DCP)):
        for folder in (FSDP_MODEL_DCP, FSDP_OPTIMIZER_DCP):
            if not os.path.isfile(os.path.join(path, folder, ".metadata")):
                return f"FSDP sharded state {folder}/ has no .metadata (its save was interrupted)"
        return None
    for name in (FSDP_MODEL_FILE, FSDP_OPTIMIZER_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            return f"FSDP state without {name}"
    return _files_problem([os.path.join(path, FSDP_MODEL_FILE), os.path.join(path, FSDP_OPTIMIZER_FILE)])


def is_fsdp_checkpoint(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, n)) for n in (FSDP_MODEL_DCP, FSDP_MODEL_FILE))


def checkpoint_problems(path: str) -> list[str]:
    """Why the Trainer could not resume exactly from folder `path` (empty: it can).

    Needs `trainer_state.json` (readable, with `global_step`), the model weights (full or LoRA adapter), the optimizer
    and scheduler states (or DeepSpeed's engine state, or FSDP's model and optimizer state) and the RNG states;
    weight and state files must not be cut.
    """
    if not os.path.isdir(path):
        return ["no such folder"]
    problems = []
    state_path = os.path.join(path, TRAINER_STATE)
    if not os.path.isfile(state_path):
        problems.append(f"no {TRAINER_STATE} (the save was interrupted)")
    else:
        try:
            with open(state_path, encoding="utf-8") as f:
                if "global_step" not in json.load(f):
                    problems.append(f"{TRAINER_STATE} has no global_step")
        except (ValueError, OSError) as e:
            problems.append(f"{TRAINER_STATE} is unreadable ({e})")
    try:
        weights = weight_files(path, ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin"))
    except CheckpointError as e:
        weights, problems = [], [*problems, str(e)]
    if not weights and not os.path.isfile(os.path.join(path, "latest")):
        problems.append("no model weights (model.safetensors / adapter_model.safetensors)")
    elif problem := _files_problem(weights):
        problems.append(problem)
    if os.path.isfile(os.path.join(path, "latest")) or any(n.startswith("global_step") for n in os.listdir(path)):
        if problem := _deepspeed_problem(path):
            problems.append(problem)
    elif is_fsdp_checkpoint(path):
        if problem := _fsdp_problem(path):
            problems.append(problem)
        if not os.path.isfile(os.path.join(path, "scheduler.pt")):
            problems.append("no scheduler.pt")
    else:
        for name in ("optimizer.pt", "scheduler.pt"):
            if not os.path.isfile(os.path.join(path, name)):
                problems.append(f"no {name}")
            elif problem := _files_problem([os.path.join(path, name)]):
                problems.append(problem)
    rng = [os.path.join(path, n) for n in os.listdir(path) if re.fullmatch(r"rng_state(_\d+)?\.pth", n)]
    if not rng:
        problems.append("no rng_state*.pth")
    elif problem := _files_problem(rng):
        problems.append(problem)
    return problems


def find_resumable_checkpoint(output_dir: str) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """(newest complete checkpoint or None, [(newer incomplete checkpoint, its problems)...])."""
    skipped = []
    for path in list_checkpoints(output_dir):
        problems = checkpoint_problems(path)
        if not problems:
            return path, skipped
        skipped.append((path, problems))
    return None, skipped


def interrupted_saves(output_dir: str) -> list[str]:
    """Checkpoints left half-written under `output_dir/.saving/` by a process that died while saving."""
    staging = os.path.join(output_dir, STAGING_DIR)
    return [os.path.join(staging, n) for n in sorted(os.listdir(staging))] if os.path.isdir(staging) else []


def resolve_auto_resume(output_dir: str) -> str | None:
    """`--resume auto`: the newest complete checkpoint (None: start at step 0); logs what it passes over and why."""
    for path in interrupted_saves(output_dir):
        logger.warning("resume auto: ignoring %s, a save interrupted before it completed (removed at the next save)",
                       path)
    found, skipped = find_resumable_checkpoint(output_dir)
    for path, problems in skipped:
        logger.warning("resume auto: skipping %s, incomplete: %s", path, "; ".join(problems))
    if found:
        logger.info("resume auto: resuming from %s", found)
    elif skipped:
        logger.warning("resume auto: no complete checkpoint in %s; training starts at step 0", output_dir)
    else:
        logger.info("resume auto: no checkpoint in %s yet; training starts at step 0", output_dir)
    return found


def check_resume_folder(path: str) -> None:
    """An explicit `--resume PATH` must be complete: CheckpointError naming what is missing."""
    problems = checkpoint_problems(path)
    if problems:
        raise CheckpointError(f"--resume {path}: cannot resume from it: {'; '.join(problems)}. Use a complete "
                              "checkpoint-N, or --resume auto to take the newest complete one")


def publish_checkpoint(staged: str, final: str) -> None:
    """Move a fully written checkpoint from the staging folder to its final name (replacing a stale one there)."""
    if os.path.exists(final):  # an incomplete leftover, or a run restarted from an earlier step: this save wins
        stale = f"{final}.replaced"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(staged, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(staged, final)


def rotate_checkpoints(output_dir: str, keep: int | None, newest: str, protected: tuple[str, ...] = ()) -> list[str]:
    """Delete what `save_total_limit` no longer needs; returns the deleted folders.

    Keeps `newest` (just saved), `protected` (the best model) and the newest other complete checkpoints up to `keep`;
    incomplete checkpoints older than `newest` can never be resumed from and go too. Never deletes the only complete
    checkpoint, whatever the order of modification times.
    """
    newest_step = checkpoint_step(newest)
    keep_paths = {os.path.abspath(newest), *(os.path.abspath(p) for p in protected if p)}
    complete_kept = 1
    deleted = []
    for path in list_checkpoints(output_dir):
        if os.path.abspath(path) in keep_paths:
            continue
        step = checkpoint_step(path)
        if checkpoint_problems(path):
            if step is not None and newest_step is not None and step < newest_step:
                deleted.append(path)
            continue
        if keep is None or keep <= 0 or complete_kept < keep:
            complete_kept += 1
            continue
        deleted.append(path)
    for path in deleted:
        logger.info("deleting %s (save_total_limit %s)", path, keep)
        shutil.rmtree(path, ignore_errors=True)
    return deleted
