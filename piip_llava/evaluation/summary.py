"""``python -m piip_llava.evaluation.summary DIR [--title T]``: the per-benchmark table of
:mod:`piip_llava.evaluation.report` only (no paper row, CSV or chart), as the quickstart shows it."""
from __future__ import annotations

from collections.abc import Sequence

from piip_llava.evaluation.report import summary_table  # noqa: F401  (the per-benchmark table)
from piip_llava.evaluation.report import main as _report_main


def main(argv: Sequence[str] | None = None) -> int:
    return _report_main(argv, write_files=False, paper_row=False)


if __name__ == "__main__":
    raise SystemExit(main())
