"""Collect benchmark summary JSONs and print the PIIP paper row (Markdown + CSV) and a bar chart.

Every eval CLI writes ``<out_dir>/<benchmark>_summary.json`` with at least ``{"benchmark": ..., "score": ...}``
(score in percent, or null for server-graded benchmarks). Columns follow the PIIP / LLaVA-1.5 table; ``Avg`` is
the plain mean of the 8 columns and is only given when all 8 are present (spec piip_spec §2).
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

__all__ = ["COLUMNS", "PAPER_ROWS", "collect_summaries", "make_row", "plot_bars", "to_csv", "to_markdown"]

# (column title, benchmark key written by the CLIs)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("MMB-EN", "mmbench"), ("MMVet", "mmvet"), ("TextVQA", "textvqa"), ("SQA-I", "scienceqa"),
    ("GQA", "gqa"), ("VQAv2", "vqav2"), ("SEED-I", "seed"), ("POPE", "pope"),
)

# Published numbers (PIIP README multimodal table; spec piip_spec §2). Order = COLUMNS, then Avg.
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


def make_row(summaries: dict[str, dict]) -> list[float | None]:
    """8 column values rounded to 1 decimal (None when absent), then Avg (None unless all 8 are present)."""
    vals: list[float | None] = []
    for _, key in COLUMNS:
        score = summaries.get(key, {}).get("score")
        vals.append(None if score is None else round(float(score), 1))
    avg = round(sum(vals) / len(vals), 1) if all(v is not None for v in vals) else None
    return vals + [avg]


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _header() -> list[str]:
    return ["model"] + [c for c, _ in COLUMNS] + ["Avg"]


def to_markdown(rows: dict[str, list[float | None]]) -> str:
    head = _header()
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, vals in rows.items():
        lines.append("| " + " | ".join([name] + [_fmt(v) for v in vals]) + " |")
    return "\n".join(lines)


def to_csv(rows: dict[str, list[float | None]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_header())
    for name, vals in rows.items():
        w.writerow([name] + ["" if v is None else f"{v:.1f}" for v in vals])
    return buf.getvalue()


def plot_bars(rows: dict[str, list[float | None]], out_png: str | os.PathLike) -> Path:
    """Grouped bar chart, one group per column, one bar per row (missing values are skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [c for c, _ in COLUMNS] + ["Avg"]
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
