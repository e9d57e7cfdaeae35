"""Image loading, image preprocessing as the official PIIP-LLaVA does it (spec 1.13), image-token expansion and the
`PiipLlavaProcessor` that bundles the image processor with a tokenizer.

Preprocessing: optional pad-to-square with the mean colour (`pad`, instruction tuning and evaluation) or
shortest-edge resize + centre crop (`square`, pre-training), bicubic resize to the highest branch resolution,
rescale 1/255, ImageNet mean/std.
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

from ..constants import DEFAULT_MAX_IMAGE_PIXELS, IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD


class ImageLoadError(ValueError):
    """An input could not be used as an image (not an image, unreadable, too large)."""


def load_image(source: str | bytes | os.PathLike | Image.Image, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open a path / raw bytes / PIL image as an RGB PIL image.

    Refuses images over `max_pixels` before decoding them, applies the EXIF orientation, and converts palette,
    grayscale, CMYK and RGBA images (alpha composited on white) to RGB. Raises `ImageLoadError` naming the source.
    """
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
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square, image centred (LLaVA's `expand2square`)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


class PiipLlavaImageProcessor:
    """PIL images -> `pixel_values` (N, 3, R, R) float32 at the highest branch resolution R."""

    def __init__(
        self,
        image_size: int,
        aspect_mode: Literal["pad", "square"] = "pad",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if aspect_mode not in ("pad", "square"):
            raise ValueError(f"aspect_mode must be 'pad' or 'square', got {aspect_mode!r}")
        self.image_size = int(image_size)
        self.aspect_mode = aspect_mode
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.background = tuple(int(m * 255) for m in mean)

    @classmethod
    def from_config(cls, config, aspect_mode: Literal["pad", "square"] | None = None) -> PiipLlavaImageProcessor:
        return cls(config.vision_config.image_size, aspect_mode or config.image_aspect_ratio, config.image_mean, config.image_std)

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
        arr = (arr - self.mean) / self.std
        return arr.transpose(2, 0, 1)

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        if isinstance(images, Image.Image):
            images = [images]
        if not images:
            return torch.empty(0, 3, self.image_size, self.image_size)
        return torch.from_numpy(np.stack([self.preprocess_one(im) for im in images]))


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


class PiipLlavaProcessor:
    """Image processor + tokenizer + image-token bookkeeping for one model config."""

    def __init__(self, image_processor: PiipLlavaImageProcessor, tokenizer, image_token_id: int, num_image_tokens: int):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens

    @classmethod
    def from_config(cls, config, tokenizer, aspect_mode: Literal["pad", "square"] | None = None) -> PiipLlavaProcessor:
        return cls(
            PiipLlavaImageProcessor.from_config(config, aspect_mode), tokenizer, config.image_token_id, config.num_image_tokens
        )

    def expand(self, input_ids: Sequence[int], labels: Sequence[int] | None = None):
        return expand_image_tokens(input_ids, labels, self.image_token_id, self.num_image_tokens)
