"""ScienceQA-IMG (LLaVA-1.5 protocol): checkpoint -> answers JSONL -> Accuracy and IMG-Accuracy (PIIP's SQA-I).

    python eval/scienceqa.py --model-path CKPT --question-file playground/data/eval/scienceqa/llava_test_CQM-A.json \
        --image-folder playground/data/eval/scienceqa/images/test --base-dir playground/data/eval/scienceqa \
        --answers-file out/scienceqa.jsonl
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("piip_llava") is None:  # python eval/X.py from a checkout without pip install -e .
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piip_llava.evaluation.benchmarks import load_scienceqa_questions, score_scienceqa
from piip_llava.evaluation.cli import add_generation_args, default_summary_path, generate_answers, write_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question-file")
    parser.add_argument("--image-folder")
    parser.add_argument("--base-dir", required=True, help="folder with problems.json and pid_splits.json")
    parser.add_argument("--split", default="test")
    parser.add_argument("--no-single-pred-prompt", action="store_true")
    parser.add_argument("--score-only", action="store_true")
    parser.add_argument("--summary")
    add_generation_args(parser, default_max_new_tokens=1024)
    args = parser.parse_args(argv)
    if not args.answers_file:
        parser.error("--answers-file is required")
    if not args.score_only:
        if not (args.question_file and args.image_folder):
            parser.error("--question-file and --image-folder are required to generate")
        qs = load_scienceqa_questions(args.question_file, args.image_folder,
                                      single_pred_prompt=not args.no_single_pred_prompt)
        gen = generate_answers(args, qs)
        if not gen["merged"]:
            return 0
    base = Path(args.base_dir)
    s = score_scienceqa(args.answers_file, base / "problems.json", base / "pid_splits.json", args.split)
    print(f"Total: {s['total']}, Accuracy: {s['accuracy']:.2f}%, IMG-Accuracy: {s['img_accuracy']:.2f}%")
    print(f"summary: {write_summary(args.summary or default_summary_path(args.answers_file, 'scienceqa'), s)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
