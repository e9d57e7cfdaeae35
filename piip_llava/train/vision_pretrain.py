"""Stage 0: supervised pretraining of the vision side (branches + interactions + projector) on labelled images.

The official recipe starts every branch from a pretrained backbone (CLIP, DeiT, InternViT, ConvNeXt), so from the
first alignment step the visual tokens already describe the image. With nothing to download (the tiny presets and
the synthetic quickstart) the branches start random, and an LLM trained end to end on random visual tokens learns to
ignore them; this stage gives the branches what backbone pretraining gives real ones, at toy scale (about 2 minutes on
a 2-core CPU; the measurements are in docs/quickstart.md).

The model is the whole `PiipLlavaForConditionalGeneration` (from a preset, a config JSON or a checkpoint of ours), so
the output is a normal checkpoint that stage 1 continues from (`MODEL_PATH`); only `vision_tower` and
`multi_modal_projector` train. The probe is one linear layer per label field on the *flattened* visual tokens (the
same tokens the LLM reads, position by position), discarded afterwards.

Data: a JSON list of `{"image": "relative/path.png", "labels": {"field": "value", ...}}`, every record with the same
fields (the synthetic generator writes `stage0.json`). Classes per field are the sorted distinct values. Records may
also carry `"regions": [{"box": [x0, y0, x1, y1], "labels": {"field": "value"}}]` (pixel boxes of a square image):
then every visual token is also classified by the region under it (`TokenProbe`).

    python -m piip_llava.train.vision_pretrain --data-path DATA/stage0.json --image-folder DATA \\
        --preset mini-piip2_clip-ls_64-128 --tokenizer-path TOK --output-dir RUN/stage0 --max-steps 2000
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from piip_llava.models.processing_piip_llava import ImageLoadError, PiipLlavaImageProcessor, load_image, save_processor

METRICS_FILE = "vision_pretrain_metrics.json"


@dataclass
class VisionPretrainArguments:
    """Everything stage 0 needs; `main` parses the same names with dashes."""

    data_path: str
    image_folder: str
    output_dir: str
    preset: str | None = None
    config: str | None = None
    model_path: str | None = None
    tokenizer_path: str | None = None
    max_steps: int = 2000
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    #: weight of the per-token (region) fields' mean loss against the image-level fields' mean: the per-token code is
    #: what lets an LLM find a word by its colour, and is learnt far more slowly (docs/quickstart.md)
    token_loss_weight: float = 3.0
    num_eval: int | None = None  # None: min(256, 10% of the records)
    eval_steps: int = 500
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        sources = [s for s in (self.preset, self.config, self.model_path) if s]
        if len(sources) != 1:
            raise ValueError("give exactly one of --preset, --config or --model-path")
        for name in ("max_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.token_loss_weight < 0:
            raise ValueError(f"--token-loss-weight must be >= 0, got {self.token_loss_weight}")
        if self.num_eval is not None and self.num_eval < 0:
            raise ValueError(f"--num-eval must be >= 0, got {self.num_eval}")


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------

def load_label_records(path: str) -> tuple[list[dict], dict[str, list[str]]]:
    """Read and validate the labels JSON -> (records, {field: sorted class names}). Errors name the record and field."""
    with open(path, encoding="utf-8") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{'image', 'labels'}} records")
    fields: list[str] | None = None
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
            raise ValueError(f"{path}: record {i}: needs an 'image' path (string)")
        fields = _check_labels(rec.get("labels"), fields, f"{path}: record {i} ({rec['image']})", "record")
    assert fields is not None
    classes = {k: sorted({str(r["labels"][k]) for r in records}) for k in fields}
    return records, classes


def _check_labels(labels: object, fields: list[str] | None, where: str, first: str) -> list[str]:
    """Check one `labels` object (non-empty, string or int values, the same fields as the `first` one seen, whose
    sorted fields are `fields`, None for the first) and return its sorted fields; errors start with `where`."""
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{where}: needs a non-empty 'labels' object")
    if fields is not None and sorted(labels) != fields:
        raise ValueError(f"{where}: label fields {sorted(labels)} differ from the first {first}'s {fields}")
    for k, v in labels.items():
        if not isinstance(v, (str, int)):
            raise ValueError(f"{where}: label {k!r} must be a string or int, got {v!r}")
    return sorted(labels)


def region_classes(path: str, records: list[dict]) -> dict[str, list[str]]:
    """Classes of the per-token fields of the records' ``regions`` (``{}`` when no record has any).

    A region is ``{"box": [x0, y0, x1, y1], "labels": {field: value}}`` in the image's pixel coordinates; every
    region of every record has the same fields. Class 0 of each field is ``"none"`` (a token that no region covers).
    """
    with_regions = [i for i, r in enumerate(records) if "regions" in r]
    if not with_regions:
        return {}
    if len(with_regions) != len(records):
        missing = next(i for i, r in enumerate(records) if "regions" not in r)
        raise ValueError(f"{path}: record {missing} ({records[missing]['image']}) has no 'regions' while record "
                         f"{with_regions[0]} has: give regions for every record or none")
    fields: list[str] | None = None
    values: dict[str, set[str]] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec["regions"], list):
            raise ValueError(f"{path}: record {i} ({rec['image']}): 'regions' must be a list")
        for j, region in enumerate(rec["regions"]):
            where = f"{path}: record {i} ({rec['image']}): regions[{j}]"
            box = region.get("box") if isinstance(region, dict) else None
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                    and box[0] < box[2] and box[1] < box[3]):
                raise ValueError(f"{where}: 'box' must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1, got {box!r}")
            fields = _check_labels(region.get("labels"), fields, where, "region")
            for k, v in region["labels"].items():
                values.setdefault(k, set()).add(str(v))
    return {k: ["none", *sorted(v - {"none"})] for k, v in sorted(values.items())}


def token_targets(regions: list[dict], index: dict[str, dict[str, int]], image_size: tuple[int, int],
                  grid: int, min_cover: float = 0.1) -> torch.Tensor:
    """Per-token classes (fields, grid * grid), row-major like the visual tokens: each grid cell takes the labels of
    the region covering most of it, if that covers at least `min_cover` of the cell, else class 0 ("none")."""
    width, height = image_size
    cw, ch = width / grid, height / grid
    out = torch.zeros(len(index), grid * grid, dtype=torch.long)
    for r in range(grid):
        for c in range(grid):
            x0, y0 = c * cw, r * ch
            best, best_area = None, min_cover * cw * ch
            for region in regions:
                bx0, by0, bx1, by1 = region["box"]
                area = max(0.0, min(bx1, x0 + cw) - max(bx0, x0)) * max(0.0, min(by1, y0 + ch) - max(by0, y0))
                if area >= best_area:
                    best, best_area = region, area
            if best is not None:
                for k, (name, field_index) in enumerate(index.items()):
                    out[k, r * grid + c] = field_index[str(best["labels"][name])]
    return out


class LabelledImageDataset(Dataset):
    """Records -> (pixel_values (3, R, R), targets (num_fields,) long, token targets (num_region_fields, T) long).

    Token targets need square images (the processor then only rescales, so a box maps onto the token grid as is)."""

    def __init__(self, records: list[dict], classes: dict[str, list[str]], image_folder: str,
                 processor: PiipLlavaImageProcessor, token_classes: dict[str, list[str]] | None = None,
                 grid: int = 0):
        self.records, self.image_folder, self.processor = records, image_folder, processor
        self.fields = list(classes)
        self.index = {k: {c: i for i, c in enumerate(v)} for k, v in classes.items()}
        self.token_index = {k: {c: i for i, c in enumerate(v)} for k, v in (token_classes or {}).items()}
        self.grid = grid
        self._token_targets: dict[int, torch.Tensor] = {}  # per record: computed once, reused every epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rec = self.records[i]
        path = os.path.join(self.image_folder, rec["image"])
        try:
            image = load_image(path)
        except ImageLoadError as e:
            raise ImageLoadError(f"record {i}: {e}") from e
        target = torch.tensor([self.index[k][str(rec["labels"][k])] for k in self.fields])
        tokens = torch.zeros(0, self.grid * self.grid, dtype=torch.long)
        if self.token_index:
            if image.width != image.height:
                raise ValueError(f"record {i} ({rec['image']}): per-token region labels need a square image, got "
                                 f"{image.width}x{image.height}")
            if i not in self._token_targets:
                self._token_targets[i] = token_targets(rec["regions"], self.token_index, image.size, self.grid)
            tokens = self._token_targets[i]
        return self.processor.pixel_values([image])[0], target, tokens


# ----------------------------------------------------------------------------------------------------------------------
# Probe
# ----------------------------------------------------------------------------------------------------------------------

class FlatTokenProbe(nn.Module):
    """One linear classifier per label field on the flattened visual tokens (N, T, D) -> list of (N, C_k) logits.

    Flattening keeps each token's position, like the LLM does; a mean-pooled probe cannot tell which word is where
    (docs/quickstart.md).
    """

    def __init__(self, num_tokens: int, dim: int, num_classes: list[int]):
        super().__init__()
        self.num_classes = list(num_classes)
        self.head = nn.Linear(num_tokens * dim, sum(num_classes))

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        return list(self.head(tokens.flatten(1)).split(self.num_classes, dim=-1))


class TokenProbe(nn.Module):
    """One linear classifier per region field shared by all visual tokens: (N, T, D) -> list of (N, T, C_k) logits.

    Each token has to say what lies under it, so a token carries the features of its own part of the image (the word
    and the colour written there) instead of leaving them spread over all tokens, as the flat probe allows, so that an
    LLM can find a word by its colour with one attention lookup (what it did for the quickstart: docs/quickstart.md)."""

    def __init__(self, dim: int, num_classes: list[int]):
        super().__init__()
        self.num_classes = list(num_classes)
        self.head = nn.Linear(dim, sum(num_classes))

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        return list(self.head(tokens).split(self.num_classes, dim=-1))


def probe_losses(features: torch.Tensor, probe: FlatTokenProbe, token_probe: TokenProbe | None,
                 targets: torch.Tensor, token_targets_: torch.Tensor, token_loss_weight: float) -> torch.Tensor:
    """Mean cross-entropy of the image-level fields + `token_loss_weight` x that of the per-token fields."""
    loss = torch.stack([F.cross_entropy(lg, targets[:, k]) for k, lg in enumerate(probe(features))]).mean()
    if token_probe is not None:
        loss = loss + token_loss_weight * torch.stack([F.cross_entropy(lg.flatten(0, 1), token_targets_[:, k].flatten())
                                                       for k, lg in enumerate(token_probe(features))]).mean()
    return loss


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------

def build_stage0_model(args: VisionPretrainArguments, tokenizer=None):
    """The PIIP-LLaVA model to pretrain (seeded), its LLM vocabulary checked against the tokenizer."""
    from piip_llava.models import PiipLlavaForConditionalGeneration
    from piip_llava.models.builder import build_model
    from piip_llava.models.configuration_piip_llava import load_preset
    from piip_llava.train.model_setup import check_tokenizer_fits

    torch.manual_seed(args.seed)
    if args.model_path:
        model = PiipLlavaForConditionalGeneration.from_pretrained(args.model_path, dtype=torch.float32)
    else:
        config = load_preset(args.preset or args.config)  # a preset name or a config JSON path, as in training
        model = build_model(config, load_branches=True)
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, model.config, args.tokenizer_path)
    return model


@torch.no_grad()
def evaluate_probe(model, probe: FlatTokenProbe, loader: DataLoader, fields: list[str],
                   token_probe: TokenProbe | None = None, token_fields: list[str] = ()) -> dict[str, float]:
    """Accuracy per label field on `loader`; for region fields (``tokens:FIELD``) over the tokens a region covers."""
    model.eval()
    correct = torch.zeros(len(fields))
    token_correct, token_n = torch.zeros(len(token_fields)), torch.zeros(len(token_fields))
    n = 0
    for pixel_values, targets, tok_targets in loader:
        features = model.get_image_features(pixel_values)
        correct += torch.stack([(lg.argmax(-1) == targets[:, k]).float().sum() for k, lg in enumerate(probe(features))])
        if token_probe is not None:
            for k, lg in enumerate(token_probe(features)):
                covered = tok_targets[:, k] != 0
                token_correct[k] += ((lg.argmax(-1) == tok_targets[:, k]) & covered).sum()
                token_n[k] += covered.sum()
        n += targets.shape[0]
    model.train()
    acc = {f: round(float(c) / max(n, 1), 4) for f, c in zip(fields, correct)}
    acc.update({f"tokens:{f}": round(float(c) / max(float(m), 1.0), 4)
                for f, c, m in zip(token_fields, token_correct, token_n)})
    return acc


def pretrain_vision(args: VisionPretrainArguments) -> dict:
    """Train tower + projector with the flat-token probe; save the checkpoint and metrics to `output_dir`."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    tokenizer = None
    if args.tokenizer_path:
        from piip_llava.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer_path)
    model = build_stage0_model(args, tokenizer)
    if tokenizer is not None:
        from piip_llava.models import align_image_token_id

        align_image_token_id(model.config, tokenizer)
    records, classes = load_label_records(args.data_path)
    num_eval = min(256, len(records) // 10) if args.num_eval is None else args.num_eval
    if num_eval >= len(records):
        raise ValueError(f"--num-eval {num_eval} leaves no training records out of {len(records)}")
    order = list(range(len(records)))
    random.Random(args.seed).shuffle(order)
    eval_records = [records[i] for i in order[:num_eval]]
    train_records = [records[i] for i in order[num_eval:]]
    token_classes = region_classes(args.data_path, records)
    grid = math.isqrt(model.config.num_image_tokens)
    if token_classes and grid * grid != model.config.num_image_tokens:
        raise ValueError(f"per-token region labels need a square grid of visual tokens, the model has "
                         f"{model.config.num_image_tokens}")
    processor = PiipLlavaImageProcessor.from_config(model.config)
    train_ds = LabelledImageDataset(train_records, classes, args.image_folder, processor, token_classes, grid)
    eval_ds = LabelledImageDataset(eval_records, classes, args.image_folder, processor, token_classes, grid)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=generator)
    if len(train_loader) == 0:
        raise ValueError(f"{len(train_records)} training records < batch size {args.batch_size}")
    eval_loader = DataLoader(eval_ds, batch_size=64)

    probe = FlatTokenProbe(model.config.num_image_tokens, model.config.text_config.hidden_size,
                           [len(v) for v in classes.values()])
    token_probe = (TokenProbe(model.config.text_config.hidden_size, [len(v) for v in token_classes.values()])
                   if token_classes else None)
    # only the tower + projector (+ probes) are optimised; the LLM is not even in the forward (get_image_features)
    modules = [model.vision_tower, model.multi_modal_projector, probe] + ([token_probe] if token_probe else [])
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * args.max_steps),
                                                args.max_steps)
    fields = list(classes)
    history: list[dict] = []
    model.train()
    start = time.perf_counter()
    step = 0
    bar = tqdm(total=args.max_steps, desc="stage 0 (vision pretraining)", disable=not args.progress, mininterval=2)
    while step < args.max_steps:
        for pixel_values, targets, tok_targets in train_loader:
            loss = probe_losses(model.get_image_features(pixel_values), probe, token_probe, targets, tok_targets,
                                args.token_loss_weight)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if step % args.eval_steps == 0 or step == args.max_steps:
                acc = (evaluate_probe(model, probe, eval_loader, fields, token_probe, list(token_classes))
                       if num_eval else {})
                history.append({"step": step, "loss": round(loss.item(), 4), "eval_accuracy": acc})
                bar.write(f"step {step}: loss {loss.item():.3f}  held-out accuracy "
                          + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()))
            if step >= args.max_steps:
                break
    bar.close()
    os.makedirs(args.output_dir, exist_ok=True)
    model.save_pretrained(args.output_dir)
    if tokenizer is not None:
        save_processor(model.config, tokenizer, args.output_dir)
    metrics = {
        "args": asdict(args), "classes": classes, "token_classes": token_classes, "num_train": len(train_records), "num_eval": len(eval_records),
        "seconds": round(time.perf_counter() - start, 1), "history": history,
        "final_eval_accuracy": history[-1]["eval_accuracy"] if history else {},
    }
    with open(os.path.join(args.output_dir, METRICS_FILE), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m piip_llava.train.vision_pretrain",
                                     description=__doc__.split("\n")[0])
    defaults = argparse.Namespace(**{f.name: f.default for f in fields(VisionPretrainArguments)})
    parser.add_argument("--data-path", required=True, help="labels JSON: [{'image', 'labels': {field: value}}]")
    parser.add_argument("--image-folder", required=True, help="root the 'image' paths are relative to")
    parser.add_argument("--output-dir", required=True, help="checkpoint + metrics go here (created)")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--config", default=None, help="a PiipLlavaConfig JSON")
    parser.add_argument("--model-path", default=None, help="a checkpoint of ours to continue from")
    parser.add_argument("--tokenizer-path", default=None, help="checked against the LLM vocabulary, saved along")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio)
    parser.add_argument("--token-loss-weight", type=float, default=defaults.token_loss_weight,
                        help="weight of the per-token fields' loss against the image-level fields' (with regions)")
    parser.add_argument("--num-eval", type=int, default=None,
                        help="held-out records for accuracy [min(256, 10%% of the records)]")
    parser.add_argument("--eval-steps", type=int, default=defaults.eval_steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = VisionPretrainArguments(**vars(parser.parse_args(argv)))
    metrics = pretrain_vision(args)
    acc = metrics["final_eval_accuracy"]
    print(f"stage 0 done in {metrics['seconds']:.0f} s; held-out accuracy: "
          + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    print(f"checkpoint: {os.path.abspath(args.output_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
