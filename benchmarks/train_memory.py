"""Measured vs estimated training memory (`piip_llava.train.memory`) on CPU, fp32, for the tiny and mini presets.

    python benchmarks/train_memory.py [--presets tiny-piip2_clip_64-128 mini-piip2_clip-ls_64-128]

Each case runs in its own process: build the model (random weights), apply the freeze policy, run 3 real training
steps (forward with labels, backward, AdamW step) on a batch of `B` samples of `s` tokens with one image each, and
report the peak resident memory above the process's memory after imports, next to the estimate for the same run
(1 GPU, no ZeRO, fp32, SDPA's math attention as on CPU, without the fixed CUDA overhead). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

CASES = [  # (tune, micro-batch, sequence length, LLM gradient checkpointing)
    ("full", 8, 512, False),
    ("full", 8, 512, True),
    ("projector+llm", 16, 512, True),
]


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def measure(preset: str, tune: str, batch: int, seq: int, checkpointing: bool) -> dict:
    import torch

    from piip_llava.models import PiipLlavaForConditionalGeneration, load_preset
    from piip_llava.train.model_setup import apply_tune_policy

    torch.set_num_threads(2)
    base = _rss_kb()
    config = load_preset(preset)
    torch.manual_seed(0)
    model = PiipLlavaForConditionalGeneration(config).train()
    apply_tune_policy(model, tune)
    if checkpointing:
        llm = model.language_model  # transformers >= 5.2x renamed the switch
        (llm.activation_checkpointing_enable if hasattr(llm, "activation_checkpointing_enable")
         else llm.gradient_checkpointing_enable)({"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    n_img = config.num_image_tokens
    ids = torch.randint(3, min(500, config.text_config.vocab_size), (batch, seq))
    ids[:, 1:1 + n_img] = config.image_token_id
    labels = ids.clone()
    labels[:, : 1 + n_img] = -100
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size)
    for _ in range(3):
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"measured_mib": (peak_kb - base) / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny-piip2_clip_64-128", "mini-piip2_clip-ls_64-128"])
    parser.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._case:  # child process: one measurement
        preset, tune, batch, seq, ckpt = json.loads(args._case)
        print(json.dumps(measure(preset, tune, batch, seq, ckpt)))
        return 0
    from piip_llava.train.memory import estimate

    print("| preset | tune | micro-batch x tokens | LLM checkpointing | estimated (MiB) | measured peak (MiB) | "
          "estimate / measured |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for preset in args.presets:
        for tune, batch, seq, ckpt in CASES:
            out = subprocess.run([sys.executable, __file__, "--_case", json.dumps([preset, tune, batch, seq, ckpt])],
                                 capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
            measured = json.loads(out.stdout.strip().splitlines()[-1])["measured_mib"]
            est = estimate(preset, gpus=1, zero=0, micro_batch=batch, seq_len=seq, dtype="fp32", tune=tune,
                           checkpointing=ckpt, overhead_bytes=0.0, attention="math")
            e = est.total_bytes / 2**20
            print(f"| {preset} | {tune} | {batch} x {seq} | {'on' if ckpt else 'off'} | {e:.0f} | {measured:.0f} | "
                  f"{e / measured:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
