"""Inference engine shared by the CLI, the Gradio demo, the OpenAI-compatible API and evaluation.

Loads a checkpoint of this project (or a LoRA adapter on top of one), picks device and dtype (CUDA bf16/fp16, CPU
fp32) unless told, and generates for batches of chat requests with left padding and the KV cache, or streams the
tokens of one request. Prompts use the model's conversation template; stop strings end generation.
"""
from __future__ import annotations

import os
import queue
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..constants import DEFAULT_MAX_IMAGE_PIXELS
from ..data.conversation import ConversationTemplate, get_template
from ..data.tokenizer import load_tokenizer
from ..models import PiipLlavaForConditionalGeneration, PiipLlavaProcessor, load_image


class PromptTooLongError(ValueError):
    """The prompt (with its visual tokens and the requested new tokens) does not fit the model's context."""


@dataclass
class ChatRequest:
    """One conversation to continue: messages [{"role": "system"|"user"|"assistant", "content": str}] ending
    with a user message, and at most one image (it belongs to the first user turn)."""

    messages: list[dict[str, str]]
    image: Image.Image | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def pick_device_dtype(device: str | None, dtype: str | torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """Default: CUDA with bf16 (fp16 where bf16 is unsupported), else CPU fp32."""
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[dtype]
    if dtype is None:
        if dev.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    return dev, dtype


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of each stop string, stripped (the answer the user sees)."""
    for s in stops:
        if s and s in text:
            text = text[: text.index(s)]
    return text.strip()


class IncrementalText:
    """Token ids in, text deltas out, such that the deltas concatenate to the final (stop-cut, stripped) answer.

    Text is re-decoded from all ids at each step and only emitted where later tokens cannot change it: not inside a
    run of SentencePiece byte-fallback tokens (an invalid run decodes to U+FFFD per byte), not on a trailing
    incomplete character, and not the last `len(stop) - 1` characters, which could be the start of a stop string.
    """

    def __init__(self, tokenizer, byte_token_ids: set[int], stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.byte_token_ids = byte_token_ids
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) - 1 for s in self.stops), default=0)
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def _cut(self, text: str) -> str:
        return cut_at_stops(text, self.stops)

    def push(self, token_id: int) -> str:
        """Add one id; returns the new visible text (may be ""). Sets `stopped` when a stop string appeared."""
        self.ids.append(token_id)
        if token_id in self.byte_token_ids:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        if any(s in text for s in self.stops):
            self.stopped = True
            return ""
        visible = text.strip()
        safe = visible[: max(len(self.emitted), len(visible) - self.hold)]
        if len(safe) > len(self.emitted) and safe.startswith(self.emitted):
            delta, self.emitted = safe[len(self.emitted):], safe
            return delta
        return ""

    def finish(self) -> str:
        """The rest of the answer (after the last delta)."""
        final = self._cut(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        if final.startswith(self.emitted) and len(final) > len(self.emitted):
            delta, self.emitted = final[len(self.emitted):], final
            return delta
        return ""

    @property
    def text(self) -> str:
        return self._cut(self.tokenizer.decode(self.ids, skip_special_tokens=True))


class InferenceEngine:
    """A loaded model + tokenizer + image processor + template."""

    def __init__(self, model: PiipLlavaForConditionalGeneration, tokenizer, template: str | ConversationTemplate | None = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.template = get_template(template or self.config.conversation_template)
        # the one path from messages + image to model inputs (as in training and `AutoProcessor`)
        self.processor = PiipLlavaProcessor.from_config(self.config, tokenizer, template=self.template)
        self.image_processor = self.processor.image_processor
        self.max_image_pixels = max_image_pixels
        self.device = next(model.parameters()).device
        self.max_context = int(getattr(self.config.text_config, "max_position_embeddings", 2048))
        if getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < 1e9:
            self.max_context = min(self.max_context, int(tokenizer.model_max_length))
        self._lock = threading.Lock()  # generate() is not re-entrant on one model
        self._byte_token_ids = {i for t, i in tokenizer.get_vocab().items() if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t)}

    @classmethod
    def load(cls, model_path: str, device: str | None = None, dtype: str | torch.dtype | None = None,
             template: str | None = None, lora_base: str | None = None, load_in_4bit: bool = False,
             load_in_8bit: bool = False, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> InferenceEngine:
        """Load a checkpoint directory of this project, a LoRA adapter directory (`adapter_config.json`; the base is
        `lora_base` or the adapter's `base_model_name_or_path`), or an official OpenGVLab checkpoint
        (`model_type: llava_llama`, converted on the fly)."""
        dev, dt = pick_device_dtype(device, dtype)
        kwargs: dict[str, Any] = {"dtype": dt}
        if load_in_4bit or load_in_8bit:
            if dev.type != "cuda":
                raise ValueError("4/8-bit loading needs a CUDA GPU (bitsandbytes)")
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, bnb_4bit_compute_dtype=dt,
                llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"],
            )
        from ..models.loading import adapter_base, check_checkpoint, check_tokenizer

        # fail before building anything, with one message naming the file (missing folder, config, weights...)
        kind = check_checkpoint(model_path, ("piip_llava", "official", "lora_adapter"), "model")
        tokenizer_path = model_path
        if kind == "lora_adapter":
            from peft import PeftModel

            base = adapter_base(model_path, lora_base)
            check_checkpoint(base, "piip_llava", f"the LoRA base (of adapter {model_path})")
            if not os.path.isfile(os.path.join(model_path, "tokenizer_config.json")):
                tokenizer_path = base
            check_tokenizer(tokenizer_path, "model")
            model = PiipLlavaForConditionalGeneration.from_pretrained(base, **kwargs)
            model = PeftModel.from_pretrained(model, model_path).merge_and_unload()
        elif kind == "official":
            from ..models.convert_official import load_official_checkpoint

            check_tokenizer(tokenizer_path, "model")
            model = load_official_checkpoint(model_path).to(dt)
        else:
            check_tokenizer(tokenizer_path, "model")
            model = PiipLlavaForConditionalGeneration.from_pretrained(model_path, **kwargs)
        if "quantization_config" not in kwargs:
            model = model.to(dev)
        tokenizer = load_tokenizer(tokenizer_path, padding_side="left")
        return cls(model, tokenizer, template, max_image_pixels)

    # ---- prompt building ----
    def open_image(self, source: str | bytes | Image.Image) -> Image.Image:
        """Path / bytes / PIL -> RGB image, refusing files over the pixel limit, or whose padded square canvas is
        (`pad` preprocessing), before decoding them (ImageLoadError)."""
        return load_image(source, self.max_image_pixels, square_canvas=self.image_processor.aspect_mode == "pad")

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        return self.processor.encode_messages(request.messages, request.image is not None, self.template)

    def fit_messages(self, request: ChatRequest, max_new_tokens: int) -> tuple[ChatRequest, bool]:
        """Drop the oldest user/assistant rounds until the prompt fits the context; return (request, truncated).

        Raises PromptTooLongError when even the last user message alone does not fit.
        """
        messages = list(request.messages)
        system = [messages.pop(0)] if messages and messages[0]["role"] == "system" else []
        truncated = False
        while True:
            candidate = ChatRequest(system + messages, request.image, request.extra)
            n = len(self.prompt_ids(candidate))
            if n + max_new_tokens <= self.max_context:
                return candidate, truncated
            if len(messages) <= 1:
                raise PromptTooLongError(
                    f"the prompt needs {n} tokens (with {self.config.num_image_tokens if request.image else 0} visual "
                    f"tokens) + {max_new_tokens} new tokens, over the model's context of {self.max_context}"
                )
            messages = messages[2:]
            truncated = True

    def prepare(self, requests: Sequence[ChatRequest], prompt_ids: Sequence[list[int]] | None = None,
                pixel_values: Sequence[torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
        """Left-padded batch: input_ids, attention_mask, pixel_values (images in request order). `prompt_ids`:
        the requests' `self.prompt_ids`, and `pixel_values`: their `self.pixel_values` ((1, 3, R, R) or None), when
        the caller already has them."""
        seqs = list(prompt_ids) if prompt_ids is not None else [self.prompt_ids(r) for r in requests]
        length = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, length - len(s):] = torch.tensor(s)
            attention_mask[i, length - len(s):] = 1
        batch = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        if pixel_values is None:
            pixel_values = [self.pixel_values(r) for r in requests]
        images = [p for p in pixel_values if p is not None]
        if images:
            dtype = next(self.model.parameters()).dtype
            batch["pixel_values"] = torch.cat(images).to(self.device, dtype)
        return batch

    def pixel_values(self, request: ChatRequest) -> torch.Tensor | None:
        """The request's image preprocessed, (1, 3, R, R) float32, or None without an image."""
        return None if request.image is None else self.image_processor.pixel_values([request.image])

    def _generation_kwargs(self, max_new_tokens: int, temperature: float, top_p: float,
                           stop: Sequence[str] | None) -> dict[str, Any]:
        eos = [self.tokenizer.eos_token_id]
        stops = [s for s in [self.template.stop_str, *(stop or [])] if s]
        for s in stops:
            tid = self.tokenizer.convert_tokens_to_ids(s)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid not in eos:
                eos.append(tid)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens, "eos_token_id": eos, "pad_token_id": self.tokenizer.pad_token_id,
            "do_sample": temperature > 0, "use_cache": True,
        }
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    # ---- generation ----
    @torch.inference_mode()
    def generate(self, requests: Sequence[ChatRequest], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] | None = None) -> list[str]:
        """Batched generation; greedy when temperature == 0 (identical to batch size 1)."""
        if not requests:
            return []
        batch = self.prepare(requests)
        with self._lock:
            out = self.model.generate(**batch, **self._generation_kwargs(max_new_tokens, temperature, top_p, stop))
        new = out[:, batch["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [cut_at_stops(t, [self.template.stop_str, *(stop or [])]) for t in texts]

    def stream(self, request: ChatRequest, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               stop: Sequence[str] | None = None) -> Iterator[str]:
        """Yield text deltas of one request as they are generated; the concatenation equals `generate()`'s text
        (see `IncrementalText` for when text is held back)."""
        from transformers.generation.streamers import BaseStreamer

        class TokenQueue(BaseStreamer):  # generate() pushes the prompt once, then each new token
            def __init__(self) -> None:
                self.queue: queue.Queue[list[int] | None] = queue.Queue()
                self.prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if self.prompt_seen:
                    self.queue.put(value.reshape(-1).tolist())
                self.prompt_seen = True

            def end(self) -> None:
                self.queue.put(None)

        batch = self.prepare([request])
        streamer = TokenQueue()
        kwargs = dict(batch, streamer=streamer, **self._generation_kwargs(max_new_tokens, temperature, top_p, stop))
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as e:  # surfaced to the consumer below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        text = IncrementalText(self.tokenizer, self._byte_token_ids, [self.template.stop_str, *(stop or [])])
        while (item := streamer.queue.get(timeout=600)) is not None:
            for tok in item:
                delta = text.push(tok)
                if delta:
                    yield delta
            if text.stopped:
                break
        thread.join()
        if errors:
            raise errors[0]
        tail = text.finish()
        if tail:
            yield tail


def _is_official_checkpoint(path: str) -> bool:
    from ..models.loading import CheckpointError, checkpoint_kind

    try:
        return checkpoint_kind(path) == "official"
    except CheckpointError:
        return False
