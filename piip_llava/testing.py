"""Tiny checkpoints for tests, benchmarks and the quickstart (no download: random weights + a local tokenizer)."""
from __future__ import annotations

import os

import torch

from .data.tokenizer import load_tokenizer, train_sentencepiece_tokenizer
from .models import PiipLlavaForConditionalGeneration, align_image_token_id, load_preset, save_processor


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
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the preset's vocab {config.text_config.vocab_size}")
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
