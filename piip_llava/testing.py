"""Tiny checkpoints for tests, benchmarks and the quickstart (no download: random weights + a local tokenizer),
loopback servers for the serving tests and benchmarks, and a Python process that cannot import this package (the
remote-code tests)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import sys
import time
from collections.abc import Iterator, Sequence

import torch

from .data.tokenizer import load_tokenizer, train_sentencepiece_tokenizer
from .models import PiipLlavaForConditionalGeneration, align_image_token_id, load_preset, save_processor
from .train.model_setup import check_tokenizer_fits


def build_tiny_checkpoint(out_dir: str, preset: str = "tiny-piip2_clip_64-128", seed: int = 0,
                          tokenizer_dir: str | None = None, gate_scale: float = 0.0) -> str:
    """Save a randomly initialised tiny PIIP-LLaVA + a locally trained tokenizer into `out_dir`; return it.

    `gate_scale` > 0 draws the interaction gates from N(0, gate_scale) so interactions change the outputs.
    """
    os.makedirs(out_dir, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer_dir = train_sentencepiece_tokenizer(os.path.join(out_dir, "_tokenizer"), vocab_size=512)
    tokenizer = load_tokenizer(tokenizer_dir)
    config = load_preset(preset)
    check_tokenizer_fits(tokenizer, config, tokenizer_dir)
    align_image_token_id(config, tokenizer)
    torch.manual_seed(seed)
    model = PiipLlavaForConditionalGeneration(config)
    if gate_scale > 0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("ca_weight", "cffn_weight")):
                    p.normal_(0.0, gate_scale)
    model.save_pretrained(out_dir)
    save_processor(model.config, tokenizer, out_dir)
    return out_dir


# ---- servers on loopback, for tests and benchmarks ----
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app, port: int | None = None, start_timeout_s: float = 30.0) -> Iterator[str]:
    """Run an ASGI `app` with uvicorn in a daemon thread on 127.0.0.1; yields its base URL, stops it on exit."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + start_timeout_s
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_until_healthy(proc: subprocess.Popen, base: str, timeout_s: float, log_path: str,
                       poll_s: float = 1.0) -> None:
    """Wait for `GET base/health` to answer 200 from the server process `proc`; RuntimeError with the end of its
    log when it exits or does not come up within `timeout_s`."""
    import httpx

    def tail() -> str:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]

    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{tail()}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"the server did not start in {timeout_s:.0f} s:\n{tail()}")
        time.sleep(poll_s)


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session=True), SIGKILL if it lingers."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


_WITHOUT_PACKAGE_PRELUDE = r'''
import importlib.abc, os, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "piip_llava" or name.startswith("piip_llava."):
            raise ModuleNotFoundError("blocked: " + name)
sys.meta_path.insert(0, _Block())
try:
    import piip_llava  # noqa: F401
    raise SystemExit("piip_llava importable")
except ModuleNotFoundError:
    pass
import torch
torch.set_num_threads(int(os.environ["PIIP_PARENT_THREADS"]))  # the parent's: same reduction order, same bits
'''


def run_without_package(script: str, args: Sequence[str], workdir: str, timeout_s: float = 300.0
                        ) -> subprocess.CompletedProcess:
    """Run `script` (Python source; `sys.argv[1:]` = `args`) in a process where `import piip_llava` fails, with this
    process's torch thread count, offline, remote-code modules cached under `workdir`: what a user with only
    transformers installed gets from a checkpoint's bundled code."""
    path = os.path.join(workdir, "without_piip_llava.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(_WITHOUT_PACKAGE_PRELUDE + script)
    env = dict(os.environ, HF_MODULES_CACHE=os.path.join(workdir, "modules"), HF_HUB_OFFLINE="1", PYTHONPATH="",
               PIIP_PARENT_THREADS=str(torch.get_num_threads()))
    return subprocess.run([sys.executable, path, *args], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
