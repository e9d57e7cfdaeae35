"""OpenAI-compatible chat-completions server for a PIIP-LLaVA checkpoint (FastAPI + uvicorn).

    python -m piip_llava.serve.api --model-path PATH [--host 127.0.0.1 --port 8000] [--api-key KEY]
        [--image-dir DIR] [--max-batch-size 16] [--max-queue 64] [--max-body-mb 20]

Endpoints: `POST /v1/chat/completions` (plain, or `stream: true` as server-sent events `data: {chat.completion.chunk}`
ending with `data: [DONE]`), `GET /v1/models`, `GET /health`. Message content is a string or a list of parts
`{"type": "text", "text": ...}` / `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`; at most
one image per conversation (it belongs to the first user turn, as in LLaVA). Supported: `max_tokens` /
`max_completion_tokens`, `temperature` (0 = greedy), `top_p`, `stop` (strings of any token length), `stream_options.
include_usage`.

Safe defaults for a shared machine: no server-side file is read unless `--image-dir DIR` allows paths under DIR
(resolved; `..` and symlinks that leave DIR are refused with the same message as missing files); `--api-key` (or
`PIIP_API_KEY`) requires `Authorization: Bearer KEY` on `/v1/*`; request bodies over `--max-body-mb` get 413;
images whose decoded or padded-to-square size exceeds the pixel limit are refused from their header, before decoding.
Every error is OpenAI's error object `{"error": {"message", "type", "param", "code"}}` (400, 401, 404, 405, 413,
429, 500). Unlike the chat UIs, the API never drops old turns silently: a conversation over the context is a 400.

Concurrent requests are batched continuously (`BatchScheduler`): a request that arrives while the model is busy
joins the running batch at the next decode step; over `--max-queue` waiting requests the answer is 429 at once. A
client that disconnects stops its generation. `usage` and `finish_reason` come from the generated token ids.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.conversation import ConversationFormatError
from ..models.processing_piip_llava import ImageLoadError
from .inference import ChatRequest, InferenceEngine
from .scheduler import BatchScheduler, GenerationParams, Job, QueueFullError

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- request schema
class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.2, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    ignore_eos: bool = False  # vLLM's extension, for benchmarks: always generate max_tokens


class APIError(Exception):
    """Answered as `{"error": {...}}` with `status` (OpenAI's error body)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# ------------------------------------------------------------------------------------------------- conversion
def resolve_local_image(url: str, image_dir: str | None) -> str:
    """A local path / file:// URL -> the file under `image_dir`, or APIError. The messages never tell whether a
    path outside `image_dir` exists."""
    if image_dir is None:
        raise APIError("this server reads no local image files; send the image as a data URL "
                       "(data:image/png;base64,...)", param="messages", code="local_images_disabled")
    root = os.path.realpath(image_dir)
    path = url.removeprefix("file://")
    real = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
    if os.path.commonpath([real, root]) != root or not os.path.isfile(real):
        raise APIError(f"no image file {path!r} under the server's image folder", param="messages",
                       code="image_not_found")
    return real


def load_image_url(url: str, engine: InferenceEngine, image_dir: str | None = None) -> Image.Image:
    """A data URL (base64), or a path under `image_dir` -> RGB image. Remote http(s) URLs are refused (no fetching
    on the server's behalf)."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise APIError("image data URLs must be base64: data:image/png;base64,...", param="messages")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(f"image data URL is not valid base64: {e}", param="messages") from e
        source: str | bytes = data
    elif url.startswith(("http://", "https://")):
        raise APIError("remote image URLs are not fetched; send the image as a data URL", param="messages")
    else:
        source = resolve_local_image(url, image_dir)
    try:
        return engine.open_image(source)
    except ImageLoadError as e:
        raise APIError(f"invalid image: {e}", param="messages", code="invalid_image") from e


def to_chat_request(req: ChatCompletionRequest, engine: InferenceEngine, image_dir: str | None = None) -> ChatRequest:
    """OpenAI messages -> ChatRequest: system/developer messages joined into the system prompt, consecutive messages
    of one role merged, at most one image."""
    system: list[str] = []
    turns: list[dict[str, str]] = []
    images: list[Image.Image] = []
    for i, m in enumerate(req.messages):
        parts = [ContentPart(type="text", text=m.content)] if isinstance(m.content, str) else (m.content or [])
        texts = []
        for part in parts:
            if part.type == "text":
                texts.append(part.text or "")
            else:
                if m.role != "user":
                    raise APIError(f"messages[{i}]: images are only accepted in user messages", param="messages")
                if part.image_url is None:
                    raise APIError(f"messages[{i}]: image_url part without image_url", param="messages")
                if images:
                    raise APIError("at most one image per conversation is supported", param="messages")
                images.append(load_image_url(part.image_url.url, engine, image_dir))
        text = "\n".join(t for t in texts if t)
        if m.role in ("system", "developer"):
            system.append(text)
        elif turns and turns[-1]["role"] == m.role:
            turns[-1]["content"] = "\n".join(t for t in (turns[-1]["content"], text) if t)
        else:
            turns.append({"role": m.role, "content": text})
    if not turns or turns[-1]["role"] != "user":
        raise APIError("the last message must be a user message", param="messages")
    if turns[0]["role"] != "user":
        raise APIError("the conversation must start with a user message (after any system message)", param="messages")
    if not turns[-1]["content"].strip():
        raise APIError("the last user message is empty", param="messages")
    messages = ([{"role": "system", "content": "\n".join(system)}] if system else []) + turns
    return ChatRequest(messages, images[0] if images else None)


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None = None) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _usage(job: Job) -> dict[str, int]:
    n = len(job.token_ids)
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": n, "total_tokens": job.prompt_tokens + n}


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """ASGI middleware in front of the app: API key on `/v1/*` (401) and the request-body limit (413), both
    answered before the body is read or parsed."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                await _send_error(send, APIError("missing or wrong API key (Authorization: Bearer KEY)", status=401,
                                                 code="invalid_api_key"))
                return
        length = headers.get("content-length")
        too_large = APIError(f"request body over the limit of {self.max_body_bytes} bytes", status=413,
                             code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _send_error(send, too_large)
            return
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _send_error(send, too_large)


async def _send_error(send, error: APIError) -> None:
    body = json.dumps({"error": {"message": error.message, "type": error.type, "param": error.param,
                                 "code": error.code}}).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------------- app
def create_app(engine: InferenceEngine, model_name: str = "piip-llava", image_dir: str | None = None,
               api_key: str | None = None, default_max_tokens: int = 512, max_batch_size: int = 16,
               max_queue: int = 64, max_body_bytes: int = 20 * 2**20,
               scheduler: BatchScheduler | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under the name `model_name` (see the module docstring for the options)."""
    if image_dir is not None and not os.path.isdir(image_dir):
        raise ValueError(f"--image-dir {image_dir} is not a folder")
    sched = scheduler or BatchScheduler(engine, max_batch_size=max_batch_size, max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if scheduler is None:  # ours to stop; a scheduler passed in belongs to the caller
            sched.close()

    app = FastAPI(title="PIIP-LLaVA OpenAI-compatible API", lifespan=lifespan)
    app.state.scheduler = sched
    created_at = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors())
        param = next((str(e["loc"][1]) for e in exc.errors() if len(e["loc"]) > 1), None)
        return APIError(f"invalid request: {problems}", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return APIError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code,
                        code=kind).response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return APIError(f"internal error: {type(exc).__name__}: {exc}", status=500, type="server_error").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "busy": sched.busy, "waiting": sched.waiting}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created_at, "owned_by": "piip_llava"}]}

    def admit(req: ChatCompletionRequest, sink) -> Job:
        """Parse, validate and queue one request (runs in a worker thread: image decoding, tokenisation)."""
        request = to_chat_request(req, engine, image_dir)
        try:
            prompt_ids = engine.prompt_ids(request)
        except ConversationFormatError as e:
            raise APIError(str(e), param="messages") from e
        prompt_tokens = len(prompt_ids)
        room = engine.max_context - prompt_tokens
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, min(default_max_tokens, room))
        if prompt_tokens + max_tokens > engine.max_context:
            raise APIError(
                f"This model's maximum context length is {engine.max_context} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                f"completion). Please reduce the length of the messages or completion.",
                param="messages", code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        params = GenerationParams(max_tokens, req.temperature, req.top_p, tuple(s for s in stop if s), req.ignore_eos)
        try:
            return sched.submit(request, params, sink, prompt_ids)
        except QueueFullError as e:
            raise APIError(str(e), status=429, type="rate_limit_error", code="rate_limit_exceeded") from e

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, http: Request):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = await run_in_threadpool(admit, req, lambda item: loop.call_soon_threadsafe(events.put_nowait, item))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if not req.stream:
            try:
                while True:
                    try:
                        kind, value = await asyncio.wait_for(events.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        if await http.is_disconnected():  # nobody will read the answer: free the batch row
                            job.cancel()
                            return JSONResponse({}, status_code=499)
                        continue
                    if kind == "error":
                        raise APIError(f"generation failed: {value}", status=500, type="server_error")
                    if kind == "done":
                        break
            finally:
                job.cancel()  # no-op when finished
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                                 "finish_reason": job.finish_reason}],
                    "usage": _usage(job)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events_stream() -> AsyncIterator[str]:
            try:
                yield _chunk(cid, created, model_name, {"role": "assistant", "content": ""})
                held = None  # an event taken from the queue while merging deltas
                while True:
                    kind, value = held or await events.get()
                    held = None
                    if kind == "delta":
                        # deltas that queued up while this task waited for the event loop go out as one chunk
                        while held is None and not events.empty():
                            held = events.get_nowait()
                            if held[0] == "delta":
                                value, held = value + held[1], None
                        yield _chunk(cid, created, model_name, {"content": value})
                    elif kind == "error":  # the 200 header is sent: report in-band
                        yield f"data: {json.dumps({'error': {'message': str(value), 'type': 'server_error'}})}\n\n"
                        break
                    else:
                        yield _chunk(cid, created, model_name, {}, job.finish_reason)
                        if include_usage:
                            body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                    "model": model_name, "choices": [], "usage": _usage(job)}
                            yield f"data: {json.dumps(body)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:  # also when the client disconnects mid-stream: its row stops at the next step
                job.cancel()

        return StreamingResponse(events_stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return RequestGuard(app, api_key, max_body_bytes)


def main(argv: list[str] | None = None) -> int:
    from .cli import add_engine_args, load_engine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes the server)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None, help="name in /v1/models (default: the checkpoint folder)")
    parser.add_argument("--max-tokens", type=int, default=512, help="default max_tokens when a request gives none")
    parser.add_argument("--api-key", default=os.environ.get("PIIP_API_KEY"),
                        help="require Authorization: Bearer KEY on /v1/* (default: $PIIP_API_KEY; none = open)")
    parser.add_argument("--image-dir", default=None,
                        help="allow image_url paths under this folder (default: data: URLs only, no file is read)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests generated together")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond this get 429")
    parser.add_argument("--max-body-mb", type=float, default=20.0, help="request bodies over this get 413")
    args = parser.parse_args(argv)

    import uvicorn

    from ..models.loading import CheckpointError, cli_error

    try:
        engine = load_engine(args)
    except CheckpointError as e:  # a bad --model: one line naming the file, exit 1 (PIIP_DEBUG=1: traceback)
        return cli_error(e)
    name = args.model_name or os.path.basename(os.path.normpath(args.model))
    app = create_app(engine, name, image_dir=args.image_dir, api_key=args.api_key, default_max_tokens=args.max_tokens,
                     max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                     max_body_bytes=int(args.max_body_mb * 2**20))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who reaches the port can use the model",
              file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
