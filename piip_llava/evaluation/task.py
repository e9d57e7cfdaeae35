"""What a benchmark is to the evaluation skeleton: data plus a few functions, registered once in ``tasks/``.

The skeleton (:mod:`piip_llava.evaluation.cli`) owns everything common (flags, engine or server, provenance,
sharding, merge, summary file); a :class:`Task` says how to read its questions, build prompts, score an answers
file and print the result, and where its files sit in LLaVA's ``playground/data/eval`` layout (for
``scripts/eval_all.sh``).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from piip_llava.evaluation.io import load_question_jsonl
from piip_llava.evaluation.runner import QuestionRecord

__all__ = ["DataLayout", "Task", "load_llava_questions"]


def load_llava_questions(args: argparse.Namespace) -> list[QuestionRecord]:
    """The `load_questions` of tasks that read a LLaVA question file as is (`--question-file`, `--image-folder`)."""
    if not args.question_file:
        raise SystemExit("error: --question-file is required to generate")
    return load_question_jsonl(args.question_file, args.image_folder, image_decode=args.image_decode)


@dataclass(frozen=True)
class DataLayout:
    """Where a task's files sit under a data folder: the paths that must exist and the task's flags."""

    required: tuple[Path, ...]
    args: tuple[str, ...]
    optional: tuple[tuple[Path, tuple[str, ...]], ...] = ()  # (path, flags added when the path exists)


def _no_options(args: argparse.Namespace) -> dict:
    return {}


@dataclass(frozen=True)
class Task:
    """One benchmark.

    ``score(args, answers_path) -> summary`` returns at least ``{"benchmark", "metric", "score"}`` (score in
    percent, or ``None`` when a server or grader computes it); ``format_summary(summary) -> str`` is what the
    CLI prints. ``prompt_options(args)`` lists the task flags that change what is asked (recorded in the answers
    file's provenance). ``layout(data_dir, answers_dir)`` gives the files and flags of LLaVA's layout.
    """

    name: str
    title: str                     # column title in the results table, e.g. "TextVQA"
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    load_questions: Callable[[argparse.Namespace], list[QuestionRecord]]
    score: Callable[[argparse.Namespace, Path], dict]
    format_summary: Callable[[dict], str]
    layout: Callable[[Path, Path], DataLayout]
    max_new_tokens: int = 128
    prompt_options: Callable[[argparse.Namespace], dict] = _no_options
    in_paper_row: bool = True      # one of the 8 columns of the PIIP / LLaVA-1.5 table
    server_graded: bool = False    # the paper number comes from a server or grader, not from `score`
    usage: str = ""
