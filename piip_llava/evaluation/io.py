"""The one answers-file reader, the one question-file reader (LLaVA's jsonl question files) and JSON helpers.

Every task reads answers through :func:`read_answers` and LLaVA ``model_vqa_loader`` question files through
:func:`load_question_jsonl`; bad input raises an error naming the file, line and field.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from piip_llava.evaluation.runner import QuestionRecord, image_from_file, read_answers

__all__ = ["answers_of", "load_question_jsonl", "read_answers", "read_json", "read_jsonl", "write_json"]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every non-blank line of a JSONL file; a bad line raises ``ValueError("<file>:<line>: ...")``."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
    return out


def read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=indent, ensure_ascii=False, default=str), encoding="utf-8")
    return p


def answers_of(answers: list[dict] | str | os.PathLike) -> list[dict]:
    """Answer records given either as a list or as an answers-file path."""
    return answers if isinstance(answers, list) else read_answers(answers)


def load_question_jsonl(question_file: str | os.PathLike, image_folder: str | os.PathLike | None,
                        keep: Callable[[dict], bool] | None = None, require_image: bool = False,
                        text_transform: Callable[[str], str] | None = None,
                        image_decode: str = "official") -> list[QuestionRecord]:
    """LLaVA ``model_vqa_loader`` question file (``question_id``, ``image``, ``text``).

    ``text`` (after ``text_transform``) is sent and recorded verbatim as ``prompt``; ``keep(row) -> bool``
    filters rows. A malformed line becomes an error record (id ``line<N>``) naming file, line and field, so one
    bad row costs one question instead of the run.
    """
    records: list[QuestionRecord] = []
    with open(question_file, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{question_file}:{lineno}"
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                records.append(QuestionRecord(f"line{lineno}", "", "", error=f"{where}: invalid JSON ({exc})"))
                continue
            if not isinstance(row, dict) or "question_id" not in row:
                records.append(QuestionRecord(f"line{lineno}", "", "", error=f"{where}: missing field 'question_id'"))
                continue
            if keep is not None and not keep(row):
                continue
            qid = row["question_id"]
            needed = ("text", "image") if require_image else ("text",)
            bad = [k for k in needed if not isinstance(row.get(k), str)]
            if bad:
                records.append(QuestionRecord(qid, "", "", error=f"{where}: missing or non-string field {bad[0]!r}"))
                continue
            image = None
            if row.get("image") is not None:
                if image_folder is None:
                    raise ValueError(f"{where}: question has an image but no --image-folder was given")
                image = image_from_file(Path(image_folder) / row["image"], decode=image_decode)
            text = text_transform(row["text"]) if text_transform else row["text"]
            records.append(QuestionRecord(qid, text, text, image=image))
    return records
