"""Length- and modality-grouped sampling (LLaVA-1.5's `LengthGroupedSampler` with `group_by_modality_length`).

Image and text-only samples (positive / negative `modality_lengths`) go into separate megabatches of
`batch_size * world_size` indices, each sorted by length and split evenly across ranks, so a step never mixes
modalities (except one final mixed megabatch of leftovers) and padding stays small. Deterministic given
`seed` and the epoch (`set_epoch`), identical on every rank.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def split_to_even_chunks(indices: Sequence[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Split a megabatch into `num_chunks` chunks of equal size with roughly equal total length (greedy)."""
    if len(indices) % num_chunks != 0:
        return [list(indices[i::num_chunks]) for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for idx in indices:
        c = totals.index(min(totals))
        chunks[c].append(idx)
        totals[c] += lengths[idx]
        if len(chunks[c]) == per_chunk:
            totals[c] = float("inf")
    return chunks


def get_length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                               generator: torch.Generator | None = None) -> list[int]:
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    mb = world_size * batch_size
    megabatches = [sorted(indices[i:i + mb], key=lambda j: lengths[j], reverse=True)
                   for i in range(0, len(indices), mb)]
    return [i for m in megabatches for chunk in split_to_even_chunks(m, lengths, world_size) for i in chunk]


def get_modality_length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                                        generator: torch.Generator | None = None) -> list[int]:
    """LLaVA-1.5's modality grouping; `lengths` > 0 for image samples, < 0 for text-only (never 0)."""
    if any(length == 0 for length in lengths):
        raise ValueError("modality lengths must be non-zero (positive: image, negative: text-only)")
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        return get_length_grouped_indices([abs(x) for x in lengths], batch_size, world_size, generator)
    mm = [(i, x) for i, x in enumerate(lengths) if x > 0]
    lang = [(i, -x) for i, x in enumerate(lengths) if x < 0]
    mb = world_size * batch_size
    groups = []
    for pairs in (mm, lang):
        idx, lens = zip(*pairs)
        order = [idx[k] for k in get_length_grouped_indices(lens, batch_size, world_size, generator)]
        groups.append([order[k:k + mb] for k in range(0, len(order), mb)])
    mm_mb, lang_mb = groups
    leftover = mm_mb[-1] + lang_mb[-1]
    megabatches = mm_mb[:-1] + lang_mb[:-1]
    perm = torch.randperm(len(megabatches), generator=generator).tolist()
    megabatches = [megabatches[k] for k in perm]
    if leftover:
        megabatches.append(sorted(leftover))
    return [i for m in megabatches for i in m]


class LengthGroupedSampler(Sampler[int]):
    """Sampler over a dataset's `modality_lengths` (group_by_modality=True) or plain lengths.

    `batch_size` is the per-device batch size; every rank builds the same global order (the distributed
    sampler/accelerate then shards it), as in LLaVA-1.5.
    """

    def __init__(self, batch_size: int, world_size: int, lengths: Sequence[int], group_by_modality: bool = True,
                 seed: int = 0):
        if batch_size < 1 or world_size < 1:
            raise ValueError("batch_size and world_size must be >= 1")
        self.batch_size = batch_size
        self.world_size = world_size
        self.lengths = list(lengths)
        self.group_by_modality = group_by_modality
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        if self.group_by_modality:
            order = get_modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, g)
        else:
            order = get_length_grouped_indices([abs(x) for x in self.lengths], self.batch_size, self.world_size, g)
        return iter(order)
