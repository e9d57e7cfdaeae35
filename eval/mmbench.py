"""MMBench dev: submission xlsx + local circular accuracy: `python -m piip_llava.evaluation mmbench` (same flags; --help lists them)."""
from piip_llava.evaluation.cli import task_main

main = task_main("mmbench")

if __name__ == "__main__":
    raise SystemExit(main())
