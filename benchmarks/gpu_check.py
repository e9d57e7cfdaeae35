"""What a new GPU machine needs to know, in one run (`bash scripts/gpu_check.sh`; under 10 minutes on one GPU).

    python benchmarks/gpu_check.py                  # CUDA: real sizes, bf16
    python benchmarks/gpu_check.py --cpu            # the same code paths on the tiny preset, fp32 (CI runs this)

Steps, each printed as it finishes (a step that cannot run says why and the others go on):
1. the machine: torch / transformers versions, device, bf16 support, flash-attn installed or not;
2. the GPU tests (`pytest -m gpu`; skipped with --cpu);
3. the dense matmul peak of this device (bf16 8192^2 on CUDA; fp32 2048^2 on CPU), measured in this run;
4. vision-tower throughput of `--tower-preset` (default `piip-llava_clip-bl_512-448_7B`, random weights): images/s,
   achieved TFLOP/s (2 x MACs from `piip_llava.models.flops`) and its % of the step-3 peak;
5. stage-2 training throughput: the `--train-preset` model with its LLM cut to `--llm-layers` layers (the full
   width; a 7B LLM with all 32 layers and AdamW states does not fit one GPU), `projector+llm` trainable, AdamW,
   micro-batches of `--micro-batch` x `--seq-len` tokens, for each attention implementation available (SDPA, and
   flash-attention 2 when installed): samples/s, tokens/s, MFU (6 x trainable-and-frozen LLM parameters x tokens +
   3 x tower FLOPs per image, over the step-3 peak) and peak memory;
6. QLoRA loading: the same cut model loaded in 4-bit through bitsandbytes (CUDA only), its memory and one forward.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def say(step: str, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, runs: int = 10) -> float:
    """Best FLOP/s of an n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def tower_throughput(preset: str, device, dtype, batch: int, runs: int, peak: float) -> None:
    from piip_llava.models import PiipVisionTower, load_preset
    from piip_llava.models.flops import count_vision_flops

    config = load_preset(preset)
    macs = count_vision_flops(config, count_llm=False)["executed"]
    tower = PiipVisionTower(config.vision_config).to(device, dtype).eval()
    size = config.vision_config.image_size
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    with torch.inference_mode():
        tower(x)
        sync(device)
        t = time.perf_counter()
        for _ in range(runs):
            tower(x)
        sync(device)
    seconds = (time.perf_counter() - t) / runs
    flops = 2 * macs * batch / seconds
    say("4 tower", f"{preset}: {batch / seconds:.1f} images/s at batch {batch} ({size}px), "
                   f"{flops / 1e12:.3f} TFLOP/s = {100 * flops / peak:.0f}% of the matmul peak")
    del tower


def cut_config(preset: str, llm_layers: int | None):
    from piip_llava.models import load_preset

    config = load_preset(preset)
    if llm_layers:
        config.text_config.num_hidden_layers = min(llm_layers, config.text_config.num_hidden_layers)
    return config


