"""Training throughput (samples/s, tokens/s) of a preset on this machine: one process, and N processes + ZeRO-2.

    python benchmarks/train_throughput.py [--preset tiny-piip2_clip_64-128] [--steps 20] [--batch 4] [--nproc 2]

Writes synthetic LLaVA stage-2 records (coloured images + a question/answer) and a locally trained tokenizer into a
temporary folder, runs `python -m piip_llava.train` (single process, no DeepSpeed) and
`scripts/finetune_piip_llava.sh` (torchrun, DeepSpeed ZeRO-2; on a machine without a GPU: the CPU, fp32), and prints
the median of the per-step `samples_per_second` / `tokens_per_second` the trainer logs (all ranks together;
tokens = non-padding tokens including the visual tokens), skipping the first `--warmup` steps.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20)}


def write_data(root: str, records: int) -> str:
    from PIL import Image

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = random.Random(0)
    out = []
    for i in range(records):
        name = rng.choice(sorted(COLORS))
        rel = f"images/{i}.png"
        Image.new("RGB", (rng.randint(40, 300), rng.randint(40, 300)), COLORS[name]).save(os.path.join(root, rel))
        out.append({"id": i, "image": rel, "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the picture? Answer with one sentence."},
            {"from": "gpt", "value": f"The picture is {name}, a plain {name} rectangle without any text."}]})
    path = os.path.join(root, "data.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f)
    return path


def summarize(output_dir: str, warmup: int) -> tuple[float, float, int]:
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as f:
        logs = [h for h in json.load(f)["log_history"] if "samples_per_second" in h]
    logs = logs[warmup:] or logs
    return (statistics.median(h["samples_per_second"] for h in logs),
            statistics.median(h["tokens_per_second"] for h in logs), len(logs))


def run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"failed: {' '.join(cmd[:4])} ...")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny-piip2_clip_64-128")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4, help="per-device batch size")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the ZeRO-2 run (CPU) ")
    parser.add_argument("--warmup", type=int, default=3, help="logged steps left out of the median")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    from piip_llava.data.tokenizer import train_sentencepiece_tokenizer
    from piip_llava.testing import free_port

    work = args.workdir or tempfile.mkdtemp(prefix="piip_train_bench_")
    records = args.steps * args.batch * max(args.nproc, 1)
    data = write_data(os.path.join(work, "data"), records)
    tok = train_sentencepiece_tokenizer(os.path.join(work, "tok"), vocab_size=512)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    common = ["--preset", args.preset, "--tokenizer_path", tok, "--data_path", data, "--max_steps", str(args.steps),
              "--per_device_train_batch_size", str(args.batch), "--learning_rate", "1e-4", "--logging_steps", "1",
              "--save_strategy", "no", "--disable_tqdm", "true", "--stage", "2"]
    results = []
    single = os.path.join(work, "single")
    run([sys.executable, "-m", "piip_llava.train", *common, "--output_dir", single], env)
    results.append(("1 process, no DeepSpeed", *summarize(single, args.warmup)))
    zero2 = os.path.join(work, "zero2")
    run(["bash", os.path.join(REPO, "scripts", "finetune_piip_llava.sh")],
        dict(env, PYTHON=sys.executable, PRESET=args.preset, TOKENIZER_PATH=tok, DATA_PATH=data, OUTPUT_DIR=zero2,
             NPROC=str(args.nproc), ZERO="2", MAX_STEPS=str(args.steps), PER_DEVICE_BATCH=str(args.batch),
             SAVE_STEPS="100000", GRAD_CKPT="false", MASTER_PORT=str(free_port()), RESUME=""))
    results.append((f"{args.nproc} processes, ZeRO-2", *summarize(zero2, args.warmup)))

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"preset {args.preset}, per-device batch {args.batch}, {args.steps} steps, {os.cpu_count()} CPUs, "
          f"load average {load}, workdir {work}")
    print(f"{'run':28s} {'samples/s':>10s} {'tokens/s':>10s} {'steps':>6s}")
    for name, sps, tps, n in results:
        print(f"{name:28s} {sps:10.2f} {tps:10.0f} {n:6d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
