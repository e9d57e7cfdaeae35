"""GQA testdev-balanced (LLaVA-1.5 protocol): predictions for the official ``eval.py`` and a local exact match.

``convert_gqa_for_eval.py`` writes ``[{"questionId", "prediction"}]`` with the text ``rstrip('.')`` and lower-cased;
with ``--gqa-questions testdev_balanced_questions.json`` the exact-match accuracy is computed here as well (missing
answers and error records are wrong).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from piip_llava.evaluation.io import answers_of, read_json
from piip_llava.evaluation.task import DataLayout, Task, load_llava_questions

__all__ = ["TASK", "score_gqa", "write_gqa_predictions"]


def write_gqa_predictions(answers: list[dict] | str | os.PathLike, dst: str | os.PathLike) -> list[dict]:
    """``testdev_balanced_predictions.json`` for the official GQA ``eval.py``."""
    preds = [{"questionId": a["question_id"], "prediction": str(a.get("text", "")).rstrip(".").lower()}
             for a in answers_of(answers)]
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(preds, f)
    return preds


def score_gqa(answers: list[dict] | str | os.PathLike, questions_json: str | os.PathLike) -> dict:
    """Exact-match accuracy over the questions of ``testdev_balanced_questions.json`` (missing = wrong)."""
    questions = read_json(questions_json)
    preds = {str(a["question_id"]): ("" if a.get("error") else str(a.get("text", "")).rstrip(".").lower())
             for a in answers_of(answers)}
    hits = missing = 0
    for qid, q in questions.items():
        if str(qid) not in preds:
            missing += 1
            continue
        hits += preds[str(qid)] == q["answer"]
    acc = 100.0 * hits / len(questions) if questions else 0.0
    return {"benchmark": "gqa", "metric": "accuracy", "score": round(acc, 2), "accuracy": acc,
            "questions": len(questions), "missing": missing}


def _add_arguments(p) -> None:
    p.add_argument("--question-file", help="llava_gqa_testdev_balanced.jsonl")
    p.add_argument("--image-folder", help="GQA images/")
    p.add_argument("--predictions", help="output for the official eval.py (default: next to the answers)")
    p.add_argument("--gqa-questions", help="testdev_balanced_questions.json: compute the accuracy locally")


def _score(args: argparse.Namespace, answers: Path) -> dict:
    dst = args.predictions or str(answers.parent / "testdev_balanced_predictions.json")
    n = len(write_gqa_predictions(answers, dst))
    s = {"benchmark": "gqa", "metric": "accuracy", "score": None}
    if args.gqa_questions:
        s = score_gqa(answers, args.gqa_questions)
    s.update(predictions_file=dst, predictions=n)
    return s


def _format(s: dict) -> str:
    out = f"{s['predictions']} predictions -> {s['predictions_file']} (run GQA eval.py --tier testdev_balanced)"
    return out + (f"\nAccuracy: {s['accuracy']:.2f}%" if s["score"] is not None else "")


def _layout(data: Path, out: Path) -> DataLayout:
    d = data / "gqa"
    q, img, gq = d / "llava_gqa_testdev_balanced.jsonl", d / "data" / "images", d / "data" / "testdev_balanced_questions.json"
    return DataLayout((q, img), ("--question-file", str(q), "--image-folder", str(img),
                                 "--answers-file", str(out / "gqa.jsonl")),
                      optional=((gq, ("--gqa-questions", str(gq))),))


TASK = Task(
    name="gqa", title="GQA", description="GQA testdev-balanced: predictions for eval.py (+ local exact match)",
    add_arguments=_add_arguments, load_questions=load_llava_questions, score=_score, format_summary=_format,
    layout=_layout, max_new_tokens=128,
    usage="""example:
  python eval/gqa.py --model-path CKPT --question-file playground/data/eval/gqa/llava_gqa_testdev_balanced.jsonl \\
      --image-folder playground/data/eval/gqa/data/images --answers-file out/gqa.jsonl \\
      [--gqa-questions playground/data/eval/gqa/data/testdev_balanced_questions.json]""",
)
