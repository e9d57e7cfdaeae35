"""MME: perception and cognition scores (official calculation): `python -m piip_llava.evaluation mme` (same flags; --help lists them)."""
from piip_llava.evaluation.cli import task_main

main = task_main("mme")

if __name__ == "__main__":
    raise SystemExit(main())
