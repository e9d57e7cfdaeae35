"""SEED-Bench image questions: exact-letter accuracy (SEED-I): `python -m piip_llava.evaluation seed` (same flags; --help lists them)."""
from piip_llava.evaluation.cli import task_main

main = task_main("seed")

if __name__ == "__main__":
    raise SystemExit(main())
