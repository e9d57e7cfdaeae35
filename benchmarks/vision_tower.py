"""CPU timing of the PIIP vision-tower forward for a real-size preset (random weights, fp32, batch 1).

Prints seconds (median of N runs after a warm-up), achieved GFLOP/s (2 x MACs from `piip_llava.models.flops` per
second), the fraction of this CPU's fp32 matmul throughput (a 2048 x 2048 fp32 matmul timed in the same run), and
peak resident memory. Only the vision tower is built, never the LLM.

    python benchmarks/vision_tower.py [--preset piip-llava_clip-bl_512-448_7B] [--runs 5] [--profile]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from piip_llava.models import PiipVisionTower, load_preset
from piip_llava.models.flops import count_vision_flops


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux VmHWM; counts torch's allocations), in MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # fallback: ru_maxrss is in KiB on Linux

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_gflops(n: int = 2048, runs: int = 5) -> float:
    """fp32 GFLOP/s of an n x n matmul (2 n^3 flops), best of `runs`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="piip-llava_clip-bl_512-448_7B")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one forward")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = load_preset(args.preset)
    macs = count_vision_flops(config, count_llm=False)["executed"]
    tower = PiipVisionTower(config.vision_config).eval()
    size = config.vision_config.image_size
    pixel_values = torch.randn(1, 3, size, size)

    peak_matmul = matmul_gflops()
    times = []
    with torch.inference_mode():
        tower(pixel_values)  # warm-up
        for _ in range(args.runs):
            t = time.perf_counter()
            tower(pixel_values)
            times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    achieved = 2 * macs / seconds / 1e9
    print(f"preset            {args.preset} ({size}px, {torch.get_num_threads()} threads, {os.cpu_count()} cpus)")
    print(f"forward           {seconds:.3f} s (median of {args.runs}; min {min(times):.3f}, max {max(times):.3f})")
    print(f"work              {macs / 1e9:.1f} GMAC executed = {2 * macs / 1e9:.1f} GFLOP")
    print(f"achieved          {achieved:.1f} GFLOP/s")
    print(f"fp32 matmul peak  {peak_matmul:.1f} GFLOP/s (2048^2, same run) -> {100 * achieved / peak_matmul:.0f}% of it")
    print(f"peak RSS          {peak_rss_mb():.0f} MiB")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            tower(pixel_values)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
