"""TextVQA (val 0.5.1) as evaluated by LLaVA-1.5 and PIIP: question loader, annotation loader, VQA soft accuracy.

Reproduces ``llava/eval/eval_textvqa.py`` + ``m4c_evaluator.TextVQAAccuracyEvaluator`` (spec
eval_data_formats §3):

* question file ``llava_textvqa_val_v051_ocr.jsonl``: ``question_id`` is the **image id**; ``text`` is the
  capitalised question, the ``Reference OCR token: ...`` line and the short-answer instruction, recorded
  verbatim as ``prompt`` in the answers file;
* matching: key ``(image_id, question.lower())``, later annotation wins on duplicates; the question is
  recovered from the recorded prompt by :func:`prompt_processor` (3-line OCR form, 2-line form, InstructBLIP
  form);
* metric: both prediction and the 10 GT answers go through :class:`EvalAIAnswerProcessor`; an answer's score
  is the mean over the 10 leave-one-out subsets of ``min(1, #matches / 3)``; the benchmark score is the mean
  over **answer lines** (missing predictions are not penalised, so check ``samples``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from piip_llava.evaluation.answer_processing import EvalAIAnswerProcessor
from piip_llava.evaluation.io import load_question_jsonl, read_answers
from piip_llava.evaluation.runner import QuestionRecord
from piip_llava.evaluation.task import DataLayout, Task

__all__ = [
    "OCR_PREFIX",
    "TASK",
    "drop_ocr_line",
    "load_textvqa_annotations",
    "load_textvqa_questions",
    "prompt_processor",
    "score_answers",
    "vqa_accuracy",
    "vqa_answer_scores",
]

OCR_PREFIX = "Reference OCR token: "
_INSTRUCTBLIP_RE = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def drop_ocr_line(text: str) -> str:
    """Remove the ``Reference OCR token: ...`` line (the no-OCR protocol; the 2-line prompt still matches)."""
    return "\n".join(line for line in text.split("\n") if not line.startswith(OCR_PREFIX))


def load_textvqa_questions(question_file: str | os.PathLike, image_folder: str | os.PathLike,
                           ocr: bool = True, image_decode: str = "official") -> list[QuestionRecord]:
    """One record per line of the LLaVA question file; malformed lines become error records (id = line)."""
    return load_question_jsonl(question_file, image_folder, require_image=True,
                               text_transform=None if ocr else drop_ocr_line, image_decode=image_decode)


def load_textvqa_annotations(annotation_file: str | os.PathLike) -> dict[tuple[str, str], list[str]]:
    """``TextVQA_0.5.1_val.json`` -> ``{(image_id, question.lower()): answers}`` (later duplicates win).

    Raises ``ValueError`` naming the file, entry index and field when the file is malformed.
    """
    try:
        with open(annotation_file, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{annotation_file}: not valid JSON ({exc})") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise ValueError(f"{annotation_file}: expected a JSON object with a list field 'data'")
    out: dict[tuple[str, str], list[str]] = {}
    for i, ann in enumerate(obj["data"]):
        where = f"{annotation_file}: data[{i}]"
        if not isinstance(ann, dict):
            raise ValueError(f"{where}: expected an object")
        for key in ("image_id", "question"):
            if not isinstance(ann.get(key), str):
                raise ValueError(f"{where}: field {key!r} missing or not a string")
        answers = ann.get("answers")
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: field 'answers' missing or not a list of strings")
        if len(answers) != 10:
            raise ValueError(f"{where}: field 'answers' has {len(answers)} entries, TextVQA needs exactly 10")
        out[(ann["image_id"], ann["question"].lower())] = answers
    return out


def prompt_processor(prompt: str) -> str:
    """The lower-cased question inside a recorded prompt, exactly as ``eval_textvqa.prompt_processor``."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _INSTRUCTBLIP_RE.search(prompt)
        if match is None:
            raise ValueError(f"InstructBLIP-style prompt without 'Question: ... Short answer:': {prompt!r}")
        question = match.group(1)
    elif OCR_PREFIX in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"prompt has {len(lines)} lines; expected the 2-line or 3-line TextVQA form: {prompt!r}")
    return question.lower()


def vqa_answer_scores(gt_answers: list[str], processor: EvalAIAnswerProcessor | None = None) -> dict[str, float]:
    """Score of every distinct normalised GT answer: mean over the 10 leave-one-out subsets of
    ``min(1, matches / 3)`` (``TextVQAAccuracyEvaluator._compute_answer_scores``)."""
    processor = processor or EvalAIAnswerProcessor()
    answers = [processor(a) for a in gt_answers]
    if len(answers) != 10:
        raise ValueError(f"expected 10 ground-truth answers, got {len(answers)}")
    scores = {}
    for unique in set(answers):
        accs = []
        for j in range(len(answers)):
            matches = sum(1 for i, a in enumerate(answers) if i != j and a == unique)
            accs.append(min(1.0, matches / 3))
        scores[unique] = sum(accs) / len(accs)
    return scores


