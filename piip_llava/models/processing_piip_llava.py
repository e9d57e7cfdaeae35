"""Image loading, image preprocessing as the official PIIP-LLaVA does it (spec 1.13), and `PiipLlavaProcessor`: the
one way text and images become model inputs (training data, chat, evaluation, `AutoProcessor`, vLLM).

Preprocessing: optional pad-to-square with the mean colour (`pad`, instruction tuning and evaluation) or
shortest-edge resize + centre crop (`square`, pre-training), bicubic resize to the highest branch resolution,
rescale 1/255, ImageNet mean/std.

Tokenisation is LLaVA's `tokenizer_image_token`: the text is cut at each `<image>`, each chunk is tokenised on its
own (so the text after an image gets a fresh SentencePiece `▁`), one BOS goes in front, and each image becomes
`num_image_tokens` copies of the image token. `<image>` is an added special token of the tokenizer whose id is the
config's `image_token_id`, so engines that tokenise a whole prompt at once (vLLM) find it; the replacement they are
given (`text_replacement_offsets`) carries the `▁` that the chunk-wise encoding puts after an image, so their token
ids equal ours.
"""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import MultiModalData, ProcessorMixin

from .configuration_piip_llava import AUTO_MAP, save_remote_code
from ..constants import DEFAULT_MAX_IMAGE_PIXELS, IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGENET_MEAN, IMAGENET_STD
from ..data.conversation import (
    ConversationTemplate,
    bos_ids,
    chat_template_jinja,
    get_template,
    tokenize_conversation,
    tokenize_prompt,
)


class ImageLoadError(ValueError):
    """An input could not be used as an image (not an image, unreadable, too large)."""


ImageDecode = Literal["official", "friendly"]


