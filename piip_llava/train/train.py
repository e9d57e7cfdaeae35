"""Train PIIP-LLaVA: stage 1 (projector alignment) or stage 2 (instruction tuning, full or LoRA/QLoRA).

    python -m piip_llava.train [run.yaml] --stage 1 --preset NAME --tokenizer_path DIR --data_path F.json \
        --image_folder DIR --output_dir OUT [--deepspeed scripts/zero2.json] [HF TrainingArguments ...]

Launch multi-process with `torchrun` or `deepspeed` (see scripts/pretrain_piip_llava.sh). FSDP2 instead of
DeepSpeed: `--fsdp --fsdp_config '{"version": 2, "state_dict_type": "SHARDED_STATE_DICT"}'` (any stage and `--tune`,
LoRA included); the wrap units are the model's `_no_split_modules` (branch layers, interaction blocks, the LLM's
decoder layers; see `fsdp_wrap_classes`). Stage 1 writes
`OUT/mm_projector.safetensors` + `config.json`; stage 2 writes a full `save_pretrained` checkpoint (or a LoRA adapter
folder with its `base/`) + tokenizer. `--resume auto` continues from the newest complete `OUT/checkpoint-N` (checkpoints
are written under `OUT/.saving/` and renamed into place when complete; see `checkpoints.py`).
"""
from __future__ import annotations

import logging
import os
import sys

import torch
from torch import nn
from transformers import PreTrainedModel

from ..data.dataset import DataCollatorForSupervisedDataset, LazySupervisedDataset
from ..data.tokenizer import load_tokenizer
from ..models import (PiipLlavaConfig, PiipLlavaForConditionalGeneration, PiipLlavaImageProcessor, PiipLlavaProcessor,
                      align_image_token_id)
from ..data.mixture import DataFormatError
from ..models.loading import CheckpointError, cli_error
from .arguments import DataArguments, ModelArguments, PiipTrainingArguments, parse_args
from .model_setup import (apply_lora, build_training_model, check_tokenizer_fits, full_model_init,
                          save_stage1_weights, unwrap_piip)
from .checkpoints import check_resume_folder, resolve_auto_resume
from .lifeline import watch_launcher
from .trainer import PiipTrainer, ProgressLogCallback

logger = logging.getLogger("piip_llava.train")


def setup_logging(args: PiipTrainingArguments) -> None:
    level = logging.INFO if args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    logging.getLogger("piip_llava").setLevel(level)


def resolve_template_and_aspect(data_args: DataArguments, args: PiipTrainingArguments,
                                config: PiipLlavaConfig) -> tuple[str, str]:
    """Stage defaults (spec 3.1): stage 1 `plain` + `square`, stage 2 the config's (`vicuna_v1` + `pad`)."""
    template = data_args.template or ("plain" if args.stage == 1 else config.conversation_template)
    aspect = data_args.image_aspect_ratio or ("square" if args.stage == 1 else config.image_aspect_ratio)
    return template, aspect


def build_data(data_args: DataArguments, args: PiipTrainingArguments, config: PiipLlavaConfig,
               processor: PiipLlavaProcessor):
    """The dataset tokenises through the model's processor, with the stage's template and image mode."""
    template, aspect = resolve_template_and_aspect(data_args, args, config)
    tokenizer = processor.tokenizer
    dataset = LazySupervisedDataset(
        data_args.data_path, processor, PiipLlavaImageProcessor.from_config(config, aspect),
        image_folder=data_args.image_folder, template=template,
        model_max_length=data_args.model_max_length, max_image_pixels=data_args.max_image_pixels,
        progress=args.should_log)
    collator = DataCollatorForSupervisedDataset(tokenizer.pad_token_id, data_args.model_max_length, report_skipped=True)
    logger.info("data %s: %d records, template %s, images %s", data_args.data_path, len(dataset), template, aspect)
    return dataset, collator


def apply_gradient_checkpointing(model: PiipLlavaForConditionalGeneration, args: PiipTrainingArguments) -> None:
    """LLM layers per `gradient_checkpointing`, branch blocks per `vision_gradient_checkpointing`.

    Applied here rather than by the Trainer, whose toggle would always switch both on together; the flag is then
    cleared so the Trainer does not toggle it again.
    """
    if args.llm_checkpointing:
        llm = model.language_model
        if hasattr(llm, "activation_checkpointing_enable"):
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs=args.checkpointing_kwargs)
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.checkpointing_kwargs)
    model.vision_tower.set_grad_checkpointing(args.vision_gradient_checkpointing)
    args.hand_checkpointing_to_model()


def resolve_resume(args: PiipTrainingArguments) -> str | None:
    """`--resume auto`: the newest complete checkpoint in output_dir (None: start at step 0), logging every newer
    incomplete one it skips and why; `--resume PATH`: that folder, which must be complete (CheckpointError);
    `--resume none`: step 0."""
    if not args.resume or args.resume == "none":
        return None
    if args.resume != "auto":
        check_resume_folder(args.resume)
        return args.resume
    return resolve_auto_resume(args.output_dir)


def save_final(trainer: PiipTrainer, args: PiipTrainingArguments, tokenizer) -> str:
    """Stage 1 (projector policies): projector weights + config; otherwise the whole model (or adapter) + tokenizer."""
    out = args.output_dir
    if args.stage == 1 and args.tune in ("projector", "projector+interactions"):
        save_stage1_weights(trainer.model_wrapped, out, args.tune, trainer.args.should_save)
        if trainer.args.should_save:
            tokenizer.save_pretrained(out)
    else:
        trainer.save_model(out)  # gathers ZeRO-3 weights; saves the tokenizer (processing_class)
    trainer.save_state()
    return os.path.abspath(out)