def vqa_accuracy(prediction: str, gt_answers: list[str], processor: EvalAIAnswerProcessor | None = None) -> float:
    """Soft accuracy (0, 0.3, 0.6, 0.9 or 1.0 for 0, 1, 2, 3, >=4 matches) of one prediction."""
    processor = processor or EvalAIAnswerProcessor()
    return vqa_answer_scores(gt_answers, processor).get(processor(prediction), 0.0)


def score_answers(answers_path: str | os.PathLike, annotation_path: str | os.PathLike) -> dict:
    """Score an answers JSONL (ours or one written by LLaVA's ``model_vqa_loader``) against the annotations.

    Error records (``"error"`` field) score 0 and are listed. A normal line whose (question_id, question) has
    no annotation raises ``ValueError`` with the line number, like the reference's KeyError.
    """
    annotations = load_textvqa_annotations(annotation_path)
    processor = EvalAIAnswerProcessor()
    scores: list[float] = []
    error_ids: list = []
    matched: set = set()
    for lineno, rec in enumerate(read_answers(answers_path), start=1):
        if rec.get("error"):
            scores.append(0.0)
            error_ids.append(rec.get("question_id"))
            continue
        for key in ("question_id", "prompt", "text"):
            if key not in rec:
                raise ValueError(f"{answers_path}: record {lineno}: missing field {key!r}")
        try:
            key = (rec["question_id"], prompt_processor(rec["prompt"]))
        except ValueError as exc:
            raise ValueError(f"{answers_path}: record {lineno}: {exc}") from exc
        if key not in annotations:
            raise ValueError(f"{answers_path}: record {lineno}: no annotation for image_id={key[0]!r} "
                             f"question={key[1]!r} (was the prompt altered?)")
        matched.add(key)
        scores.append(vqa_accuracy(str(rec["text"]), annotations[key], processor))
    accuracy = 100.0 * sum(scores) / len(scores) if scores else 0.0
    return {
        "benchmark": "textvqa",
        "metric": "vqa_accuracy",
        "score": round(accuracy, 2),
        "accuracy": accuracy,
        "samples": len(scores),
        "num_annotations": len(annotations),
        "unanswered_annotations": len(annotations) - len(matched),
        "errors": len(error_ids),
        "error_ids": error_ids,
        "answers_file": str(answers_path),
    }


# ---------------------------------------------------------------------------------------------------------------
# Task
# ---------------------------------------------------------------------------------------------------------------
def _add_arguments(p) -> None:
    p.add_argument("--question-file", help="llava_textvqa_val_v051_ocr.jsonl")
    p.add_argument("--image-folder", help="train_images/")
    p.add_argument("--annotation-file", required=True, help="TextVQA_0.5.1_val.json")
    p.add_argument("--no-ocr", action="store_true", help="drop the 'Reference OCR token:' line (not comparable)")


def _load(args: argparse.Namespace) -> list[QuestionRecord]:
    if not (args.question_file and args.image_folder):
        raise SystemExit("error: --question-file and --image-folder are needed to generate answers")
    return load_textvqa_questions(args.question_file, args.image_folder, ocr=not args.no_ocr,
                                  image_decode=args.image_decode)


def _score(args: argparse.Namespace, answers: Path) -> dict:
    summary = score_answers(answers, args.annotation_file)
    summary["ocr"] = not args.no_ocr
    return summary


def _format(s: dict) -> str:
    lines = [f"Samples: {s['samples']}", f"Accuracy: {s['accuracy']:.2f}%"]
    if s["errors"]:
        lines.append(f"error records (scored 0): {s['errors']}")
    if s["unanswered_annotations"]:
        lines.append(f"warning: {s['unanswered_annotations']} annotations have no answer line")
    return "\n".join(lines)


def _layout(data: Path, out: Path) -> DataLayout:
    d = data / "textvqa"
    q, img, ann = d / "llava_textvqa_val_v051_ocr.jsonl", d / "train_images", d / "TextVQA_0.5.1_val.json"
    return DataLayout((q, img, ann), ("--question-file", str(q), "--image-folder", str(img),
                                      "--annotation-file", str(ann), "--answers-file", str(out / "textvqa.jsonl")))


TASK = Task(
    name="textvqa", title="TextVQA", description="TextVQA val 0.5.1 with OCR tokens: VQA soft accuracy",
    add_arguments=_add_arguments, load_questions=_load, score=_score, format_summary=_format, layout=_layout,
    max_new_tokens=128, prompt_options=lambda a: {"ocr": not a.no_ocr},
    usage="""example:
  python eval/textvqa.py --model-path CKPT --question-file playground/data/eval/textvqa/llava_textvqa_val_v051_ocr.jsonl \\
      --image-folder playground/data/eval/textvqa/train_images \\
      --annotation-file playground/data/eval/textvqa/TextVQA_0.5.1_val.json --answers-file out/textvqa.jsonl
  python eval/textvqa.py --score-only out/textvqa.jsonl --annotation-file .../TextVQA_0.5.1_val.json""",
)
