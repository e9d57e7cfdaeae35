"""Training arguments: model / data / training dataclasses, parsed from a YAML file and/or CLI flags.

    python -m piip_llava.train run.yaml --learning_rate 2e-5      # CLI flags override the YAML values

`ModelArguments` says which model to start from, `DataArguments` which data and how to present it, and
`PiipTrainingArguments` (a `transformers.TrainingArguments`) how to train: the stage, what is trainable (`tune`),
LoRA/QLoRA, per-module learning rates, the stage-1 projector to start from and resuming.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

TunePolicy = Literal["projector", "projector+interactions", "vision", "full", "projector+llm", "llm", "lora"]
TUNE_POLICIES = ("projector", "projector+interactions", "vision", "full", "projector+llm", "llm", "lora")
DEFAULT_LORA_TARGETS = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class ModelArguments:
    """Where the model comes from: a preset / config JSON (+ pretrained parts) or one of our checkpoints."""

    preset: str | None = field(default=None, metadata={"help": "preset name (piip_llava/models/presets) or JSON path"})
    config: str | None = field(default=None, metadata={"help": "path to a PiipLlavaConfig JSON (alternative to preset)"})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "a checkpoint of this project to continue from (save_pretrained folder)"})
    llm_path: str | None = field(default=None, metadata={"help": "pretrained LLM (HF folder or hub id); none: random init"})
    tokenizer_path: str | None = field(
        default=None, metadata={"help": "tokenizer folder; default: model_name_or_path, else llm_path"})
    load_pretrained_branches: bool = field(
        default=True, metadata={"help": "load the branch weights named in the config (`pretrained`)"})

    def __post_init__(self) -> None:
        sources = [x for x in (self.preset, self.config, self.model_name_or_path) if x]
        if len(sources) != 1:
            raise ValueError("give exactly one of --preset, --config or --model_name_or_path "
                             f"(got preset={self.preset!r}, config={self.config!r}, "
                             f"model_name_or_path={self.model_name_or_path!r})")
        if self.tokenizer_path is None:
            self.tokenizer_path = self.model_name_or_path or self.llm_path
        if self.tokenizer_path is None:
            raise ValueError("no tokenizer: pass --tokenizer_path (or --llm_path / --model_name_or_path that has one)")


@dataclass
class DataArguments:
    """LLaVA-format training data and how samples are built from it."""

    data_path: str | None = field(default=None, metadata={"help": "LLaVA JSON / JSONL file (required)"})
    image_folder: str | None = field(default=None, metadata={"help": "root of relative image paths [data file folder]"})
    template: str | None = field(
        default=None, metadata={"help": "conversation template [stage 1: plain, stage 2: the config's]"})
    image_aspect_ratio: Literal["pad", "square"] | None = field(
        default=None, metadata={"help": "override the config's [stage 1: square, stage 2: the config's]"})
    group_by_modality_length: bool = field(
        default=False, metadata={"help": "batches of one modality, grouped by length (LLaVA-1.5 stage 2)"})
    model_max_length: int = field(default=2048, metadata={"help": "max tokens after image-token expansion"})
    max_image_pixels: int = field(default=64_000_000, metadata={"help": "refuse larger images (skipped, counted)"})

    def __post_init__(self) -> None:
        if not self.data_path:
            raise ValueError("--data_path is required")
        if not os.path.isfile(self.data_path):
            raise ValueError(f"--data_path {self.data_path}: no such file")


@dataclass
class PiipTrainingArguments(TrainingArguments):
    """HF TrainingArguments + stage, trainable-parameter policy, LoRA/QLoRA and per-module learning rates."""

    stage: int = field(default=2, metadata={"help": "1: alignment pre-training, 2: instruction tuning"})
    tune: TunePolicy | None = field(
        default=None, metadata={"help": f"what trains, one of {TUNE_POLICIES} [stage 1: projector, stage 2: full]"})
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_target_modules: str = field(
        default=DEFAULT_LORA_TARGETS, metadata={"help": "regex over module names (LLM linears only by default)"})
    qlora: bool = field(default=False, metadata={"help": "4-bit NF4 base LLM (CUDA + bitsandbytes) with tune=lora"})
    vision_lr: float | None = field(default=None, metadata={"help": "LR of the branch backbones [learning_rate]"})
    interaction_lr: float | None = field(default=None, metadata={"help": "LR of the interactions [learning_rate]"})
    projector_lr: float | None = field(default=None, metadata={"help": "LR of the projector [learning_rate]"})
    pretrained_projector: str | None = field(
        default=None, metadata={"help": "stage-1 output folder or mm_projector.safetensors to start from"})
    vision_gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "checkpoint the branch blocks [same as --gradient_checkpointing]"})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "keep False: the batch carries pixel_values and num_skipped"})
    # The official recipe (LLaVA-1.5 / PIIP DeepSpeed configs have no `gradient_clipping`) does not clip.
    max_grad_norm: float = field(
        default=0.0, metadata={"help": "clip gradients to this norm; 0 = no clipping, as the official recipe"})
    loss_normalization: Literal["micro_batch", "tokens"] = field(
        default="micro_batch", metadata={
            "help": "micro_batch: mean over each micro-batch's supervised tokens, averaged over micro-batches and "
                    "GPUs (the official recipe, transformers 4.37); tokens: one mean over all supervised tokens of "
                    "the optimizer step (transformers 5's default)"})
    resume: str | None = field(
        default=None, metadata={"help": "'auto': the newest complete checkpoint in output_dir (if any); a checkpoint "
                                        "folder; 'none': start at step 0"})

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"--stage must be 1 or 2, got {self.stage}")
        if self.tune is None:
            self.tune = "projector" if self.stage == 1 else "full"
        if self.tune not in TUNE_POLICIES:
            raise ValueError(f"--tune must be one of {TUNE_POLICIES}, got {self.tune!r}")
        if self.loss_normalization not in ("micro_batch", "tokens"):
            raise ValueError(f"--loss_normalization must be 'micro_batch' or 'tokens', got {self.loss_normalization!r}")
        if self.qlora and self.tune != "lora":
            raise ValueError("--qlora needs --tune lora")
        if self.qlora and self.fsdp:  # FSDP2 shards 4-bit weights only with bnb_4bit_quant_storage = compute dtype
            raise ValueError("--qlora with --fsdp is not supported (the 4-bit LLM is not set up for FSDP2 sharding); "
                             "use --tune lora with --fsdp, or --qlora with DeepSpeed (ENGINE=deepspeed ZERO=2)")
        if self.qlora and not torch.cuda.is_available():
            raise ValueError("--qlora needs a CUDA GPU (bitsandbytes 4-bit); use --tune lora on the CPU")
        super().__post_init__()
        # transformers >= 5.24 calls it `activation_checkpointing` (the old names stay as mirrored aliases)
        if self.checkpointing_kwargs is None:
            self.checkpointing_kwargs = {"use_reentrant": False}  # frozen inputs still get gradients
        if self.vision_gradient_checkpointing is None:
            self.vision_gradient_checkpointing = self.llm_checkpointing

    @property
    def llm_checkpointing(self) -> bool:
        return bool(getattr(self, "activation_checkpointing", None) or self.gradient_checkpointing)

    @property
    def checkpointing_kwargs(self) -> dict[str, Any] | None:
        return getattr(self, "activation_checkpointing_kwargs", None) or self.gradient_checkpointing_kwargs

    @checkpointing_kwargs.setter
    def checkpointing_kwargs(self, value: dict[str, Any]) -> None:
        self.gradient_checkpointing_kwargs = value
        if hasattr(self, "activation_checkpointing_kwargs"):
            self.activation_checkpointing_kwargs = value

    def hand_checkpointing_to_model(self) -> None:
        """Clear the Trainer's checkpointing switch once the model has been set up (see train.py)."""
        self.gradient_checkpointing = False
        if hasattr(self, "activation_checkpointing"):
            self.activation_checkpointing = False


