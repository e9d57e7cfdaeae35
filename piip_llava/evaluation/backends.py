"""Where answers come from: the in-process engine, or any OpenAI-compatible server (ours, vLLM, ...).

Both have ``generate(list[ChatRequest], max_new_tokens=, temperature=) -> list[str | ValueError]`` for the runner.
The OpenAI backend sends each question as one ``/v1/chat/completions`` request (image as a PNG data URL of the
image the task decoded, so the server sees the official pixels) with at most ``concurrency`` requests in flight; a
request the server refuses (4xx, e.g. a prompt over the context) becomes that question's error record, while a
server that stays unreachable or answers 5xx after retries stops the run (resume it later).
"""
from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["DTYPE_ALIASES", "OpenAIEngine", "ServerError", "eval_device_dtype", "load_local_engine"]

# every spelling the project's entry points accept, mapped to torch's name
DTYPE_ALIASES = {"fp16": "float16", "float16": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16",
                 "fp32": "float32", "float32": "float32"}


def eval_device_dtype(device: str | None, dtype: str | None) -> tuple[str, str]:
    """The official protocol's defaults: CUDA when available, fp16 on CUDA (LLaVA's eval scripts load in fp16),
    fp32 on CPU; ``dtype`` overrides. Under torchrun each rank takes the GPU of its ``LOCAL_RANK``."""
    import torch

    if device is None:
        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        else:
            device = "cpu"
    if dtype is None:
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, DTYPE_ALIASES[dtype]


def load_local_engine(model_path: str, device: str, dtype: str, template: str | None):
    from piip_llava.serve.inference import InferenceEngine

    return InferenceEngine.load(model_path, device=device, dtype=dtype, template=template)


class ServerError(RuntimeError):
    """The server could not be reached or kept failing (5xx / 429) after retries."""


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class OpenAIEngine:
    """``generate`` over an OpenAI-compatible chat completions endpoint with bounded concurrency."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 8,
                 timeout_s: float = 600.0, max_retries: int = 3, retry_wait_s: float = 2.0) -> None:
        import httpx

        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.retry_wait_s = retry_wait_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers,
                                   limits=httpx.Limits(max_connections=concurrency,
                                                       max_keepalive_connections=concurrency))
        self.model = model or self.served_models()[0]

    def served_models(self) -> list[str]:
        data = self._request("GET", "/models").get("data") or []
        names = [m.get("id") for m in data if isinstance(m, dict) and m.get("id")]
        if not names:
            raise ServerError(f"{self.base_url}/models lists no model; pass --api-model")
        return names

    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        import httpx

        url = self.base_url + path
        for attempt in range(self.max_retries + 1):
            try:
                resp = self.client.request(method, url, json=payload)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 400:
                    return resp.json()
                if resp.status_code != 429 and resp.status_code < 500:
                    raise ValueError(f"server refused the request ({resp.status_code}): {_error_text(resp)}")
                problem = f"HTTP {resp.status_code}: {_error_text(resp)}"
            if attempt < self.max_retries:
                time.sleep(self.retry_wait_s * 2 ** attempt)
        raise ServerError(f"{url}: {problem} (after {self.max_retries} retries)")

    def _payload(self, request, max_new_tokens: int, temperature: float, top_p: float,
                 stop: Sequence[str] | None) -> dict[str, Any]:
        messages = []
        image_sent = False
        for m in request.messages:
            if m["role"] == "user" and request.image is not None and not image_sent:
                content: Any = [{"type": "image_url", "image_url": {"url": _data_url(request.image)}},
                                {"type": "text", "text": m["content"]}]
                image_sent = True
            else:
                content = m["content"]
            messages.append({"role": m["role"], "content": content})
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens,
                                   "temperature": temperature}
        if temperature > 0:
            payload["top_p"] = top_p
        if stop:
            payload["stop"] = list(stop)
        return payload

    def _one(self, payload: dict) -> str | ValueError:
        try:
            out = self._request("POST", "/chat/completions", payload)
        except ValueError as exc:
            return exc
        try:
            return (out["choices"][0]["message"]["content"] or "").strip()
        except (KeyError, IndexError, TypeError) as exc:
            return ValueError(f"malformed chat completion ({exc!r}): {str(out)[:200]}")

    def generate(self, requests: Sequence, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] | None = None) -> list[str | ValueError]:
        payloads = [self._payload(r, max_new_tokens, temperature, top_p, stop) for r in requests]
        if len(payloads) <= 1:
            return [self._one(p) for p in payloads]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(payloads))) as pool:
            return list(pool.map(self._one, payloads))

    def close(self) -> None:
        self.client.close()


def _error_text(resp) -> str:
    try:
        body = resp.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except ValueError:
        return resp.text[:300]
