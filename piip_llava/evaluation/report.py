"""The one results-table tool: a per-benchmark table of every ``*_summary.json`` in a folder, the PIIP paper row
(Markdown + CSV) with published rows to compare, and a bar chart.

    python -m piip_llava.evaluation.report OUT_DIR [--name my-run] [--compare "LLaVA-1.5 7B (CLIP-L 336)"] \\
        [--server-score vqav2=78.5 --server-score mmvet=31.1 --server-score mmbench=64.3] [--no-files]

Columns come from the task registry (tasks with ``in_paper_row``, in registry order); ``Avg`` is the plain mean of
the 8 columns, given only when all 8 are present (spec piip_spec §2). Server-graded benchmarks (VQAv2 EvalAI, MM-Vet
grader, MMBench server) get their number from ``--server-score TASK=VALUE``; without it a local rule-based score
(MMBench) is shown with ``*`` (and so is an Avg that includes it).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PAPER_ROWS", "apply_server_scores", "collect_summaries", "local_marks", "main", "make_row",
           "paper_columns", "plot_bars", "summary_table", "to_csv", "to_markdown"]

# Published numbers (PIIP README multimodal table; spec piip_spec §2), in the order of paper_columns(), then Avg.
PAPER_ROWS: dict[str, tuple[float, ...]] = {
    "LLaVA-1.5 7B (CLIP-L 336)": (64.3, 31.1, 58.2, 66.8, 62.0, 78.5, 66.1, 85.9, 64.1),
    "CLIP-BL 512-256 7B": (63.8, 32.0, 57.9, 68.8, 62.8, 79.1, 67.3, 86.5, 64.8),
    "ConvNeXt-B CLIP-L 640-224 7B": (64.5, 31.9, 59.0, 68.3, 62.1, 79.9, 67.5, 86.5, 65.0),
    "CLIP-BL 512-448 7B": (66.2, 30.5, 59.5, 68.0, 63.7, 80.3, 69.0, 87.3, 65.6),
    "ConvNeXt-B CLIP-L 1024-336 7B": (67.5, 31.5, 63.1, 68.1, 62.7, 81.1, 69.0, 87.9, 66.4),
    "ConvNeXt-L CLIP-L 1024-336 7B": (67.0, 31.4, 67.1, 68.3, 63.9, 81.5, 69.4, 88.2, 67.1),
    "PIIP-LLaVA-Plus ConvNeXt-L CLIP-L 1024-336 7B": (74.5, 44.7, 73.0, 95.0, 62.9, 82.3, 72.1, 87.5, 74.0),
    "LLaVA-1.5 13B": (67.7, 36.1, 61.3, 71.6, 63.3, 80.0, 68.2, 85.9, 66.8),
    "CLIP-BL 512-448 13B": (67.6, 36.1, 61.6, 71.0, 64.5, 81.2, 69.5, 87.2, 67.3),
    "ConvNeXt-B CLIP-L 1024-336 13B": (68.5, 37.7, 64.2, 71.1, 64.2, 81.8, 69.3, 87.9, 68.0),
    "ConvNeXt-L CLIP-L 1024-336 13B": (66.5, 36.8, 69.2, 69.8, 65.2, 82.5, 70.5, 87.6, 68.5),
}

# Secondary figures worth a column in the per-benchmark table when a summary has them.
EXTRA_KEYS = ("metric", "scored_by", "circular", "vanilla", "cognition", "questions", "rows", "samples", "errors",
              "num_errors", "unreadable", "unloadable_rows", "missing_answers")


def paper_columns() -> list[tuple[str, str]]:
    """``[(column title, task name)]`` of the PIIP / LLaVA-1.5 table, from the registry."""
    from piip_llava.evaluation.tasks import all_tasks

    return [(t.title, t.name) for t in all_tasks() if t.in_paper_row]


def collect_summaries(summary_dir: str | os.PathLike) -> dict[str, dict]:
    """``{benchmark: summary}`` from every ``*.json`` in the folder that has a ``benchmark`` key."""
    out: dict[str, dict] = {}
    for p in sorted(Path(summary_dir).glob("*.json")):
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict) and isinstance(obj.get("benchmark"), str):
            out[obj["benchmark"]] = obj
    return out


def parse_server_scores(items: Sequence[str]) -> dict[str, float]:
    """``["vqav2=78.5", ...]`` -> ``{"vqav2": 78.5}``; task names checked against the registry."""
    from piip_llava.evaluation.tasks import TASKS

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in TASKS:
            raise ValueError(f"--server-score {item!r}: expected TASK=VALUE with TASK one of {', '.join(TASKS)}")
        try:
            out[name] = float(value)
        except ValueError as exc:
            raise ValueError(f"--server-score {item!r}: {value!r} is not a number") from exc
    return out


def apply_server_scores(summaries: dict[str, dict], server_scores: dict[str, float]) -> dict[str, dict]:
    """Summaries with the server's / grader's number as ``score`` (``scored_by: server``); the local score, if
    any, stays as ``local_score``."""
    out = dict(summaries)
    for name, value in server_scores.items():
        s = dict(out.get(name, {"benchmark": name}))
        if s.get("score") is not None and s.get("scored_by") != "server":
            s["local_score"] = s["score"]
        s.update(score=value, scored_by="server")
        out[name] = s
    return out


def local_marks(summaries: dict[str, dict]) -> set[int]:
    """Column indices whose value is a local stand-in for a server-graded number (shown with ``*``)."""
    from piip_llava.evaluation.tasks import get_task

    return {i for i, (_, name) in enumerate(paper_columns())
            if get_task(name).server_graded and summaries.get(name, {}).get("score") is not None
            and summaries[name].get("scored_by") != "server"}


def make_row(summaries: dict[str, dict]) -> list[float | None]:
    """8 column values rounded to 1 decimal (None when absent), then Avg (None unless all 8 are present)."""
    vals: list[float | None] = []
    for _, key in paper_columns():
        score = summaries.get(key, {}).get("score")
        vals.append(None if score is None else round(float(score), 1))
    avg = round(sum(vals) / len(vals), 1) if all(v is not None for v in vals) else None
    return vals + [avg]


def _fmt(v: float | None, mark: bool = False) -> str:
    return "-" if v is None else f"{v:.1f}" + ("*" if mark else "")


def _header() -> list[str]:
    return ["model"] + [c for c, _ in paper_columns()] + ["Avg"]


def to_markdown(rows: dict[str, list[float | None]], marks: dict[str, set[int]] | None = None) -> str:
    """Paper-row table; ``marks[name]`` = column indices shown with ``*`` (local stand-ins, and then Avg)."""
    head = _header()
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, vals in rows.items():
        m = (marks or {}).get(name, set())
        cells = [_fmt(v, i in m or (i == len(vals) - 1 and bool(m))) for i, v in enumerate(vals)]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def to_csv(rows: dict[str, list[float | None]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_header())
    for name, vals in rows.items():
        w.writerow([name] + ["" if v is None else f"{v:.1f}" for v in vals])
    return buf.getvalue()


def _detail(value) -> str:
    """One table cell entry: lists (e.g. the unreadable answers) by their length, floats to 2 decimals."""
    if isinstance(value, (list, tuple)):
        return str(len(value))
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def summary_table(summaries: dict[str, dict]) -> str:
    """One Markdown row per benchmark: main score and the secondary figures its summary holds."""
    lines = ["| benchmark | score (%) | details |", "| --- | --- | --- |"]
    for name, summary in sorted(summaries.items()):
        score = summary.get("score")
        details = ", ".join(f"{k}={_detail(summary[k])}" for k in EXTRA_KEYS
                            if k in summary and summary[k] is not None and not isinstance(summary[k], dict))
        lines.append(f"| {name} | {'n/a' if score is None else f'{score:.2f}'} | {details} |")
    return "\n".join(lines)


def plot_bars(rows: dict[str, list[float | None]], out_png: str | os.PathLike) -> Path:
    """Grouped bar chart, one group per column, one bar per row (missing values are skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [c for c, _ in paper_columns()] + ["Avg"]
    n = max(len(rows), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for k, (name, vals) in enumerate(rows.items()):
        xs = [i + (k - (n - 1) / 2) * width for i, v in enumerate(vals) if v is not None]
        ys = [v for v in vals if v is not None]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None, write_files: bool = True, paper_row: bool = True) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summary_dir", nargs="?", help="folder of *_summary.json files")
    parser.add_argument("--summary-dir", dest="summary_dir_flag", help="same as the positional folder")
    parser.add_argument("--title", default=None, help="heading printed above the tables")
    parser.add_argument("--name", default="this run", help="row label for the collected results")
    parser.add_argument("--compare", action="append", default=[], choices=sorted(PAPER_ROWS),
                        help="published row(s) to print and plot next to ours (repeatable)")
    parser.add_argument("--server-score", action="append", default=[], metavar="TASK=VALUE",
                        help="a server- or grader-computed score (VQAv2 EvalAI, MM-Vet grader, MMBench server)")
    parser.add_argument("--csv", help="CSV path (default: <summary dir>/report.csv)")
    parser.add_argument("--png", help="bar chart path (default: <summary dir>/report.png)")
    parser.add_argument("--no-files", action="store_true", help="print only; write no CSV or chart")
    args = parser.parse_args(argv)
    folder = args.summary_dir or args.summary_dir_flag
    if not folder:
        parser.error("give the folder of *_summary.json files")
    try:
        server = parse_server_scores(args.server_score)
    except ValueError as exc:
        parser.error(str(exc))
    summaries = apply_server_scores(collect_summaries(folder), server)
    if not summaries:
        print(f"no *_summary.json with a 'benchmark' key in {folder}")
        return 1
    if args.title:
        print(f"### {args.title}\n")
    print(summary_table(summaries))
    if not paper_row:
        return 0
    print()
    rows = {args.name: make_row(summaries)}
    marks = {args.name: local_marks(summaries)}
    for name in args.compare:
        rows[name] = list(PAPER_ROWS[name])
    print(to_markdown(rows, marks))
    if marks[args.name]:
        print("* local rule-based score, not the server's (give it with --server-score TASK=VALUE)")
    missing = [name for _, name in paper_columns() if summaries.get(name, {}).get("score") is None]
    if missing:
        print("no score for: " + ", ".join(missing) + " (Avg needs all 8; server-graded ones take "
              "--server-score TASK=VALUE)")
    if write_files and not args.no_files:
        csv_text = to_csv(rows)
        csv_path = Path(args.csv) if args.csv else Path(folder) / "report.csv"
        csv_path.write_text(csv_text, encoding="utf-8")
        png = plot_bars(rows, args.png or Path(folder) / "report.png")
        print(f"\ncsv: {csv_path}\nchart: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
