"""The benchmark registry: one line per task. A task is one module here exposing ``TASK``
(:class:`piip_llava.evaluation.task.Task`); the CLI, ``scripts/eval_all.sh`` and the results table know benchmarks
only through this table. Order = the PIIP / LLaVA-1.5 table's columns, then the rest."""
from __future__ import annotations

import importlib

from piip_llava.evaluation.task import Task

TASKS: dict[str, str] = {
    "mmbench": "piip_llava.evaluation.tasks.mmbench",
    "mmvet": "piip_llava.evaluation.tasks.mmvet",
    "textvqa": "piip_llava.evaluation.tasks.textvqa",
    "scienceqa": "piip_llava.evaluation.tasks.scienceqa",
    "gqa": "piip_llava.evaluation.tasks.gqa",
    "vqav2": "piip_llava.evaluation.tasks.vqav2",
    "seed": "piip_llava.evaluation.tasks.seed",
    "pope": "piip_llava.evaluation.tasks.pope",
    "mme": "piip_llava.evaluation.tasks.mme",
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name]).TASK


def all_tasks() -> list[Task]:
    return [get_task(name) for name in TASKS]
