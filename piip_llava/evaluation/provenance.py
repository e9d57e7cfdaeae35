"""What produced an answers file, so a resumed run never scores one model's answers for another.

A run's provenance is a dict: task, backend, checkpoint identity (a content fingerprint, not the path: retraining
into the same folder is a different model), template, dtype, image decoding, generation settings and the task's
prompt options. Its short hash goes into every answer line (``metadata["provenance"]``, a field LLaVA's format
already has and its scripts ignore), and the full dict into ``<answers>.provenance.json`` beside the file.

Resuming checks that every existing line carries the current hash. Anything else is refused with the fields that
differ and how to start fresh (``--overwrite``); batch size, device and chunk index are recorded but not compared
(they do not change greedy answers beyond fp16 noise).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["ProvenanceMismatch", "check_resume", "checkpoint_fingerprint", "fingerprint", "provenance_path",
           "read_provenance", "write_provenance"]

COMPARED = ("task", "backend", "checkpoint", "server", "template", "dtype", "image_decode", "generation",
            "prompt_options")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".gguf")
_JSON_SUFFIXES = ("config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json", ".index.json",
                  "chat_template.json")
_FULL_HASH_MAX = 64 << 20   # files up to 64 MiB are hashed in full
_SAMPLES, _BLOCK = 64, 64 << 10  # larger ones: 64 blocks of 64 KiB spread over the file (4 MiB read, ~0.1 s)


class ProvenanceMismatch(ValueError):
    """The answers file was written by a different model or settings."""


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= _FULL_HASH_MAX:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            # every trained tensor changes when a model is retrained, and the LLM dominates the file, so evenly
            # spread samples tell two trainings apart without reading 14 GB on every call
            for i in range(_SAMPLES):
                f.seek((size - _BLOCK) * i // (_SAMPLES - 1))
                h.update(f.read(_BLOCK))
    return h.hexdigest()


def _identity_files(folder: Path) -> list[Path]:
    files = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name == "training_args.bin":
            continue
        if p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(_JSON_SUFFIXES) or p.name.endswith(".jinja"):
            files.append(p)
    return files


def checkpoint_fingerprint(model_path: str | os.PathLike) -> str:
    """Content fingerprint of a checkpoint folder: weights, configs and tokenizer files (names + content). A LoRA
    adapter folder also fingerprints its local base model. 16 hex digits."""
    folder = Path(model_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {model_path}")
    h = hashlib.sha256()
    files = _identity_files(folder)
    if not files:
        raise ValueError(f"{model_path}: no weights or config files to identify the checkpoint by")
    for p in files:
        h.update(p.name.encode() + b"\0" + _file_digest(p).encode())
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if base and Path(base).is_dir():
            h.update(b"base\0" + checkpoint_fingerprint(base).encode())
    return h.hexdigest()[:16]


def fingerprint(provenance: dict) -> str:
    """Short hash of the compared fields."""
    compared = {k: provenance.get(k) for k in COMPARED}
    return hashlib.sha256(json.dumps(compared, sort_keys=True, default=str).encode()).hexdigest()[:12]


def provenance_path(answers_path: str | os.PathLike) -> Path:
    p = Path(answers_path)
    return p.with_name(p.name + ".provenance.json")


def read_provenance(answers_path: str | os.PathLike) -> dict | None:
    p = provenance_path(answers_path)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def write_provenance(answers_path: str | os.PathLike, provenance: dict) -> Path:
    p = provenance_path(answers_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps({**provenance, "fingerprint": fingerprint(provenance)}, indent=2, default=str),
                   encoding="utf-8")
    os.replace(tmp, p)
    return p


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
    return out


def describe_difference(old: dict, new: dict) -> list[str]:
    """``field: <answers file> -> <this run>`` for every compared field that differs."""
    a = _flat({k: old.get(k) for k in COMPARED})
    b = _flat({k: new.get(k) for k in COMPARED})
    return [f"{k}: {a.get(k)!r} (answers file) vs {b.get(k)!r} (this run)"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not k.endswith(".path")]


def check_resume(answers_path: str | os.PathLike, records: list[dict], provenance: dict) -> None:
    """Raise :class:`ProvenanceMismatch` unless every record in ``records`` (the answers file's lines) was
    written with ``provenance``. Records from a file without provenance (another tool, an older version) are
    refused too: nobody can tell which model wrote them."""
    if not records:
        return
    want = fingerprint(provenance)
    found = [(r.get("metadata") or {}).get("provenance") if isinstance(r.get("metadata"), dict) else None
             for r in records]
    if all(f == want for f in found):
        return
    fresh = "to start fresh, pass --overwrite (or choose another --answers-file); to score it as it is, --score-only"
    unknown = sum(1 for f in found if f is None)
    if unknown:
        raise ProvenanceMismatch(
            f"{answers_path}: {unknown} of {len(records)} answers carry no provenance (written by another tool or "
            f"an older version), so they cannot be resumed as this run's; {fresh}")
    old = read_provenance(answers_path)
    others = sorted({f for f in found if f != want})
    if old is not None and old.get("fingerprint") in others:
        diff = describe_difference(old, provenance)
        detail = "; ".join(diff) if diff else "settings differ"
    else:
        detail = f"written by run(s) {', '.join(others)}, this run is {want} ({provenance_path(answers_path).name} " \
                 "is missing or belongs to another run)"
    raise ProvenanceMismatch(f"{answers_path} was written by a different model or settings: {detail}. {fresh}")
