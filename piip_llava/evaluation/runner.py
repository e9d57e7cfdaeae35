"""Shared generation loop for every benchmark CLI: batched, sharded, resumable, crash-safe.

A benchmark turns its question file into :class:`QuestionRecord` objects (id, the prompt string recorded in the
answers file, the user message actually sent, an image loader callable or an error). :func:`run_generation`
then

* takes this process' shard (``num_chunks``/``chunk_idx``, or torchrun's ``RANK``/``WORLD_SIZE``), split into
  ceil-sized contiguous chunks like LLaVA's ``get_chunk``;
* reads the answers file first and skips every question already answered (key: ``question_id`` + ``prompt``,
  because TextVQA's ``question_id`` is the image id and repeats), cutting off a half-written last line; with a
  ``provenance`` it refuses a file written by another model or other settings (:mod:`.provenance`) and stamps
  each new line with the provenance hash;
* loads images per batch; a missing file, undecodable base64 or malformed row becomes an **error record** in
  the answers file (``"error"`` field, ``text`` empty), counted in the summary, never a crash;
* calls ``engine.generate`` on the rest (a batch refused with a ValueError, e.g. a prompt over the context, is
  retried one by one and the offending questions become error records), appends one JSON line per question in question order, then flushes and
  ``os.fsync``s, so a crash loses at most the batch in flight;
* shows a tqdm bar (questions/s, ETA) and returns a summary dict;
* after ``retry_errors`` re-asked questions, rewrites the file in question order, because POPE's and MME's
  official scorers read answers by position.

:func:`merge_chunks` concatenates chunk files in chunk order into one answers file.

The engine is anything with ``generate(list[ChatRequest], **gen_kwargs) -> list[str]``
(``piip_llava.serve.inference.InferenceEngine`` in practice; a fake in unit tests).
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image
from tqdm.auto import tqdm

from piip_llava.constants import DEFAULT_MAX_IMAGE_PIXELS
from piip_llava.evaluation.provenance import (check_resume, fingerprint, provenance_path, read_provenance,
                                             write_provenance)
from piip_llava.models.processing_piip_llava import load_image

__all__ = [
    "GenerationEngine",
    "QuestionRecord",
    "ShardSpec",
    "answer_key",
    "chunk_answers_path",
    "get_chunk",
    "image_from_base64",
    "image_from_file",
    "merge_chunks",
    "read_answers",
    "resolve_shard",
    "run_generation",
]

ImageLoader = Callable[[], Image.Image]


class GenerationEngine(Protocol):
    """What the runner needs from an inference engine."""

    def generate(self, requests: list, **gen_kwargs: Any) -> list[str]: ...


@dataclass
class QuestionRecord:
    """One question to ask.

    ``prompt`` is what the answers file records (LLaVA conventions differ per benchmark); ``message`` is the
    user text sent to the model, without the image placeholder (the engine's template inserts it when an image
    is given). ``image`` is ``None`` for text-only questions. ``error`` set means the row cannot be asked
    (malformed row); it is written as an error record. ``extra`` fields are copied into the answers line.
    """

    question_id: Any
    prompt: str
    message: str
    image: ImageLoader | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ShardSpec:
    num_chunks: int = 1
    chunk_idx: int = 0

    def __post_init__(self) -> None:
        if self.num_chunks < 1 or not 0 <= self.chunk_idx < self.num_chunks:
            raise ValueError(f"invalid shard: chunk_idx={self.chunk_idx} num_chunks={self.num_chunks}")

    @property
    def sharded(self) -> bool:
        return self.num_chunks > 1


def resolve_shard(num_chunks: int = 1, chunk_idx: int = 0, env: dict | None = None) -> ShardSpec:
    """Explicit ``--num-chunks/--chunk-idx`` win; otherwise a torchrun launch (``WORLD_SIZE>1``) shards by rank."""
    env = os.environ if env is None else env
    if num_chunks > 1:
        return ShardSpec(num_chunks, chunk_idx)
    world = int(env.get("WORLD_SIZE", "1"))
    if world > 1:
        return ShardSpec(world, int(env.get("RANK", "0")))
    return ShardSpec(1, 0)


def get_chunk(items: Sequence, num_chunks: int, chunk_idx: int) -> list:
    """LLaVA's ``split_list``/``get_chunk``: contiguous chunks of ``ceil(n / num_chunks)`` items.

    Unlike LLaVA, a chunk index past the last non-empty chunk gives an empty list instead of an IndexError.
    """
    if num_chunks <= 1:
        return list(items)
    size = math.ceil(len(items) / num_chunks) if items else 0
    if size == 0:
        return []
    return list(items[chunk_idx * size:(chunk_idx + 1) * size])


def chunk_answers_path(answers_path: str | os.PathLike, shard: ShardSpec) -> Path:
    """``out/answers.jsonl`` -> ``out/answers.chunk2of4.jsonl`` when sharded, unchanged otherwise."""
    p = Path(answers_path)
    if not shard.sharded:
        return p
    return p.with_name(f"{p.stem}.chunk{shard.chunk_idx}of{shard.num_chunks}{p.suffix}")


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------
def image_from_file(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                    decode: str = "official") -> ImageLoader:
    """A loader that opens ``path`` lazily with the project's ``load_image`` (RGB, pixel limit; ``official``:
    ``Image.open(p).convert('RGB')`` as LLaVA's eval loaders); it raises ``FileNotFoundError``/``ImageLoadError``
    (a ValueError) naming the path."""

    def load() -> Image.Image:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path}")
        return load_image(os.fspath(path), max_pixels, decode=decode)

    return load


def image_from_base64(data: str, source: str = "base64 image",
                      max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, decode: str = "official") -> ImageLoader:
    """A loader that decodes standard base64 image bytes (MMBench TSV ``image`` cells) lazily."""

    def load() -> Image.Image:
        try:
            raw = base64.b64decode(data, validate=False)
            return load_image(raw, max_pixels, decode=decode)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{source}: undecodable base64 image ({exc})") from exc

    return load


# ---------------------------------------------------------------------------------------------------------------
# Answers files
# ---------------------------------------------------------------------------------------------------------------
def answer_key(question_id: Any, prompt: str | None) -> tuple[str, str]:
    """Identity of one answered question: ``question_id`` alone is not unique in TextVQA (it is the image id)."""
    return (str(question_id), prompt or "")


def read_answers(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Read an answers JSONL. A half-written last line (crash mid-write) is ignored, and cut off when
    ``repair``; a bad line elsewhere raises an error naming the file and line."""
    p = Path(path)
    if not p.exists():
        return []
    raw = p.read_bytes()
    lines = raw.split(b"\n")
    records: list[dict] = []
    good_end = 0
    offset = 0
    for lineno, line in enumerate(lines, start=1):
        end = offset + len(line) + 1
        if line.strip():
            try:
                records.append(json.loads(line))
                good_end = min(end, len(raw))
            except json.JSONDecodeError as exc:
                is_last = all(not rest.strip() for rest in lines[lineno:])
                if not is_last:
                    raise ValueError(f"{p}:{lineno}: not valid JSON ({exc})") from exc
                break
        else:
            good_end = min(end, len(raw))
        offset = end
    if repair and (good_end < len(raw) or (good_end and not raw.endswith(b"\n"))):
        # drop the half-written tail; make sure appended lines start on a new line (LLaVA files may lack a
        # final newline)
        with open(p, "r+b") as f:
            f.truncate(good_end)
            if good_end and not raw[:good_end].endswith(b"\n"):
                f.seek(good_end)
                f.write(b"\n")
    return records


