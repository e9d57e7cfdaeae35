"""GQA testdev-balanced: predictions for eval.py (+ local exact match): `python -m piip_llava.evaluation gqa` (same flags; --help lists them)."""
from piip_llava.evaluation.cli import task_main

main = task_main("gqa")

if __name__ == "__main__":
    raise SystemExit(main())
