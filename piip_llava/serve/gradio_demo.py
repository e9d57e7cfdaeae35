"""Gradio web demo: chat with a PIIP-LLaVA checkpoint about an uploaded image.

    python -m piip_llava.serve.gradio_demo --model-path PATH [--host 127.0.0.1 --port 7860 --concurrency 16]
        [--auth USER:PASSWORD [--share]] [--max-queue 64]

Image upload (changing the image restarts the conversation), multi-turn chat with streamed answers, temperature /
top-p / max-new-tokens controls, regenerate, clear, example images from `piip_llava/serve/examples/`. When a
conversation no longer fits the context, the oldest turns are dropped for the model and a notice says so. Bad input
(a file that is not an image, an image over the pixel limit, an empty message, a single message over the context)
shows a warning toast and a notice line, leaves the conversation as it was, and the app keeps serving.

`build_demo(engine)` returns the queued `gr.Blocks`; the named endpoint `/chat` (message, image, history,
temperature, top_p, max_new_tokens) -> (history, cleared textbox, notice) is callable with `gradio_client`.
Answers of users chatting at the same time are generated together (`BatchScheduler`, as in the API); Stop ends the
running answer and frees its row; beyond `--max-queue` waiting requests Gradio refuses new ones. Images get the
API's limits (pixels, padded canvas). `--share` (a public link) refuses to start without `--auth` unless
`--share-without-auth` says so.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import gradio as gr
from PIL import Image, ImageDraw

from ..data.conversation import ConversationFormatError
from ..models.processing_piip_llava import ImageLoadError
from .inference import ChatRequest, InferenceEngine, PromptTooLongError
from .scheduler import BatchScheduler, GenerationParams, QueueFullError

EXAMPLES_DIR = os.path.join(os.path.dirname(__file__), "examples")
TITLE = "# PIIP-LLaVA\nUpload an image, then chat about it. Changing the image starts a new conversation."

EMPTY_ANSWER = "(the model gave an empty answer)"  # shown instead of an empty bubble; the model sees ""
History = list[dict[str, Any]]
Outputs = tuple[History, str, str]


# ------------------------------------------------------------------------------------------------- helpers
def content_text(content: Any) -> str:
    """Text of a chatbot message's content: a string, a `{"type": "text", "text": ...}` part, or a list of parts
    (gradio 6 sends lists of parts; file parts carry no text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "") if content.get("type", "text") == "text" else ""
    if isinstance(content, list | tuple):
        return "".join(content_text(c) for c in content)
    return ""


def history_to_messages(history: History | None) -> list[dict[str, str]]:
    """Chatbot history -> alternating user/assistant messages (other roles and empty user turns are skipped)."""
    messages: list[dict[str, str]] = []
    for m in history or []:
        role, text = m.get("role"), content_text(m.get("content"))
        if role == "user" and text.strip():
            if messages and messages[-1]["role"] == "user":  # an unanswered turn: keep the newest question
                messages.pop()
            messages.append({"role": "user", "content": text})
        elif role == "assistant" and messages and messages[-1]["role"] == "user":
            messages.append({"role": "assistant", "content": "" if text == EMPTY_ANSWER else text})
    if messages and messages[-1]["role"] == "user":
        messages.pop()
    return messages


