"""Wall time and peak RSS of the mixture tool on a large synthetic LLaVA input (default 2.8M records).

    python benchmarks/mixture_memory.py --records 2800000 [--workdir DIR] [--keep]

Writes a JSON-array file (LLaVA's format) with 1 bad record per 1,000 and two thirds of the records referencing a
few small image files, plus a second JSONL source that is sub-sampled, then runs
`python -m piip_llava.data.mixture` in a child process and prints its wall time and peak RSS
(`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def write_inputs(workdir: str, records: int) -> tuple[str, int]:
    from PIL import Image

    img_dir = os.path.join(workdir, "images")
    os.makedirs(img_dir, exist_ok=True)
    for k in range(4):
        Image.new("RGB", (8 + k, 8), (k * 40, 0, 0)).save(os.path.join(img_dir, f"img_{k}.png"))
    small = max(records // 28, 1)  # second source: ~1/28 of the records, half of them sampled
    big = records - small
    with open(os.path.join(workdir, "big.json"), "w", encoding="utf-8") as f:
        f.write("[\n")
        for i in range(big):
            rec: dict = {"id": f"{i:09d}", "conversations": [
                {"from": "human", "value": f"<image>\nWhat is shown in picture {i}?" if i % 3 else f"Question {i}?"},
                {"from": "gpt", "value": f"Answer number {i} with a few more words of text."},
                {"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": "Red."}]}
            if i % 3:
                rec["image"] = f"img_{i % 4}.png" if i % 1000 != 1 else "missing.png"
            if i % 1000 == 2:
                rec["conversations"] = [{"from": "human", "value": "no answer"}]
            f.write(json.dumps(rec) + (",\n" if i < big - 1 else "\n"))
        f.write("]\n")
    with open(os.path.join(workdir, "small.jsonl"), "w", encoding="utf-8") as f:
        for i in range(small):
            f.write(json.dumps({"id": f"s{i}", "conversations": [{"from": "human", "value": f"Text {i}"},
                                                                 {"from": "gpt", "value": "Fine."}]}) + "\n")
    with open(os.path.join(workdir, "recipe.yaml"), "w", encoding="utf-8") as f:
        f.write(f"seed: 0\nimage_folder: {img_dir}\nstages:\n  finetune:\n    sources:\n"
                f"      - {{name: big, file: {workdir}/big.json, image_root: {img_dir}, template: vicuna_v1}}\n"
                f"      - {{name: small, file: {workdir}/small.jsonl, template: vicuna_v1, count: {small // 2}}}\n")
    return os.path.join(workdir, "recipe.yaml"), big + small


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2_800_000)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="mixture_bench_")
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    recipe, total = write_inputs(workdir, args.records)
    gen_s = time.time() - t0
    size_mb = sum(os.path.getsize(os.path.join(workdir, n)) for n in ("big.json", "small.jsonl")) / 2**20
    t0 = time.time()
    # The child prints its peak RSS right after importing the tool (the `piip_llava` package imports torch and
    # transformers) and at the end, so the tool's own memory is visible apart from the import cost.
    child = ("import json, resource, sys\n"
             "import piip_llava.data.mixture as m\n"
             "imp = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "rc = m.main(sys.argv[1:])\n"
             "print(json.dumps({'import_kb': imp, 'peak_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))\n"
             "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", child, recipe, "--out", os.path.join(workdir, "out"),
                           "--no-progress"], capture_output=True, text=True)
    wall = time.time() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        return proc.returncode
    with open(os.path.join(workdir, "out", "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    stage = report["stages"]["finetune"]
    dropped = {k: v for s in stage["sources"] for k, v in s["dropped"].items()}
    print(f"input: {total:,} records ({size_mb:,.0f} MB) generated in {gen_s:.0f} s")
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"mixture tool: wall {wall:.1f} s (report: {report['seconds']} s in build_mixture), peak RSS "
          f"{peak_mb:,.0f} MB, of which {rss['import_kb'] / 1024:,.0f} MB after imports alone "
          f"(tool's own growth {(rss['peak_kb'] - rss['import_kb']) / 1024:,.0f} MB); wrote {stage['written']:,} "
          f"records, dropped {dropped}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
