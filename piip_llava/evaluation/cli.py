"""The one evaluation skeleton: parse -> generate -> merge -> score -> summary, for every registered task.

    python -m piip_llava.evaluation TASK --model-path CKPT --answers-file out/TASK.jsonl [task flags]
    python -m piip_llava.evaluation TASK --backend openai --base-url http://host:8000/v1 --answers-file ...
    python -m piip_llava.evaluation TASK --score-only out/TASK.jsonl [task flags]
    python -m piip_llava.evaluation --list

Flags common to every task (one vocabulary): ``--model-path`` (alias ``--model``), ``--conv-mode``, ``--dtype``,
``--device``, ``--max-new-tokens``, ``--temperature``, ``--batch-size``, ``--image-decode``, ``--backend`` /
``--base-url`` / ``--api-model`` / ``--concurrency``, ``--answers-file``, ``--score-only [ANSWERS]`` (score the
answers file as it is, nothing is generated), ``--overwrite``, ``--retry-errors``, ``--summary``, sharding
(``--num-chunks``, ``--chunk-idx``, ``--merge-chunks``). ``eval/<task>.py`` are one-line shims over this.

Resuming: the answers file is read first; answers written with the same provenance (checkpoint content, template,
dtype, image decoding, generation settings, prompt options) are reused and counted; a file written with anything
else is refused, naming what differs (``--overwrite`` starts fresh).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from piip_llava.evaluation.backends import DTYPE_ALIASES, OpenAIEngine, eval_device_dtype, load_local_engine
from piip_llava.evaluation.io import read_answers, write_json
from piip_llava.evaluation.provenance import (ProvenanceMismatch, check_resume, checkpoint_fingerprint,
                                              read_provenance)
from piip_llava.evaluation.runner import chunk_answers_path, merge_chunks, resolve_shard, run_generation
from piip_llava.evaluation.task import Task

__all__ = ["EngineCache", "add_common_args", "build_parser", "default_summary_path", "main", "run_task", "task_main"]


def add_common_args(parser: argparse.ArgumentParser, default_max_new_tokens: int = 128) -> None:
    g = parser.add_argument_group("model and generation")
    g.add_argument("--model-path", "--model", dest="model_path",
                   help="checkpoint folder (this project's, a LoRA adapter, or official)")
    g.add_argument("--conv-mode", default=None, help="conversation template (default: the checkpoint's)")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPE_ALIASES),
                   help="default: float16 on CUDA (the official protocol), float32 on CPU")
    g.add_argument("--device", default=None, help="default: cuda (torchrun: cuda:LOCAL_RANK) when available, else cpu")
    g.add_argument("--max-new-tokens", type=int, default=default_max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the benchmark protocol)")
    g.add_argument("--batch-size", type=int, default=1,
                   help="questions per forward pass (batch 1 is the protocol; fp16 batching can flip rare tokens)")
    g.add_argument("--image-decode", choices=("official", "friendly"), default="official",
                   help="official: Image.open(p).convert('RGB') as LLaVA's loaders; friendly: EXIF rotation and "
                        "transparency on white, as chat uploads")
    b = parser.add_argument_group("backend")
    b.add_argument("--backend", choices=("local", "openai"), default="local",
                   help="local: load the checkpoint in this process; openai: ask an OpenAI-compatible server")
    b.add_argument("--base-url", help="openai backend: server URL, e.g. http://127.0.0.1:8000/v1")
    b.add_argument("--api-model", help="openai backend: model name on the server (default: the first it lists)")
    b.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    b.add_argument("--concurrency", type=int, default=8, help="openai backend: requests in flight")
    b.add_argument("--request-timeout", type=float, default=600.0, help="openai backend: seconds per request")
    o = parser.add_argument_group("answers, resume and scoring")
    o.add_argument("--answers-file", help="answers JSONL (LLaVA's answers format); resumed if present")
    o.add_argument("--score-only", nargs="?", const=True, default=False, metavar="ANSWERS",
                   help="generate nothing; score the answers file (ANSWERS, or --answers-file) as it is")
    o.add_argument("--overwrite", action="store_true", help="delete the answers file first instead of resuming")
    o.add_argument("--retry-errors", action="store_true", help="re-ask questions recorded as errors")
    o.add_argument("--summary", help="summary JSON (default: <answers dir>/<task>_summary.json)")
    o.add_argument("--num-chunks", type=int, default=1)
    o.add_argument("--chunk-idx", type=int, default=0)
    o.add_argument("--merge-chunks", type=int, default=0, metavar="K",
                   help="only merge K finished chunk files into --answers-file, then score")
    o.add_argument("--merge-wait-s", type=float, default=3600.0,
                   help="torchrun rank 0: how long to wait for the other ranks' chunks")
    o.add_argument("--no-progress", action="store_true")


def build_parser(task: Task, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or f"python -m piip_llava.evaluation {task.name}",
                                     description=task.description, epilog=task.usage,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    task.add_arguments(parser.add_argument_group(f"{task.name} data and prompt"))
    add_common_args(parser, task.max_new_tokens)
    return parser


def default_summary_path(answers_file: str | os.PathLike, benchmark: str) -> Path:
    """``<answers dir>/<benchmark>_summary.json``: where the results table looks."""
    return Path(answers_file).parent / f"{benchmark}_summary.json"


class EngineCache:
    """One loaded engine per (backend, model, device, dtype, template), shared by the tasks of one process."""

    def __init__(self) -> None:
        self._engines: dict[tuple, Any] = {}

    def get(self, key: tuple, make) -> Any:
        if key not in self._engines:
            self._engines[key] = make()
        return self._engines[key]


def _template_name(model_path: str, conv_mode: str | None) -> str:
    """The template the engine will use, read from config.json without loading the weights."""
    import json

    from piip_llava.data.conversation import get_template

    name = conv_mode
    if name is None:
        cfg = Path(model_path) / "config.json"
        if cfg.is_file():
            name = json.loads(cfg.read_text(encoding="utf-8")).get("conversation_template")
    return get_template(name or "vicuna_v1").name


def _provenance(task: Task, args: argparse.Namespace, shard, **backend_fields) -> dict:
    return {
        "task": task.name,
        "backend": args.backend,
        **backend_fields,
        "image_decode": args.image_decode,
        "generation": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature},
        "prompt_options": task.prompt_options(args),
        "run": {"batch_size": args.batch_size, "num_chunks": shard.num_chunks, "chunk_idx": shard.chunk_idx,
                "written": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    }


def _check_generation_args(parser_error, args: argparse.Namespace) -> None:
    if args.backend == "local" and not args.model_path:
        parser_error("--model-path is required to generate answers (or --score-only to score a file)")
    if args.backend == "openai":
        if not args.base_url:
            parser_error("--backend openai needs --base-url")
        if args.conv_mode or args.dtype or args.device:
            parser_error("--conv-mode / --dtype / --device are the server's settings with --backend openai")


def _generate(task: Task, args: argparse.Namespace, answers: Path, engines: EngineCache) -> dict:
    questions = task.load_questions(args)
    shard = resolve_shard(args.num_chunks, args.chunk_idx)
    out = chunk_answers_path(answers, shard)
    if args.backend == "openai":
        engine = engines.get(("openai", args.base_url, args.api_model, args.concurrency), lambda: OpenAIEngine(
            args.base_url, args.api_model, args.api_key, args.concurrency, args.request_timeout))
        prov = _provenance(task, args, shard, server={"base_url": engine.base_url, "model": engine.model},
                           template=None, dtype=None)
        batch_size = 4 * args.concurrency  # a window of requests; at most `concurrency` in flight
    else:
        from piip_llava.models.loading import check_checkpoint

        check_checkpoint(args.model_path, ("piip_llava", "official", "lora_adapter"), "--model-path")  # one clear line
        device, dtype = eval_device_dtype(args.device, args.dtype)
        template = _template_name(args.model_path, args.conv_mode)
        prov = _provenance(task, args, shard, checkpoint={"path": str(Path(args.model_path).resolve()),
                                                          "fingerprint": checkpoint_fingerprint(args.model_path)},
                           template=template, dtype=dtype)
        if not args.overwrite:  # refuse before spending a minute loading the weights
            check_resume(out, read_answers(out), prov)
        engine = engines.get(("local", str(Path(args.model_path).resolve()), device, dtype, template),
                             lambda: load_local_engine(args.model_path, device, dtype, template))
        prov["template"] = engine.template.name
        batch_size = args.batch_size
    summary = run_generation(questions, engine, out, batch_size=batch_size, shard=shard,
                             model_id=Path(args.model_path).name if args.model_path else str(prov["server"]["model"]),
                             gen_kwargs={"max_new_tokens": args.max_new_tokens, "temperature": args.temperature},
                             retry_errors=args.retry_errors, progress=not args.no_progress, provenance=prov,
                             overwrite=args.overwrite)
    if summary["already_answered"]:
        print(f"resumed {out}: reused {summary['already_answered']} of {summary['num_questions']} answers "
              f"(same checkpoint and settings), asked {summary['answered'] + summary['errors']}")
    summary["merged"] = not shard.sharded
    torchrun = args.num_chunks <= 1 and shard.sharded
    if torchrun and shard.chunk_idx == 0:
        summary["merge"] = merge_chunks(answers, shard.num_chunks, wait_s=args.merge_wait_s)
        summary["merged"] = True
    elif torchrun:
        print(f"rank {shard.chunk_idx}: chunk written to {out}; rank 0 merges and scores")
    elif shard.sharded:
        print(f"chunk written to {out}; when all {shard.num_chunks} chunks are done, rerun with "
              f"--merge-chunks {shard.num_chunks} to merge and score")
    return summary


def run_task(task: Task, args: argparse.Namespace, engines: EngineCache | None = None,
             parser_error=None) -> dict | None:
    """Generate (unless ``--score-only``), merge, score, print and write the summary. Returns the summary, or
    None when this process only wrote a chunk."""
    error = parser_error or (lambda msg: (_ for _ in ()).throw(SystemExit(f"error: {msg}")))
    answers = args.score_only if isinstance(args.score_only, str) else args.answers_file
    if not answers:
        error("--answers-file is required")
    answers = Path(answers)
    gen = None
    if args.merge_chunks:
        info = merge_chunks(answers, args.merge_chunks)
        print(f"merged {info['num_records']} answers from {args.merge_chunks} chunks -> {answers}")
    elif not args.score_only:
        _check_generation_args(error, args)
        gen = _generate(task, args, answers, engines or EngineCache())
        if not gen["merged"]:
            return None
    elif not answers.is_file():
        error(f"--score-only: answers file not found: {answers}")
    summary = task.score(args, answers)
    summary.setdefault("answers_file", str(answers))
    prov = read_provenance(answers)
    if prov is not None:
        summary["provenance"] = prov
    if gen is not None:
        summary["generation"] = {k: gen.get(k) for k in ("num_questions", "already_answered", "answered", "errors",
                                                         "elapsed_s", "questions_per_s")}
    print(task.format_summary(summary))
    path = write_json(args.summary or default_summary_path(answers, task.name), summary)
    print(f"summary: {path}")
    return summary


def task_main(name: str):
    """``main(argv=None) -> int`` of one task (what ``eval/<task>.py`` exposes)."""

    def main(argv: Sequence[str] | None = None) -> int:
        from piip_llava.evaluation.tasks import get_task

        task = get_task(name)
        parser = build_parser(task, prog=f"eval/{name}.py")
        args = parser.parse_args(argv)
        from piip_llava.models.loading import CheckpointError, cli_error

        try:
            run_task(task, args, parser_error=parser.error)
        except ProvenanceMismatch as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except CheckpointError as exc:  # a bad --model-path: one line naming the file (PIIP_DEBUG=1: traceback)
            return cli_error(exc)
        return 0

    main.__doc__ = f"Evaluate {name}: parse -> generate -> merge -> score -> summary."
    return main


def main(argv: Sequence[str] | None = None) -> int:
    from piip_llava.evaluation.tasks import TASKS, get_task

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print(__doc__.split("\n\n")[0] + "\n")
        print("tasks:")
        for name in TASKS:
            task = get_task(name)
            print(f"  {name:<10} {task.description}")
        print("\n`python -m piip_llava.evaluation TASK --help` lists a task's flags.")
        return 0 if argv else 2
    if argv[0] not in TASKS:
        print(f"unknown task {argv[0]!r}; tasks: {', '.join(TASKS)}", file=sys.stderr)
        return 2
    return task_main(argv[0])(argv[1:])
