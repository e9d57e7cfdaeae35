"""MM-Vet (LLaVA-1.5 protocol): ``{"v1_<id>": answer}`` for the GPT-4 grader (``convert_mmvet_for_eval.py``).

The grader's total goes into the results table with ``--grader-score`` here or ``--server-score mmvet=31.1`` in the
report.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from piip_llava.evaluation.io import answers_of
from piip_llava.evaluation.task import DataLayout, Task, load_llava_questions

__all__ = ["TASK", "write_mmvet_results"]


def write_mmvet_results(answers: list[dict] | str | os.PathLike, dst: str | os.PathLike) -> dict[str, str]:
    result = {f"v1_{a['question_id']}": a.get("text", "") for a in answers_of(answers)}
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return result


def _add_arguments(p) -> None:
    p.add_argument("--question-file", help="llava-mm-vet.jsonl")
    p.add_argument("--image-folder", help="images/")
    p.add_argument("--results", help="output JSON for the grader (default: next to the answers)")
    p.add_argument("--grader-score", type=float, help="total reported by the MM-Vet grader, for the results table")


def _score(args: argparse.Namespace, answers: Path) -> dict:
    dst = args.results or str(answers.parent / "mmvet_results.json")
    n = len(write_mmvet_results(answers, dst))
    return {"benchmark": "mmvet", "metric": "gpt4_grader", "score": args.grader_score, "results_file": dst,
            "answers": n, "scored_by": "server" if args.grader_score is not None else None}


def _layout(data: Path, out: Path) -> DataLayout:
    d = data / "mm-vet"
    q, img = d / "llava-mm-vet.jsonl", d / "images"
    return DataLayout((q, img), ("--question-file", str(q), "--image-folder", str(img),
                                 "--answers-file", str(out / "mmvet.jsonl")))


TASK = Task(
    name="mmvet", title="MMVet", description="MM-Vet: answers JSON for the GPT-4 grader (server-graded)",
    add_arguments=_add_arguments, load_questions=load_llava_questions, score=_score, layout=_layout,
    max_new_tokens=1024,
    server_graded=True,
    format_summary=lambda s: f"{s['answers']} answers -> {s['results_file']} (grade with the MM-Vet GPT-4 evaluator)",
    usage="""example:
  python eval/mmvet.py --model-path CKPT --question-file playground/data/eval/mm-vet/llava-mm-vet.jsonl \\
      --image-folder playground/data/eval/mm-vet/images --answers-file out/mmvet.jsonl
  python eval/mmvet.py --score-only out/mmvet.jsonl --grader-score 31.1   # record the grader's total""",
)
