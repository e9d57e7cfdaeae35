"""Per-GPU training memory of a PIIP-LLaVA run before it starts: parameters, gradients, optimizer states, activations.

    python -m piip_llava.train.memory --preset P --zero {0,1,2,3} --gpus N --micro-batch B --gpu-mem G [--lora]
        [--tune full] [--seq-len 2048] [--dtype bf16] [--no-checkpointing] [--json]

Parameter counts come from the model built on the meta device (no weights, no download) and its freeze policy
(`--tune`, as in training; `--lora` adds rank-`--lora-r` matrices on the LLM's projections, as `apply_lora` does).
Bytes per parameter follow DeepSpeed's mixed-precision AdamW: weights and gradients in the compute dtype, an fp32
master copy + two fp32 moments for trainable parameters (fp32 training: no master copy). ZeRO-1 partitions the
optimizer states over the GPUs, ZeRO-2 the gradients too, ZeRO-3 the weights too.

Activations of one micro-batch (bytes, compute dtype `a` bytes per element, sequence `s`, hidden `h`, `L` layers):
* LLM, with gradient checkpointing (the recipe's default): the layer inputs `L*s*h*a`, plus the recomputed layer
  at the backward peak `s*h*(17a + 3a*f/h)` (f = MLP width); without checkpointing every layer keeps that much
  (after Korthikanti et al. 2022). Flash / memory-efficient attention (`--attention flash`, what SDPA picks on a
  GPU) keeps no s x s matrix; the math kernel (`--attention math`, SDPA on CPU) keeps the scores and their softmax,
  `2*a*heads*s^2` per layer;
* the logits and the loss: `s*V*(a + 8)` (the logits, their fp32 copy and its gradient), an upper bound: training
  runs the LM head only at the supervised positions (the answers);
* the vision tower: when it trains, each branch keeps `17a` bytes per token and channel of every block, on that
  block's grid (checkpointing off, the recipe's); frozen, only one block's worth at a time.
`--seq-len` is the padded length of a micro-batch: LLaVA's length-grouped sampler keeps most batches shorter than
`model_max_length`, so the default 2048 is the worst case.
A fixed 1.5 GiB covers the CUDA context and the allocator's fragmentation. `fits` compares the sum with
`--gpu-mem`. The figures are estimates: `benchmarks/train_memory.py` compares them with the measured peak of real
training steps of the tiny and mini presets on CPU (fp32).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..models import PiipLlavaForConditionalGeneration, load_preset
from .arguments import DEFAULT_LORA_TARGETS, TUNE_POLICIES
from .model_setup import TRAINABLE_GROUPS

GIB = 2**30
CONTEXT_OVERHEAD = 1.5 * GIB  # CUDA context + allocator fragmentation
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class MemoryEstimate:
    preset: str
    gpus: int
    zero: int
    micro_batch: int
    seq_len: int
    dtype: str
    tune: str
    lora: bool
    params: int
    trainable: int
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    overhead_bytes: float
    total_bytes: float
    gpu_mem_bytes: float | None

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_mem_bytes is None else self.total_bytes <= self.gpu_mem_bytes

    def table(self) -> str:
        rows = [("parameters", f"{self.params / 1e9:.3f} B ({self.trainable / 1e9:.3f} B trainable)"),
                ("weights", _gib(self.weights_bytes)), ("gradients", _gib(self.grads_bytes)),
                ("optimizer states", _gib(self.optimizer_bytes)), ("activations", _gib(self.activations_bytes)),
                ("context + fragmentation", _gib(self.overhead_bytes)), ("total per GPU", _gib(self.total_bytes))]
        if self.gpu_mem_bytes is not None:
            rows.append(("fits", f"{'yes' if self.fits else 'NO'} ({_gib(self.gpu_mem_bytes)} GPU)"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def count_parameters(model: nn.Module, tune: str, lora: bool, lora_r: int, lora_targets: str) -> tuple[int, int]:
    """(all parameters incl. LoRA matrices, trainable ones) for a tune policy."""
    groups = model.param_groups()
    train = TRAINABLE_GROUPS["lora" if lora else tune]
    total = sum(p.numel() for params in groups.values() for _, p in params)
    trainable = sum(p.numel() for g, params in groups.items() if g in train for _, p in params)
    if lora:
        pattern = re.compile(lora_targets)
        extra = sum(lora_r * (m.in_features + m.out_features) for name, m in model.named_modules()
                    if isinstance(m, nn.Linear) and pattern.fullmatch(name))
        total += extra
        trainable += extra
    return total, trainable


def activation_bytes(config, micro_batch: int, seq_len: int, act: int, tower_trains: bool,
                     checkpointing: bool, attention: str = "flash") -> float:
    """Bytes of the activations one micro-batch keeps for the backward pass (see the module docstring)."""
    text = config.text_config
    h, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    f = getattr(text, "intermediate_size", 4 * h)
    per_layer = seq_len * h * (17 * act + 3 * act * f / h)
    if attention == "math":
        per_layer += 2 * act * text.num_attention_heads * seq_len**2
    llm = (layers * seq_len * h * act + per_layer) if checkpointing else layers * per_layer
    logits = seq_len * vocab * (act + 8)
    from ..models.flops import block_runs

    tower = 0.0
    for branch in config.vision_config.branch_configs():
        # per block run: tokens on its grid x its width (ConvNeXt stages shrink the grid and widen the channels); a
        # block outside every interaction range keeps nothing, one in two ranges keeps its activations twice
        blocks = [grid**2 * d * 17 * act for _, d, grid in block_runs(branch)]
        tower += sum(blocks) if tower_trains else max(blocks)
    return micro_batch * (llm + logits + tower)


def estimate(preset: str, gpus: int = 1, zero: int = 2, micro_batch: int = 16, seq_len: int = 2048,
             dtype: str = "bf16", tune: str = "full", lora: bool = False, lora_r: int = 128,
             lora_targets: str = DEFAULT_LORA_TARGETS, gpu_mem_gib: float | None = None,
             checkpointing: bool = True, overhead_bytes: float = CONTEXT_OVERHEAD,
             attention: str = "flash") -> MemoryEstimate:
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"--zero must be 0, 1, 2 or 3, got {zero}")
    if gpus < 1 or micro_batch < 1:
        raise ValueError("--gpus and --micro-batch must be >= 1")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPE_BYTES)}")
    if tune not in TUNE_POLICIES:
        raise ValueError(f"--tune must be one of {TUNE_POLICIES}")
    config = load_preset(preset)
    with torch.device("meta"):
        model = PiipLlavaForConditionalGeneration(config)
    total, trainable = count_parameters(model, tune, lora, lora_r, lora_targets)
    w = DTYPE_BYTES[dtype]
    opt_per_param = 8 if dtype == "fp32" else 12  # moments (+ fp32 master weights in mixed precision)
    weights = total * w / (gpus if zero == 3 else 1)
    grads = trainable * w / (gpus if zero >= 2 else 1)
    optimizer = trainable * opt_per_param / (gpus if zero >= 1 else 1)
    groups = TRAINABLE_GROUPS["lora" if lora else tune]
    if attention not in ("flash", "math"):
        raise ValueError(f"--attention must be 'flash' or 'math', got {attention!r}")
    acts = activation_bytes(config, micro_batch, seq_len, w, "branches" in groups, checkpointing, attention)
    total_bytes = weights + grads + optimizer + acts + overhead_bytes
    return MemoryEstimate(preset, gpus, zero, micro_batch, seq_len, dtype, "lora" if lora else tune, lora, total,
                          trainable, weights, grads, optimizer, acts, overhead_bytes, total_bytes,
                          None if gpu_mem_gib is None else gpu_mem_gib * GIB)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m piip_llava.train.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, help="preset name or config JSON")
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=16, help="per-GPU batch (the recipe: 32 stage 1, 16 stage 2)")
    parser.add_argument("--gpu-mem", type=float, default=None, help="GPU memory in GiB (answers: does it fit?)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sample incl. visual tokens")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    parser.add_argument("--tune", default="full", choices=TUNE_POLICIES)
    parser.add_argument("--lora", action="store_true", help="LoRA on the LLM (projector + interactions train fully)")
    parser.add_argument("--lora-r", type=int, default=128)
    parser.add_argument("--no-checkpointing", action="store_true", help="LLM gradient checkpointing off")
    parser.add_argument("--attention", default="flash", choices=["flash", "math"],
                        help="flash: no s x s matrix (GPU SDPA / flash-attn); math: SDPA's math kernel (CPU)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        est = estimate(args.preset, args.gpus, args.zero, args.micro_batch, args.seq_len, args.dtype, args.tune,
                       args.lora, args.lora_r, gpu_mem_gib=args.gpu_mem, checkpointing=not args.no_checkpointing,
                       attention=args.attention)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**asdict(est), "fits": est.fits}, indent=1))
    else:
        print(f"{est.preset}: {est.gpus} GPU(s), ZeRO-{est.zero}, micro-batch {est.micro_batch} x {est.seq_len} "
              f"tokens, {est.dtype}, tune {est.tune}")
        print(est.table())
    return 0 if est.fits is not False else 1


if __name__ == "__main__":
    raise SystemExit(main())
