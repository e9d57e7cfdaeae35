"""Tokenizer helpers: train a tiny Llama/Vicuna-style SentencePiece tokenizer offline, load any HF tokenizer folder.

`train_sentencepiece_tokenizer` reproduces the properties of the Llama-2 / Vicuna tokenizer that LLaVA's prompt
building and label masking depend on (BPE with byte fallback, `<unk>`=0, `<s>`=1, `</s>`=2, a `▁` dummy prefix,
newline as a byte token), in a vocabulary small enough to train in well under a second. Tests and tiny training runs
use it instead of a download.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Iterable

from piip_llava.constants import IMAGE_PLACEHOLDER

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

_WORDS = (
    "the a an of to and in is it that this what which who where when why how color colour picture image photo "
    "describe detail object objects person people man woman child dog cat car bus tree sky street table room "
    "red blue green yellow black white brown left right top bottom front behind near next on under over there "
    "are was were be can could would should do does did not no yes answer question single word phrase option "
    "letter given choices directly provide one sentence caption for provided region box text sign number "
    "many much some all any two three four five cat dog sitting standing holding wearing looking playing "
    "please explain why happened scene visible shown appear appears kind type shape size small large big "
    "I you he she we they my your his her our their with from by at as or but if then so because"
).split()
_PUNCT = list(".,;:!?'\"()[]{}-_/\\@#$%&*+=<>|~`^")


def default_corpus(num_lines: int = 3000, seed: int = 0) -> list[str]:
    """A deterministic small English corpus that covers chat-template strings, digits and punctuation."""
    rng = random.Random(seed)
    lines = [
        VICUNA_SYSTEM,
        f"{VICUNA_SYSTEM} USER: {IMAGE_PLACEHOLDER}\nWhat is it? ASSISTANT: Cat</s>USER: Color? ASSISTANT: Black</s>",
        "Answer the question using a single word or phrase.",
        "Answer with the option's letter from the given choices directly.",
        "Provide a one-sentence caption for the provided image.",
        "0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 [0.12, 0.34, 0.56, 0.78]",
        " ".join(_PUNCT),
    ]
    for _ in range(num_lines):
        kind = rng.randrange(5)
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        sent = " ".join(words)
        if kind == 0:
            lines.append(f"USER: {sent.capitalize()}? ASSISTANT: {rng.choice(_WORDS).capitalize()}.")
        elif kind == 1:
            lines.append(f"{sent.capitalize()}{rng.choice('.!?')} {rng.randint(0, 9999)}")
        elif kind == 2:
            lines.append(f"{IMAGE_PLACEHOLDER}\n{sent.capitalize()}{rng.choice(_PUNCT)}")
        elif kind == 3:
            lines.append(f"({rng.choice(_WORDS)}) {sent}, {rng.choice(_WORDS)}; \"{rng.choice(_WORDS)}\"")
        else:
            lines.append(f"A. {rng.choice(_WORDS)}\nB. {rng.choice(_WORDS)}\nC. {rng.choice(_WORDS)}")
    return lines


def train_sentencepiece_tokenizer(out_dir: str, vocab_size: int = 512, texts: Iterable[str] | None = None,
                                  model_max_length: int = 2048) -> str:
    """Train a Llama-style SentencePiece BPE tokenizer on `texts` and write a `from_pretrained`-loadable folder.

    The folder holds `tokenizer.model`, `tokenizer_config.json` (LlamaTokenizer, add_bos_token true,
    add_eos_token false, pad = unk, right padding, legacy false as in Vicuna-1.5) and `special_tokens_map.json`.
    Returns `out_dir`.
    """
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    lines = list(texts) if texts is not None else default_corpus()
    if not lines:
        raise ValueError("train_sentencepiece_tokenizer: `texts` is empty")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line.replace("\n", " ").strip() + "\n")
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=prefix, vocab_size=vocab_size, hard_vocab_limit=False, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", add_dummy_prefix=True,
            remove_extra_whitespaces=False, split_digits=True, num_threads=1, minloglevel=2,
        )
        with open(prefix + ".model", "rb") as src, open(os.path.join(out_dir, "tokenizer.model"), "wb") as dst:
            dst.write(src.read())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "padding_side": "right",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    return out_dir


def load_tokenizer(path: str, model_max_length: int | None = None, padding_side: str = "right"):
    """Load an HF tokenizer folder (or hub id, offline cache) and make sure it has a pad token.

    Pad = unk for Llama-style tokenizers that have an unk token (LLaVA-1.5's choice, pad id 0), else pad = eos.
    """
    from transformers import AutoTokenizer

    kwargs = {"padding_side": padding_side}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    tok.padding_side = padding_side
    if model_max_length is not None:
        tok.model_max_length = model_max_length
    if tok.pad_token is None:
        if tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        elif tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            raise ValueError(f"tokenizer at {path!r} has neither unk nor eos token to use as padding")
    return tok


def main(argv: list[str] | None = None) -> int:
    """`python -m piip_llava.data.tokenizer --out DIR [--vocab-size N] [--from-llava A.json B.json ...]`."""
    import argparse

    parser = argparse.ArgumentParser(description="Train a small Llama-style SentencePiece tokenizer offline.")
    parser.add_argument("--out", required=True, help="output folder (loadable with AutoTokenizer.from_pretrained)")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--model-max-length", type=int, default=2048)
    parser.add_argument("--from-llava", nargs="*", default=None,
                        help="LLaVA-format JSON files whose conversation text (plus the built-in corpus) trains it")
    args = parser.parse_args(argv)
    texts = None
    if args.from_llava:
        texts = default_corpus()
        for path in args.from_llava:
            with open(path, encoding="utf-8") as f:
                for record in json.load(f):
                    texts.extend(turn["value"].replace(IMAGE_PLACEHOLDER, "") for turn in record["conversations"])
    train_sentencepiece_tokenizer(args.out, args.vocab_size, texts, model_max_length=args.model_max_length)
    tok = load_tokenizer(args.out)
    print(f"tokenizer with {len(tok)} tokens written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
