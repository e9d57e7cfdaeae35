"""Argument handling and the generate -> merge -> summary sequence shared by the thin CLIs in ``eval/``.

Flags common to every benchmark: ``--model-path``, ``--answers-file``, ``--batch-size``, ``--num-chunks``,
``--chunk-idx``, ``--max-new-tokens``, ``--conv-mode`` (default: the checkpoint's template), ``--device``,
``--dtype``, ``--temperature``, ``--retry-errors``. Sharded runs write ``<answers>.chunk<i>of<K>.jsonl``; chunk
files are merged into ``--answers-file`` by the rank-0 process of a torchrun launch (after waiting for the
others) or by a later call with ``--merge-chunks K``.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from piip_llava.evaluation.runner import (QuestionRecord, chunk_answers_path, merge_chunks, resolve_shard,
                                          run_generation)

__all__ = ["add_generation_args", "default_summary_path", "generate_answers", "load_engine", "write_summary"]


def add_generation_args(parser: argparse.ArgumentParser, default_max_new_tokens: int = 128) -> None:
    g = parser.add_argument_group("generation")
    g.add_argument("--model-path", help="checkpoint folder (PiipLlava save_pretrained + tokenizer)")
    g.add_argument("--answers-file", help="answers JSONL (LLaVA answers format); resumed if present")
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--num-chunks", type=int, default=1)
    g.add_argument("--chunk-idx", type=int, default=0)
    g.add_argument("--merge-chunks", type=int, default=0, metavar="K",
                   help="only merge K finished chunk files into --answers-file, then score")
    g.add_argument("--max-new-tokens", type=int, default=default_max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the benchmark protocol)")
    g.add_argument("--conv-mode", default=None, help="conversation template (default: the checkpoint's)")
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", default=None, help="e.g. float16, bfloat16, float32 (default: engine's choice)")
    g.add_argument("--retry-errors", action="store_true", help="re-ask questions recorded as errors")
    g.add_argument("--merge-wait-s", type=float, default=3600.0,
                   help="torchrun rank 0: how long to wait for the other ranks' chunks")
    g.add_argument("--no-progress", action="store_true")


def load_engine(args: argparse.Namespace):
    """``InferenceEngine.load`` with the CLI's device/dtype/template; one GPU per torchrun local rank."""
    from piip_llava.serve.inference import InferenceEngine

    if not args.model_path:
        raise SystemExit("--model-path is required to generate answers")
    device = args.device
    if device is None and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return InferenceEngine.load(args.model_path, device=device, dtype=args.dtype, template=args.conv_mode)


def generate_answers(args: argparse.Namespace, questions: Sequence[QuestionRecord], engine=None) -> dict:
    """Run (or resume) this process' shard; merge when possible. ``summary["merged"]`` says whether
    ``args.answers_file`` is now complete."""
    answers = Path(args.answers_file)
    if args.merge_chunks:
        info = merge_chunks(answers, args.merge_chunks)
        return {"merged": True, **info}
    shard = resolve_shard(args.num_chunks, args.chunk_idx)
    engine = engine if engine is not None else load_engine(args)
    gen_kwargs = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    summary = run_generation(questions, engine, chunk_answers_path(answers, shard), batch_size=args.batch_size,
                             shard=shard, model_id=Path(args.model_path or "model").name,
                             gen_kwargs=gen_kwargs, retry_errors=args.retry_errors,
                             progress=not args.no_progress)
    summary["merged"] = not shard.sharded
    torchrun = args.num_chunks <= 1 and shard.sharded
    if torchrun and shard.chunk_idx == 0:
        summary["merge"] = merge_chunks(answers, shard.num_chunks, wait_s=args.merge_wait_s)
        summary["merged"] = True
    elif torchrun:
        print(f"rank {shard.chunk_idx}: chunk written to {summary['answers_file']}; rank 0 merges and scores")
    elif shard.sharded:
        print(f"chunk written to {summary['answers_file']}; when all {shard.num_chunks} chunks are done, rerun "
              f"with --merge-chunks {shard.num_chunks} to merge and score")
    return summary


def write_summary(path: str | os.PathLike, summary: dict) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    return p


def default_summary_path(answers_file: str | os.PathLike, benchmark: str) -> Path:
    """``<answers dir>/<benchmark>_summary.json``: where report.py looks."""
    return Path(answers_file).parent / f"{benchmark}_summary.json"

