"""POPE (LLaVA-1.5 protocol): yes/no object-hallucination questions, F1 per category (yes = positive), mean F1.

``eval_pope.py`` zips the answers of a category **positionally** with ``coco_pope_<category>.json``; here each
category's label lines are matched to the question file's questions of that category in question order, and the
answers by ``question_id``, which gives the official numbers on an answers file in question order and stays right
after ``--retry-errors`` or a merge reorders lines. Parsing: first sentence, commas removed, "no" if
``No``/``not``/``no`` is a word, else "yes". Error records and missing answers count as wrong.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from piip_llava.evaluation.io import answers_of, load_question_jsonl, read_jsonl
from piip_llava.evaluation.runner import QuestionRecord
from piip_llava.evaluation.task import DataLayout, Task

__all__ = ["TASK", "binary_metrics", "pope_yes_no", "score_pope"]


def pope_yes_no(text: str) -> str:
    """``eval_pope.py``: first sentence, commas removed, split on spaces; "no" if No/not/no is a word."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_metrics(preds: list[int], labels: list[int]) -> dict:
    tp = sum(1 for p, l in zip(preds, labels) if p == 1 and l == 1)
    fp = sum(1 for p, l in zip(preds, labels) if p == 1 and l == 0)
    tn = sum(1 for p, l in zip(preds, labels) if p == 0 and l == 0)
    fn = sum(1 for p, l in zip(preds, labels) if p == 0 and l == 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(preds)
    return {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "accuracy": (tp + tn) / n if n else 0.0,
            "precision": precision, "recall": recall, "f1": f1, "yes_ratio": sum(preds) / n if n else 0.0}


def score_pope(answers: list[dict] | str | os.PathLike, question_file: str | os.PathLike,
               annotation_dir: str | os.PathLike) -> dict:
    """Per-category F1 and the mean (x100). Every file in ``annotation_dir`` must be ``coco_pope_*.json``."""
    by_id: dict[str, dict] = {}
    for a in answers_of(answers):
        by_id.setdefault(str(a.get("question_id")), a)
    questions = read_jsonl(question_file)
    per_cat, warnings = {}, []
    for name in sorted(os.listdir(annotation_dir)):
        if not (name.startswith("coco_pope_") and name.endswith(".json")):
            raise ValueError(f"{annotation_dir}: unexpected file {name!r}; POPE wants only coco_pope_<category>.json")
        category = name[len("coco_pope_"):-len(".json")]
        labels = [0 if row["label"] == "no" else 1 for row in read_jsonl(Path(annotation_dir) / name)]
        qids = [str(q["question_id"]) for q in questions if q.get("category") == category]
        if len(qids) != len(labels):
            warnings.append(f"{category}: {len(qids)} questions vs {len(labels)} labels (matched in order)")
        preds, errors, missing = [], 0, 0
        for qid, label in zip(qids, labels):
            a = by_id.get(qid)
            if a is None or a.get("error"):
                missing += a is None
                errors += a is not None
                preds.append(1 - label)  # no answer is a wrong answer
            else:
                preds.append(0 if pope_yes_no(str(a.get("text", ""))) == "no" else 1)
        m = binary_metrics(preds, labels[:len(preds)])
        m.update(samples=len(preds), errors=errors, missing=missing)
        per_cat[category] = m
    f1s = [m["f1"] for m in per_cat.values()]
    mean_f1 = 100.0 * sum(f1s) / len(f1s) if f1s else 0.0
    return {"benchmark": "pope", "metric": "mean_f1", "score": round(mean_f1, 2), "mean_f1": mean_f1,
            "per_category": per_cat, "warnings": warnings}


def _add_arguments(p) -> None:
    p.add_argument("--question-file", required=True, help="llava_pope_test.jsonl")
    p.add_argument("--image-folder", help="COCO val2014/")
    p.add_argument("--annotation-dir", required=True, help="folder of coco_pope_<category>.json label files")


def _load(args: argparse.Namespace) -> list[QuestionRecord]:
    return load_question_jsonl(args.question_file, args.image_folder, image_decode=args.image_decode)


def _format(s: dict) -> str:
    out = []
    for cat, m in s["per_category"].items():
        out.append(f"Category: {cat}, # samples: {m['samples']}\nTP\tFP\tTN\tFN\t\n{m['TP']}\t{m['FP']}\t{m['TN']}\t"
                   f"{m['FN']}\nAccuracy: {m['accuracy']:.3f}\nPrecision: {m['precision']:.3f}\nRecall: "
                   f"{m['recall']:.3f}\nF1 score: {m['f1']:.3f}\nYes ratio: {m['yes_ratio']:.3f}\n")
    out += [f"warning: {w}" for w in s["warnings"]]
    out.append(f"POPE (mean F1): {s['mean_f1']:.2f}")
    return "\n".join(out)


def _layout(data: Path, out: Path) -> DataLayout:
    d = data / "pope"
    q, img, ann = d / "llava_pope_test.jsonl", d / "val2014", d / "coco"
    return DataLayout((q, img, ann), ("--question-file", str(q), "--image-folder", str(img), "--annotation-dir",
                                      str(ann), "--answers-file", str(out / "pope.jsonl")))


TASK = Task(
    name="pope", title="POPE", description="POPE (COCO adversarial/popular/random): mean F1",
    add_arguments=_add_arguments, load_questions=_load,
    score=lambda args, answers: score_pope(answers, args.question_file, args.annotation_dir),
    format_summary=_format, layout=_layout, max_new_tokens=128,
    usage="""example:
  python eval/pope.py --model-path CKPT --question-file playground/data/eval/pope/llava_pope_test.jsonl \\
      --image-folder playground/data/eval/pope/val2014 --annotation-dir playground/data/eval/pope/coco \\
      --answers-file out/pope.jsonl""",
)
