"""Results tables, the PIIP paper row and a chart from *_summary.json: `python -m piip_llava.evaluation.report`."""
from piip_llava.evaluation.report import main

if __name__ == "__main__":
    raise SystemExit(main())
