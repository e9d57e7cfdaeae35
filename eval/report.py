"""Collect the *_summary.json files of eval/*.py and print the PIIP table row (Markdown + CSV) and a bar chart.

    python eval/report.py --summary-dir out/ --name my-run --compare "LLaVA-1.5 7B (CLIP-L 336)" --png out/report.png
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("piip_llava") is None:  # python eval/X.py from a checkout without pip install -e .
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piip_llava.evaluation.report import PAPER_ROWS, collect_summaries, make_row, plot_bars, to_csv, to_markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary-dir", required=True)
    parser.add_argument("--name", default="this run", help="row label for the collected results")
    parser.add_argument("--compare", action="append", default=[], choices=sorted(PAPER_ROWS),
                        help="published row(s) to print and plot next to ours (repeatable)")
    parser.add_argument("--csv", help="also write the CSV here (default: <summary-dir>/report.csv)")
    parser.add_argument("--png", help="bar chart path (default: <summary-dir>/report.png)")
    args = parser.parse_args(argv)

    summaries = collect_summaries(args.summary_dir)
    if not summaries:
        print(f"no *_summary.json with a 'benchmark' key in {args.summary_dir}")
        return 1
    rows = {args.name: make_row(summaries)}
    for name in args.compare:
        rows[name] = list(PAPER_ROWS[name])
    print(to_markdown(rows))
    print()
    csv_text = to_csv(rows)
    print(csv_text, end="")
    out_dir = Path(args.summary_dir)
    csv_path = Path(args.csv) if args.csv else out_dir / "report.csv"
    csv_path.write_text(csv_text, encoding="utf-8")
    png = plot_bars(rows, args.png or out_dir / "report.png")
    print(f"\ncsv: {csv_path}\nchart: {png}")
    missing = [b for b in ("mmbench", "mmvet", "textvqa", "scienceqa", "gqa", "vqav2", "seed", "pope")
               if summaries.get(b, {}).get("score") is None]
    if missing:
        print("no local score for: " + ", ".join(missing) + " (Avg needs all 8; server-graded ones need the "
              "server's number)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
