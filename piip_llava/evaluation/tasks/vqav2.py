"""VQAv2 test-dev (LLaVA-1.5 protocol): the EvalAI submission JSON (server-graded).

``convert_vqav2_for_submission.py``: one ``{"question_id", "answer"}`` per question of the **full** test2015 split,
the EvalAI-processed answer or ``""`` when unanswered (or an error record). The server's number goes into the results
table with ``python -m piip_llava.evaluation.report DIR --server-score vqav2=78.5``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from piip_llava.evaluation.answer_processing import EvalAIAnswerProcessor
from piip_llava.evaluation.io import answers_of, read_jsonl
from piip_llava.evaluation.task import DataLayout, Task, load_llava_questions

__all__ = ["TASK", "write_vqav2_submission"]


def write_vqav2_submission(answers: list[dict] | str | os.PathLike, test_split_jsonl: str | os.PathLike,
                           dst: str | os.PathLike) -> dict:
    processor = EvalAIAnswerProcessor()
    results = {a["question_id"]: a.get("text", "") for a in answers_of(answers) if not a.get("error")}
    split = read_jsonl(test_split_jsonl)
    out = [{"question_id": x["question_id"],
            "answer": processor(results[x["question_id"]]) if x["question_id"] in results else ""}
           for x in split]
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(out, f)
    return {"total_split": len(split), "answered": sum(1 for x in split if x["question_id"] in results)}


def _add_arguments(p) -> None:
    p.add_argument("--question-file", help="llava_vqav2_mscoco_test-dev2015.jsonl")
    p.add_argument("--image-folder", help="test2015/")
    p.add_argument("--test-split", required=True, help="the full llava_vqav2_mscoco_test2015.jsonl")
    p.add_argument("--submission", help="output JSON (default: next to the answers)")


def _score(args: argparse.Namespace, answers: Path) -> dict:
    dst = args.submission or str(answers.parent / "vqav2_submission.json")
    info = write_vqav2_submission(answers, args.test_split, dst)
    return {"benchmark": "vqav2", "metric": "server", "score": None, "submission_file": dst, **info}


def _layout(data: Path, out: Path) -> DataLayout:
    d = data / "vqav2"
    q, img, split = d / "llava_vqav2_mscoco_test-dev2015.jsonl", d / "test2015", d / "llava_vqav2_mscoco_test2015.jsonl"
    return DataLayout((q, img, split), ("--question-file", str(q), "--image-folder", str(img), "--test-split",
                                        str(split), "--answers-file", str(out / "vqav2.jsonl")))


TASK = Task(
    name="vqav2", title="VQAv2", description="VQAv2 test-dev: EvalAI submission JSON (server-graded)",
    add_arguments=_add_arguments, load_questions=load_llava_questions, score=_score, layout=_layout,
    max_new_tokens=128,
    server_graded=True,
    format_summary=lambda s: f"total split: {s['total_split']}, answered: {s['answered']} -> {s['submission_file']} "
                             "(upload to EvalAI, test-dev)",
    usage="""example:
  python eval/vqav2.py --model-path CKPT --question-file playground/data/eval/vqav2/llava_vqav2_mscoco_test-dev2015.jsonl \\
      --image-folder playground/data/eval/vqav2/test2015 \\
      --test-split playground/data/eval/vqav2/llava_vqav2_mscoco_test2015.jsonl --answers-file out/vqav2.jsonl""",
)
