"""Quickstart training speed on a quiet and on a busy machine, per process count, thread count and OpenMP wait policy.

    python benchmarks/busy_machine.py [--steps 40] [--configs 1x1 1x2 1x2p 2x1] [--background 0 1]

Runs stage 2 of the quickstart (`python -m piip_llava.train`, preset mini-piip2_clip-ls_64-128, global batch 16, the
synthetic data) for `--steps` steps once per (configuration, background processes) and prints the median samples/s
of the logged steps and each configuration's slowdown under load. A configuration `PxT[p]` is P training processes
(P > 1: torchrun, DDP on gloo, batch 16 / P each) of T torch/OpenMP threads each, with `p` for
OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep at once instead of spinning). A background process is a single-core
busy loop (`while True: pass`) at normal priority, started before the run and killed after it: the "one other
process beside it" of a shared machine. The quickstart's choice (scripts/quickstart.sh) comes from this table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from piip_llava.testing import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUSY_LOOP = "while True: pass"


def prepare(work: str, records: int) -> tuple[str, str]:
    from piip_llava.data.synthetic import generate_synthetic_dataset
    from piip_llava.data.tokenizer import main as tokenizer_main

    data = os.path.join(work, "data")
    paths = generate_synthetic_dataset(data, num_train=records, num_eval=0)
    tok = os.path.join(work, "tokenizer")
    tokenizer_main(["--out", tok, "--vocab-size", "2048", "--from-llava", paths["stage1"], paths["stage2"]])
    return paths["stage2"], tok


def samples_per_second(output_dir: str, warmup: int) -> float:
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as f:
        logs = [h["samples_per_second"] for h in json.load(f)["log_history"] if "samples_per_second" in h]
    return statistics.median(logs[warmup:] or logs)


def parse_config(text: str) -> tuple[int, int, str]:
    """``"2x1"`` -> (2 processes, 1 thread, "active"); ``"1x2p"`` -> (1, 2, "passive")."""
    body, policy = (text[:-1], "passive") if text.endswith("p") else (text, "active")
    try:
        procs, threads = (int(x) for x in body.split("x"))
    except ValueError:
        raise SystemExit(f"--configs {text!r}: expected PxT or PxTp, e.g. 1x2 or 1x2p") from None
    return procs, threads, policy


def run_once(args: argparse.Namespace, data: str, tok: str, out: str, config: str, background: int) -> tuple[float, float]:
    procs, threads, policy = parse_config(config)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY=policy.upper())
    launcher = [sys.executable, "-m", "piip_llava.train"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(procs),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "piip_llava.train"]
    cmd = [*launcher, "--preset", args.preset, "--tokenizer_path", tok,
           "--data_path", data, "--image_folder", os.path.dirname(data), "--max_steps", str(args.steps),
           "--per_device_train_batch_size", str(args.batch // procs), "--learning_rate", "1e-3", "--logging_steps", "1",
           "--save_strategy", "no", "--disable_tqdm", "true", "--stage", "2", "--output_dir", out,
           "--dataloader_num_workers", str(args.workers), "--gradient_checkpointing", "false"]
    loads = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(background)]
    try:
        start = time.perf_counter()
        proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    finally:
        for p in loads:
            p.kill()
            p.wait()
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"training failed for {config} with {background} background processes")
    return samples_per_second(out, args.warmup), wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mini-piip2_clip-ls_64-128")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="--dataloader_num_workers of the runs")
    parser.add_argument("--warmup", type=int, default=5, help="logged steps left out of the median")
    parser.add_argument("--configs", nargs="+", default=["1x1", "1x2", "1x2p", "2x1"],
                        help="PxT[p]: P processes of T threads, p = OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--background", type=int, nargs="+", default=[0, 1], help="busy-loop processes beside it")
    parser.add_argument("--workdir", default=None, help="kept if given; a temporary folder otherwise")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="piip_busy_") as tmp:
        work = args.workdir or tmp
        data, tok = prepare(work, records=max(64, args.steps * args.batch))
        rows = []
        for config in args.configs:
            speeds = {}
            for background in args.background:
                out = os.path.join(work, f"run_{config}_b{background}")
                speeds[background] = run_once(args, data, tok, out, config, background)
                print(f"{config:5s} background {background}: {speeds[background][0]:.1f} samples/s "
                      f"({speeds[background][1]:.0f} s wall)", flush=True)
            rows.append((config, speeds))

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\npreset {args.preset}, batch {args.batch}, {args.steps} steps, {os.cpu_count()} CPUs, "
          f"load average after the runs {load}")
    head = " | ".join(f"{b} background: samples/s" for b in args.background)
    print(f"| processes x threads | OMP_WAIT_POLICY | {head} | slowdown |")
    print("|---|---|" + "---|" * len(args.background) + "---|")
    for config, speeds in rows:
        procs, threads, policy = parse_config(config)
        cells = " | ".join(f"{speeds[b][0]:.1f}" for b in args.background)
        base, worst = speeds[args.background[0]][0], speeds[args.background[-1]][0]
        print(f"| {procs} x {threads} | {policy} | {cells} | {base / worst:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