def _read_yaml(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values")
    return data


def _cli_value(argv: list[str], name: str) -> str | None:
    """Value of `--name X` / `--name=X` in argv (last one wins), without parsing the rest."""
    value = None
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def ensure_launcher_env(deepspeed_config: str | None) -> None:
    """A plain `python -m piip_llava.train --deepspeed ...` (no launcher): declare a 1-process world.

    Otherwise DeepSpeed falls back to MPI discovery and fails without mpi4py.
    """
    if not deepspeed_config or "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


def init_cpu_deepspeed_state(deepspeed_config: str | None) -> dict[str, Any]:
    """Trainer + DeepSpeed + CPU + several processes: pre-build accelerate's state on gloo (see the CPU notes §4.2).

    Without it accelerate reports one process while DeepSpeed sees the real world size and the batch-size check
    fails. Returns the extra TrainingArguments defaults that make the Trainer use the pre-built state.
    """
    if not deepspeed_config or torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return {"accelerator_config": {"use_configured_state": True}}


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, PiipTrainingArguments]:
    """[run.yaml] [--flag value ...] -> the three argument dataclasses (CLI overrides YAML).

    Also sets the CPU defaults: `use_cpu` for DDP without a GPU, and the DeepSpeed-on-CPU state (which must exist
    before TrainingArguments is built, because its `__post_init__` sets up the devices).
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    defaults: dict[str, Any] = {}
    if argv and argv[0].endswith((".yaml", ".yml")):
        defaults = _read_yaml(argv.pop(0))
    parser = HfArgumentParser((ModelArguments, DataArguments, PiipTrainingArguments))
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise ValueError(f"unknown argument(s) in the YAML file: {', '.join(unknown)}")
    deepspeed_config = _cli_value(argv, "deepspeed") or defaults.get("deepspeed")
    ensure_launcher_env(deepspeed_config)
    extra = init_cpu_deepspeed_state(deepspeed_config)
    if not torch.cuda.is_available() and not deepspeed_config:
        extra["use_cpu"] = True  # else each DDP rank silently trains alone on the CPU
    parser.set_defaults(**{**extra, **defaults})
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, training_args
