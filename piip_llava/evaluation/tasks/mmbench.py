"""MMBench (dev 20230712 TSV) as run by LLaVA-1.5/PIIP, scored locally the way the official tools do.

* TSV loader: ``pandas.read_table`` like LLaVA; the rotated (circular) copies are already rows of the file
  (``index + k * 1e6``); a malformed row becomes a recorded error with its row index.
* Prompt: ``model_vqa_mmbench.py --single-pred-prompt``: options A-D up to the first "none" value, hint +
  ``"\\n"`` + question, ``"\\nX. option"`` lines; the message adds the letter instruction (spec §4.2).
* Letter extraction: VLMEvalKit ``can_infer`` (refusal phrases -> Z, standalone option letter, then unique
  option text; spec §4.5). Unextractable answers count as wrong and are listed.
* Scores: circular (group by ``index % 1e6``; a group is right only if every copy is), vanilla (per row),
  circ0 (main rows), per ``category`` and ``l2-category`` tables (on groups, labelled by the main row).
* Submission: the xlsx of ``scripts/convert_mmbench_for_submission.py`` (columns ``index, question, A, B, C,
  D, prediction, answer, split`` for dev).
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import argparse

from piip_llava.evaluation.io import read_answers
from piip_llava.evaluation.runner import QuestionRecord, image_from_base64
from piip_llava.evaluation.task import DataLayout, Task

__all__ = [
    "LETTER_INSTRUCTION",
    "TASK",
    "MMBenchRow",
    "build_mmbench_prompt",
    "build_mmbench_questions",
    "can_infer",
    "can_infer_option",
    "can_infer_text",
    "extract_choice",
    "is_none",
    "load_mmbench_tsv",
    "score_mmbench",
    "write_submission_xlsx",
]

OPTION_LETTERS = ("A", "B", "C", "D")
LETTER_INSTRUCTION = {
    "en": "Answer with the option's letter from the given choices directly.",
    "cn": "请直接回答选项字母。",
}
CIRCULAR_BASE = 1_000_000
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)


def is_none(value: Any) -> bool:
    """LLaVA's ``is_none``: None, float NaN, or the strings "nan"/"none" in any case."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.lower() in ("nan", "none")


@dataclass
class MMBenchRow:
    index: int
    question: str
    hint: str | None
    options: list[str]            # displayed order, letters A, B, ... implied
    answer: str | None            # letter; None in test files
    category: str | None
    l2_category: str | None
    image_b64: str
    split: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def letters(self) -> list[str]:
        return list(OPTION_LETTERS[:len(self.options)])

    @property
    def group(self) -> int:
        return self.index % CIRCULAR_BASE


def _cell(value: Any) -> Any:
    return None if is_none(value) and not isinstance(value, str) else value


def load_mmbench_tsv(path: str | os.PathLike) -> tuple[list[MMBenchRow], list[dict]]:
    """Read the TSV. Returns ``(rows, errors)``; each error is ``{"row": i, "index": ..., "error": msg}``
    for a row that cannot be asked (no question, no options, non-integer index, missing image)."""
    import pandas as pd

    str_cols = {c: str for c in ("question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category",
                                 "image", "split")}
    df = pd.read_table(path, dtype=str_cols)
    required = ("index", "question", "image")
    missing_cols = [c for c in required if c not in df.columns]
    if missing_cols:
        raise ValueError(f"{path}: missing column(s) {missing_cols}; columns are {list(df.columns)}")
    records = df.to_dict("records")
    # VLMEvalKit's re-hosted TSVs store, for repeated images, another row's index (<= 64 chars) instead of the
    # base64 bytes; resolve those references (LLaVA's loader cannot and would fail on them).
    full_images = {str(r.get("index")): r["image"] for r in records
                   if isinstance(r.get("image"), str) and len(r["image"]) > 64}
    rows: list[MMBenchRow] = []
    errors: list[dict] = []
    for i, rec in enumerate(records):
        image = rec.get("image")
        if isinstance(image, str) and len(image) <= 64 and image.strip() in full_images:
            rec["image"] = full_images[image.strip()]
        raw_index = rec.get("index")
        try:
            index = int(raw_index)
            if isinstance(raw_index, float) and not raw_index.is_integer():
                raise ValueError
        except (TypeError, ValueError):
            errors.append({"row": i, "index": f"row{i}", "error": f"{path}: row {i}: field 'index' is not an "
                                                                  f"integer ({raw_index!r})"})
            continue
        problem = None
        options = []
        for letter in OPTION_LETTERS:
            if letter not in rec or is_none(rec[letter]):
                break
            options.append(rec[letter])
        if is_none(rec.get("question")):
            problem = "field 'question' is empty"
        elif len(options) < 2:
            problem = f"only {len(options)} option(s) before the first empty one"
        elif is_none(rec.get("image")):
            problem = "field 'image' is empty"
        if problem:
            errors.append({"row": i, "index": index, "error": f"{path}: row {i} (index {index}): {problem}"})
            continue
        answer = rec.get("answer")
        rows.append(MMBenchRow(
            index=index, question=rec["question"], hint=None if is_none(rec.get("hint")) else rec["hint"],
            options=options, answer=None if is_none(answer) else str(answer).strip(),
            category=_cell(rec.get("category")), l2_category=_cell(rec.get("l2-category")),
            image_b64=rec["image"], split=_cell(rec.get("split")),
        ))
    return rows, errors


