"""The inverted-pyramid experiment's report: accuracy against vision-encoder FLOPs for several trained runs.

`python -m piip_llava.evaluation.inverted_pyramid --run "LABEL=PRESET=RUN_DIR" ... --out DIR` reads each run's
`eval/textvqa_answers.jsonl` (scored against the annotation file) and `eval/mmbench_summary.json`, counts the
preset's vision-encoder FLOPs with `piip_llava.models.flops`, splits TextVQA accuracy by question type (large word /
small word / other) and writes `DIR/results.md`, `DIR/results.json` and `DIR/accuracy_vs_flops.png`.
"""
from __future__ import annotations

import argparse
import json
import os

from ..models import load_preset
from ..models.flops import count_vision_flops
from .answer_processing import EvalAIAnswerProcessor
from .textvqa import load_textvqa_annotations, prompt_processor, vqa_accuracy


def question_kind(question: str) -> str:
    q = question.lower()
    if "small letters" in q:
        return "small word"
    if "large letters" in q:
        return "large word"
    return "other"


def textvqa_by_kind(answers_path: str, annotation_path: str) -> dict[str, tuple[float, int]]:
    """{kind: (accuracy %, count)} plus "all", scored with the official VQA accuracy."""
    annotations = load_textvqa_annotations(annotation_path)
    processor = EvalAIAnswerProcessor()
    scores: dict[str, list[float]] = {}
    with open(answers_path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("error"):
                acc, question = 0.0, row.get("prompt", "")
            else:
                question = prompt_processor(row["prompt"])
                acc = vqa_accuracy(row["text"], annotations[(str(row["question_id"]), question)], processor)
            scores.setdefault(question_kind(question), []).append(acc)
            scores.setdefault("all", []).append(acc)
    return {k: (100.0 * sum(v) / len(v), len(v)) for k, v in scores.items()}


def collect(runs: list[tuple[str, str, str]], annotation_path: str) -> list[dict]:
    rows = []
    for label, preset, run_dir in runs:
        flops = count_vision_flops(load_preset(preset))
        by_kind = textvqa_by_kind(os.path.join(run_dir, "eval", "textvqa_answers.jsonl"), annotation_path)
        mmb_path = os.path.join(run_dir, "eval", "mmbench_summary.json")
        mmb = json.load(open(mmb_path, encoding="utf-8")) if os.path.isfile(mmb_path) else {}
        cfg = load_preset(preset)
        rows.append({
            "label": label, "preset": preset, "vision_mflops": flops["total"] / 1e6,
            "vision_params_m": flops["params"]["tower"] / 1e6,
            "visual_tokens": cfg.num_image_tokens,
            "textvqa": by_kind["all"][0], "textvqa_small": by_kind.get("small word", (float("nan"), 0))[0],
            "textvqa_large": by_kind.get("large word", (float("nan"), 0))[0],
            "mmbench_circular": mmb.get("circular"), "mmbench_vanilla": mmb.get("vanilla"),
        })
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| run | preset | vision MFLOPs | vision params (M) | visual tokens | TextVQA | small-word Qs | large-word Qs "
        "| MMBench circ. / vanilla |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        mmb = ("n/a" if r["mmbench_circular"] is None
               else f"{r['mmbench_circular']:.1f} / {r['mmbench_vanilla']:.1f}")
        lines.append(
            f"| {r['label']} | `{r['preset']}` | {r['vision_mflops']:.1f} | {r['vision_params_m']:.2f} | "
            f"{r['visual_tokens']} | {r['textvqa']:.1f} | {r['textvqa_small']:.1f} | {r['textvqa_large']:.1f} | {mmb} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    markers = {"textvqa": ("o", "all questions"), "textvqa_small": ("v", "small-word questions"),
               "textvqa_large": ("^", "large-word questions")}
    for key, (marker, name) in markers.items():
        ax.plot([r["vision_mflops"] for r in rows], [r[key] for r in rows], linestyle="none", marker=marker,
                markersize=8, label=name, alpha=0.85)
    for r in rows:
        ax.annotate(r["label"], (r["vision_mflops"], r["textvqa"]), textcoords="offset points", xytext=(6, 6),
                    fontsize=8)
    ax.set_xlabel("vision encoder MFLOPs (MACs, paper counting rules)")
    ax.set_ylabel("synthetic TextVQA accuracy (%)")
    ax.set_title("Inverted pyramid in miniature: accuracy vs encoder cost")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")  # upper left hid the low-FLOPs run's large-word point
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, help="LABEL=PRESET=RUN_DIR (repeatable)")
    parser.add_argument("--annotation-file", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    runs = []
    for spec in args.run:
        parts = spec.split("=", 2)
        if len(parts) != 3:
            parser.error(f"--run {spec!r}: expected LABEL=PRESET=RUN_DIR")
        runs.append((parts[0], parts[1], parts[2]))
    rows = collect(runs, args.annotation_file)
    os.makedirs(args.out, exist_ok=True)
    table = to_markdown(rows)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
    plot(rows, os.path.join(args.out, "accuracy_vs_flops.png"))
    print(table)
    print(f"wrote {args.out}/results.md, results.json, accuracy_vs_flops.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