def prepare_model(model_args: ModelArguments, data_args: DataArguments, args: PiipTrainingArguments,
                  tokenizer) -> nn.Module:
    """Seeded model + stage-1 weights + freeze policy (+ LoRA), stage-2 config updates, gradient checkpointing."""
    with full_model_init(args):
        model = build_training_model(model_args, args)
        config = model.config
        check_tokenizer_fits(tokenizer, config, model_args.tokenizer_path)
        align_image_token_id(config, tokenizer)
        if args.stage == 2:  # inference reads the template and the aspect mode the model was tuned with
            config.conversation_template, config.image_aspect_ratio = resolve_template_and_aspect(data_args, args, config)
        if args.tune == "lora":
            model = apply_lora(model, model_args, args, tokenizer)
    apply_gradient_checkpointing(unwrap_piip(model), args)
    return model


def fsdp_wrap_classes(model: nn.Module) -> list[str]:
    """Class names of the FSDP2 units: the `_no_split_modules` of the model and of the pretrained models inside it
    (branch backbones, the LLM) whose instances are repeated blocks of an `nn.ModuleList`, e.g. CLIPEncoderLayer,
    InteractionBlock, LlamaDecoderLayer.

    A unit gathers its shards in its own `forward`, so a listed module whose forward the model never calls (CLIP's
    `CLIPVisionEmbeddings`: the branch uses its patch and position embeddings directly) stays in the root unit.
    Frozen units (a frozen tower) shard like trainable ones; parameters outside every unit (projector, embeddings,
    norms) belong to the root unit, frozen and trainable side by side. Under LoRA, peft's `modules_to_save` wrapper
    takes the interaction blocks' place in their ModuleList (it holds a frozen original that never runs and the
    trained copy), so the interactions stay in the root unit; the LoRA matrices shard with their decoder layers.
    """
    names: set[str] = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            names.update(module._no_split_modules or ())
    blocks = {type(block).__name__ for module in model.modules() if isinstance(module, nn.ModuleList)
              for block in module}
    return sorted(names & blocks)


def configure_fsdp(model: nn.Module, args: PiipTrainingArguments) -> None:
    """`--fsdp` without `transformer_layer_cls_to_wrap`: wrap the classes of `fsdp_wrap_classes` (accelerate's
    default reads only the top-level `_no_split_modules`). Must run before the Trainer builds its FSDP plugin."""
    plugin_args = args.fsdp_plugin_args
    if not plugin_args or plugin_args.get("auto_wrap_policy") != "TRANSFORMER_BASED_WRAP":
        return
    if not plugin_args.get("transformer_cls_names_to_wrap"):
        plugin_args["transformer_cls_names_to_wrap"] = ",".join(fsdp_wrap_classes(model))
    logger.info("FSDP%s units: %s", plugin_args.get("fsdp_version"), plugin_args["transformer_cls_names_to_wrap"])


def enable_fsdp_on_cpu(trainer: PiipTrainer) -> None:
    """`--fsdp` under torchrun without a GPU (gloo): give the Trainer's accelerator the FSDP plugin it dropped.

    accelerate (1.16) switches to `DistributedType.FSDP` only for GPU-like backends; on the CPU it keeps
    `MULTI_CPU` and the run silently becomes DDP. PyTorch's FSDP2 itself runs on gloo, so set the state that
    accelerate would have set on a GPU (in the shared state that every `AcceleratorState()` re-reads).
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if not trainer.args.fsdp or trainer.is_fsdp_enabled or state.distributed_type != DistributedType.MULTI_CPU:
        return
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def main(argv: list[str] | None = None) -> int:
    watch_launcher()  # under a launcher: stop when it is gone (a SIGKILL of the launch script's group)
    model_args, data_args, args = parse_args(argv)
    setup_logging(args)
    try:
        return train(model_args, data_args, args)
    except (CheckpointError, DataFormatError) as e:  # one line naming the file (PIIP_DEBUG=1: the traceback)
        return cli_error(e) if args.should_log else 1


def train(model_args: ModelArguments, data_args: DataArguments, args: PiipTrainingArguments) -> int:
    logger.info("world size %d (%s), stage %d, tune %s", args.world_size, args.parallel_mode.value, args.stage, args.tune)
    resume = resolve_resume(args)  # before building anything: a bad --resume fails in a second
    tokenizer = load_tokenizer(model_args.tokenizer_path, model_max_length=data_args.model_max_length)
    model = prepare_model(model_args, data_args, args, tokenizer)
    # the processor (tokenizer + `<image>` + image processor + chat template + code) is saved with every checkpoint
    processor = PiipLlavaProcessor.from_config(unwrap_piip(model).config, tokenizer)
    dataset, collator = build_data(data_args, args, unwrap_piip(model).config, processor)
    configure_fsdp(model, args)
    trainer = PiipTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, processing_class=processor,
        group_by_modality_length=data_args.group_by_modality_length,
        module_lrs={"branches": args.vision_lr, "interactions": args.interaction_lr, "projector": args.projector_lr},
        callbacks=[ProgressLogCallback()],
    )
    enable_fsdp_on_cpu(trainer)
    trainer.train(resume_from_checkpoint=resume)
    out = save_final(trainer, args, processor)
    if args.should_log:
        print(f"final checkpoint: {out}", flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0
