"""Load-and-fault run against our API server: many clients for a while, good and bad requests mixed.

    python benchmarks/serve_load_faults.py                      # 64 clients for 60 s, tiny random checkpoint
    python benchmarks/serve_load_faults.py --clients 16 --seconds 10 --model CKPT

The server runs as its own process on a loopback port (`python -m piip_llava.serve.api` with an API key, a 1 MB
body limit and a 1-megapixel image limit). Each client loops until the time is up, picking in turn: a good
streamed request, a good plain request, a request with a corrupt image, one over the body limit, one with an image
whose padded canvas is over the pixel limit, one that disconnects after its first token, one with a wrong key.
Checked: nothing hangs (every request finishes within its timeout), no 5xx, every good request gets its complete
answer (`finish_reason` and `[DONE]`), the server's resident memory stays bounded (peak vs after warm-up), and the
server still answers afterwards. Prints the counts and figures; exits 1 when a check fails. Loopback only, bounded
in time and count.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

import httpx
from PIL import Image

from piip_llava.testing import free_port, stop_process_group, wait_until_healthy

KEY = "load-test-key"
KINDS = ["good_stream", "good_plain", "bad_image", "oversized_body", "huge_canvas", "disconnect", "wrong_key"]


def _png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _body(image_url: str | None, text: str = "Describe the picture.", max_tokens: int = 16, stream: bool = False):
    content = [{"type": "text", "text": text}]
    if image_url:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return {"model": "load", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}


def one(client: httpx.Client, base: str, kind: str, images: dict[str, str]) -> tuple[str, bool]:
    """Send one request of `kind`; returns (outcome, ok)."""
    auth = {"Authorization": f"Bearer {KEY}"}
    url = f"{base}/v1/chat/completions"
    if kind == "good_plain":
        r = client.post(url, json=_body(images["good"]), headers=auth)
        ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        return f"{r.status_code}", ok
    if kind == "good_stream":
        done = finished = False
        with client.stream("POST", url, json=_body(images["good"], stream=True), headers=auth) as r:
            if r.status_code != 200:
                return f"{r.status_code}", False
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and '"finish_reason": "' in line:
                    finished = True
        return "200", done and finished
    if kind == "bad_image":
        r = client.post(url, json=_body("data:image/png;base64," + base64.b64encode(b"garbage" * 10).decode()),
                        headers=auth)
        return f"{r.status_code}", r.status_code == 400 and r.json()["error"]["code"] == "invalid_image"
    if kind == "oversized_body":
        r = client.post(url, json=_body(None, text="x" * 1_200_000), headers=auth)
        return f"{r.status_code}", r.status_code == 413
    if kind == "huge_canvas":
        r = client.post(url, json=_body(images["tall"]), headers=auth)
        return f"{r.status_code}", r.status_code == 400 and "square" in r.json()["error"]["message"]
    if kind == "disconnect":
        with client.stream("POST", url, json=_body(images["good"], max_tokens=200, stream=True), headers=auth) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # leave mid-stream
        return "left", r.status_code == 200
    r = client.post(url, json=_body(None), headers={"Authorization": "Bearer wrong"})
    return f"{r.status_code}", r.status_code == 401


def run(ckpt: str, clients: int, seconds: float, threads: int = 2, timeout: float = 120.0) -> dict:
    number = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "piip_llava.serve.api", "--model-path", ckpt, "--port", str(number),
                             "--device", "cpu", "--dtype", "fp32", "--api-key", KEY, "--max-body-mb", "1",
                             "--max-image-pixels", "1000000", "--max-queue", str(4 * clients),
                             "--max-batch-size", "16", "--model-name", "load"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{number}"
    images = {"good": _png(Image.new("RGB", (64, 48), (200, 60, 30))),
              "tall": _png(Image.new("RGB", (10, 2000), (0, 0, 0)))}  # 20,000 pixels; padded: 4,000,000
    outcomes: Counter = Counter()
    failures: Counter = Counter()
    durations: list[float] = []
    lock = threading.Lock()
    finished = threading.Event()
    try:
        wait_until_healthy(proc, base, 300, log.name, poll_s=0.5)
        with httpx.Client(timeout=timeout) as c:  # warm-up, then the memory baseline
            one(c, base, "good_plain", images)
        rss_start = _rss_kb(proc.pid)
        peak = [rss_start]
        stop_at = time.time() + seconds

        def client_loop(index: int) -> None:
            with httpx.Client(timeout=timeout) as c:
                i = index
                while time.time() < stop_at:
                    kind = KINDS[i % len(KINDS)]
                    i += 1
                    t0 = time.perf_counter()
                    try:
                        outcome, ok = one(c, base, kind, images)
                    except (httpx.HTTPError, KeyError, ValueError) as e:
                        outcome, ok = type(e).__name__, False
                    with lock:
                        outcomes[(kind, outcome)] += 1
                        durations.append(time.perf_counter() - t0)
                        if not ok:
                            failures[(kind, outcome)] += 1

        def watch() -> None:
            while not finished.is_set():
                peak[0] = max(peak[0], _rss_kb(proc.pid))
                finished.wait(0.5)

        workers = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        for w in workers:
            w.start()
        hung = 0
        for w in workers:
            w.join(seconds + 2 * timeout)
            hung += w.is_alive()
        after = httpx.get(f"{base}/health", timeout=5).json()
        alive_after = after["status"] == "ok"
        rss_end = _rss_kb(proc.pid)
        finished.set()
        watcher.join(5)
    finally:
        finished.set()
        stop_process_group(proc, timeout_s=30)
    five_xx = sum(n for (k, o), n in outcomes.items() if o.startswith("5"))
    return {"clients": clients, "seconds": seconds, "requests": sum(outcomes.values()),
            "by_kind": {f"{k}:{o}": n for (k, o), n in sorted(outcomes.items())},
            "failures": {f"{k}:{o}": n for (k, o), n in sorted(failures.items())}, "five_xx": five_xx, "hung": hung,
            "rss_start_mb": rss_start / 1024, "rss_peak_mb": peak[0] / 1024, "rss_end_mb": rss_end / 1024,
            "max_request_s": max(durations) if durations else 0.0, "alive_after": alive_after}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: a tiny random one in a temp dir)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.model
        if ckpt is None:
            from piip_llava.testing import build_tiny_checkpoint

            ckpt = build_tiny_checkpoint(os.path.join(tmp, "ckpt"), gate_scale=0.5)
        result = run(ckpt, args.clients, args.seconds, args.threads)
    print(json.dumps(result, indent=1))
    ok = not result["failures"] and not result["five_xx"] and not result["hung"] and result["alive_after"]
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
