"""Model side of training: build the model to train, apply the freeze policy / LoRA, stage-1 projector I/O.

Freeze policies (`--tune`):

| policy                   | trains                                                  | official use          |
| ------------------------ | ------------------------------------------------------- | --------------------- |
| `projector`              | projector                                               | stage 1               |
| `projector+interactions` | projector + interactions (branches and LLM frozen)      | stage-1 option        |
| `vision`                 | branches + interactions + projector (LLM frozen)        | from-scratch towers   |
| `full`                   | everything                                              | stage 2               |
| `projector+llm`          | projector + LLM (branches and interactions frozen)      | LLaVA-1.5 stage 2     |
| `llm`                    | LLM only (for text-only data, e.g. language pretraining) | -                    |
| `lora`                   | LoRA on the LLM linears + projector + interactions      | stage-2 option        |

Stage 1 saves `mm_projector.safetensors` (`multi_modal_projector.*` keys; plus `mm_interactions.safetensors` when
the interactions trained too) and the config; stage 2 loads them with `--pretrained_projector`.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..constants import IMAGE_PLACEHOLDER
from ..models import PiipLlavaConfig, PiipLlavaForConditionalGeneration, load_preset, save_processor
from ..models.builder import build_model
from ..models.loading import CheckpointError, check_checkpoint, check_safetensors
from .arguments import ModelArguments, PiipTrainingArguments

logger = logging.getLogger(__name__)

PROJECTOR_FILE = "mm_projector.safetensors"
INTERACTIONS_FILE = "mm_interactions.safetensors"
TRAINABLE_GROUPS = {
    "projector": ("projector",),
    "projector+interactions": ("projector", "interactions"),
    "vision": ("projector", "interactions", "branches"),
    "full": ("projector", "interactions", "branches", "llm"),
    "projector+llm": ("projector", "llm"),
    "llm": ("llm",),
    "lora": ("projector", "interactions"),  # + the LoRA matrices peft adds
}


def pick_attn_implementation() -> str:
    """FlashAttention-2 when installed (CUDA), else PyTorch SDPA."""
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if torch.cuda.is_available() and is_flash_attn_2_available() else "sdpa"


def load_config(model_args: ModelArguments) -> PiipLlavaConfig:
    if model_args.model_name_or_path:
        check_checkpoint(model_args.model_name_or_path, "piip_llava", "--model_name_or_path")
        return PiipLlavaConfig.from_pretrained(model_args.model_name_or_path)
    return load_preset(model_args.preset or model_args.config)


def embedded_token_count(tokenizer) -> int:
    """Ids the LLM's embedding table must hold: every token but the image placeholder, whose positions take visual
    features instead (a saved checkpoint's tokenizer has it at `vocab_size`, one past the table)."""
    ids = [i for token, i in tokenizer.get_vocab().items() if token != IMAGE_PLACEHOLDER]
    return max(ids) + 1 if ids else 0


def check_tokenizer_fits(tokenizer, config: PiipLlavaConfig, tokenizer_path: str | None) -> None:
    """Refuse a tokenizer with ids past the LLM's embedding table (they would index out of range)."""
    num_tokens = embedded_token_count(tokenizer)
    if num_tokens > config.text_config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_path} has {num_tokens} tokens but the LLM "
                         f"vocabulary is {config.text_config.vocab_size}")


def build_base_model(model_args: ModelArguments, attn_implementation: str | None = None) -> PiipLlavaForConditionalGeneration:
    """A checkpoint of ours (`model_name_or_path`) or preset/config + pretrained branches + LLM, in fp32.

    Random parts (interactions, projector, a missing LLM) are drawn from torch's global RNG: seed it first.
    """
    attn = attn_implementation or pick_attn_implementation()
    if model_args.model_name_or_path:
        check_checkpoint(model_args.model_name_or_path, "piip_llava", "--model_name_or_path")  # CheckpointError
        logger.info("model: the checkpoint %s", model_args.model_name_or_path)
        return PiipLlavaForConditionalGeneration.from_pretrained(
            model_args.model_name_or_path, dtype=torch.float32, attn_implementation=attn)
    config = load_config(model_args)
    return build_model(config, load_branches=model_args.load_pretrained_branches, llm_path=model_args.llm_path,
                       attn_implementation=attn)


