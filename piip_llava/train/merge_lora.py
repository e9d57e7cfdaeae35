"""Merge a LoRA adapter (from `--tune lora`) into a plain PIIP-LLaVA checkpoint.

    python -m piip_llava.train.merge_lora --adapter OUT --out OUT/merged [--base OUT/base]

The adapter folder holds the LoRA matrices of the LLM plus the fully trained projector and interactions
(`modules_to_save`); its base is `--base` or the adapter's `base_model_name_or_path`. The merged folder is a normal
`save_pretrained` checkpoint + tokenizer whose logits equal the adapter model's (up to float rounding).
"""
from __future__ import annotations

import argparse
import os

import torch

from ..data.tokenizer import load_tokenizer
from ..models import PiipLlavaForConditionalGeneration, loading, save_processor


def adapter_base(adapter_dir: str, base: str | None = None) -> str:
    """The base checkpoint of an adapter folder (explicit `base` wins)."""
    return loading.adapter_base(adapter_dir, base)


def load_adapter_model(adapter_dir: str, base: str | None = None, dtype: torch.dtype = torch.float32):
    """Base checkpoint + adapter -> the (unmerged) `PeftModel`; CheckpointError for a bad adapter or base folder."""
    from peft import PeftModel

    loading.check_checkpoint(adapter_dir, "lora_adapter", "--adapter")
    base = adapter_base(adapter_dir, base)
    loading.check_checkpoint(base, "piip_llava", f"the LoRA base (of adapter {adapter_dir})")
    model = PiipLlavaForConditionalGeneration.from_pretrained(base, dtype=dtype)
    return PeftModel.from_pretrained(model, adapter_dir)


def merge_lora(adapter_dir: str, out_dir: str, base: str | None = None,
               dtype: torch.dtype = torch.float32) -> PiipLlavaForConditionalGeneration:
    """Merge and save; returns the merged model."""
    merged = load_adapter_model(adapter_dir, base, dtype).merge_and_unload()
    leftover = [n for n, _ in merged.named_parameters() if "lora_" in n or "modules_to_save" in n]
    if leftover:
        raise RuntimeError(f"merge left adapter parameters behind: {leftover[:5]}")
    merged.save_pretrained(out_dir)
    tok_dir = adapter_dir if os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json")) else adapter_base(adapter_dir, base)
    save_processor(merged.config, load_tokenizer(tok_dir), out_dir)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m piip_llava.train.merge_lora", description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="adapter folder written by `--tune lora`")
    parser.add_argument("--out", required=True, help="output folder for the merged checkpoint")
    parser.add_argument("--base", default=None, help="base checkpoint [the adapter's base_model_name_or_path]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--debug", action="store_true", help="a traceback instead of a one-line error (or PIIP_DEBUG=1)")
    args = parser.parse_args(argv)
    try:
        merge_lora(args.adapter, args.out, args.base, getattr(torch, args.dtype))
    except loading.CheckpointError as e:
        return loading.cli_error(e, args.debug)
    print(f"merged checkpoint: {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
