"""Every registered benchmark whose data is present, with one loaded model, then the results tables.

    python -m piip_llava.evaluation.eval_all --model-path CKPT [--data-dir playground/data/eval] \\
        [--output-dir eval_out/<checkpoint name>] [--tasks textvqa pope] [any task flag, e.g. --batch-size 16]

Each task's files are looked up in LLaVA's ``playground/data/eval`` layout (``Task.layout``); a task whose files are
missing is skipped with the path it looked for. Flags this command does not know go to every task. A task that
fails (e.g. an answers file written by another model) is reported and the others still run; the exit status is
then 1. ``scripts/eval_all.sh`` is a launcher for this.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from piip_llava.evaluation.cli import EngineCache, build_parser, run_task
from piip_llava.evaluation.provenance import ProvenanceMismatch
from piip_llava.evaluation.report import PAPER_ROWS
from piip_llava.evaluation.report import main as report_main
from piip_llava.evaluation.tasks import TASKS, get_task


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", "--model", dest="model_path")
    parser.add_argument("--data-dir", default="playground/data/eval")
    parser.add_argument("--output-dir", help="default: eval_out/<checkpoint folder name>")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--name", help="row label in the report (default: the checkpoint folder name)")
    parser.add_argument("--compare", action="append", choices=sorted(PAPER_ROWS),
                        help="published row(s) next to ours (default: LLaVA-1.5 7B)")
    args, task_argv = parser.parse_known_args(argv)
    name = args.name or Path(args.model_path or "server").name
    out = Path(args.output_dir or Path("eval_out") / name)
    data = Path(args.data_dir)
    engines = EngineCache()
    failed = []
    for task_name in args.tasks:
        task = get_task(task_name)
        layout = task.layout(data, out)
        missing = next((p for p in layout.required if not p.exists()), None)
        if missing is not None:
            print(f"skip {task.name}: {missing} not found")
            continue
        task_args = list(layout.args)
        for path, flags in layout.optional:
            if path.exists():
                task_args += flags
        if args.model_path:
            task_args += ["--model-path", args.model_path]
        print(f"== {task.name}")
        try:
            run_task(task, build_parser(task).parse_args(task_args + task_argv), engines=engines)
        except (ProvenanceMismatch, ValueError, FileNotFoundError) as exc:
            print(f"error: {task.name}: {exc}")
            failed.append(task.name)
    print("== report")
    compare = []
    for row in args.compare or ["LLaVA-1.5 7B (CLIP-L 336)"]:
        compare += ["--compare", row]
    rc = report_main([str(out), "--name", name, *compare]) if out.is_dir() else 1
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else rc


if __name__ == "__main__":
    raise SystemExit(main())
