"""`PiipTrainer`: the HF Trainer plus per-module learning rates, the modality sampler and progress metrics.

What it adds, and nothing else:
* optimizer param groups from the model hooks (`param_groups()` -> branches / interactions / projector / llm, each
  with its own LR; `no_weight_decay()` -> weight decay 0), also under peft (LoRA matrices join the `llm` group);
* LLaVA-1.5's modality- and length-grouped sampler when `group_by_modality_length`;
* checkpoints that are complete or absent: each `checkpoint-N` is written under `OUT/.saving/` and renamed into
  place once every rank has finished writing it (see `piip_llava.train.checkpoints`), so a kill during a save
  never leaves a `checkpoint-N` that `--resume auto` would pick and fail on;
* under FSDP, weights gathered for `from_pretrained` in every checkpoint and the final folder, whether the
  checkpoint's FSDP state is sharded or full (for a LoRA adapter only the trainable tensors are gathered);
* throughput and data-quality metrics in every training log: `samples_per_second`, `tokens_per_second`
  (non-padding tokens incl. visual tokens, all ranks), `skipped_records` (since the last log) and
  `skipped_records_total`. Skips are counted inside the dataset (possibly in DataLoader workers), travel in the
  batch as `num_skipped` and are popped here before the forward pass, so they survive worker processes and ranks.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ..data.sampler import LengthGroupedSampler
from .checkpoints import STAGING_DIR, TRAINER_STATE, publish_checkpoint, rotate_checkpoints
from .model_setup import unwrap_piip

logger = logging.getLogger(__name__)

SKIP_KEY = "num_skipped"


def build_param_groups(model: nn.Module, lr: float, weight_decay: float,
                       module_lrs: dict[str, float | None]) -> list[dict[str, Any]]:
    """Trainable parameters -> optimizer groups keyed by (module group, decay); `module_lrs[group]` or `lr`.

    Groups come from `PiipLlavaForConditionalGeneration.param_groups()`; parameters are matched by identity, so
    wrappers (peft, DDP) that rename them do not matter. Parameters outside every group (none today) go to `llm`.
    """
    piip = unwrap_piip(model)
    group_of: dict[int, str] = {id(p): g for g, params in piip.param_groups().items() for _, p in params}
    no_decay_ids = {id(p) for n, p in piip.named_parameters() if n in piip.no_weight_decay()}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (group_of.get(id(p), "llm"), id(p) not in no_decay_ids and p.ndim > 1)
        buckets.setdefault(key, []).append(p)
    groups = []
    for (group, decay), params in sorted(buckets.items()):
        group_lr = module_lrs.get(group) or lr
        groups.append({"params": params, "lr": group_lr, "weight_decay": weight_decay if decay else 0.0,
                       "name": f"{group}{'' if decay else '_no_decay'}"})
    groups.sort(key=lambda g: g["lr"] != lr)  # stable: the Trainer logs the first group's LR, so make it the base LR
    return groups


class PiipTrainer(Trainer):
    """HF Trainer with module-wise LRs, the modality sampler and skip/throughput logging (see the module doc)."""

    def __init__(self, *args: Any, group_by_modality_length: bool = False,
                 module_lrs: dict[str, float | None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self.args, "loss_normalization", "tokens") == "micro_batch":
            # The model then gets no `num_items_in_batch`: its loss is the mean over the micro-batch and the Trainer
            # divides by the accumulation steps (the official recipe), instead of one mean over the whole step.
            self.model_accepts_loss_kwargs = False
        self.group_by_modality_length = group_by_modality_length
        self.module_lrs = module_lrs or {}
        self._counts = torch.zeros(3, dtype=torch.float64)  # samples, tokens, skipped since the last log
        self._last_log_time: float | None = None
        self._skipped_total: int | None = None
        self._staging_root: str | None = None  # set while a checkpoint is being written (see _save_checkpoint)

    # ---- data order ----
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        return LengthGroupedSampler(
            self.args.train_batch_size * self.args.gradient_accumulation_steps, world_size=self.args.world_size,
            lengths=dataset.modality_lengths, group_by_modality=True, seed=self.args.seed)

    # ---- optimizer ----
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            groups = build_param_groups(model or self.model, self.args.learning_rate, self.args.weight_decay,
                                        self.module_lrs)
            for g in groups:
                logger.info("param group %-22s lr %.2e wd %.3g: %d tensors, %d params", g["name"], g["lr"],
                            g["weight_decay"], len(g["params"]), sum(p.numel() for p in g["params"]))
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model or self.model)
            optimizer_kwargs.pop("lr", None)  # every group carries its own
            self.optimizer = optimizer_cls([{k: v for k, v in g.items() if k != "name"} for g in groups],
                                           lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    # ---- weights: gathered under FSDP, whatever the checkpoint's state-dict type ----
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP the `from_pretrained` weights are gathered here (collective on every rank; rank 0 writes).

        The Trainer writes none when the checkpoint state dict is sharded, and would gather the whole model for a
        LoRA adapter; here a checkpoint always carries loadable weights, and under peft only the trainable tensors
        (LoRA matrices, `modules_to_save`: all the adapter holds) are gathered, not the frozen base LLM.
        """
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        from peft import PeftModel
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True,
                                   ignore_frozen_params=isinstance(self.model, PeftModel))
        self._save(output_dir or self.args.output_dir, state_dict=get_model_state_dict(self.model, options=options))

    # ---- checkpoints: written under OUT/.saving/, renamed into place when complete ----
    def _get_output_dir(self, trial) -> str:
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIR)
        if self.args.should_save:  # leftovers of a save that a kill interrupted
            shutil.rmtree(staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)  # every rank writes its part; the Trainer's rotation sees only this one
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()  # all ranks' files (DeepSpeed shards, RNG states) are on disk
        if not self.args.should_save:
            return
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        best = self.state.best_model_checkpoint
        if best and os.path.abspath(best).startswith(os.path.abspath(staging_root) + os.sep):
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            self.state.save_to_json(os.path.join(staged, TRAINER_STATE))
        publish_checkpoint(staged, final)
        shutil.rmtree(staging_root, ignore_errors=True)
        rotate_checkpoints(run_dir, self.args.save_total_limit, final, (self.state.best_model_checkpoint,))

    # ---- metrics ----
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        skipped = inputs.pop(SKIP_KEY, None)
        if self._last_log_time is None:
            self._last_log_time = time.perf_counter()
        mask = inputs.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        self._counts += torch.tensor([inputs["input_ids"].shape[0], tokens, int(skipped) if skipped is not None else 0],
                                     dtype=torch.float64)
        return super().training_step(model, inputs, num_items_in_batch)

    def _reduced_counts(self) -> torch.Tensor:
        counts = self._counts.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = self.args.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
            counts = counts.to(device)
            torch.distributed.all_reduce(counts)
        return counts.cpu()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: every rank gets here at the same step
            samples, tokens, skipped = self._reduced_counts().tolist()
            self._counts.zero_()
            now = time.perf_counter()
            elapsed = max(now - (self._last_log_time or now), 1e-9)
            self._last_log_time = now
            if self._skipped_total is None:  # resumed runs continue the total from the checkpoint's log history
                previous = [h["skipped_records_total"] for h in self.state.log_history if "skipped_records_total" in h]
                self._skipped_total = int(previous[-1]) if previous else 0
            self._skipped_total += int(skipped)
            logs.update(samples_per_second=round(samples / elapsed, 3), tokens_per_second=round(tokens / elapsed, 1),
                        skipped_records=int(skipped), skipped_records_total=self._skipped_total)
        super().log(logs, start_time)


class ProgressLogCallback(TrainerCallback):
    """One readable line per training log on the main process (the log file, not only the progress bar)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        logger.info(
            "step %d/%d  loss %.4f  lr %.3e  %.2f samples/s  %.0f tokens/s  skipped %d (total %d)",
            state.global_step, state.max_steps, logs["loss"], logs.get("learning_rate", float("nan")),
            logs.get("samples_per_second", 0.0), logs.get("tokens_per_second", 0.0),
            logs.get("skipped_records", 0), logs.get("skipped_records_total", 0))
