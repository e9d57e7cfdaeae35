"""SEED-Bench image questions (LLaVA-1.5 protocol): exact string equality of the answer and the letter (SEED-I).

``convert_seed_for_submission.eval_single``: ``text == answer`` (so ``"A."`` is wrong) over the questions of one
``data_type``; missing answers are wrong; per question-type accuracy; optional upload jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from piip_llava.evaluation.io import answers_of, load_question_jsonl, read_json
from piip_llava.evaluation.runner import QuestionRecord
from piip_llava.evaluation.task import DataLayout, Task

__all__ = ["TASK", "score_seed", "write_seed_upload"]


def _seed_qid(qid: Any) -> Any:
    try:
        return int(qid)
    except (TypeError, ValueError):
        return qid


def score_seed(answers: list[dict] | str | os.PathLike, seed_json: str | os.PathLike,
               data_type: str | None = "image") -> dict:
    """Exact-letter accuracy over the questions of ``data_type`` and per question type."""
    data = read_json(seed_json)
    results = {_seed_qid(a["question_id"]): a for a in answers_of(answers)}
    type_names = {v: k for k, v in data.get("question_type", {}).items()}
    counts: dict[Any, list[int]] = defaultdict(lambda: [0, 0])
    for q in data["questions"]:
        if data_type is not None and q["data_type"] != data_type:
            continue
        c = counts[q["question_type_id"]]
        c[1] += 1
        row = results.get(_seed_qid(q["question_id"]))
        if row is not None and not row.get("error") and row.get("text") == q["answer"]:
            c[0] += 1
    hits = sum(c[0] for c in counts.values())
    total = sum(c[1] for c in counts.values())
    acc = 100.0 * hits / total if total else 0.0
    return {"benchmark": "seed", "metric": f"{data_type or 'total'}_accuracy", "score": round(acc, 2),
            "accuracy": acc, "questions": total,
            "per_type": {str(type_names.get(k, k)): 100.0 * c[0] / c[1] for k, c in sorted(counts.items())}}


def write_seed_upload(answers: list[dict] | str | os.PathLike, seed_json: str | os.PathLike,
                      dst: str | os.PathLike) -> int:
    """Upload jsonl of ``{question_id, prediction}`` for every answered question of ``SEED-Bench.json``."""
    data = read_json(seed_json)
    results = {_seed_qid(a["question_id"]): a for a in answers_of(answers)}
    n = 0
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", encoding="utf-8") as f:
        for q in data["questions"]:
            row = results.get(_seed_qid(q["question_id"]))
            if row is not None:
                f.write(json.dumps({"question_id": q["question_id"], "prediction": row.get("text", "")}) + "\n")
                n += 1
    return n


def _add_arguments(p) -> None:
    p.add_argument("--question-file", help="llava-seed-bench.jsonl")
    p.add_argument("--image-folder")
    p.add_argument("--seed-json", required=True, help="SEED-Bench.json (answers, data_type, question types)")
    p.add_argument("--all-types", action="store_true", help="also ask the video questions (middle frames)")
    p.add_argument("--upload", help="write the {question_id, prediction} upload jsonl here")


def _load(args: argparse.Namespace) -> list[QuestionRecord]:
    if not args.question_file:
        raise SystemExit("error: --question-file is required to generate")
    keep = None
    if not args.all_types:
        image_ids = {str(q["question_id"]) for q in read_json(args.seed_json)["questions"] if q["data_type"] == "image"}
        keep = lambda row: str(row["question_id"]) in image_ids  # noqa: E731
    return load_question_jsonl(args.question_file, args.image_folder, keep=keep, image_decode=args.image_decode)


def _score(args: argparse.Namespace, answers: Path) -> dict:
    s = score_seed(answers, args.seed_json, data_type="image")
    if args.upload:
        s["upload_file"], s["uploaded"] = args.upload, write_seed_upload(answers, args.seed_json, args.upload)
    return s


def _format(s: dict) -> str:
    out = [f"image accuracy: {s['accuracy']:.2f}%"] + [f"{k}: {v:.2f}%" for k, v in s["per_type"].items()]
    if s.get("upload_file"):
        out.append(f"{s['uploaded']} predictions -> {s['upload_file']}")
    return "\n".join(out)


def _layout(data: Path, out: Path) -> DataLayout:
    d = data / "seed_bench"
    q, js = d / "llava-seed-bench.jsonl", d / "SEED-Bench.json"
    return DataLayout((q, js), ("--question-file", str(q), "--image-folder", str(d), "--seed-json", str(js),
                                "--answers-file", str(out / "seed.jsonl"), "--upload", str(out / "seed_upload.jsonl")))


TASK = Task(
    name="seed", title="SEED-I", description="SEED-Bench image questions: exact-letter accuracy (SEED-I)",
    add_arguments=_add_arguments, load_questions=_load, score=_score, format_summary=_format, layout=_layout,
    max_new_tokens=128, prompt_options=lambda a: {"all_types": a.all_types},
    usage="""example:
  python eval/seed.py --model-path CKPT --question-file playground/data/eval/seed_bench/llava-seed-bench.jsonl \\
      --image-folder playground/data/eval/seed_bench --seed-json playground/data/eval/seed_bench/SEED-Bench.json \\
      --answers-file out/seed.jsonl [--upload out/seed_upload.jsonl]""",
)
