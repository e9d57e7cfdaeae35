"""Terminal chat with a PIIP-LLaVA checkpoint: multi-turn, streamed tokens, one image per conversation.

    python -m piip_llava.serve.cli --model PATH [--image IMG] [--temperature 0.2] [--max-new-tokens 512]

Commands typed at the prompt: `/image PATH` (load another image; the conversation restarts), `/reset`, `/help`,
`/exit` (EOF exits too). A bad image or a message that does not fit the context prints an error and the chat goes on.
The model's answers go to stdout as `ASSISTANT: ...` lines; notices and errors go to stderr.

`add_engine_args` / `load_engine` are the model-loading flags shared by this CLI, the Gradio demo and the API server.
"""
from __future__ import annotations

import argparse
import sys
from typing import TextIO

from PIL import Image

from ..data.conversation import ConversationFormatError
from ..models.processing_piip_llava import ImageLoadError
from .inference import ChatRequest, InferenceEngine, PromptTooLongError

HELP = "commands: /image PATH (new image, restarts the conversation), /reset, /help, /exit"


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags that say which checkpoint to load and how (shared by cli, gradio_demo and api)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model-path", "--model", dest="model", required=True,
                   help="checkpoint folder (this project's, a LoRA adapter, or official)")
    g.add_argument("--lora-base", default=None, help="base checkpoint of a LoRA adapter (default: from the adapter)")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16", "float32", "float16", "bfloat16"],
                   help="default: bf16/fp16 on GPU, fp32 on CPU")
    g.add_argument("--conv-mode", "--template", dest="template", default=None,
                   help="conversation template (default: the checkpoint's)")
    g.add_argument("--max-image-pixels", type=int, default=None, help="refuse images with more pixels than this")
    q = g.add_mutually_exclusive_group()
    q.add_argument("--load-4bit", action="store_true", help="4-bit weights (bitsandbytes, CUDA only)")
    q.add_argument("--load-8bit", action="store_true", help="8-bit weights (bitsandbytes, CUDA only)")


def load_engine(args: argparse.Namespace) -> InferenceEngine:
    kwargs = {} if args.max_image_pixels is None else {"max_image_pixels": args.max_image_pixels}
    return InferenceEngine.load(args.model, device=args.device, dtype=args.dtype, template=args.template,
                                lora_base=args.lora_base, load_in_4bit=args.load_4bit, load_in_8bit=args.load_8bit,
                                **kwargs)


class TerminalChat:
    """The conversation state of one terminal session (messages + image) and the command loop."""

    def __init__(self, engine: InferenceEngine, temperature: float, top_p: float, max_new_tokens: int,
                 out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.engine = engine
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.out, self.err = out, err
        self.messages: list[dict[str, str]] = []
        self.image: Image.Image | None = None

    def notice(self, text: str) -> None:
        print(f"[{text}]", file=self.err, flush=True)

    def set_image(self, path: str) -> bool:
        """Load `path`; on success the conversation restarts. On failure the old image and conversation stay."""
        try:
            image = self.engine.open_image(path)
        except ImageLoadError as e:
            self.notice(f"error: {e}; keeping the previous image")
            return False
        self.image, self.messages = image, []
        self.notice(f"image {path} ({image.width}x{image.height}) loaded; new conversation")
        return True

    def reset(self) -> None:
        self.messages = []
        self.notice("conversation reset")

    def ask(self, text: str) -> str | None:
        """One user turn: fit the context, stream the answer to `out`; returns it (None if the turn was refused)."""
        messages = [*self.messages, {"role": "user", "content": text}]
        try:
            request, truncated = self.engine.fit_messages(ChatRequest(messages, self.image), self.max_new_tokens)
        except PromptTooLongError as e:
            self.notice(f"error: message not sent, {e}")
            return None
        except ConversationFormatError as e:  # e.g. a typed <image>, the placeholder of the image slot
            self.notice(f"error: message not sent, {e} (the image comes from --image or /image)")
            return None
        if truncated:
            dropped = (len(messages) - len(request.messages)) // 2
            self.notice(f"conversation truncated to fit the context: the oldest {dropped} turn(s) are no longer seen")
        self.out.write("ASSISTANT: ")
        self.out.flush()
        answer = ""
        for delta in self.engine.stream(request, self.max_new_tokens, self.temperature, self.top_p):
            answer += delta
            self.out.write(delta)
            self.out.flush()
        self.out.write("\n")
        self.out.flush()
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        return answer

    def handle(self, line: str) -> bool:
        """Process one input line; False means exit."""
        text = line.strip()
        if not text:
            return True
        command, _, rest = text.partition(" ")
        if command == "/exit":
            return False
        if command == "/reset":
            self.reset()
        elif command == "/help":
            self.notice(HELP)
        elif command == "/image":
            if rest.strip():
                self.set_image(rest.strip())
            else:
                self.notice("usage: /image PATH")
        elif command.startswith("/") and command[1:].isalpha():
            self.notice(f"unknown command {command}; {HELP}")
        else:
            self.ask(text)
        return True

    def run(self, stdin: TextIO = sys.stdin) -> None:
        interactive = stdin.isatty()
        while True:
            if interactive:
                self.out.write("USER: ")
                self.out.flush()
            line = stdin.readline()
            if not line:  # EOF
                if interactive:
                    self.out.write("\n")
                return
            if not self.handle(line):
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(parser)
    parser.add_argument("--image", default=None, help="image for the first conversation (change it with /image)")
    parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        parser.error("need --temperature >= 0, 0 < --top-p <= 1, --max-new-tokens >= 1")

    from ..models.loading import CheckpointError, cli_error

    try:
        engine = load_engine(args)
    except CheckpointError as e:  # a bad --model: one line naming the file, exit 1 (PIIP_DEBUG=1: traceback)
        return cli_error(e)
    chat = TerminalChat(engine, args.temperature, args.top_p, args.max_new_tokens)
    chat.notice(f"model {args.model} loaded on {engine.device}; {HELP}")
    if args.image:
        chat.set_image(args.image)
    try:
        chat.run()
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
