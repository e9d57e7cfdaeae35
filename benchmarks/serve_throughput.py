"""Serving throughput: N concurrent clients against our API and against vLLM, on the same checkpoint.

    python benchmarks/serve_throughput.py                          # mini preset, built in a temp dir, both servers
    python benchmarks/serve_throughput.py --model CKPT --servers ours --clients 1 4 16 64 --max-tokens 64
    python benchmarks/serve_throughput.py --servers ours --preset tiny-piip2_clip_64-128

Each server is started as its own process (`python -m piip_llava.serve.api`, `bash scripts/serve_vllm.sh`) on a
loopback port. For each concurrency C, C clients each send `--requests` streamed chat requests (one image + a
question, greedy, exactly `--max-tokens` new tokens: `ignore_eos`, which both servers accept) one after the other;
the figures are over all requests of that run:
- tokens/s: completion tokens (from the server's `usage`) of all requests / wall time of the run,
- p50 / p95 latency: request start to the last streamed byte,
- TTFT p50: request start to the first content delta.
Prints a Markdown table. Loopback only; every run is bounded by `--timeout`.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from PIL import Image

from piip_llava.testing import free_port, stop_process_group, wait_until_healthy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image_url(seed: int) -> str:
    img = Image.new("RGB", (96, 64), ((seed * 53) % 256, (seed * 97) % 256, (seed * 31) % 256))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def start_server(kind: str, ckpt: str, threads: int, log_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    if kind == "ours":
        cmd = [sys.executable, "-m", "piip_llava.serve.api", "--model", ckpt, "--port", str(port),
               "--model-name", "bench", "--dtype", "fp32", "--device", "cpu"]
    else:
        cmd = ["bash", os.path.join(ROOT, "scripts", "serve_vllm.sh"), ckpt, "--port", str(port),
               "--served-model-name", "bench", "--max-num-seqs", "64"]
    log = open(os.path.join(log_dir, f"{kind}.log"), "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    wait_until_healthy(proc, base, 600, log.name)
    return proc, base


async def one_request(host: str, port: int, kind: str, seed: int, max_tokens: int) -> dict:
    """One streamed request over a raw HTTP/1.0 connection: the server streams the SSE body and closes, so no
    chunked decoding and no HTTP library sit in the measurement; only the first content chunk and the usage chunk
    are parsed as JSON. On a machine of few cores the load generator's CPU is taken from the server, so it is kept
    small (and reported: `client_cpu_ms_per_request`)."""
    body = {"model": "bench", "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _image_url(seed)}},
                                                      {"type": "text", "text": "Describe the picture in detail."}]}]}
    body["ignore_eos"] = True  # the same number of tokens for every request, on both servers
    payload = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.0\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    t0 = time.perf_counter()
    first = None
    tokens = 0
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head + payload)
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"{kind}: {status.decode().strip()}: {(await reader.read(300))!r}")
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):  # headers
            pass
        while line := await reader.readline():
            if not line.startswith(b"data: {"):
                continue
            if first is None and b'"content"' in line and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            elif b'"usage"' in line and (usage := json.loads(line[6:]).get("usage")):
                tokens = usage["completion_tokens"]
    finally:
        writer.close()
    end = time.perf_counter()
    return {"latency": end - t0, "ttft": (first or end) - t0, "tokens": tokens}


def _group_cpu_seconds(pgid: int) -> float:
    """User + system CPU so far of the live processes in process group `pgid` (the server and its workers; Linux)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def run_level(base: str, kind: str, clients: int, requests: int, max_tokens: int, timeout: float,
                    server_pgid: int | None = None) -> dict:
    host, port = base.removeprefix("http://").rsplit(":", 1)

    async def worker(c: int) -> list[dict]:
        return [await one_request(host, int(port), kind, c * 1000 + i, max_tokens) for i in range(requests)]

    cpu0, server0 = time.process_time(), _group_cpu_seconds(server_pgid) if server_pgid else 0.0
    t0 = time.perf_counter()
    results = await asyncio.wait_for(asyncio.gather(*(worker(c) for c in range(clients))), timeout)
    wall = time.perf_counter() - t0
    client_cpu = time.process_time() - cpu0
    server_cpu = _group_cpu_seconds(server_pgid) - server0 if server_pgid else float("nan")
    flat = [r for rs in results for r in rs]
    lat = sorted(r["latency"] for r in flat)
    return {"clients": clients, "requests": len(flat), "tokens": sum(r["tokens"] for r in flat),
            "tokens_per_s": sum(r["tokens"] for r in flat) / wall, "p50_s": statistics.median(lat),
            "p95_s": lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))],
            "ttft_p50_s": statistics.median(r["ttft"] for r in flat), "wall_s": wall,
            "server_cpu_ms_per_request": 1e3 * server_cpu / len(flat),
            "client_cpu_ms_per_request": 1e3 * client_cpu / len(flat)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: --preset with random weights)")
    parser.add_argument("--preset", default="mini-piip2_clip-ls_64-128",
                        help="preset of the random checkpoint (vLLM's CPU attention needs head size >= 32: not tiny)")
    parser.add_argument("--servers", nargs="+", default=["ours", "vllm"], choices=["ours", "vllm"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP threads of each server (1: on a few shared cores, more threads spin-wait "
                             "against the clients and other jobs)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per concurrency level")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.model
        if ckpt is None:
            from piip_llava.data.tokenizer import train_sentencepiece_tokenizer
            from piip_llava.testing import build_tiny_checkpoint

            from piip_llava.models import load_preset

            # as large as the LLM vocabulary, so few generated ids fall outside the tokenizer
            vocab = load_preset(args.preset).text_config.vocab_size
            tok = train_sentencepiece_tokenizer(os.path.join(tmp, "tok"), vocab_size=vocab)
            ckpt = build_tiny_checkpoint(os.path.join(tmp, "ckpt"), preset=args.preset, tokenizer_dir=tok,
                                         gate_scale=0.5)
        rows = []
        for kind in args.servers:
            proc, base = start_server(kind, ckpt, args.threads, tmp)
            try:
                asyncio.run(run_level(base, kind, 1, 1, args.max_tokens, args.timeout))  # warm-up
                for c in args.clients:
                    row = asyncio.run(run_level(base, kind, c, args.requests, args.max_tokens, args.timeout, proc.pid))
                    row["server"] = kind
                    rows.append(row)
                    print(f"{kind:5s} {c:3d} clients: {row['tokens_per_s']:8.1f} tok/s  p50 {row['p50_s']:.2f} s  "
                          f"p95 {row['p95_s']:.2f} s  TTFT p50 {row['ttft_p50_s']:.2f} s  CPU/request: server "
                          f"{row['server_cpu_ms_per_request']:.1f} ms, clients {row['client_cpu_ms_per_request']:.1f} ms",
                          flush=True)
            finally:
                stop_process_group(proc)
    print("\n| server | clients | requests | tokens/s | p50 latency (s) | p95 latency (s) | TTFT p50 (s) "
          "| server CPU ms/request | client CPU ms/request |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['p50_s']:.3f} | "
              f"{r['p95_s']:.3f} | {r['ttft_p50_s']:.3f} | {r['server_cpu_ms_per_request']:.1f} | "
              f"{r['client_cpu_ms_per_request']:.1f} |")
    for kind in args.servers:  # the target: at 16 clients >= 4x the tokens/s of one, p95 <= 2x a lone one's
        by = {r["clients"]: r for r in rows if r["server"] == kind}
        if 1 in by:
            for c in sorted(set(by) - {1}):
                print(f"{kind}: {c} clients vs 1: {by[c]['tokens_per_s'] / by[1]['tokens_per_s']:.1f}x the tokens/s, "
                      f"p95 {by[c]['p95_s'] / by[1]['p95_s']:.1f}x a lone request's")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