def projector_paths(path: str) -> tuple[str, str | None]:
    """Stage-1 output folder or projector file -> (projector file, interactions file or None)."""
    folder, proj = (path, os.path.join(path, PROJECTOR_FILE)) if os.path.isdir(path) else (os.path.dirname(path), path)
    if not os.path.isfile(proj):
        raise CheckpointError(f"--pretrained_projector {path}: no {PROJECTOR_FILE} there (give the stage-1 OUTPUT_DIR "
                              "after stage 1 finished, or run stage 1 first)")
    inter = os.path.join(folder, INTERACTIONS_FILE)
    inter = inter if os.path.isfile(inter) else None
    for file in (proj, inter):
        if file is not None:
            check_safetensors(file)  # a cut file: CheckpointError naming it
    return proj, inter


def load_pretrained_projector(model: PiipLlavaForConditionalGeneration, path: str) -> list[str]:
    """Load stage-1 weights (projector, plus interactions when stage 1 trained them); every key must match.

    Returns the loaded parameter names.
    """
    proj_file, inter_file = projector_paths(path)
    loaded = []
    for file, prefix in ((proj_file, "multi_modal_projector."), (inter_file, "vision_tower.interactions.")):
        if file is None:
            continue
        state = load_file(file)
        bad = [k for k in state if not k.startswith(prefix)]
        if bad:
            raise CheckpointError(f"{file}: keys outside {prefix}*: {bad[:5]} (not a stage-1 output of this project)")
        # the files keep LLaVA's `mm_projector` names (`multi_modal_projector.*`); in the model they live under `model.`
        expected = {k[len("model."):] for k in model.state_dict() if k.startswith("model." + prefix)}
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise CheckpointError(f"{file} does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]} (was stage 1 run with the same preset?)")
        model.load_state_dict({"model." + k: v for k, v in state.items()}, strict=False)
        loaded.extend(state)
        logger.info("loaded %d tensors from %s", len(state), file)
    return loaded


def apply_tune_policy(model: PiipLlavaForConditionalGeneration, tune: str) -> dict[str, int]:
    """Set `requires_grad` per parameter group; return trainable parameter counts per group."""
    train_groups = TRAINABLE_GROUPS[tune]
    counts = {}
    for group, params in model.param_groups().items():
        trainable = group in train_groups
        for _, p in params:
            p.requires_grad_(trainable)
        counts[group] = sum(p.numel() for _, p in params) if trainable else 0
    return counts


@contextlib.contextmanager
def full_model_init(args: PiipTrainingArguments) -> Iterator[None]:
    """Build models with full weights on every rank even under ZeRO-3; DeepSpeed partitions them at engine start.

    transformers would otherwise construct the composed LLM under `deepspeed.zero.Init` (partitioned) while the
    tower and projector stay whole, and its weight init fails on the partitioned embedding. The cost is host memory:
    each rank holds the fp32 model once before partitioning (use fewer ranks per node or zero3_offload if short).
    """
    hf_ds_config = getattr(args, "hf_deepspeed_config", None)
    if hf_ds_config is None or not hf_ds_config.is_zero3():
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(hf_ds_config)


def build_training_model(model_args: ModelArguments, args: PiipTrainingArguments) -> PiipLlavaForConditionalGeneration:
    """Seeded base model + stage-1 weights (`pretrained_projector`) + the `tune` freeze policy (before LoRA)."""
    from transformers import set_seed

    set_seed(args.seed)
    model = build_base_model(model_args)
    if args.pretrained_projector:
        load_pretrained_projector(model, args.pretrained_projector)
    apply_tune_policy(model, args.tune)
    return model


