"""`LazySupervisedDataset` over LLaVA-format files and `DataCollatorForSupervisedDataset`.

The dataset indexes the file once (numpy arrays of byte offsets and word-count lengths, ~20 bytes per record, so
2.8M records take ~60 MB instead of a multi-GB list of dicts) and parses, tokenises and loads the image of a record
only in `__getitem__`. A bad record (unparsable, wrong schema, no assistant turn, more `<image>` tags than images,
missing/unreadable/oversized image, masking that cannot be made consistent, image tokens that do not fit
`model_max_length`) is skipped with a warning naming its id, file and line, counted in `dataset.skipped` (a Counter
of reasons), and replaced by the next record; each returned sample carries `num_skipped` so counts survive
DataLoader worker processes (the collator can forward their sum to the trainer's log).
"""
from __future__ import annotations

import copy
import logging
import os
from array import array
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from piip_llava.constants import DEFAULT_MAX_IMAGE_PIXELS, IGNORE_INDEX, IMAGE_PLACEHOLDER
from piip_llava.data.conversation import (
    ConversationFormatError,
    ConversationTemplate,
    MaskingError,
    get_template,
)
from piip_llava.data.mixture import iter_records, read_record, record_images
from piip_llava.models.processing_piip_llava import (
    ImageLoadError,
    PiipLlavaImageProcessor,
    PiipLlavaProcessor,
    load_image,
)

logger = logging.getLogger(__name__)

IMAGE_LENGTH_BONUS = 128  # LLaVA adds 128 to the word count of image samples in `lengths`


