"""VQAv2 test-dev (LLaVA-1.5 protocol): checkpoint -> answers JSONL -> EvalAI submission JSON (server-graded).

    python eval/vqav2.py --model-path CKPT --question-file playground/data/eval/vqav2/llava_vqav2_mscoco_test-dev2015.jsonl \
        --image-folder playground/data/eval/vqav2/test2015 \
        --test-split playground/data/eval/vqav2/llava_vqav2_mscoco_test2015.jsonl \
        --answers-file out/vqav2.jsonl --submission out/vqav2_submission.json
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("piip_llava") is None:  # python eval/X.py from a checkout without pip install -e .
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piip_llava.evaluation.benchmarks import load_question_jsonl, write_vqav2_submission
from piip_llava.evaluation.cli import add_generation_args, default_summary_path, generate_answers, write_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question-file")
    parser.add_argument("--image-folder")
    parser.add_argument("--test-split", required=True, help="the full llava_vqav2_mscoco_test2015.jsonl")
    parser.add_argument("--submission", help="output JSON (default: next to the answers)")
    parser.add_argument("--score-only", action="store_true", help="only convert an existing --answers-file")
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
    dst = args.submission or str(Path(args.answers_file).parent / "vqav2_submission.json")
    info = write_vqav2_submission(args.answers_file, args.test_split, dst)
    print(f"total split: {info['total_split']}, answered: {info['answered']} -> {dst} (upload to EvalAI, test-dev)")
    summary = {"benchmark": "vqav2", "metric": "server", "score": None, "submission_file": dst, **info}
    print(f"summary: {write_summary(args.summary or default_summary_path(args.answers_file, 'vqav2'), summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
