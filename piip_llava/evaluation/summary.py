"""Print a results table from the summary JSONs that the eval CLIs write (`*_summary.json` in a folder).

`python -m piip_llava.evaluation.summary DIR [--title T]` prints one Markdown row per benchmark with its main score
and the secondary figures the summary holds (e.g. MMBench vanilla accuracy, error counts).
"""
from __future__ import annotations

import argparse

from .report import collect_summaries

# Secondary figures worth a column when a summary has them.
EXTRA_KEYS = ("metric", "circular", "vanilla", "questions", "rows", "samples", "errors", "num_errors", "unreadable")


def _detail(value) -> str:
    """One table cell entry: lists (e.g. the unreadable answers) by their length, floats to 2 decimals."""
    if isinstance(value, (list, tuple)):
        return str(len(value))
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def summary_table(summaries: dict[str, dict]) -> str:
    lines = ["| benchmark | score (%) | details |", "| --- | --- | --- |"]
    for name, summary in sorted(summaries.items()):
        score = summary.get("score")
        details = ", ".join(f"{k}={_detail(summary[k])}" for k in EXTRA_KEYS
                            if k in summary and not isinstance(summary[k], dict))
        lines.append(f"| {name} | {'n/a' if score is None else f'{score:.2f}'} | {details} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summary_dir")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    summaries = collect_summaries(args.summary_dir)
    if not summaries:
        print(f"no *_summary.json with a 'benchmark' key in {args.summary_dir}")
        return 1
    if args.title:
        print(f"### {args.title}\n")
    print(summary_table(summaries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
