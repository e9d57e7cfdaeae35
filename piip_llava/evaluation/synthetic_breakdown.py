"""Per-skill scores of a model on the synthetic quickstart data (``piip_llava.data.synthetic``).

    python -m piip_llava.evaluation.synthetic_breakdown RUN/eval --annotation-file DATA/eval/textvqa/TextVQA_0.5.1_val.json

One overall TextVQA or MMBench number hides what a tiny model has learned: the synthetic TextVQA questions refer to a
word by its place (large / small at the top / small at the bottom) or by its colour, and the MMBench questions ask about
words, colours, counts, shapes and positions. This reads the answers and summaries that ``eval/textvqa.py`` and
``eval/mmbench.py`` wrote into ``RUN/eval`` and writes ``synthetic_breakdown.json`` there: TextVQA accuracy per way of
referring to the word, MMBench circular and vanilla accuracy per category, and next to the overall MMBench scores what
guessing would get and the answer the model gives most often (a model that always answers "A" scores 0 % circular,
below guessing: the number alone would not say whether it picks options at random or not at all), and how the answers
name their choice: by letter, or by the option's text, which MMBench's rule-based extraction also scores.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from piip_llava.data.synthetic import COLORS, MMBENCH_COPY_OFFSET
from piip_llava.evaluation.answer_processing import EvalAIAnswerProcessor
from piip_llava.evaluation.io import read_answers
from piip_llava.evaluation.tasks.mmbench import OPTION_LETTERS, can_infer_option, can_infer_text
from piip_llava.evaluation.tasks.textvqa import (
    load_textvqa_annotations,
    prompt_processor,
    vqa_accuracy,
)

OUTPUT_FILE = "synthetic_breakdown.json"
#: How a synthetic TextVQA question refers to the word it asks for (see `synthetic.word_question`).
TEXTVQA_KINDS = ("large", "top", "bottom", "colour")
_KIND_RE = {
    "large": re.compile(r"in large letters\?$"),
    "top": re.compile(r"in small letters at the top\?$"),
    "bottom": re.compile(r"in small letters at the bottom\?$"),
    "colour": re.compile(r"written in (" + "|".join(COLORS) + r")\?$"),
}


def question_kind(question: str) -> str:
    """``large`` / ``top`` / ``bottom`` / ``colour`` for a synthetic TextVQA question (lower case), else ``other``."""
    for kind, pattern in _KIND_RE.items():
        if pattern.search(question):
            return kind
    return "other"


def textvqa_scores(answers_file: str | os.PathLike, annotation_file: str | os.PathLike) -> dict[str, list[float]]:
    """``{kind: [VQA accuracy of each answer line, 0..1]}``; error records score 0, as in the task's own score."""
    annotations = load_textvqa_annotations(annotation_file)
    processor = EvalAIAnswerProcessor()
    scores: dict[str, list[float]] = defaultdict(list)
    for lineno, rec in enumerate(read_answers(answers_file), start=1):
        question = prompt_processor(rec["prompt"]) if "prompt" in rec else ""
        kind = question_kind(question)
        if rec.get("error"):
            scores[kind].append(0.0)
            continue
        gt = annotations.get((str(rec["question_id"]), question))
        if gt is None:
            raise ValueError(f"{answers_file}: record {lineno}: no annotation for image_id={rec['question_id']!r} "
                             f"question={question!r}")
        scores[kind].append(vqa_accuracy(str(rec["text"]), gt, processor))
    return dict(sorted(scores.items(), key=lambda kv: _order(kv[0])))


def textvqa_by_kind(answers_file: str | os.PathLike, annotation_file: str | os.PathLike) -> dict[str, dict]:
    """``{kind: {"accuracy": %, "questions": n}}`` for each way of naming the word, plus ``all``."""
    scores = textvqa_scores(answers_file, annotation_file)
    scores["all"] = [x for v in scores.values() for x in v]
    return {k: {"accuracy": round(100.0 * sum(v) / len(v), 2), "questions": len(v)} for k, v in scores.items() if v}


def _order(kind: str) -> int:
    return TEXTVQA_KINDS.index(kind) if kind in TEXTVQA_KINDS else len(TEXTVQA_KINDS)