def _answer_line(q: QuestionRecord, text: str, model_id: str, error: str | None, run: str | None) -> dict:
    line = {"question_id": q.question_id, "prompt": q.prompt, "text": text,
            "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {"provenance": run} if run else {}}
    line.update(q.extra)
    if error is not None:
        line["error"] = error
    return line


def _write_lines(f, lines: Iterable[dict]) -> None:
    for line in lines:
        f.write(json.dumps(line, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _make_request(message: str, image: Image.Image | None):
    from piip_llava.serve.inference import ChatRequest

    return ChatRequest(messages=[{"role": "user", "content": message}], image=image)


def _generate_batch(engine: GenerationEngine, requests: list, gen_kwargs: dict) -> list[str | ValueError]:
    """``engine.generate`` on the batch; when it refuses the batch with a ValueError (e.g. a prompt longer than
    the context), retry one by one so only the offending questions become error records."""
    if not requests:
        return []
    try:
        outputs = engine.generate(requests, **gen_kwargs)
    except ValueError as exc:
        if len(requests) == 1:
            return [exc]
        return [out for r in requests for out in _generate_batch(engine, [r], gen_kwargs)]
    if len(outputs) != len(requests):
        raise RuntimeError(f"engine returned {len(outputs)} outputs for {len(requests)} requests")
    return list(outputs)


def run_generation(
    questions: Sequence[QuestionRecord],
    engine: GenerationEngine,
    answers_path: str | os.PathLike,
    *,
    batch_size: int = 1,
    shard: ShardSpec | None = None,
    model_id: str = "piip_llava",
    gen_kwargs: dict | None = None,
    retry_errors: bool = False,
    progress: bool = True,
    provenance: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Answer this shard's questions into ``answers_path`` (appending; resumable). Returns a summary dict
    (``already_answered``: answers reused from the file).

    ``answers_path`` is the file this process writes (pass :func:`chunk_answers_path` output when sharded).
    ``retry_errors`` re-asks questions whose earlier record is an error record. ``provenance`` (see
    :mod:`.provenance`) refuses to resume a file written with anything else (``ProvenanceMismatch``);
    ``overwrite`` deletes the file first.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shard = shard or ShardSpec()
    gen_kwargs = dict(gen_kwargs or {})
    mine = get_chunk(questions, shard.num_chunks, shard.chunk_idx)
    path = Path(answers_path)
    path.parent.mkdir(parents=True, exist_ok=True)

    done_marker = path.with_name(path.name + ".done.json")
    done_marker.unlink(missing_ok=True)  # an older marker must not let merge_chunks read a file in progress
    if overwrite:
        path.unlink(missing_ok=True)
        provenance_path(path).unlink(missing_ok=True)
    existing = read_answers(path, repair=True)
    run = None
    if provenance is not None:
        check_resume(path, existing, provenance)
        write_provenance(path, provenance)
        run = fingerprint(provenance)
    retried = retry_errors and any(r.get("error") for r in existing)
    if retried:
        # drop the error records to be retried, so the file never holds two lines for one question
        existing = [r for r in existing if not r.get("error")]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            _write_lines(f, existing)
        os.replace(tmp, path)
    done = {answer_key(r.get("question_id"), r.get("prompt")) for r in existing}
    todo = [q for q in mine if answer_key(q.question_id, q.prompt) not in done]
    summary = {"num_questions": len(mine), "already_answered": len(mine) - len(todo), "answered": 0,
               "errors": 0, "error_ids": [], "answers_file": str(path),
               "num_chunks": shard.num_chunks, "chunk_idx": shard.chunk_idx}

    bar = tqdm(total=len(todo), unit="q", desc=path.stem, disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    with open(path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            errors: dict[int, str] = {}
            requests, asked = [], []
            for i, q in enumerate(batch):
                if q.error is not None:
                    errors[i] = q.error
                    continue
                try:
                    image = q.image() if q.image is not None else None
                except (OSError, ValueError) as exc:
                    errors[i] = f"{type(exc).__name__}: {exc}"
                    continue
                requests.append(_make_request(q.message, image))
                asked.append(i)
            texts: dict[int, str] = {}
            for i, out in zip(asked, _generate_batch(engine, requests, gen_kwargs)):
                if isinstance(out, Exception):
                    errors[i] = f"{type(out).__name__}: {out}"
                else:
                    texts[i] = out.strip()
            lines = []
            for i, q in enumerate(batch):
                if i in errors:
                    lines.append(_answer_line(q, "", model_id, errors[i], run))
                    summary["errors"] += 1
                    summary["error_ids"].append(q.question_id)
                else:
                    lines.append(_answer_line(q, texts[i], model_id, None, run))
                    summary["answered"] += 1
            _write_lines(f, lines)
            bar.update(len(batch))  # rate in questions/s and ETA
    bar.close()
    if retried:
        _sort_answers(path, mine)
    elapsed = time.perf_counter() - t0
    summary["elapsed_s"] = round(elapsed, 3)
    summary["questions_per_s"] = round(len(todo) / elapsed, 3) if elapsed > 0 and todo else None
    done_marker.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    return summary


def _sort_answers(path: Path, questions: Sequence[QuestionRecord]) -> None:
    """Rewrite the answers file in question order (lines of other questions keep their place at the end)."""
    rank = {answer_key(q.question_id, q.prompt): i for i, q in enumerate(questions)}
    records = read_answers(path)
    records.sort(key=lambda r: rank.get(answer_key(r.get("question_id"), r.get("prompt")), len(rank)))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        _write_lines(f, records)
    os.replace(tmp, path)


def merge_chunks(answers_path: str | os.PathLike, num_chunks: int, *, wait_s: float = 0.0,
                 poll_s: float = 2.0) -> dict:
    """Concatenate the chunk files of ``answers_path`` (chunk order = question order) into ``answers_path``.

    Every chunk must have finished (its ``.done.json`` marker exists); with ``wait_s > 0`` the call polls for
    stragglers (rank 0 under torchrun). Duplicate keys keep the first occurrence.
    """
    shards = [ShardSpec(num_chunks, i) for i in range(num_chunks)]
    paths = [chunk_answers_path(answers_path, s) for s in shards]
    deadline = time.monotonic() + wait_s
    while True:
        missing = [p for p in paths if not p.with_name(p.name + ".done.json").exists()]
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    if missing:
        raise FileNotFoundError(f"cannot merge: chunks not finished: {', '.join(str(p) for p in missing)}")
    runs = {(r.get("metadata") or {}).get("provenance") for p in paths for r in read_answers(p)
            if isinstance(r.get("metadata"), dict)}
    if len(runs) > 1:
        raise ValueError(f"cannot merge: the chunks of {answers_path} were written by different runs "
                         f"({', '.join(sorted(str(r) for r in runs))}); rerun the odd chunk with --overwrite")
    seen: set = set()
    merged: list[dict] = []
    for p in paths:
        for rec in read_answers(p):
            k = answer_key(rec.get("question_id"), rec.get("prompt"))
            if k not in seen:
                seen.add(k)
                merged.append(rec)
    out = Path(answers_path)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        _write_lines(f, merged)
    os.replace(tmp, out)
    prov = next((x for x in map(read_provenance, paths) if x is not None), None)
    if prov is not None:
        prov = {k: v for k, v in prov.items() if k != "fingerprint"}
        prov.get("run", {}).pop("chunk_idx", None)
        write_provenance(out, prov)
    return {"merged_file": str(out), "num_records": len(merged),
            "errors": sum(1 for r in merged if r.get("error")), "chunks": [str(p) for p in paths]}