class SkipRecord(Exception):
    """Internal: the record cannot be used; `reason` is the counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _word_count(record: Any) -> int:
    try:
        return sum(len(t["value"].split()) for t in record["conversations"])
    except (KeyError, TypeError, AttributeError):
        return 0


class LazySupervisedDataset(Dataset):
    """LLaVA-format JSON/JSONL -> {input_ids, labels, pixel_values, num_skipped}, tokenised on access.

    Args:
        data_path: JSON array or JSONL file of LLaVA records.
        tokenizer: the model's `PiipLlavaProcessor` (it tokenises, masks and expands the image token); or an HF
            tokenizer together with `image_processor` (`PiipLlavaImageProcessor`), `image_token_id` and
            `num_image_tokens`, from which a processor is built.
        image_folder: root for relative `image` paths (default: the data file's folder).
        template: conversation template name or object (`plain` for stage 1, `vicuna_v1` for stage 2).
        model_max_length: total length after image-token expansion; longer samples are truncated (text only) and
            samples whose image tokens would be cut are skipped. None: the tokenizer's `model_max_length`.
    """

    def __init__(self, data_path: str, tokenizer, image_processor=None, image_token_id: int | None = None,
                 num_image_tokens: int | None = None,
                 image_folder: str | None = None, template: str | ConversationTemplate = "vicuna_v1",
                 model_max_length: int | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_retries: int = 100, progress: bool = True):
        if isinstance(tokenizer, PiipLlavaProcessor):
            processor = tokenizer
        else:  # (tokenizer, image processor, ids): a processor over a copy, the caller's tokenizer stays as it is
            images = image_processor if isinstance(image_processor, PiipLlavaImageProcessor) else PiipLlavaImageProcessor()
            processor = PiipLlavaProcessor(images, copy.deepcopy(tokenizer), num_image_tokens=num_image_tokens,
                                           image_token_id=image_token_id)
        self.processor = processor
        self.data_path = data_path
        self.tokenizer = processor.tokenizer
        # an explicit image processor wins (stage 1 uses `square` while the model's processor says `pad`); any callable
        # list[PIL.Image] -> (N, 3, R, R) tensor works
        self.image_processor = image_processor if image_processor is not None else processor.image_processor
        self._pixel_values = getattr(self.image_processor, "pixel_values", self.image_processor)
        self.image_token_id = processor.image_token_id
        self.num_image_tokens = processor.num_image_tokens
        self.image_folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(data_path))
        self.template = get_template(template)
        self.model_max_length = int(model_max_length or tokenizer.model_max_length)
        self.max_image_pixels = max_image_pixels
        self.max_retries = max_retries
        self.skipped: Counter = Counter()
        self._fh = None
        self._fh_pid = None

        starts, ends, lines, lens = array("q"), array("q"), array("i"), array("i")
        unparsable = 0
        for raw in iter_records(data_path, progress=progress):
            starts.append(raw.start)
            ends.append(raw.end)
            lines.append(raw.line)
            words = max(_word_count(raw.obj), 1)  # never 0: the modality sign must survive
            has_image = isinstance(raw.obj, dict) and raw.obj.get("image") is not None
            lens.append(words if has_image else -words)
            unparsable += raw.error is not None
        self._starts = np.frombuffer(starts, dtype=np.int64).copy()
        self._ends = np.frombuffer(ends, dtype=np.int64).copy()
        self._lines = np.frombuffer(lines, dtype=np.int32).copy()
        self._modality_lengths = np.frombuffer(lens, dtype=np.int32).copy()
        if len(self._starts) == 0:
            raise ValueError(f"{data_path}: no records")
        if unparsable:
            logger.warning("%s: %d records are not valid JSON; they will be skipped", data_path, unparsable)

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def modality_lengths(self) -> list[int]:
        """Word counts, positive for image samples and negative for text-only (LLaVA's `modality_lengths`)."""
        return self._modality_lengths.tolist()

    @property
    def lengths(self) -> list[int]:
        """Word counts, +128 for image samples (LLaVA's `lengths`)."""
        m = self._modality_lengths.astype(np.int64)
        return np.where(m > 0, m + IMAGE_LENGTH_BONUS, -m).tolist()

    def skip_report(self) -> dict[str, int]:
        """Skips seen by this process so far, by reason (workers report theirs via `num_skipped`)."""
        return dict(self.skipped)

    # ----------------------------------------------------------------------------------------------- access
    def _read(self, i: int) -> Any:
        if self._fh is None or self._fh_pid != os.getpid():  # one handle per DataLoader worker
            self._fh = open(self.data_path, "rb")  # noqa: SIM115
            self._fh_pid = os.getpid()
        return read_record(self.data_path, int(self._starts[i]), int(self._ends[i]), self._fh)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fh"] = None
        return state

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        for attempt in range(self.max_retries):
            j = (i + attempt) % n
            try:
                sample = self.build_sample(j)
                sample["num_skipped"] = attempt
                return sample
            except SkipRecord as e:
                self.skipped[e.reason] += 1
                logger.warning("skipping %s:%d (record %d): %s [%s] (skipped so far in this process: %d)",
                               self.data_path, int(self._lines[j]), j, e, e.reason, sum(self.skipped.values()))
        raise RuntimeError(f"{self.data_path}: {self.max_retries} consecutive bad records from index {i}; "
                           f"skips so far: {dict(self.skipped)}")

    def build_sample(self, i: int) -> dict[str, Any]:
        """Record `i` -> sample dict; raises `SkipRecord` with a reason for unusable records."""
        try:
            record = self._read(i)
        except ValueError as e:
            raise SkipRecord("bad_json", f"not valid JSON: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise SkipRecord("schema", "record needs a `conversations` list")
        rid = record.get("id", f"#{i}")
        try:
            images = record_images(record)
        except ValueError as e:
            raise SkipRecord("schema", f"id {rid!r}: {e}") from None
        if len(images) > 1:
            raise SkipRecord("multi_image", f"id {rid!r}: {len(images)} images; one image per sample is supported")
        tags = sum(t.get("value", "").count(IMAGE_PLACEHOLDER) for t in record["conversations"]
                   if isinstance(t, dict) and t.get("from") == "human" and isinstance(t.get("value"), str))
        if tags > len(images):
            raise SkipRecord("image_tags", f"id {rid!r}: {tags} {IMAGE_PLACEHOLDER} tags but {len(images)} images")
        has_image = bool(images)
        try:
            ids, labels = self.processor.encode_conversation(record["conversations"], has_image, self.template)
        except ConversationFormatError as e:
            raise SkipRecord(e.reason, f"id {rid!r}: {e}") from None
        except MaskingError as e:
            raise SkipRecord("masking", f"id {rid!r}: {e}") from None
        ids, labels = self._truncate(ids, labels, rid)
        pixel_values = None
        if has_image:
            path = os.path.join(self.image_folder, images[0])
            try:
                image = load_image(path, max_pixels=self.max_image_pixels, decode="official")  # as LLaVA's loader
            except ImageLoadError as e:
                if not os.path.exists(path):
                    raise SkipRecord("missing_image", f"id {rid!r}: image {path} does not exist") from None
                reason = "image_too_large" if "over the limit" in str(e) else "bad_image"
                raise SkipRecord(reason, f"id {rid!r}: {e}") from None
            pixel_values = self._pixel_values([image])[0]
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
                "pixel_values": pixel_values}

    def _truncate(self, ids: list[int], labels: list[int], rid: Any) -> tuple[list[int], list[int]]:
        limit = self.model_max_length
        if len(ids) > limit:
            if self.image_token_id in ids[limit:]:
                raise SkipRecord("image_truncated", f"id {rid!r}: {len(ids)} tokens; the image tokens do not fit "
                                                    f"model_max_length={limit}")
            ids, labels = ids[:limit], labels[:limit]
        if all(x == IGNORE_INDEX for x in labels):
            raise SkipRecord("no_supervised_tokens", f"id {rid!r}: no answer token within {limit} tokens")
        return ids, labels


class DataCollatorForSupervisedDataset:
    """Right-pads `input_ids` (pad id) and `labels` (IGNORE_INDEX), builds `attention_mask`, stacks present images.

    Output: input_ids/labels/attention_mask (B, T) with T = longest sample (capped at `model_max_length`), and
    `pixel_values` (num_images, 3, R, R) only if some sample has an image. With `report_skipped=True` the batch also
    has `num_skipped` (a 0-d LongTensor) that the trainer must pop before calling the model.
    """

    def __init__(self, pad_token_id: int, model_max_length: int, report_skipped: bool = False):
        self.pad_token_id = int(pad_token_id)
        self.model_max_length = int(model_max_length)
        self.report_skipped = report_skipped

    def __call__(self, instances: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not instances:
            raise ValueError("empty batch")
        # The dataset already truncates without cutting image tokens, so this cap is a no-op safety net.
        seqs = [inst["input_ids"][: self.model_max_length] for inst in instances]
        labs = [inst["labels"][: self.model_max_length] for inst in instances]
        T = max(len(s) for s in seqs)
        B = len(seqs)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for b, (s, lab) in enumerate(zip(seqs, labs)):
            if len(s) != len(lab):
                raise ValueError(f"sample {b}: input_ids ({len(s)}) and labels ({len(lab)}) differ in length")
            input_ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            labels[b, : len(s)] = torch.as_tensor(lab, dtype=torch.long)
            attention_mask[b, : len(s)] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        images = [inst["pixel_values"] for inst in instances if inst.get("pixel_values") is not None]
        if images:
            batch["pixel_values"] = torch.stack(images)
        if self.report_skipped:
            batch["num_skipped"] = torch.tensor(sum(int(inst.get("num_skipped", 0)) for inst in instances))
        return batch
