"""TextVQA val (LLaVA-1.5 / PIIP protocol): checkpoint -> answers JSONL -> VQA accuracy + JSON summary.

    python eval/textvqa.py --model-path CKPT --question-file playground/data/eval/textvqa/llava_textvqa_val_v051_ocr.jsonl \
        --image-folder playground/data/eval/textvqa/train_images \
        --annotation-file playground/data/eval/textvqa/TextVQA_0.5.1_val.json --answers-file out/textvqa.jsonl
    python eval/textvqa.py --score-only out/textvqa.jsonl --annotation-file .../TextVQA_0.5.1_val.json
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("piip_llava") is None:  # python eval/X.py from a checkout without pip install -e .
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piip_llava.evaluation.cli import add_generation_args, default_summary_path, generate_answers, write_summary
from piip_llava.evaluation.textvqa import load_textvqa_questions, score_answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question-file")
    parser.add_argument("--image-folder")
    parser.add_argument("--annotation-file", required=True)
    parser.add_argument("--no-ocr", action="store_true", help="drop the 'Reference OCR token:' line (not comparable)")
    parser.add_argument("--score-only", metavar="ANSWERS", help="score an existing answers JSONL (ours or LLaVA's)")
    parser.add_argument("--summary", help="summary JSON path (default: <answers dir>/textvqa_summary.json)")
    add_generation_args(parser, default_max_new_tokens=128)
    args = parser.parse_args(argv)

    answers = args.score_only
    if answers is None:
        if not (args.question_file and args.image_folder and args.answers_file):
            parser.error("--question-file, --image-folder and --answers-file are needed to generate answers")
        questions = load_textvqa_questions(args.question_file, args.image_folder, ocr=not args.no_ocr)
        gen = generate_answers(args, questions)
        if not gen["merged"]:
            return 0
        answers = args.answers_file
    summary = score_answers(answers, args.annotation_file)
    summary["ocr"] = not args.no_ocr
    print(f"Samples: {summary['samples']}\nAccuracy: {summary['accuracy']:.2f}%")
    if summary["errors"]:
        print(f"error records (scored 0): {summary['errors']}")
    if summary["unanswered_annotations"]:
        print(f"warning: {summary['unanswered_annotations']} annotations have no answer line")
    path = write_summary(args.summary or default_summary_path(answers, "textvqa"), summary)
    print(f"summary: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
