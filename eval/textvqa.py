"""TextVQA val 0.5.1 with OCR tokens: VQA soft accuracy: `python -m piip_llava.evaluation textvqa` (same flags; --help lists them)."""
from piip_llava.evaluation.cli import task_main

main = task_main("textvqa")

if __name__ == "__main__":
    raise SystemExit(main())