def example_rows() -> list[list[str]]:
    """[[image path, question], ...] from `examples/examples.json`; generated placeholders when the folder is empty."""
    index = os.path.join(EXAMPLES_DIR, "examples.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            rows = [[os.path.join(EXAMPLES_DIR, e["image"]), e["question"]] for e in json.load(f)]
        rows = [r for r in rows if os.path.isfile(r[0])]
        if rows:
            return rows
    out = tempfile.mkdtemp(prefix="piip_llava_examples_")
    rows = []
    for name, colour, question in [("red_square", (220, 40, 40), "What colour is the square?"),
                                   ("blue_circle", (40, 80, 220), "What shape is in the picture?")]:
        image = Image.new("RGB", (256, 256), (245, 245, 245))
        draw = ImageDraw.Draw(image)
        if "circle" in name:
            draw.ellipse((48, 48, 208, 208), fill=colour)
        else:
            draw.rectangle((48, 48, 208, 208), fill=colour)
        path = os.path.join(out, f"{name}.png")
        image.save(path)
        rows.append([path, question])
    return rows


class BadInput(ValueError):
    """Input the demo refuses (shown to the user, never a crash)."""

    def __init__(self, title: str, message: str) -> None:
        super().__init__(message)
        self.title, self.message = title, message


class DemoHandlers:
    """Event handlers bound to one engine. Inputs arrive unpreprocessed (`preprocess=False`) so that the image file
    is opened by `engine.open_image` (pixel limit, clear error for non-images) rather than by Gradio."""

    def __init__(self, engine: InferenceEngine, scheduler: BatchScheduler | None = None) -> None:
        self.engine = engine
        self.scheduler = scheduler or BatchScheduler(engine)

    def _image(self, payload: Any) -> Image.Image | None:
        if payload is None:
            return None
        path = payload.get("path") if isinstance(payload, dict) else str(payload)
        name = (payload.get("orig_name") if isinstance(payload, dict) else None) or os.path.basename(str(path))
        if not path:
            return None
        try:
            return self.engine.open_image(path)
        except ImageLoadError as e:
            reason = str(e).replace(str(path), name)
            raise BadInput("Invalid image", f"Cannot use the uploaded file {name}: {reason}") from e

    def chat(self, message: str | None, image: Any, history: History | None, temperature: float, top_p: float,
             max_new_tokens: float) -> Iterator[Outputs]:
        """Stream the answer to `message`. Bad input leaves the conversation and the typed text as they were and
        explains itself in a warning toast and in the notice line (an error would blank the chat in the page)."""
        past = history_to_messages(history)
        try:
            request, truncated = self._request(message, image, past, int(max_new_tokens))
        except BadInput as e:
            gr.Warning(e.message, title=e.title)
            yield past, message or "", f"⚠️ {e.message}"
            return
        text = request.messages[-1]["content"]
        notice = ""
        if truncated:
            dropped = (len(past) + 1 - len(request.messages)) // 2
            notice = (f"⚠️ The conversation was truncated to fit the model's context of {self.engine.max_context} "
                      f"tokens: the oldest {dropped} turn(s) are no longer seen by the model.")
            gr.Warning(notice, title="Conversation truncated")
        try:
            job = self.scheduler.submit(request, GenerationParams(int(max_new_tokens), float(temperature),
                                                                  float(top_p)))
        except QueueFullError as e:
            gr.Warning(str(e), title="Busy")
            yield past, message or "", f"⚠️ The server is busy: {e}"
            return
        shown: History = [*past, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        yield shown, "", notice
        answer = ""
        try:
            while True:
                kind, value = job.events.get()
                if kind == "error":
                    raise gr.Error(f"generation failed: {value}")
                if kind == "done":
                    break
                answer += value
                shown[-1] = {"role": "assistant", "content": answer}
                yield shown, "", notice
        finally:  # Stop (or a closed page) closes this generator: the row stops at the next step
            job.cancel()
        if not answer:
            shown[-1] = {"role": "assistant", "content": EMPTY_ANSWER}
            yield shown, "", notice

    def _request(self, message: str | None, image: Any, past: list[dict[str, str]],
                 max_new_tokens: int) -> tuple[ChatRequest, bool]:
        text = (message or "").strip()
        if not text:
            raise BadInput("Empty message", "Type a message first.")
        messages = [*past, {"role": "user", "content": text}]
        try:
            return self.engine.fit_messages(ChatRequest(messages, self._image(image)), max_new_tokens)
        except PromptTooLongError as e:
            raise BadInput("Message too long", f"This message is too long for the model: {e}. Shorten it or lower "
                           "max new tokens.") from e
        except ConversationFormatError as e:  # e.g. a typed <image>: the placeholder of the image slot
            raise BadInput("Unsupported text", f"{e}; attach the image with the image box instead") from e

    def regenerate(self, image: Any, history: History | None, temperature: float, top_p: float,
                   max_new_tokens: float) -> Iterator[Outputs]:
        """Answer the last user message again (drops the last answer)."""
        turns = [m for m in (history or []) if m.get("role") in ("user", "assistant")]
        while turns and turns[-1]["role"] == "assistant":
            turns.pop()
        if not turns:
            gr.Warning("Nothing to regenerate yet.", title="Empty conversation")
            yield [], "", "⚠️ Nothing to regenerate yet."
            return
        last = content_text(turns.pop()["content"])
        yield from self.chat(last, image, turns, temperature, top_p, max_new_tokens)


# ------------------------------------------------------------------------------------------------- app
def build_demo(engine: InferenceEngine, concurrency_limit: int = 16, max_new_tokens: int = 512,
               temperature: float = 0.2, top_p: float = 0.7, max_queue: int = 64,
               scheduler: BatchScheduler | None = None) -> gr.Blocks:
    """The demo as a queued `gr.Blocks`; launch it with `.launch(...)`. The numbers are the sliders' initial values;
    `concurrency_limit` users stream at once (their answers are batched), `max_queue` more may wait."""
    h = DemoHandlers(engine, scheduler or BatchScheduler(engine, max_batch_size=concurrency_limit, max_queue=max_queue))
    with gr.Blocks(title="PIIP-LLaVA", analytics_enabled=False) as demo:
        gr.Markdown(TITLE)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=300)
                with gr.Accordion("Parameters", open=False):
                    temperature = gr.Slider(0.0, 1.5, value=temperature, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=top_p, step=0.05, label="Top-p")
                    max_new = gr.Slider(1, max(1, min(2048, engine.max_context - 1)),
                                        value=min(max_new_tokens, engine.max_context - 1), step=1,
                                        label="Max new tokens")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", height=460)
                notice = gr.Markdown("", label="Notice", elem_id="notice")
                with gr.Row():
                    textbox = gr.Textbox(label="Message", placeholder="Ask about the image and press Enter",
                                         scale=5, autofocus=True)
                    send = gr.Button("Send", variant="primary", scale=1)
                with gr.Row():
                    stop = gr.Button("Stop", variant="stop")
                    regenerate = gr.Button("Regenerate")
                    clear = gr.Button("Clear")
        gr.Examples(examples=example_rows(), inputs=[image, textbox], label="Examples")

        params = [temperature, top_p, max_new]
        outputs = [chatbot, textbox, notice]
        sent = send.click(h.chat, [textbox, image, chatbot, *params], outputs, api_name="chat", preprocess=False)
        submitted = textbox.submit(h.chat, [textbox, image, chatbot, *params], outputs, api_visibility="private",
                                   preprocess=False)
        regenerated = regenerate.click(h.regenerate, [image, chatbot, *params], outputs, api_name="regenerate",
                                       preprocess=False)
        stop.click(None, None, None, cancels=[sent, submitted, regenerated], api_visibility="private")
        clear.click(lambda: ([], "", None, ""), None, [chatbot, textbox, image, notice], api_name="clear")
        image.change(lambda: ([], ""), None, [chatbot, notice], api_visibility="private")
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=max_queue)
    return demo


def main(argv: list[str] | None = None) -> int:
    from .cli import add_engine_args, load_engine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes the demo)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="public gradio.live link (needs --auth)")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="require this login")
    parser.add_argument("--share-without-auth", action="store_true", help="allow --share without --auth")
    parser.add_argument("--concurrency", type=int, default=16, help="users answered at once (in one batch)")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond this are refused")
    parser.add_argument("--temperature", type=float, default=0.2, help="initial value of the slider (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=0.7, help="initial value of the slider")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="initial value of the slider")
    args = parser.parse_args(argv)
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            parser.error("--auth must be USER:PASSWORD")
        auth = (user, password)
    if args.share and auth is None and not args.share_without_auth:
        parser.error("--share makes the demo public: give --auth USER:PASSWORD (or --share-without-auth)")
    from ..models.loading import CheckpointError, cli_error

    try:
        engine = load_engine(args)
    except CheckpointError as e:  # a bad --model: one line naming the file, exit 1 (PIIP_DEBUG=1: traceback)
        return cli_error(e)
    demo = build_demo(engine, concurrency_limit=args.concurrency, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, max_queue=args.max_queue)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
