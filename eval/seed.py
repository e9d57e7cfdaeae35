"""SEED-Bench image questions (LLaVA-1.5 protocol): checkpoint -> answers JSONL -> exact-letter accuracy (SEED-I).

    python eval/seed.py --model-path CKPT --question-file playground/data/eval/seed_bench/llava-seed-bench.jsonl \
        --image-folder playground/data/eval/seed_bench --seed-json playground/data/eval/seed_bench/SEED-Bench.json \
        --answers-file out/seed.jsonl [--upload out/seed_upload.jsonl]
"""
from __future__ import annotations

import json
import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("piip_llava") is None:  # python eval/X.py from a checkout without pip install -e .
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piip_llava.evaluation.benchmarks import load_question_jsonl, score_seed, write_seed_upload
from piip_llava.evaluation.cli import add_generation_args, default_summary_path, generate_answers, write_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question-file")
    parser.add_argument("--image-folder")
    parser.add_argument("--seed-json", required=True, help="SEED-Bench.json (answers, data_type, question types)")
    parser.add_argument("--all-types", action="store_true", help="also ask the video questions (middle frames)")
    parser.add_argument("--upload", help="write the {question_id, prediction} upload jsonl here")
    parser.add_argument("--score-only", action="store_true")
    parser.add_argument("--summary")
    add_generation_args(parser, default_max_new_tokens=128)
    args = parser.parse_args(argv)
    if not args.answers_file:
        parser.error("--answers-file is required")
    if not args.score_only:
        if not args.question_file:
            parser.error("--question-file is required to generate")
        keep = None
        if not args.all_types:
            with open(args.seed_json, encoding="utf-8") as f:
                image_ids = {str(q["question_id"]) for q in json.load(f)["questions"] if q["data_type"] == "image"}
            keep = lambda row: str(row["question_id"]) in image_ids  # noqa: E731
        gen = generate_answers(args, load_question_jsonl(args.question_file, args.image_folder, keep=keep))
        if not gen["merged"]:
            return 0
    s = score_seed(args.answers_file, args.seed_json, data_type="image")
    print(f"image accuracy: {s['accuracy']:.2f}%")
    for name, acc in s["per_type"].items():
        print(f"{name}: {acc:.2f}%")
    if args.upload:
        print(f"{write_seed_upload(args.answers_file, args.seed_json, args.upload)} predictions -> {args.upload}")
    print(f"summary: {write_summary(args.summary or default_summary_path(args.answers_file, 'seed'), s)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
