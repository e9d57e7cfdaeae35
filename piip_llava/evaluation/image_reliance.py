"""Does the model look at the image? Answer loss with each record's own image vs with another record's image.

A multimodal model can lower its training loss from the text alone (answer formats, priors, an OCR-token line in
the prompt); a falling loss curve does not say that it reads the image. This measures it directly on LLaVA-format
records: the mean answer-token loss (label-masked exactly as in training) with the right images, and again with the
images of each batch rolled by one record, so every conversation gets another record's image. The gap (other minus
own, in nats per answer token) is ~0 for a model that ignores the image and grows as it reads it. Only records with
an image count; text-only records are left out (and counted).

    python -m piip_llava.evaluation.image_reliance --model-path CKPT --data-path data.json --image-folder IMGS \\
        [--num-records 256] [--batch-size 16] [--output reliance.json]

Figures for the synthetic quickstart's models are in docs/quickstart.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random

import torch
import torch.nn.functional as F

from piip_llava.constants import IGNORE_INDEX


@torch.no_grad()
def answer_loss(model, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(sum of answer-token cross-entropies, number of answer tokens) of one collated batch."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    mask = labels != IGNORE_INDEX
    nll = F.cross_entropy(logits[mask], labels[mask], reduction="sum")
    return float(nll), int(mask.sum())


@torch.no_grad()
def image_reliance(model, dataset, collator, indices: list[int], batch_size: int = 16,
                   progress: bool = True) -> dict:
    """Own-image vs rolled-image answer loss over `indices` (records with an image), `batch_size` records at a time.

    A final batch of one record cannot be rolled and is left out (counted in `records_left_out`).
    """
    from tqdm.auto import tqdm

    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (images are swapped within a batch), got {batch_size}")
    model.eval()
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    left_out = 0
    if chunks and len(chunks[-1]) < 2:
        left_out = len(chunks.pop())
    own = other = 0.0
    tokens = 0
    for chunk in tqdm(chunks, desc="image reliance", disable=not progress):
        batch = collator([dataset[i] for i in chunk])
        batch.pop("num_skipped", None)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        if "pixel_values" not in batch or batch["pixel_values"].shape[0] != len(chunk):
            raise ValueError("every record passed to image_reliance needs exactly one image")
        nll, n = answer_loss(model, batch)
        own += nll
        tokens += n
        batch["pixel_values"] = batch["pixel_values"].roll(1, 0)
        other += answer_loss(model, batch)[0]
    if tokens == 0:
        raise ValueError("no answer tokens in the selected records")
    loss_own, loss_other = own / tokens, other / tokens
    return {"records": sum(len(c) for c in chunks), "records_left_out": left_out, "answer_tokens": tokens,
            "loss_own_image": round(loss_own, 6), "loss_other_image": round(loss_other, 6),
            "gap": round(loss_other - loss_own, 6)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m piip_llava.evaluation.image_reliance",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", "--model", dest="model_path", required=True, help="checkpoint folder (save_pretrained + tokenizer)")
    parser.add_argument("--data-path", required=True, help="LLaVA-format JSON / JSONL conversations")
    parser.add_argument("--image-folder", default=None, help="root of the records' image paths [data's folder]")
    parser.add_argument("--num-records", type=int, default=256, help="image records sampled (seeded) [256]")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--conv-mode", default=None, help="conversation template (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.num_records < 2:
        parser.error("--num-records must be >= 2")

    from piip_llava.data.dataset import DataCollatorForSupervisedDataset, LazySupervisedDataset
    from piip_llava.data.tokenizer import load_tokenizer
    from piip_llava.models import PiipLlavaForConditionalGeneration, PiipLlavaProcessor

    model = PiipLlavaForConditionalGeneration.from_pretrained(args.model_path, dtype=torch.float32)
    config = model.config
    tokenizer = load_tokenizer(args.model_path)
    max_len = min(int(tokenizer.model_max_length), 1 << 20)
    dataset = LazySupervisedDataset(
        args.data_path, PiipLlavaProcessor.from_config(config, tokenizer), image_folder=args.image_folder,
        template=args.conv_mode or config.conversation_template, model_max_length=max_len, progress=args.progress)
    with_image = [i for i, m in enumerate(dataset.modality_lengths) if m > 0]
    if len(with_image) < 2:
        raise SystemExit(f"{args.data_path}: {len(with_image)} record(s) with an image; need at least 2")
    picked = sorted(random.Random(args.seed).sample(with_image, min(args.num_records, len(with_image))))
    result = image_reliance(model, dataset, DataCollatorForSupervisedDataset(tokenizer.pad_token_id, max_len),
                            picked, args.batch_size, args.progress)
    result.update(model_path=os.path.abspath(args.model_path), data_path=os.path.abspath(args.data_path),
                  text_only_records_skipped=len(dataset) - len(with_image),
                  records_skipped_as_bad=sum(dataset.skip_report().values()))
    print(f"image reliance of {args.model_path} on {result['records']} records ({result['answer_tokens']} answer "
          f"tokens): loss {result['loss_own_image']:.3f} with the right images, {result['loss_other_image']:.3f} "
          f"with another record's image, gap {result['gap']:.3f} nats/token")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
