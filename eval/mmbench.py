"""MMBench dev (LLaVA-1.5 / PIIP protocol): checkpoint -> answers JSONL -> submission xlsx and/or local scores.

    python eval/mmbench.py --model-path CKPT --question-file playground/data/eval/mmbench/mmbench_dev_20230712.tsv \
        --answers-file out/mmbench.jsonl --score --submission out/mmbench_upload
    python eval/mmbench.py --question-file ...tsv --answers-file out/mmbench.jsonl --score-only --score

Final MMB-EN numbers come from the OpenCompass server (upload the xlsx); ``--score`` computes the rule-based
circular / vanilla / per-category accuracies locally (unextractable answers count as wrong and are listed).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("piip_llava") is None:  # python eval/X.py from a checkout without pip install -e .
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piip_llava.evaluation.cli import add_generation_args, default_summary_path, generate_answers, write_summary
from piip_llava.evaluation.mmbench import (build_mmbench_questions, load_mmbench_tsv, score_mmbench,
                                           write_submission_xlsx)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question-file", required=True, help="MMBench TSV (with base64 images)")
    parser.add_argument("--lang", choices=("en", "cn"), default="en")
    parser.add_argument("--no-single-pred-prompt", action="store_true", help="omit the letter instruction")
    parser.add_argument("--score-only", action="store_true", help="do not generate; use --answers-file as is")
    parser.add_argument("--score", action="store_true", help="compute local circular/vanilla/per-category scores")
    parser.add_argument("--submission", metavar="DIR", help="write DIR/<answers stem>.xlsx for the MMBench server")
    parser.add_argument("--summary", help="summary JSON path (default: <answers dir>/mmbench_summary.json)")
    add_generation_args(parser, default_max_new_tokens=1024)
    args = parser.parse_args(argv)
    if not args.answers_file:
        parser.error("--answers-file is required")

    rows, errors = load_mmbench_tsv(args.question_file)
    if errors:
        print(f"{len(errors)} malformed TSV row(s) recorded as errors, e.g. {errors[0]['error']}")
    if not args.score_only:
        questions = build_mmbench_questions(rows, errors, single_pred_prompt=not args.no_single_pred_prompt,
                                            lang=args.lang)
        gen = generate_answers(args, questions)
        if not gen["merged"]:
            return 0
    if args.submission:
        out = write_submission_xlsx(args.question_file, args.answers_file,
                                    Path(args.submission) / f"{Path(args.answers_file).stem}.xlsx")
        print(f"submission: {out}")
    if args.score:
        s = score_mmbench(rows, args.answers_file)
        s["tsv_errors"] = errors
        print(f"Questions: {s['questions']} ({s['rows']} rows)\nCircular accuracy: {s['circular']:.2f}%\n"
              f"Vanilla accuracy: {s['vanilla']:.2f}%\nCirc0 accuracy: {s['circ0']:.2f}%")
        for title, key in (("l2-category", "per_l2_category"), ("category", "per_category")):
            print(f"\n| {title} | circular | vanilla | questions |\n|---|---|---|---|")
            for name, t in s[key].items():
                print(f"| {name} | {t['circular']:.2f} | {t['vanilla']:.2f} | {t['questions']} |")
        if s["unreadable"]:
            print(f"\n{len(s['unreadable'])} unreadable answer(s) counted as wrong: "
                  + ", ".join(str(u["index"]) for u in s["unreadable"][:20]))
        if s["missing"] or s["errors"]:
            print(f"{len(s['missing'])} row(s) without an answer, {len(s['errors'])} error record(s): counted wrong")
        path = write_summary(args.summary or default_summary_path(args.answers_file, "mmbench"), s)
        print(f"summary: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
