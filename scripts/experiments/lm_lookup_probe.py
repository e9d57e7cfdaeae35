"""Can the quickstart's random-init LLM learn the in-context lookups of `lm_pretrain.json`, and how fast?

Trains the preset's LLM alone (a plain loop, no images, one thread) on fresh `synthetic.lm_pretrain_record`
conversations and prints, every `--eval-every` steps, the accuracy of the first answer token on held-out one-question
records, split by kind: colour-named word ("What word is written in red?"), multiple choice about the described scene,
multiple choice with the answer stated in the hint, and the other short answers. The table in docs/quickstart.md
("Language pretraining") was measured with this loop (same model, data and evaluation; its random streams differed,
so expect a few points of difference); ~0.5 s per step on one core of the 2-core machine.

    python scripts/experiments/lm_lookup_probe.py --tokenizer outputs/quickstart/tokenizer --steps 1500
"""
from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict

import torch
from transformers import AutoTokenizer, AutoModelForCausalLM

from piip_llava.constants import IGNORE_INDEX
from piip_llava.data import synthetic
from piip_llava.data.conversation import tokenize_conversation
from piip_llava.data.dataset import DataCollatorForSupervisedDataset
from piip_llava.models import load_preset


def kind_of(question: str) -> str:
    if question.endswith(synthetic.MC_ANSWER_PROMPT):
        return "mc_stated" if "The answer is " in question else "mc_scene"
    if any(f"written in {c}?" in question for c in synthetic.COLORS):
        return "colour_word"
    return "other"


def collate(conversations: list[list[dict]], tokenizer) -> dict[str, torch.Tensor]:
    """Text-only conversations -> the training collator's padded input_ids / labels / attention_mask."""
    samples = []
    for conv in conversations:
        ids, labels = tokenize_conversation(conv, tokenizer, "vicuna_v1", has_image=False)
        samples.append({"input_ids": ids, "labels": labels})
    return DataCollatorForSupervisedDataset(tokenizer.pad_token_id, model_max_length=4096)(samples)


@torch.no_grad()
def first_answer_accuracy(model, tokenizer, records: list[tuple[str, list[dict]]]) -> dict[str, float]:
    model.eval()
    right = defaultdict(list)
    for k in range(0, len(records), 32):
        chunk = records[k:k + 32]
        batch = collate([c for _, c in chunk], tokenizer)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        target = batch["labels"][:, 1:]
        first = (target != IGNORE_INDEX).float().argmax(1)
        rows = torch.arange(len(chunk))
        hits = (logits.argmax(-1)[rows, first] == target[rows, first]).tolist()
        for (kind, _), hit in zip(chunk, hits):
            right[kind].append(hit)
    model.train()
    return {kind: sum(v) / len(v) for kind, v in sorted(right.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="the quickstart's tokenizer folder")
    parser.add_argument("--preset", default="mini-piip2_clip-ls_64-128", help="its text_config is the LLM")
    parser.add_argument("--layers", type=int, default=None, help="override the LLM's number of layers")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--turns", type=int, default=synthetic.LM_PRETRAIN_TURNS)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    text_config = load_preset(args.preset).text_config
    if args.layers:
        text_config.num_hidden_layers = args.layers
    model = AutoModelForCausalLM.from_config(text_config)
    held_out = []
    for i in range(256):
        conv = synthetic.lm_pretrain_record(i, random.Random(f"probe-eval-{i}"), 128, "fixed", turns=1)
        held_out.append((kind_of(conv["conversations"][0]["value"]), conv["conversations"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng, start, index = random.Random(f"probe-train-{args.seed}"), time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        batch = []
        for _ in range(args.batch):
            batch.append(synthetic.lm_pretrain_record(index, rng, 128, "fixed", args.turns)["conversations"])
            index += 1
        loss = model(**collate(batch, tokenizer)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % args.eval_every == 0:
            acc = first_answer_accuracy(model, tokenizer, held_out)
            print(f"step {step}  loss {loss.item():.3f}  " + "  ".join(f"{k} {v:.2f}" for k, v in acc.items())
                  + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
