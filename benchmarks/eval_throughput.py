"""Evaluation throughput: questions/s of the shared eval runner at batch sizes 1 and 16 on a tiny checkpoint.

    python benchmarks/eval_throughput.py [--preset tiny-piip2_clip_64-128] [--num-questions 64] [--max-new-tokens 16]

Builds a random tiny checkpoint (no download), asks TextVQA-style questions with non-square images through
``run_generation`` (greedy, the benchmark protocol) and prints questions/s per batch size, the speed-up of the
largest batch over batch 1, and whether the greedy answers are identical across batch sizes.

On CPU the default is one intra-op thread: the figure of interest is the batching gain, and on a small shared
machine OpenMP threads competing with other processes make every step 10-40x slower (measured on the 2-core dev
box: batch 1 0.65 q/s and batch 16 1.81 q/s with 2 threads, 4.3 and 25.2 q/s with 1 thread). ``--threads``
overrides it.

``--openai-concurrency 1 8 32`` also serves the same checkpoint with our OpenAI-compatible API (uvicorn in a thread)
and prints the questions/s of the evaluation's OpenAI backend at each concurrency, and whether its answers equal the
in-process batch-1 answers (measured on the 2-core dev box, tiny checkpoint, 32 questions, 16 new tokens, 1 thread:
in-process batch 1 / 16: 45.8 / 200.4 q/s; OpenAI backend at concurrency 1 / 8 / 32: 34.2 / 78.9 / 105.0 q/s, answers
identical).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

if importlib.util.find_spec("piip_llava") is None:  # python benchmarks/X.py from a checkout without pip install -e .
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-piip2_clip_64-128")
    parser.add_argument("--checkpoint", help="use this checkpoint instead of building a tiny one")
    parser.add_argument("--num-questions", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default on CPU: 1; on a shared 2-core machine, 2 threads made "
                             "every step 10-40x slower and hid the batching gain)")
    parser.add_argument("--openai-concurrency", type=int, nargs="*", default=[],
                        help="also measure the OpenAI backend against our API server at these concurrencies")
    parser.add_argument("--min-speedup", type=float, default=None,
                        help="exit 1 when the largest batch is less than this many times faster than the smallest")
    args = parser.parse_args(argv)

    import torch
    from PIL import Image

    from piip_llava.evaluation.runner import QuestionRecord, read_answers, run_generation
    from piip_llava.serve.inference import InferenceEngine
    from piip_llava.testing import build_tiny_checkpoint

    on_cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    if args.threads or on_cpu:
        torch.set_num_threads(args.threads or 1)
    tmp = Path(tempfile.mkdtemp(prefix="eval_throughput_"))
    ckpt = args.checkpoint or build_tiny_checkpoint(str(tmp / "ckpt"), preset=args.preset)
    engine = InferenceEngine.load(ckpt, device=args.device, dtype=args.dtype)
    images = [Image.new("RGB", (64 + 8 * (i % 5), 48), (37 * i % 256, 91 * i % 256, 53 * i % 256))
              for i in range(args.num_questions)]
    questions = [QuestionRecord(question_id=f"q{i}", prompt=f"What is written on sign {i}?\nAnswer the question "
                                "using a single word or phrase.",
                                message=f"What is written on sign {i}?\nAnswer the question using a single word "
                                        "or phrase.",
                                image=(lambda im=im: im)) for i, im in enumerate(images)]
    gen_kwargs = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0}
    run_generation(questions[:2], engine, tmp / "warmup.jsonl", batch_size=2, gen_kwargs=gen_kwargs, progress=False)

    print(f"device={engine.device} dtype={next(engine.model.parameters()).dtype} threads={torch.get_num_threads()} "
          f"preset={args.preset if not args.checkpoint else args.checkpoint} questions={args.num_questions} "
          f"max_new_tokens={args.max_new_tokens}")
    rates, texts = {}, {}
    for bs in args.batch_sizes:
        out = tmp / f"answers_bs{bs}.jsonl"
        t0 = time.perf_counter()
        run_generation(questions, engine, out, batch_size=bs, gen_kwargs=gen_kwargs, progress=False)
        elapsed = time.perf_counter() - t0
        rates[bs] = args.num_questions / elapsed
        texts[bs] = [r["text"] for r in read_answers(out)]
        print(f"batch {bs:>3}: {rates[bs]:8.2f} questions/s ({elapsed:.1f} s)")
    lo, hi = min(args.batch_sizes), max(args.batch_sizes)
    speedup = rates[hi] / rates[lo]
    identical = all(t == texts[lo] for t in texts.values())
    print(f"speed-up batch {hi} vs {lo}: {speedup:.2f}x; greedy answers identical across batch sizes: {identical}")
    if args.openai_concurrency:
        for c, rate, same in _openai_rates(engine, questions, gen_kwargs, args.openai_concurrency, tmp, texts[lo]):
            print(f"openai backend, concurrency {c:>3}: {rate:8.2f} questions/s; answers equal in-process: {same}")
    if args.min_speedup is not None and speedup < args.min_speedup:
        print(f"FAIL: speed-up {speedup:.2f}x < {args.min_speedup}x")
        return 1
    return 0


def _openai_rates(engine, questions, gen_kwargs, concurrencies, tmp, reference):
    """(concurrency, questions/s, answers equal ``reference``) against our API server on a free local port."""
    import threading

    import uvicorn

    from piip_llava.evaluation.backends import OpenAIEngine
    from piip_llava.evaluation.runner import read_answers, run_generation
    from piip_llava.serve.api import create_app
    from piip_llava.testing import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "bench"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        for c in concurrencies:
            client = OpenAIEngine(f"http://127.0.0.1:{port}/v1", concurrency=c)
            out = tmp / f"openai_c{c}.jsonl"
            t0 = time.perf_counter()
            run_generation(questions, client, out, batch_size=4 * c, gen_kwargs=gen_kwargs, progress=False)
            rate = len(questions) / (time.perf_counter() - t0)
            client.close()
            yield c, rate, [r["text"] for r in read_answers(out)] == reference
    finally:
        server.should_exit = True
        thread.join(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
