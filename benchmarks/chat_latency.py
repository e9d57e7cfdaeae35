"""Chat latency: time to first token (TTFT) and streaming tokens/s, for the engine and through the OpenAI API.

    python benchmarks/chat_latency.py                       # tiny random checkpoint built in a temp dir
    python benchmarks/chat_latency.py --model PATH --device cuda --max-new-tokens 256

For each of `--runs` requests (one image + a question; greedy) it records:
- `tokens`: token-level, from `model.generate` with a streamer that timestamps every new token id: TTFT (prefill incl.
  the vision tower) and decode tokens/s = (new tokens - 1) / (last token time - first token time). Exact counts.
- `engine`: `InferenceEngine.stream` as the CLI and demo use it: time to the first visible text, the total time, and
  decode tokens/s = (new tokens of the same greedy answer - 1) / (last text time - first text time).
  (The first text can come a few tokens after the first token: text is held back while it could still change.)
- `api` (with `--api`): the same through `/v1/chat/completions` (stream) served by uvicorn in this process, which adds
  HTTP + SSE overhead.
Prints medians. On CPU, `tokens` runs `generate` in the main thread and the others in a worker thread; on an
oversubscribed CPU the main thread's OpenMP team can be much slower (busy-waiting), so compare with `--threads 1`.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

from PIL import Image

from piip_llava.serve.inference import ChatRequest, InferenceEngine


def measure_text(stream: Callable[[], Iterator[str]]) -> dict[str, float]:
    """Time to the first and the last text delta of one streamed answer."""
    t0 = time.perf_counter()
    first = last = None
    for _ in stream():
        last = time.perf_counter()
        first = first or last
    if first is None:
        raise RuntimeError("the model produced no text")
    return {"ttft_s": first - t0, "total_s": last - t0}


def measure_tokens(engine: InferenceEngine, request: ChatRequest, max_new_tokens: int) -> dict[str, float]:
    """Token-level timing of one greedy generation (exact token counts)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value) -> None:
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    clock = Clock()
    t0 = time.perf_counter()
    batch = engine.prepare([request])
    with torch.inference_mode():
        engine.model.generate(**batch, streamer=clock, **engine._generation_kwargs(max_new_tokens, 0.0, 1.0, None))
    n, ts = len(clock.times), clock.times
    return {"ttft_s": ts[0] - t0, "total_s": ts[-1] - t0, "tokens": n,
            "tok_per_s": (n - 1) / (ts[-1] - ts[0]) if n > 1 else float("nan")}


def api_stream(url: str, body: dict) -> Iterator[str]:
    import httpx

    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"]
                if delta and delta[0]["delta"].get("content"):
                    yield delta[0]["delta"]["content"]


def report(name: str, rows: list[dict[str, float]], tokens: int | None = None) -> None:
    """Medians; text rows get a decode rate from the exact token count of the same greedy answer (`tokens`)."""
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    if tokens and "tokens" not in med:
        med["tokens"] = tokens
        med["tok_per_s"] = statistics.median((tokens - 1) / (r["total_s"] - r["ttft_s"]) for r in rows)
    first = "token" if "tokens" in rows[0] else "text "
    line = f"{name:<7} runs={len(rows)}  first {first} median {med['ttft_s'] * 1000:6.1f} ms"
    if "tokens" in med:
        line += f"  decode median {med['tok_per_s']:7.1f} tok/s ({med['tokens']:.0f} new tokens)"
    print(line + f"  whole answer {med['total_s'] * 1000:6.0f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: a tiny random one, built now)")
    parser.add_argument("--preset", default="tiny-piip2_clip_64-128", help="preset of the tiny checkpoint")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--api", action="store_true", help="also measure through the OpenAI-compatible API")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (on a busy CPU, 1 can be far faster than the default)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from piip_llava.testing import build_tiny_checkpoint

            model = build_tiny_checkpoint(tmp, preset=args.preset, gate_scale=0.5)
        engine = InferenceEngine.load(model, device=args.device, dtype=args.dtype)
        print(f"model {args.model or args.preset} on {engine.device} ({next(engine.model.parameters()).dtype}), "
              f"{torch.get_num_threads()} CPU threads, {engine.config.num_image_tokens} visual tokens, "
              f"max_new_tokens={args.max_new_tokens}")
        image = Image.new("RGB", (320, 240), (200, 40, 40))
        question = "Describe the image in detail."

        request = ChatRequest([{"role": "user", "content": question}], image)
        list(engine.stream(request, 4))  # warm-up
        rows = [measure_tokens(engine, request, args.max_new_tokens) for _ in range(args.runs)]
        report("tokens", rows)
        n_tokens = int(rows[0]["tokens"])
        report("engine", [measure_text(lambda: engine.stream(request, args.max_new_tokens)) for _ in range(args.runs)],
               n_tokens)

        if args.api:
            import uvicorn

            from piip_llava.serve.api import create_app

            srv = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning"))
            thread = threading.Thread(target=srv.run, daemon=True)
            thread.start()
            while not srv.started:
                time.sleep(0.05)
            port = srv.servers[0].sockets[0].getsockname()[1]
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            body = {"model": "tiny", "max_tokens": args.max_new_tokens, "temperature": 0, "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": question},
                    {"type": "image_url",
                     "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}]}]}
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            report("api", [measure_text(lambda: api_stream(url, body)) for _ in range(args.runs)], n_tokens)
            srv.should_exit = True
            thread.join(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
