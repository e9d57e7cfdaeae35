"""GQA testdev-balanced (LLaVA-1.5 protocol): checkpoint -> answers JSONL -> predictions JSON for the official eval.py.

    python eval/gqa.py --model-path CKPT --question-file playground/data/eval/gqa/llava_gqa_testdev_balanced.jsonl \
        --image-folder playground/data/eval/gqa/data/images --answers-file out/gqa.jsonl \
        --predictions out/testdev_balanced_predictions.json \
        [--gqa-questions playground/data/eval/gqa/data/testdev_balanced_questions.json]  # local exact-match accuracy
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("piip_llava") is None:  # python eval/X.py from a checkout without pip install -e .
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piip_llava.evaluation.benchmarks import load_question_jsonl, score_gqa, write_gqa_predictions
from piip_llava.evaluation.cli import add_generation_args, default_summary_path, generate_answers, write_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question-file")
    parser.add_argument("--image-folder")
    parser.add_argument("--predictions", help="output for the official eval.py (default: next to the answers)")
    parser.add_argument("--gqa-questions", help="testdev_balanced_questions.json: compute the accuracy locally")
    parser.add_argument("--score-only", action="store_true")
    parser.add_argument("--summary")
    add_generation_args(parser, default_max_new_tokens=128)
    args = parser.parse_args(argv)
    if not args.answers_file:
        parser.error("--answers-file is required")
    if not args.score_only:
        if not args.question_file:
            parser.error("--question-file is required to generate")
        gen = generate_answers(args, load_question_jsonl(args.question_file, args.image_folder))
        if not gen["merged"]:
            return 0
    dst = args.predictions or str(Path(args.answers_file).parent / "testdev_balanced_predictions.json")
    preds = write_gqa_predictions(args.answers_file, dst)
    print(f"{len(preds)} predictions -> {dst} (run GQA eval.py --tier testdev_balanced)")
    summary = {"benchmark": "gqa", "metric": "accuracy", "score": None, "predictions_file": dst}
    if args.gqa_questions:
        summary = score_gqa(args.answers_file, args.gqa_questions)
        summary["predictions_file"] = dst
        print(f"Accuracy: {summary['accuracy']:.2f}%")
    print(f"summary: {write_summary(args.summary or default_summary_path(args.answers_file, 'gqa'), summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