def mmbench_overall(summary: dict, answers_file: str | os.PathLike) -> dict:
    """Overall circular / vanilla accuracy with their chance levels and the most frequent extracted choice.

    Chance: a uniform guess per row is right with 1/n (n options); circular needs all n rotations of a question
    right, (1/n)^n. The rotated copies of a synthetic question have ids `index + k * MMBENCH_COPY_OFFSET`.
    """
    records = list(read_answers(answers_file))
    rows = [(int(rec["question_id"]), len(rec["options"])) for rec in records]
    options_per_row = [n for _, n in rows]
    forms = Counter(answer_form(str(rec.get("text", "")), rec["options"]) for rec in records)
    main_rows = [n for qid, n in rows if qid < MMBENCH_COPY_OFFSET]
    choices = Counter(summary.get("choices", {}).values())
    letter, count = choices.most_common(1)[0] if choices else ("-", 0)
    return {
        "circular": summary["circular"], "vanilla": summary["vanilla"],
        "chance_circular": round(100.0 * sum(n ** -n for n in main_rows) / max(1, len(main_rows)), 2),
        "chance_vanilla": round(100.0 * sum(1 / n for n in options_per_row) / max(1, len(options_per_row)), 2),
        "most_common_choice": letter,
        "most_common_choice_share": round(100.0 * count / max(1, sum(choices.values())), 1),
        "answer_form": {form: round(100.0 * forms[form] / max(1, len(records)), 1) for form in ANSWER_FORMS},
    }


#: How an MMBench answer names its choice, in the order VLMEvalKit's `can_infer` tries them (spec 4.5).
ANSWER_FORMS = ("letter", "option_text", "unextractable")


def answer_form(text: str, options: Sequence[str]) -> str:
    """``letter`` when the rule-based extraction finds a letter (or a refusal), ``option_text`` when it finds the text
    of exactly one option instead, else ``unextractable``: a model can score by answering with the option's text."""
    choices = dict(zip(OPTION_LETTERS, options))
    if can_infer_option(text, choices):
        return "letter"
    return "option_text" if can_infer_text(text, choices) else "unextractable"


def breakdown(eval_dir: str | os.PathLike, annotation_file: str | os.PathLike) -> dict:
    """Read ``textvqa_answers.jsonl`` and ``mmbench_summary.json`` of `eval_dir` -> the breakdown dict."""
    eval_dir = Path(eval_dir)
    out: dict = {}
    answers = eval_dir / "textvqa_answers.jsonl"
    if answers.is_file():
        out["textvqa"] = textvqa_by_kind(answers, annotation_file)
    mmbench = eval_dir / "mmbench_summary.json"
    if mmbench.is_file():
        summary = json.loads(mmbench.read_text(encoding="utf-8"))
        out["mmbench"] = {k: {"circular": v["circular"], "vanilla": v["vanilla"], "questions": v["questions"]}
                          for k, v in summary.get("per_category", {}).items()}
        if (eval_dir / "mmbench_answers.jsonl").is_file() and "circular" in summary:
            out["mmbench_overall"] = mmbench_overall(summary, eval_dir / "mmbench_answers.jsonl")
    if not out:
        raise FileNotFoundError(f"{eval_dir}: neither textvqa_answers.jsonl nor mmbench_summary.json is there")
    return out


def format_breakdown(result: dict) -> str:
    lines = []
    if "textvqa" in result:
        cells = ", ".join(f"{k} {v['accuracy']:.1f} % ({v['questions']})" for k, v in result["textvqa"].items())
        lines.append(f"synthetic TextVQA by the way the word is named: {cells}")
    if "mmbench" in result:
        cells = ", ".join(f"{k} {_fmt(v['circular'])}/{_fmt(v['vanilla'])} ({v['questions']})"
                          for k, v in result["mmbench"].items())
        lines.append(f"synthetic MMBench per category, circular/vanilla %: {cells}")
    if "mmbench_overall" in result:
        o = result["mmbench_overall"]
        lines.append(f"synthetic MMBench: circular {o['circular']:.1f} % (guessing: {o['chance_circular']:.1f} %), "
                     f"vanilla {o['vanilla']:.1f} % (guessing: {o['chance_vanilla']:.1f} %); most frequent answer "
                     f"{o['most_common_choice']} ({o['most_common_choice_share']:.0f} % of rows)")
        if "answer_form" in o:
            f = o["answer_form"]
            lines.append(f"synthetic MMBench answers name their choice by letter in {f['letter']:.0f} % of rows, by the "
                         f"option's text in {f['option_text']:.0f} %, not at all in {f['unextractable']:.0f} %")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m piip_llava.evaluation.synthetic_breakdown",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("eval_dir", help="the folder the eval CLIs wrote (textvqa_answers.jsonl, mmbench_summary.json)")
    parser.add_argument("--annotation-file", required=True, help="the synthetic TextVQA_0.5.1_val.json")
    args = parser.parse_args(argv)
    result = breakdown(args.eval_dir, args.annotation_file)
    path = Path(args.eval_dir) / OUTPUT_FILE
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(format_breakdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