def load_image(source: str | bytes | os.PathLike | Image.Image, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               decode: ImageDecode = "friendly", square_canvas: bool = False) -> Image.Image:
    """Open a path / raw bytes / PIL image as an RGB PIL image.

    Refuses images over `max_pixels` before decoding them; with `square_canvas` (`pad` preprocessing pastes the
    image on a square of its longer side) that square is held to the limit too, also from the header: a
    64000 x 1000 image is 64 megapixels but would need a 4-gigapixel canvas. `decode="friendly"` (chat uploads) applies the EXIF
    orientation and composites transparency on white; `decode="official"` is what the official loaders do,
    `Image.open(p).convert('RGB')` (no EXIF rotation, alpha dropped), so evaluation and training data see the
    pixels the published models were trained and scored on. Raises `ImageLoadError` naming the source.
    """
    if decode not in ("official", "friendly"):
        raise ValueError(f"decode must be 'official' or 'friendly', got {decode!r}")
    name = "<bytes>" if isinstance(source, bytes | bytearray) else str(getattr(source, "filename", None) or source)
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else open(source, "rb")  # noqa: SIM115
        except OSError as e:
            raise ImageLoadError(f"cannot open image {name}: {e}") from e
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(fp)
                w, h = image.size  # header only, nothing decoded yet
                side = max(w, h)
                if square_canvas and side * side > max_pixels:
                    raise ImageLoadError(f"image of {w}x{h} pixels would be padded to a {side}x{side} square "
                                         f"({side * side} pixels), over the limit of {max_pixels}")
                if w * h > max_pixels:
                    raise ImageLoadError(f"image {name} has {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
                image.load()
        except ImageLoadError:
            fp.close()
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            fp.close()
            raise ImageLoadError(f"{name} is not a readable image: {e}") from e
        fp.close()
    w, h = image.size
    if w * h > max_pixels:
        raise ImageLoadError(f"image {name} has {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    if decode == "official":
        return image.convert("RGB")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def open_image_official(source: str | bytes | os.PathLike | Image.Image,
                        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """`Image.open(p).convert('RGB')` as LLaVA's training and evaluation loaders do, with the pixel limit and
    `ImageLoadError` of `load_image` (evaluation and training data)."""
    return load_image(source, max_pixels, decode="official")


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square, image centred (LLaVA's `expand2square`)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


class PiipLlavaImageProcessor(BaseImageProcessor):
    """PIL images -> `pixel_values` (N, 3, R, R) float32 at the highest branch resolution R.

    Saved inside `processor_config.json`; `size` ({height, width} = R) is what vLLM reads to size its dummy images.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 336,
        aspect_mode: Literal["pad", "square"] = "pad",
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        **kwargs,
    ) -> None:
        kwargs.pop("size", None)  # derived from image_size
        super().__init__(**kwargs)
        if aspect_mode not in ("pad", "square"):
            raise ValueError(f"aspect_mode must be 'pad' or 'square', got {aspect_mode!r}")
        self.image_size = int(image_size)
        self.aspect_mode = aspect_mode
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(m) for m in image_std]
        self.size = {"height": self.image_size, "width": self.image_size}

    @classmethod
    def from_config(cls, config, aspect_mode: Literal["pad", "square"] | None = None) -> PiipLlavaImageProcessor:
        return cls(config.vision_config.image_size, aspect_mode or config.image_aspect_ratio, config.image_mean,
                   config.image_std)

    @property
    def background(self) -> tuple[int, int, int]:
        return tuple(int(m * 255) for m in self.image_mean)

    def preprocess_one(self, image: Image.Image) -> np.ndarray:
        image = image if image.mode == "RGB" else load_image(image)
        if self.aspect_mode == "pad":
            image = expand_to_square(image, self.background)
        size = self.image_size
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)  # shortest edge -> size, as CLIPImageProcessor
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        if (new_w, new_h) != (size, size):
            image = image.crop((left, top, left + size, top + size))
        arr = np.asarray(image, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.image_mean, dtype=np.float32)) / np.asarray(self.image_std, dtype=np.float32)
        return arr.transpose(2, 0, 1)

    def pixel_values(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """(N, 3, R, R) float32."""
        if isinstance(images, Image.Image):
            images = [images]
        images = [_as_pil(im) for im in images]
        if not images:
            return torch.empty(0, 3, self.image_size, self.image_size)
        return torch.from_numpy(np.stack([self.preprocess_one(im) for im in images]))

    def preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        """The `BaseImageProcessor` entry point: a `BatchFeature` with `pixel_values`."""
        if not isinstance(images, list | tuple):
            images = [images]
        flat = [im for item in images for im in (item if isinstance(item, list | tuple) else [item])]
        return BatchFeature({"pixel_values": self.pixel_values(flat)}, tensor_type=return_tensors)


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):  # HWC uint8, as vLLM and datasets may pass
        return Image.fromarray(image)
    if isinstance(image, torch.Tensor):  # CHW uint8
        return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    raise TypeError(f"expected a PIL image, a HWC uint8 array or a CHW uint8 tensor, got {type(image).__name__}")


def expand_image_tokens(
    input_ids: Sequence[int], labels: Sequence[int] | None, image_token_id: int, num_image_tokens: int
) -> tuple[list[int], list[int] | None]:
    """Repeat every `image_token_id` `num_image_tokens` times (labels IGNORE_INDEX at those positions)."""
    ids: list[int] = []
    out_labels: list[int] | None = [] if labels is not None else None
    for i, tok in enumerate(input_ids):
        if tok == image_token_id:
            ids.extend([image_token_id] * num_image_tokens)
            if out_labels is not None:
                out_labels.extend([IGNORE_INDEX] * num_image_tokens)
        else:
            ids.append(tok)
            if out_labels is not None:
                out_labels.append(labels[i])
    return ids, out_labels


def align_image_token_id(config, tokenizer, image_token: str = IMAGE_PLACEHOLDER) -> int:
    """Set `config.image_token_id` to the id `image_token` has (or will get when the processor adds it) in
    `tokenizer`; returns it. With a tokenizer as large as the LLM vocabulary that is `vocab_size` (outside the
    embedding table, the default); with a smaller one (Qwen2 pads its vocabulary) it is the next free id."""
    vocab = tokenizer.get_vocab()
    config.image_token_id = int(vocab[image_token]) if image_token in vocab else len(tokenizer)
    return config.image_token_id


def add_image_token(tokenizer, image_token: str = IMAGE_PLACEHOLDER) -> int:
    """Make `image_token` an added special token of `tokenizer` (once); return its id."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    return int(tokenizer.convert_tokens_to_ids(image_token))


class PiipLlavaProcessor(ProcessorMixin):
    """Image processor + tokenizer + chat template: `processor(images=..., text=...)` -> model inputs.

    The conversation template (`vicuna_v1`, `plain`, `llama3`, `qwen2`, `mistral`) is both a Jinja chat template
    (`apply_chat_template`, saved as `chat_template.jinja`) and the structured template that training labels come
    from (`encode_conversation`), so prompts at training and at inference are the same string and the same ids.
    """


    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_token: str = IMAGE_PLACEHOLDER,
        num_image_tokens: int = 576,
        conversation_template: str = "vicuna_v1",
        image_token_id: int | None = None,
        **kwargs,
    ) -> None:
        template = get_template(conversation_template)
        vocab = tokenizer.get_vocab()
        if image_token in vocab or image_token_id is None or image_token_id == len(tokenizer):
            found = add_image_token(tokenizer, image_token)
        else:  # a checkpoint of an earlier version: tokenizer smaller than the LLM vocabulary, image id = vocab size
            warnings.warn(f"the tokenizer has no {image_token} token and cannot give it the id {image_token_id}; "
                          "this package's own paths work, engines that tokenise whole prompts (vLLM) need the "
                          "checkpoint re-saved with align_image_token_id + save_processor", stacklevel=2)
            found = image_token_id
        prefix = prompt_prefix(tokenizer)
        if chat_template is None:
            chat_template = chat_template_jinja(template, prefix)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_token = image_token
        self.num_image_tokens = int(num_image_tokens)
        self.conversation_template = template.name
        if image_token_id is not None and found != image_token_id:
            raise ValueError(
                f"the tokenizer gives {image_token!r} the id {found} but the model's image_token_id is "
                f"{image_token_id}; build the config with image_token_id={found} (or use the tokenizer the model was "
                "trained with)")
        self.image_token_id = found
        self._image_tail = _tail_after_special(tokenizer, image_token)
        self._prompt_prefix, self._bos = prefix, bos_ids(tokenizer)  # probed once: encode_text runs per request

    @classmethod
    def from_config(cls, config, tokenizer, aspect_mode: Literal["pad", "square"] | None = None,
                    template: str | ConversationTemplate | None = None) -> PiipLlavaProcessor:
        """The processor of a model config (`image_token_id`, `num_image_tokens`, preprocessing, template)."""
        name = get_template(template or config.conversation_template).name
        return cls(PiipLlavaImageProcessor.from_config(config, aspect_mode), tokenizer,
                   num_image_tokens=config.num_image_tokens, conversation_template=name,
                   image_token_id=config.image_token_id)

    @property
    def template(self) -> ConversationTemplate:
        return get_template(self.conversation_template)

    # ---- HF API ----
    def __call__(self, images=None, text: str | list[str] | None = None, add_special_tokens: bool = True,
                 padding: bool | str = False, return_tensors: str | None = None,
                 return_text_replacement_offsets: bool = False, return_mm_token_type_ids: bool = False,
                 **kwargs) -> BatchFeature:
        """`text` (one or a batch) with one `<image>` per image, in order -> `input_ids`, `attention_mask`,
        `pixel_values` (N, 3, R, R). Padding follows `tokenizer.padding_side`."""
        data: dict = {}
        pil = []
        if images is not None:
            items = images if isinstance(images, list | tuple) else [images]
            pil = [im for item in items for im in (item if isinstance(item, list | tuple) else [item])]
            data["pixel_values"] = self.image_processor.pixel_values(pil)
        if text is None:
            return BatchFeature(data, tensor_type=return_tensors)
        texts = [text] if isinstance(text, str) else list(text)
        n_slots = sum(t.count(self.image_token) for t in texts)
        if images is not None and n_slots != len(pil):
            raise ValueError(f"{n_slots} {self.image_token} placeholder(s) in the text but {len(pil)} image(s)")
        seqs, offsets = [], []
        for t in texts:
            seqs.append(self.encode_text(t, add_special_tokens))
            offsets.append(self._replacement_offsets(t))
        data.update(self._pad(seqs, padding, return_tensors))
        if return_text_replacement_offsets:
            data["text_replacement_offsets"] = offsets
        if return_mm_token_type_ids:
            data["mm_token_type_ids"] = [[int(i == self.image_token_id) for i in s] for s in data["input_ids"]]
        skip = ["text_replacement_offsets"]
        try:
            return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=skip)
        except TypeError:  # transformers < 5.19 has no skip_tensor_conversion
            return BatchFeature(data, tensor_type=return_tensors)

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """LLaVA's `tokenizer_image_token` with each image slot expanded to `num_image_tokens` ids."""
        tok = self.tokenizer
        has_bos = False
        prefix = self._prompt_prefix
        if prefix and text.startswith(prefix):  # the chat template writes BOS (+ a space) itself
            text, has_bos = text[len(prefix):], True
        ids: list[int] = list(self._bos) if has_bos or add_special_tokens else []
        for i, chunk in enumerate(text.split(self.image_token)):
            if i > 0:
                ids.extend([self.image_token_id] * self.num_image_tokens)
            if chunk:
                ids.extend(tok(chunk, add_special_tokens=False)["input_ids"])
        return ids

    def _replacement_offsets(self, text: str) -> list[dict]:
        out, shift, pos = [], 0, 0
        replacement = self.image_token * self.num_image_tokens + self._image_tail
        while (start := text.find(self.image_token, pos)) >= 0:
            end = start + len(self.image_token)
            out.append({"type": "image", "span": (start, end), "new_span": (start + shift, start + shift + len(replacement)),
                        "text": self.image_token, "replacement": replacement})
            shift += len(replacement) - len(self.image_token)
            pos = end
        return out

    def _pad(self, seqs: list[list[int]], padding, return_tensors) -> dict:
        if not padding and len({len(s) for s in seqs}) > 1 and return_tensors is not None:
            raise ValueError("texts of different lengths need padding=True to become one tensor")
        length = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        left = self.tokenizer.padding_side == "left"
        ids, mask = [], []
        for s in seqs:
            fill = [pad] * (length - len(s)) if padding else []
            ones, zeros = [1] * len(s), [0] * len(fill)
            ids.append(fill + s if left else s + fill)
            mask.append(zeros + ones if left else ones + zeros)
        return {"input_ids": ids, "attention_mask": mask}

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Every image becomes `num_image_tokens` visual tokens (one pixel_values row), whatever its size."""
        n = len(image_sizes or [])
        return MultiModalData(num_image_tokens=[self.num_image_tokens] * n, num_image_patches=[1] * n)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`ProcessorMixin.save_pretrained` + `auto_map` entries and the code files (loads with `trust_remote_code`)."""
        self.auto_map = {"AutoProcessor": AUTO_MAP["AutoProcessor"]}
        self.image_processor.auto_map = {"AutoImageProcessor": "processing_piip_llava.PiipLlavaImageProcessor",
                                         "AutoProcessor": AUTO_MAP["AutoProcessor"]}
        out = super().save_pretrained(save_directory, *args, **kwargs)
        save_remote_code(str(save_directory))
        return out

    # ---- the structured path used by training, chat and evaluation ----
    def encode_conversation(self, conversations: Sequence[dict], has_image: bool,
                            template: str | ConversationTemplate | None = None) -> tuple[list[int], list[int]]:
        """LLaVA-format turns -> (input_ids, labels), image expanded; labels IGNORE_INDEX except answers."""
        tpl = get_template(template or self.template)
        ids, labels = tokenize_conversation(conversations, self.tokenizer, tpl, has_image, self.image_token_id)
        return expand_image_tokens(ids, labels, self.image_token_id, self.num_image_tokens)

    def encode_messages(self, messages: Sequence[dict], has_image: bool,
                        template: str | ConversationTemplate | None = None) -> list[int]:
        """Chat messages (ending with a user turn) -> generation prompt ids, image expanded."""
        tpl = get_template(template or self.template)
        ids = tokenize_prompt(messages, self.tokenizer, tpl, has_image, self.image_token_id)
        return expand_image_tokens(ids, None, self.image_token_id, self.num_image_tokens)[0]

    def expand(self, input_ids: Sequence[int], labels: Sequence[int] | None = None):
        return expand_image_tokens(input_ids, labels, self.image_token_id, self.num_image_tokens)


def save_processor(config, tokenizer, out_dir: str) -> PiipLlavaProcessor:
    """Write the model's processor (tokenizer with `<image>`, image processor, chat template, code) to `out_dir`.

    Works on a copy: the caller's tokenizer is left as it was."""
    import copy

    processor = PiipLlavaProcessor.from_config(config, copy.deepcopy(tokenizer))
    processor.save_pretrained(out_dir)
    return processor


def prompt_prefix(tokenizer) -> str:
    """What the chat template writes before the conversation: BOS (for tokenizers that add one) followed by the text
    that makes a one-pass encoding start the first chunk as a fresh encoding does; "" for Qwen2."""
    if not bos_ids(tokenizer):
        return ""
    return tokenizer.bos_token + _tail_after_special(tokenizer, tokenizer.bos_token, probe="A chat")


def _tail_after_special(tokenizer, special: str, probe: str = "\nx") -> str:
    """Text that, tokenised right after `special` in one pass, gives what chunk-wise tokenisation puts at the start
    of the next chunk: " " for SentencePiece tokenizers that add a dummy `▁` to each chunk (and none after special
    tokens), "" for byte-level BPE."""
    chunk = tokenizer(probe, add_special_tokens=False)["input_ids"]
    joint = tokenizer(special + probe, add_special_tokens=False)["input_ids"][1:]
    if chunk == joint:
        return ""
    if tokenizer(special + " " + probe, add_special_tokens=False)["input_ids"][1:] == chunk:
        return " "
    warnings.warn(f"this tokenizer encodes the text after {special} differently in one pass than chunk-wise; engines "
                  "that tokenise whole prompts (vLLM) will see slightly different ids than training did", stacklevel=3)
    return ""
