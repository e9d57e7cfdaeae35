"""POPE (LLaVA-1.5 protocol): checkpoint -> answers JSONL -> F1 per category (yes = positive) and their mean.

    python eval/pope.py --model-path CKPT --question-file playground/data/eval/pope/llava_pope_test.jsonl \
        --image-folder playground/data/eval/pope/val2014 --annotation-dir playground/data/eval/pope/coco \
        --answers-file out/pope.jsonl
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("piip_llava") is None:  # python eval/X.py from a checkout without pip install -e .
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piip_llava.evaluation.benchmarks import load_question_jsonl, score_pope
from piip_llava.evaluation.cli import add_generation_args, default_summary_path, generate_answers, write_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--image-folder")
    parser.add_argument("--annotation-dir", required=True, help="folder of coco_pope_<category>.json label files")
    parser.add_argument("--score-only", action="store_true", help="do not generate; score --answers-file")
    parser.add_argument("--summary")
    add_generation_args(parser, default_max_new_tokens=128)
    args = parser.parse_args(argv)
    if not args.answers_file:
        parser.error("--answers-file is required")
    if not args.score_only:
        gen = generate_answers(args, load_question_jsonl(args.question_file, args.image_folder))
        if not gen["merged"]:
            return 0
    s = score_pope(args.answers_file, args.question_file, args.annotation_dir)
    for cat, m in s["per_category"].items():
        print(f"Category: {cat}, # samples: {m['samples']}\nTP\tFP\tTN\tFN\t\n{m['TP']}\t{m['FP']}\t{m['TN']}\t{m['FN']}\n"
              f"Accuracy: {m['accuracy']:.3f}\nPrecision: {m['precision']:.3f}\nRecall: {m['recall']:.3f}\n"
              f"F1 score: {m['f1']:.3f}\nYes ratio: {m['yes_ratio']:.3f}\n")
    for w in s["warnings"]:
        print(f"warning: {w}")
    print(f"POPE (mean F1): {s['mean_f1']:.2f}")
    print(f"summary: {write_summary(args.summary or default_summary_path(args.answers_file, 'pope'), s)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
