"""MM-Vet (LLaVA-1.5 protocol): checkpoint -> answers JSONL -> {"v1_<id>": answer} JSON for the GPT-4 grader.

    python eval/mmvet.py --model-path CKPT --question-file playground/data/eval/mm-vet/llava-mm-vet.jsonl \
        --image-folder playground/data/eval/mm-vet/images --answers-file out/mmvet.jsonl --results out/mmvet.json
    python eval/mmvet.py --answers-file out/mmvet.jsonl --score-only --grader-score 31.1  # record the grader's total
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("piip_llava") is None:  # python eval/X.py from a checkout without pip install -e .
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piip_llava.evaluation.benchmarks import load_question_jsonl, write_mmvet_results
from piip_llava.evaluation.cli import add_generation_args, default_summary_path, generate_answers, write_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question-file")
    parser.add_argument("--image-folder")
    parser.add_argument("--results", help="output JSON for the grader (default: next to the answers)")
    parser.add_argument("--grader-score", type=float, help="total reported by the MM-Vet grader, for report.py")
    parser.add_argument("--score-only", action="store_true", help="only convert an existing --answers-file")
    parser.add_argument("--summary")
    add_generation_args(parser, default_max_new_tokens=1024)
    args = parser.parse_args(argv)
    if not args.answers_file:
        parser.error("--answers-file is required")
    if not args.score_only:
        if not args.question_file:
            parser.error("--question-file is required to generate")
        gen = generate_answers(args, load_question_jsonl(args.question_file, args.image_folder))
        if not gen["merged"]:
            return 0
    dst = args.results or str(Path(args.answers_file).parent / "mmvet_results.json")
    n = len(write_mmvet_results(args.answers_file, dst))
    print(f"{n} answers -> {dst} (grade with the MM-Vet GPT-4 evaluator)")
    summary = {"benchmark": "mmvet", "metric": "gpt4_grader", "score": args.grader_score, "results_file": dst}
    print(f"summary: {write_summary(args.summary or default_summary_path(args.answers_file, 'mmvet'), summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
