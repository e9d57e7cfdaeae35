"""ScienceQA test: IMG-Accuracy (SQA-I) and Accuracy: `python -m piip_llava.evaluation scienceqa` (same flags; --help lists them)."""
from piip_llava.evaluation.cli import task_main

main = task_main("scienceqa")

if __name__ == "__main__":
    raise SystemExit(main())
