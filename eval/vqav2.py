"""VQAv2 test-dev: EvalAI submission JSON (server-graded): `python -m piip_llava.evaluation vqav2` (same flags; --help lists them)."""
from piip_llava.evaluation.cli import task_main

main = task_main("vqav2")

if __name__ == "__main__":
    raise SystemExit(main())
