"""POPE (COCO adversarial/popular/random): mean F1: `python -m piip_llava.evaluation pope` (same flags; --help lists them)."""
from piip_llava.evaluation.cli import task_main

main = task_main("pope")

if __name__ == "__main__":
    raise SystemExit(main())
