"""MM-Vet: answers JSON for the GPT-4 grader (server-graded): `python -m piip_llava.evaluation mmvet` (same flags; --help lists them)."""
from piip_llava.evaluation.cli import task_main

main = task_main("mmvet")

if __name__ == "__main__":
    raise SystemExit(main())