def train_throughput(config, device, dtype, attn: str, micro_batch: int, seq_len: int, steps: int,
                     peak: float) -> None:
    from piip_llava.models import PiipLlavaForConditionalGeneration
    from piip_llava.models.flops import count_vision_flops
    from piip_llava.train.model_setup import apply_tune_policy

    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = PiipLlavaForConditionalGeneration(config).to(device, dtype).train()
    apply_tune_policy(model, "projector+llm")
    llm = model.language_model  # transformers >= 5.2x renamed the switch
    (llm.activation_checkpointing_enable if hasattr(llm, "activation_checkpointing_enable")
     else llm.gradient_checkpointing_enable)({"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    n_img = config.num_image_tokens
    vocab = config.text_config.vocab_size
    ids = torch.randint(3, min(vocab, 30000), (micro_batch, seq_len), device=device)
    ids[:, 1:1 + n_img] = config.image_token_id
    labels = ids.masked_fill(ids == config.image_token_id, -100)
    size = config.vision_config.image_size
    pixels = torch.randn(micro_batch, 3, size, size, device=device, dtype=dtype)

    def step() -> None:
        model(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, kernel choice)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - t) / steps
    llm_params = sum(p.numel() for _, p in model.param_groups()["llm"])
    tower_macs = count_vision_flops(config, count_llm=False)["executed"]
    flops = 6 * llm_params * micro_batch * seq_len + 3 * 2 * tower_macs * micro_batch  # tower: forward only
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB peak" if device.type == "cuda" else "CPU"
    say("5 train", f"{attn}: {micro_batch / seconds:.2f} samples/s, {micro_batch * seq_len / seconds:.0f} tokens/s, "
                   f"MFU {100 * flops / seconds / peak:.1f}% ({config.text_config.num_hidden_layers} LLM layers, "
                   f"micro-batch {micro_batch} x {seq_len}), {mem}")
    del model, opt


def qlora_load(config, device) -> None:
    if device.type != "cuda":
        say("6 qlora", "skipped: 4-bit loading needs CUDA (bitsandbytes)")
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        say("6 qlora", "skipped: bitsandbytes is not installed (pip install bitsandbytes)")
        return
    from transformers import BitsAndBytesConfig

    from piip_llava.models import PiipLlavaForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        PiipLlavaForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(tmp)
        torch.cuda.reset_peak_memory_stats(device)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                   llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])
        model = PiipLlavaForConditionalGeneration.from_pretrained(tmp, quantization_config=quant, dtype=torch.bfloat16,
                                                                  device_map={"": device.index or 0})
        ids = torch.full((1, config.num_image_tokens + 8), 5, device=device)
        ids[0, 1:1 + config.num_image_tokens] = config.image_token_id
        size = config.vision_config.image_size
        with torch.inference_mode():
            logits = model(input_ids=ids, pixel_values=torch.randn(1, 3, size, size, device=device,
                                                                   dtype=torch.bfloat16)).logits
        say("6 qlora", f"4-bit load + forward ok: logits {tuple(logits.shape)}, finite {bool(logits.isfinite().all())}, "
                       f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB peak")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (what CI runs)")
    parser.add_argument("--tower-preset", default=None)
    parser.add_argument("--train-preset", default=None)
    parser.add_argument("--llm-layers", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tower_preset = args.tower_preset or ("piip-llava_clip-bl_512-448_7B" if cuda else "tiny-piip2_clip_64-128")
    train_preset = args.train_preset or ("piip-llava_clip-bl_512-448_7B" if cuda else "tiny-piip2_clip_64-128")
    llm_layers = args.llm_layers or (8 if cuda else None)
    micro_batch = args.micro_batch or (4 if cuda else 2)
    seq_len = args.seq_len or (2048 if cuda else 128)
    steps = args.steps or (5 if cuda else 2)

    import transformers

    flash = importlib.util.find_spec("flash_attn") is not None
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    bf16 = torch.cuda.is_bf16_supported() if cuda else False
    say("1 machine", f"torch {torch.__version__}, transformers {transformers.__version__}, {name}, bf16 {bf16}, "
                     f"flash-attn {'installed' if flash else 'not installed'}")
    if cuda:
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
                            cwd=ROOT).returncode
        say("2 gpu tests", "passed" if rc == 0 else ("none collected" if rc == 5 else f"FAILED (pytest exit {rc})"))
    else:
        say("2 gpu tests", "skipped (no GPU)")
    peak = matmul_peak(device, dtype, 8192 if cuda else 1024)
    say("3 peak", f"{'bf16 8192' if cuda else 'fp32 1024'}^2 matmul: {peak / 1e12:.3f} TFLOP/s")
    tower_throughput(tower_preset, device, dtype, 8 if cuda else 2, 5 if cuda else 2, peak)
    config = cut_config(train_preset, llm_layers)
    for attn in ["sdpa"] + (["flash_attention_2"] if flash and cuda else []):
        train_throughput(config, device, dtype, attn, micro_batch, seq_len, steps, peak)
    if not flash:
        say("5 train", "flash_attention_2 skipped: flash-attn is not installed (pip install flash-attn)")
    qlora_load(cut_config(train_preset, llm_layers), device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
