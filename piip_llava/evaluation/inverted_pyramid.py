"""The inverted-pyramid experiment's report: accuracy against vision-encoder FLOPs, mean and spread over seeds.

`python -m piip_llava.evaluation.inverted_pyramid --run "LABEL=PRESET=RUN_DIR[,RUN_DIR...]" ... --out DIR` reads each
run directory's `eval/textvqa_answers.jsonl` (scored against the annotation file) and `eval/mmbench_summary.json`,
counts the preset's vision-encoder FLOPs with `piip_llava.models.flops`, splits TextVQA accuracy by the way a
question names its word (large word / small word / colour, `evaluation.synthetic_breakdown`), and writes
`DIR/results.md`, `DIR/results.json` and `DIR/accuracy_vs_flops.png`. The run directories of one `--run` are the
seeds of one configuration: the table gives mean ± standard deviation over them, the plot error bars of one
standard deviation.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics

from ..models import load_preset
from ..models.flops import count_vision_flops
from .synthetic_breakdown import textvqa_scores

#: Metrics of one trained model: (results.json key, column title).
METRICS = (
    ("textvqa", "TextVQA"),
    ("textvqa_small", "small-word Qs"),
    ("textvqa_large", "large-word Qs"),
    ("textvqa_colour", "colour Qs"),
    ("mmbench_circular", "MMBench circ."),
    ("mmbench_vanilla", "MMBench vanilla"),
)


def _mean_pct(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else float("nan")


def score_run_dir(run_dir: str, annotation_path: str) -> dict[str, float]:
    """The metrics of one trained model (one seed)."""
    by_kind = textvqa_scores(os.path.join(run_dir, "eval", "textvqa_answers.jsonl"), annotation_path)
    mmb_path = os.path.join(run_dir, "eval", "mmbench_summary.json")
    mmb = {}
    if os.path.isfile(mmb_path):
        with open(mmb_path, encoding="utf-8") as f:
            mmb = json.load(f)
    nan = float("nan")
    return {
        "textvqa": _mean_pct([x for v in by_kind.values() for x in v]),
        "textvqa_small": _mean_pct(by_kind.get("top", []) + by_kind.get("bottom", [])),
        "textvqa_large": _mean_pct(by_kind.get("large", [])),
        "textvqa_colour": _mean_pct(by_kind.get("colour", [])),
        "mmbench_circular": nan if mmb.get("circular") is None else float(mmb["circular"]),
        "mmbench_vanilla": nan if mmb.get("vanilla") is None else float(mmb["vanilla"]),
    }


def _spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value) ignoring NaNs; (nan, nan) when nothing is left."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def collect(runs: list[tuple[str, str, list[str]]], annotation_path: str) -> list[dict]:
    """One row per configuration: FLOPs, parameters, tokens, per-seed metrics and their mean / std."""
    rows = []
    for label, preset, run_dirs in runs:
        cfg = load_preset(preset)
        flops = count_vision_flops(cfg)
        seeds = [score_run_dir(d, annotation_path) for d in run_dirs]
        row = {"label": label, "preset": preset, "vision_mflops": flops["total"] / 1e6,
               "vision_params_m": flops["params"]["tower"] / 1e6, "visual_tokens": cfg.num_image_tokens,
               "seeds": len(seeds), "run_dirs": list(run_dirs), "per_seed": seeds}
        for key, _ in METRICS:
            row[key], row[key + "_std"] = _spread([s[key] for s in seeds])
        rows.append(row)
    return rows


def _cell(row: dict, key: str) -> str:
    mean, std = row[key], row[key + "_std"]
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.1f}" if row["seeds"] == 1 else f"{mean:.1f} ± {std:.1f}"


def to_markdown(rows: list[dict]) -> str:
    titles = " | ".join(title for _, title in METRICS)
    lines = [f"| run | preset | vision MFLOPs | vision params (M) | visual tokens | seeds | {titles} |",
             "| --- " * (6 + len(METRICS)) + "|"]
    for r in rows:
        cells = " | ".join(_cell(r, key) for key, _ in METRICS)
        lines.append(f"| {r['label']} | `{r['preset']}` | {r['vision_mflops']:.1f} | {r['vision_params_m']:.2f} | "
                     f"{r['visual_tokens']} | {r['seeds']} | {cells} |")
    if any(r["seeds"] > 1 for r in rows):
        lines.append("")
        lines.append("Cells: mean ± sample standard deviation over the seeds (training seed: initialisation and data "
                     "order; the same data and evaluation questions for every seed).")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.4), dpi=120)
    markers = {"textvqa": ("o", "all questions"), "textvqa_small": ("v", "small-word questions"),
               "textvqa_large": ("^", "large-word questions"), "mmbench_circular": ("s", "MMBench circular")}
    for key, (marker, name) in markers.items():
        xs = [r["vision_mflops"] for r in rows]
        ax.errorbar(xs, [r[key] for r in rows], yerr=[r[key + "_std"] for r in rows], linestyle="none",
                    marker=marker, markersize=7, capsize=4, label=name, alpha=0.85)
    for r in rows:
        ax.annotate(r["label"], (r["vision_mflops"], r["textvqa"]), textcoords="offset points", xytext=(6, 6),
                    fontsize=8)
    seeds = sorted({r["seeds"] for r in rows})
    ax.set_xlabel("vision encoder MFLOPs (MACs, paper counting rules)")
    ax.set_ylabel("synthetic benchmark accuracy (%)")
    ax.set_title(f"Inverted pyramid in miniature (mean ± 1 s.d. over {'/'.join(map(str, seeds))} seeds)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _json_safe(obj):
    """NaN (a metric a run does not have) -> null, so results.json is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def parse_run(spec: str) -> tuple[str, str, list[str]]:
    """``LABEL=PRESET=DIR[,DIR...]`` -> (label, preset, [dirs]); ValueError naming the spec otherwise."""
    parts = spec.rsplit("=", 2)  # from the right: a label may hold "=", a preset or a folder rarely does
    if len(parts) != 3 or not all(parts) or not all(parts[2].split(",")):
        raise ValueError(f"--run {spec!r}: expected LABEL=PRESET=RUN_DIR[,RUN_DIR...]")
    return parts[0], parts[1], parts[2].split(",")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True,
                        help="LABEL=PRESET=RUN_DIR[,RUN_DIR...] (repeatable; several dirs = seeds of one run)")
    parser.add_argument("--annotation-file", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        runs = [parse_run(spec) for spec in args.run]
    except ValueError as exc:
        parser.error(str(exc))
    rows = collect(runs, args.annotation_file)
    os.makedirs(args.out, exist_ok=True)
    table = to_markdown(rows)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(_json_safe(rows), f, indent=2)
    plot(rows, os.path.join(args.out, "accuracy_vs_flops.png"))
    print(table)
    print(f"wrote {args.out}/results.md, results.json, accuracy_vs_flops.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