def build_mmbench_prompt(question: str, hint: str | None, options: list[str]) -> str:
    """``cur_prompt`` of ``model_vqa_mmbench.py``: [hint\\n]question + ``\\nA. opt`` lines (no instruction)."""
    if not is_none(hint):
        question = hint + "\n" + question
    for letter, option in zip(OPTION_LETTERS, options):
        question = question + "\n" + letter + ". " + option
    return question


def build_mmbench_questions(rows: list[MMBenchRow], errors: list[dict] | None = None,
                            single_pred_prompt: bool = True,
                            lang: Literal["en", "cn"] = "en", image_decode: str = "official") -> list[QuestionRecord]:
    """Question records in TSV order (error rows placed by their row number)."""
    records: list[tuple[int, QuestionRecord]] = []
    for pos, row in enumerate(rows):
        prompt = build_mmbench_prompt(row.question, row.hint, row.options)
        message = prompt + "\n" + LETTER_INSTRUCTION[lang] if single_pred_prompt else prompt
        records.append((pos, QuestionRecord(
            question_id=row.index, prompt=prompt, message=message,
            image=image_from_base64(row.image_b64, source=f"MMBench index {row.index}", decode=image_decode),
            extra={"round_id": 0, "options": list(row.options), "option_char": row.letters},
        )))
    out = [r for _, r in records]
    for err in errors or []:
        out.insert(min(err["row"], len(out)), QuestionRecord(err["index"], "", "", error=err["error"]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Choice extraction (VLMEvalKit vlmeval/utils/matching_util.py, rule-based part)
# ---------------------------------------------------------------------------------------------------------------
def can_infer_option(answer: str, choices: dict[str, str]) -> str | Literal[False]:
    if "Failed to obtain answer via API" in answer:
        return False
    for phrase in REFUSALS:
        if phrase in answer:
            return "Z"
    answer_mod = answer
    for c in ".()[],:;!*#{}":
        answer_mod = answer_mod.replace(c, " ")
    splits = [x.strip() for x in answer_mod.split()]
    count = sum(1 for c in choices if c in splits)
    if count == 1:
        for ch in choices:
            if ch in splits:
                return ch
    elif count == 0 and sum(1 for c in ("Z", "") if c in splits) == 1:
        return "Z"
    return False


def can_infer_text(answer: str, choices: dict[str, str]) -> str | Literal[False]:
    answer = answer.lower()
    cands = [k for k, v in choices.items() if str(v).lower() in answer]
    return cands[0] if len(cands) == 1 else False


def can_infer(answer: Any, choices: dict[str, str]) -> str | Literal[False]:
    """Letter (or ``Z`` for refusals) from free text, or False when it cannot be extracted by rule."""
    answer = str(answer)
    copt = can_infer_option(answer, choices)
    return copt if copt else can_infer_text(answer, choices)


def extract_choice(text: str, options: list[str]) -> str | None:
    """``can_infer`` with the row's options; None when unextractable."""
    choices = dict(zip(OPTION_LETTERS, options))
    choice = can_infer(text, choices)
    return choice or None


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------
def _pct(hits: int, total: int) -> float | None:
    return 100.0 * hits / total if total else None


def score_mmbench(rows: list[MMBenchRow], answers: list[dict] | str | os.PathLike,
                  load_errors: list[dict] | None = None) -> dict:
    """Circular / vanilla / circ0 accuracy and per-category tables from an answers JSONL (or its records).

    Rows without an answer line, error records and unextractable texts count as wrong and are listed. Rows of
    the TSV that could not be loaded (``load_errors`` of :func:`load_mmbench_tsv`) count as wrong too: as a wrong
    row of their circular group when their index is readable, else as one wrong question each.
    """
    if not isinstance(answers, list):
        answers = read_answers(answers)
    load_errors = load_errors or []
    bad_rows = [MMBenchRow(index=e["index"] if isinstance(e["index"], int) else -1 - k, question="", hint=None,
                           options=[], answer=None, category=None, l2_category=None, image_b64="")
                for k, e in enumerate(load_errors)]
    by_id: dict[int, dict] = {}
    for rec in answers:
        try:
            by_id[int(rec["question_id"])] = rec
        except (KeyError, TypeError, ValueError):
            continue
    row_hit: dict[int, bool] = {}
    unreadable, missing, errors, per_row = [], [], [], {}
    for row in rows:
        if row.answer is None:
            raise ValueError(f"MMBench index {row.index} has no 'answer' (a test TSV cannot be scored locally)")
        rec = by_id.get(row.index)
        if rec is None:
            missing.append(row.index)
            choice = None
        elif rec.get("error"):
            errors.append(row.index)
            choice = None
        else:
            choice = extract_choice(str(rec.get("text", "")), row.options)
            if choice is None:
                unreadable.append({"index": row.index, "text": rec.get("text", "")})
        row_hit[row.index] = choice == row.answer
        per_row[row.index] = choice
    for row in bad_rows:
        row_hit[row.index] = False
        per_row[row.index] = None

    def group_of(row: MMBenchRow):
        return row.group if row.index >= 0 else ("unloadable", row.index)

    rows = list(rows) + bad_rows
    groups: dict[Any, list[MMBenchRow]] = defaultdict(list)
    for row in rows:
        groups[group_of(row)].append(row)
    group_hit = {g: all(row_hit[r.index] for r in members) for g, members in groups.items()}
    # a group's category comes from its main row, or any loaded copy when the main row failed to load
    main = {group_of(r): r for r in rows if r.index == r.group and r.options}
    main_rows = [r for r in rows if r.index < CIRCULAR_BASE]

    def table(attr: str) -> dict:
        acc: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # group hits, groups, row hits, rows
        for g, members in groups.items():
            label = getattr(main.get(g) or next((m for m in members if m.options), members[0]), attr) or "unknown"
            acc[label][0] += group_hit[g]
            acc[label][1] += 1
            acc[label][2] += sum(row_hit[r.index] for r in members)
            acc[label][3] += len(members)
        return {k: {"circular": _pct(v[0], v[1]), "vanilla": _pct(v[2], v[3]), "questions": v[1], "rows": v[3]}
                for k, v in sorted(acc.items())}

    circular = _pct(sum(group_hit.values()), len(groups))
    return {
        "benchmark": "mmbench",
        "metric": "circular_accuracy",
        "score": round(circular, 2) if circular is not None else None,
        "circular": circular,
        "vanilla": _pct(sum(row_hit.values()), len(rows)),
        "circ0": _pct(sum(row_hit[r.index] for r in main_rows), len(main_rows)),
        "questions": len(groups),
        "rows": len(rows),
        "per_category": table("category"),
        "per_l2_category": table("l2_category"),
        "unreadable": unreadable,
        "missing": missing,
        "errors": errors,
        "unloadable_rows": len(load_errors),
        "choices": {str(k): v for k, v in per_row.items()},
    }


def write_submission_xlsx(tsv_path: str | os.PathLike, answers: list[dict] | str | os.PathLike,
                          out_path: str | os.PathLike) -> Path:
    """``convert_mmbench_for_submission.py``: drop hint/category/source/image/comment/l2-category, insert an
    empty ``prediction`` column at position 6, fill it with the raw ``text`` per ``question_id``."""
    import pandas as pd

    if not isinstance(answers, list):
        answers = read_answers(answers)
    df = pd.read_table(tsv_path)
    drop = ["hint", "category", "source", "image", "comment", "l2-category"]
    absent = [c for c in drop if c not in df.columns]
    if absent:
        raise ValueError(f"{tsv_path}: the submission converter needs column(s) {absent}")
    cur_df = df.drop(columns=drop)
    cur_df.insert(6, "prediction", None)
    for rec in answers:
        if rec.get("error"):
            continue
        cur_df.loc[df["index"] == rec["question_id"], "prediction"] = rec["text"]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    cur_df.to_excel(out, index=False, engine="openpyxl")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Task
# ---------------------------------------------------------------------------------------------------------------
def _add_arguments(p) -> None:
    p.add_argument("--question-file", required=True, help="MMBench TSV (with base64 images)")
    p.add_argument("--lang", choices=("en", "cn"), default="en")
    p.add_argument("--no-single-pred-prompt", action="store_true", help="omit the letter instruction")
    p.add_argument("--score", action="store_true",
                   help="accepted for compatibility: local scores are computed whenever the TSV has answers")
    p.add_argument("--submission", metavar="DIR", help="write DIR/<answers stem>.xlsx for the MMBench server")


def _load_tsv(args: argparse.Namespace) -> tuple[list[MMBenchRow], list[dict]]:
    rows, errors = load_mmbench_tsv(args.question_file)
    if errors:
        print(f"{len(errors)} malformed TSV row(s) recorded as errors (scored wrong), e.g. {errors[0]['error']}")
    return rows, errors


def _load(args: argparse.Namespace) -> list[QuestionRecord]:
    rows, errors = _load_tsv(args)
    return build_mmbench_questions(rows, errors, single_pred_prompt=not args.no_single_pred_prompt, lang=args.lang,
                                   image_decode=args.image_decode)


def _score(args: argparse.Namespace, answers: Path) -> dict:
    rows, errors = load_mmbench_tsv(args.question_file)
    submission = None
    if args.submission:
        submission = str(write_submission_xlsx(args.question_file, answers,
                                               Path(args.submission) / f"{answers.stem}.xlsx"))
    if not rows or any(r.answer is None for r in rows):
        s = {"benchmark": "mmbench", "metric": "server", "score": None,
             "note": "no answers in this TSV (test split): upload the submission to the MMBench server"}
    else:
        s = score_mmbench(rows, answers, load_errors=errors)
        s["scored_by"] = "local"  # VLMEvalKit's rule-based can_infer, no LLM judge; the paper uses the server
        s["tsv_errors"] = errors
    s["submission_file"] = submission
    return s


def _format(s: dict) -> str:
    out = []
    if s.get("submission_file"):
        out.append(f"submission: {s['submission_file']}")
    if s["score"] is None:
        out.append(s.get("note", ""))
        return "\n".join(out)
    out.append(f"Questions: {s['questions']} ({s['rows']} rows)\nCircular accuracy: {s['circular']:.2f}% (local rules)"
               f"\nVanilla accuracy: {s['vanilla']:.2f}%\nCirc0 accuracy: {s['circ0']:.2f}%")
    for title, key in (("l2-category", "per_l2_category"), ("category", "per_category")):
        out.append(f"\n| {title} | circular | vanilla | questions |\n|---|---|---|---|")
        for name, t in s[key].items():
            out.append(f"| {name} | {t['circular']:.2f} | {t['vanilla']:.2f} | {t['questions']} |")
    if s["unreadable"]:
        out.append(f"\n{len(s['unreadable'])} unreadable answer(s) counted as wrong: "
                   + ", ".join(str(u["index"]) for u in s["unreadable"][:20]))
    if s["missing"] or s["errors"] or s["unloadable_rows"]:
        out.append(f"{len(s['missing'])} row(s) without an answer, {len(s['errors'])} error record(s), "
                   f"{s['unloadable_rows']} unloadable TSV row(s): counted wrong")
    return "\n".join(out)


def _layout(data: Path, out: Path) -> DataLayout:
    tsv = data / "mmbench" / "mmbench_dev_20230712.tsv"
    return DataLayout((tsv,), ("--question-file", str(tsv), "--answers-file", str(out / "mmbench.jsonl"),
                               "--submission", str(out / "mmbench_upload")))


TASK = Task(
    name="mmbench", title="MMB-EN", description="MMBench dev: submission xlsx + local circular accuracy",
    add_arguments=_add_arguments, load_questions=_load, score=_score, format_summary=_format, layout=_layout,
    max_new_tokens=1024, server_graded=True,
    prompt_options=lambda a: {"lang": a.lang, "single_pred_prompt": not a.no_single_pred_prompt},
    usage="""example:
  python eval/mmbench.py --model-path CKPT --question-file playground/data/eval/mmbench/mmbench_dev_20230712.tsv \\
      --answers-file out/mmbench.jsonl --submission out/mmbench_upload
  python eval/mmbench.py --question-file ...tsv --score-only out/mmbench.jsonl

The paper's MMB-EN comes from the OpenCompass server (upload the xlsx); the local circular accuracy uses
VLMEvalKit's rule-based letter extraction (no LLM judge) and is marked local in the results table.""",
)