def lora_base_dir(model_args: ModelArguments, args: PiipTrainingArguments) -> str:
    """The plain checkpoint LoRA adapters refer to: the starting checkpoint if unchanged, else `output_dir/base`."""
    if model_args.model_name_or_path and not args.pretrained_projector:
        return os.path.abspath(model_args.model_name_or_path)
    return os.path.abspath(os.path.join(args.output_dir, "base"))


def apply_lora(model: PiipLlavaForConditionalGeneration, model_args: ModelArguments, args: PiipTrainingArguments,
               tokenizer) -> nn.Module:
    """Save (once) and reload the base checkpoint, then wrap it with peft LoRA on the LLM linears.

    The projector and the interactions train fully (`modules_to_save`), so the adapter folder alone (plus its base)
    restores the whole trained model: `PeftModel.from_pretrained(base, adapter)` / `merge_lora`.
    """
    from peft import LoraConfig, get_peft_model

    base_dir = lora_base_dir(model_args, args)
    with args.main_process_first(desc="save the LoRA base checkpoint"):
        if args.should_save and not os.path.isfile(os.path.join(base_dir, "config.json")):
            model.save_pretrained(base_dir)
            save_processor(model.config, tokenizer, base_dir)
            logger.info("saved the LoRA base checkpoint to %s", base_dir)
    kwargs: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": pick_attn_implementation()}
    if args.qlora:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if args.bf16 else torch.float16
        kwargs.update(dtype=compute, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
            llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"]))
    model = PiipLlavaForConditionalGeneration.from_pretrained(base_dir, **kwargs)  # identical on every rank
    if args.qlora:
        from peft import prepare_model_for_kbit_training

        # checkpointing is applied later by train.apply_gradient_checkpointing (non-reentrant: no input-grad hook)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    apply_tune_policy(model, "lora")
    n_inter = len(model.vision_tower.interactions)
    lora_config = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules, base_model_name_or_path=base_dir,
        modules_to_save=["multi_modal_projector"] + [f"vision_tower.interactions.{i}" for i in range(n_inter)],
    )
    peft_model = get_peft_model(model, lora_config)
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("LoRA on %s: %d trainable parameters; base %s", args.lora_target_modules, n_train, base_dir)
    return peft_model


def unwrap_piip(model: nn.Module) -> PiipLlavaForConditionalGeneration:
    """The PiipLlava model inside DeepSpeed / DDP / peft wrappers."""
    while not isinstance(model, PiipLlavaForConditionalGeneration):
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            raise TypeError(f"no PiipLlavaForConditionalGeneration inside {type(model).__name__}")
    return model


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """An FSDP2 shard (DTensor) -> the whole tensor (an all-gather: collective, same order on every rank)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gathered_state_dict(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Full CPU copies of `module`'s parameters and buffers; gathers ZeRO-3 partitions and FSDP2 shards, so call it
    on every rank."""
    params = list(module.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params)
    if partitioned:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        return {f"{prefix}{k}": _full_tensor(v.detach()).to("cpu", torch.float32).clone()
                for k, v in module.state_dict().items()}


def save_stage1_weights(model: nn.Module, out_dir: str, tune: str, should_save: bool) -> list[str]:
    """Write the projector (and the interactions when they trained) + config.json; returns the files written.

    Call on every rank (ZeRO-3 and FSDP gathering is collective); only `should_save` ranks write.
    """
    piip = unwrap_piip(model)
    parts = [(piip.multi_modal_projector, "multi_modal_projector.", PROJECTOR_FILE)]
    if tune == "projector+interactions":
        parts.append((piip.vision_tower.interactions, "vision_tower.interactions.", INTERACTIONS_FILE))
    written = []
    for module, prefix, name in parts:
        state = gathered_state_dict(module, prefix)
        if should_save:
            os.makedirs(out_dir, exist_ok=True)
            save_file(state, os.path.join(out_dir, name), metadata={"format": "pt"})
            written.append(os.path.join(out_dir, name))
    if should_save:
        piip.config.save_pretrained(out_dir)
    return written
