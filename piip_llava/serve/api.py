"""OpenAI-compatible chat-completions server for a PIIP-LLaVA checkpoint (FastAPI + uvicorn).

    python -m piip_llava.serve.api --model PATH [--host 127.0.0.1 --port 8000]

Endpoints: `POST /v1/chat/completions` (plain, or `stream: true` as server-sent events `data: {chat.completion.chunk}`
ending with `data: [DONE]`), `GET /v1/models`, `GET /health`. Message content is a string or a list of parts
`{"type": "text", "text": ...}` / `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..." | local
path | file:// URL}}`; at most one image per conversation (it belongs to the first user turn, as in LLaVA).
Supported: `max_tokens` / `max_completion_tokens`, `temperature` (0 = greedy), `top_p`, `stop`,
`stream_options.include_usage`. Bad requests (invalid JSON fields, unreadable or oversized image, empty message, a
prompt over the context) get HTTP 400 `{"error": {"message", "type": "invalid_request_error", "param", "code"}}`.
Unlike the chat UIs, the API never drops old turns silently: a conversation over the context is a 400.

`usage.completion_tokens` is the answer re-tokenised (the engine returns text), which can differ by a token or two
from the generated count for byte-fallback pieces.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from PIL import Image

from ..data.conversation import ConversationFormatError
from ..models.processing_piip_llava import ImageLoadError
from .inference import ChatRequest, InferenceEngine

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
def load_image_url(url: str, engine: InferenceEngine, allow_local_images: bool) -> Image.Image:
    """A data URL (base64) or a local path / file:// URL -> RGB image. Remote http(s) URLs are refused (no fetching
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
        if not allow_local_images:
            raise APIError("local image paths are disabled on this server; send a data URL", param="messages")
        source = url.removeprefix("file://")
        if not os.path.isfile(source):
            raise APIError(f"image file {source} does not exist", param="messages")
    try:
        return engine.open_image(source)
    except ImageLoadError as e:
        raise APIError(f"invalid image: {e}", param="messages", code="invalid_image") from e


def to_chat_request(req: ChatCompletionRequest, engine: InferenceEngine, allow_local_images: bool) -> ChatRequest:
    """OpenAI messages -> ChatRequest: system/developer messages joined into the system prompt, consecutive messages
    of one role merged, at most one image. A literal `<image>` in the text stays text (the template handles it)."""
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
                images.append(load_image_url(part.image_url.url, engine, allow_local_images))
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


# ------------------------------------------------------------------------------------------------- app
def create_app(engine: InferenceEngine, model_name: str = "piip-llava", allow_local_images: bool = True,
               default_max_tokens: int = 512) -> FastAPI:
    """The FastAPI app serving `engine` under the name `model_name`."""
    app = FastAPI(title="PIIP-LLaVA OpenAI-compatible API")
    created_at = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors())
        param = next((str(e["loc"][1]) for e in exc.errors() if len(e["loc"]) > 1), None)
        return APIError(f"invalid request: {problems}", param=param).response()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created_at, "owned_by": "piip_llava"}]}

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatCompletionRequest):  # sync: FastAPI runs it in a worker thread
        request = to_chat_request(req, engine, allow_local_images)
        try:
            prompt_tokens = len(engine.prompt_ids(request))
        except ConversationFormatError as e:
            raise APIError(str(e), param="messages") from e
        room = engine.max_context - prompt_tokens
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, min(default_max_tokens, room))
        if prompt_tokens + max_tokens > engine.max_context:
            raise APIError(
                f"This model's maximum context length is {engine.max_context} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                f"completion). Please reduce the length of the messages or completion.",
                param="messages", code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def usage(text: str) -> dict[str, int]:
            n = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
            n = min(n, max_tokens)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

        def finish_reason(u: dict[str, int]) -> str:
            return "length" if u["completion_tokens"] >= max_tokens else "stop"

        if not req.stream:
            text = engine.generate([request], max_tokens, req.temperature, req.top_p, stop)[0]
            u = usage(text)
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": finish_reason(u)}],
                    "usage": u}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def events() -> Iterator[str]:
            yield _chunk(cid, created, model_name, {"role": "assistant", "content": ""})
            text = ""
            try:
                for delta in engine.stream(request, max_tokens, req.temperature, req.top_p, stop):
                    text += delta
                    yield _chunk(cid, created, model_name, {"content": delta})
            except Exception as e:  # the 200 header is sent: report in-band, keep the server up
                logger.exception("generation failed in a streamed request")
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
                yield "data: [DONE]\n\n"
                return
            u = usage(text)
            yield _chunk(cid, created, model_name, {}, finish_reason(u))
            if include_usage:
                body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "choices": [], "usage": u}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def main(argv: list[str] | None = None) -> int:
    from .cli import add_engine_args, load_engine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes the server)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None, help="name in /v1/models (default: the checkpoint folder)")
    parser.add_argument("--max-tokens", type=int, default=512, help="default max_tokens when a request gives none")
    parser.add_argument("--no-local-images", action="store_true", help="refuse image_url values that are file paths")
    args = parser.parse_args(argv)

    import uvicorn

    engine = load_engine(args)
    name = args.model_name or os.path.basename(os.path.normpath(args.model))
    app = create_app(engine, name, allow_local_images=not args.no_local_images, default_max_tokens=args.max_tokens)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
