"""Checks of checkpoint folders before they are loaded: one clear message per problem (`CheckpointError`).

Every loader of checkpoints calls `check_checkpoint` first: training (`--model_name_or_path`), chat, the demo, the
API and evaluation (`InferenceEngine.load`), the converter and `merge_lora`. A missing folder, a missing or invalid
`config.json`, missing or truncated weights, or a checkpoint of the wrong kind (an official OpenGVLab checkpoint where
one of ours is expected, or the reverse) then fails before any model is built, with a message that names the file and
says what to do. Entry points catch `CheckpointError` and exit with status 1 and that message, without a traceback
unless `PIIP_DEBUG=1` is set (`cli_error`).

    python -m piip_llava.models.loading PATH [--expect piip_llava|official|lora_adapter]

checks a folder the same way and prints what it is.

The checks read file headers only (JSON configs, the safetensors header, the zip directory at the end of `.bin` /
`.pt` files), so they cost milliseconds even for a 13B checkpoint. Truncation is caught exactly for safetensors (the
header states the data length) and for zip-format torch files (their directory is written last).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import struct
import sys
import zipfile
from collections.abc import Sequence
from typing import Literal

Kind = Literal["piip_llava", "official", "lora_adapter"]
KINDS: tuple[Kind, ...] = ("piip_llava", "official", "lora_adapter")
MODEL_TYPES = {"piip_llava": "piip_llava", "llava_llama": "official"}  # config.json model_type -> kind
PROJECTOR_FILE = "mm_projector.safetensors"  # stage-1 output (see piip_llava.train.model_setup)
DEBUG_ENV = "PIIP_DEBUG"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json")  # any one of them
CONVERT_HINT = "convert it first: python -m piip_llava.models.convert_official {path} OUT_DIR, then use OUT_DIR"
FOLDER_HINT = ("give the folder that holds config.json and the weights: a training OUTPUT_DIR after training "
               "finished, one of its checkpoint-N folders, or the output of convert_official / merge_lora")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and says what to do."""


def debug_requested() -> bool:
    """`PIIP_DEBUG=1` asks entry points for tracebacks instead of one-line messages."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def cli_error(err: Exception, debug: bool = False) -> int:
    """Print `err` as one `error: ...` line on stderr and return the exit status 1 (re-raise it when debugging)."""
    if debug or debug_requested():
        raise err
    print(f"error: {err}", file=sys.stderr, flush=True)
    return 1


# ------------------------------------------------------------------------------------------------ single files
def read_json(path: str, what: str = "file") -> dict:
    """A JSON object from `path`; CheckpointError when missing, unreadable, invalid or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); the {what} is "
                              "damaged (an interrupted save or copy?): copy it again from where it came from") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}; the {what} is damaged")
    return data


def _truncated(path: str, size: int, expected: int) -> CheckpointError:
    return CheckpointError(f"{path}: truncated ({size} bytes, {expected} expected): the save or copy that wrote it "
                           "was interrupted; copy the checkpoint again, or use another one")


def check_safetensors(path: str) -> None:
    """The header parses and the file is as long as the header says (a cut file is caught exactly)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > size - 8:
                raise _truncated(path, size, 8 if n is None else 8 + n)
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except CheckpointError:
        raise
    except (ValueError, UnicodeDecodeError, AttributeError, KeyError, IndexError, TypeError):
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header); it is damaged: copy the "
                              "checkpoint again") from None
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise _truncated(path, size, expected)


def check_torch_file(path: str) -> None:
    """A zip-format torch file (`torch.save` since 1.6) must end with its zip directory; older pickles pass."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    if size == 0:
        raise _truncated(path, 0, 1)
    if magic != b"PK\x03\x04":
        return
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except (zipfile.BadZipFile, OSError):
        raise CheckpointError(f"{path}: truncated or damaged ({size} bytes, no zip directory at its end): the save "
                              "or copy that wrote it was interrupted; copy the checkpoint again, or use another one") from None


def check_weight_file(path: str) -> None:
    (check_safetensors if path.endswith(".safetensors") else check_torch_file)(path)


def _index_files(index_path: str) -> list[str]:
    index = read_json(index_path, "weight index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no `weight_map`; the index is damaged: copy the checkpoint again")
    folder = os.path.dirname(index_path)
    return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]


def weight_files(path: str, names: Sequence[str] = ("model.safetensors",)) -> list[str]:
    """The weight files of folder `path`: the first of `names` (or its `.index.json` shards) that exists."""
    for name in names:
        if os.path.isfile(os.path.join(path, name + ".index.json")):
            files = _index_files(os.path.join(path, name + ".index.json"))
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise CheckpointError(f"{path}: {len(missing)} weight shard(s) listed in {name}.index.json are missing "
                                      f"({', '.join(os.path.basename(m) for m in missing[:3])}); the save or copy is "
                                      "incomplete: copy the checkpoint again, or use another one")
            return files
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)]
    return []


def _official_weight_files(path: str) -> list[str]:
    files = weight_files(path, ("model.safetensors", "pytorch_model.bin"))
    if files:
        return files
    for pattern in ("*.safetensors", "*.bin"):  # unindexed shards, as `load_official_state_dict` accepts them
        found = [f for f in sorted(glob.glob(os.path.join(path, pattern)))
                 if os.path.basename(f) not in ("mm_projector.bin", "training_args.bin")]
        if found:
            return found
    return []


# ------------------------------------------------------------------------------------------------ whole folders
def _missing_folder(path: str, role: str) -> CheckpointError:
    parent = os.path.dirname(os.path.abspath(path))
    near = ""
    if os.path.isdir(parent):
        base = os.path.basename(os.path.normpath(path)).lower()
        similar = sorted(n for n in os.listdir(parent) if base[:4] and n.lower().startswith(base[:4]))[:3]
        if similar:
            near = f" (in {parent}: {', '.join(similar)})"
    return CheckpointError(f"{role} {path}: no such folder{near}; {FOLDER_HINT}. A checkpoint on the Hugging Face "
                           "Hub must be downloaded first (hf download ORG/NAME --local-dir DIR)")


def _no_config_hint(path: str) -> str:
    checkpoints = sorted((n for n in os.listdir(path) if n.startswith("checkpoint-") and n[11:].isdigit()),
                         key=lambda n: int(n[11:]))
    if checkpoints:
        return (f"; it looks like a training OUTPUT_DIR whose run has not finished (it has {', '.join(checkpoints[-3:])}"
                f"): use {os.path.join(path, checkpoints[-1])} or let the training finish")
    if os.path.isfile(os.path.join(path, PROJECTOR_FILE)):
        return "; it holds a stage-1 projector only: pass it to stage 2 as --pretrained_projector"
    return f"; {FOLDER_HINT}"


def checkpoint_kind(path: str, role: str = "checkpoint") -> Kind:
    """What folder `path` holds, from its config files; CheckpointError when it is not a loadable checkpoint."""
    if not os.path.exists(path):
        raise _missing_folder(path, role)
    if not os.path.isdir(path):
        raise CheckpointError(f"{role} {path}: is a file, not a folder; {FOLDER_HINT}")
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        read_json(os.path.join(path, "adapter_config.json"), "adapter config")
        return "lora_adapter"
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{role} {path}: no config.json, so it is not a model checkpoint{_no_config_hint(path)}")
    model_type = read_json(config_path, "model config").get("model_type")
    if model_type not in MODEL_TYPES:
        llm = " (an LLM: for training pass it as --llm_path)" if model_type in ("llama", "qwen2", "mistral") else ""
        raise CheckpointError(f"{config_path}: model_type {model_type!r}{llm} is neither a PIIP-LLaVA checkpoint of this "
                              "project ('piip_llava') nor an official OpenGVLab one ('llava_llama')")
    return MODEL_TYPES[model_type]


def _wrong_kind(path: str, role: str, kind: Kind, expect: Sequence[Kind]) -> CheckpointError:
    if kind == "official":
        return CheckpointError(f"{role} {path}: is an official OpenGVLab checkpoint (config.json model_type "
                               f"'llava_llama'), not one of this project's; {CONVERT_HINT.format(path=path)}")
    if kind == "piip_llava" and "official" in expect:
        return CheckpointError(f"{role} {path}: is already a checkpoint of this project (model_type 'piip_llava'); it "
                               "needs no conversion: load it directly (serve.cli --model, MODEL_PATH=...)")
    if expect == ("lora_adapter",):
        return CheckpointError(f"{role} {path}: is a model checkpoint, not a LoRA adapter (no adapter_config.json); "
                               "give the adapter folder written by training with --tune lora")
    if kind == "lora_adapter":
        return CheckpointError(f"{role} {path}: is a LoRA adapter (adapter_config.json); merge it first "
                               f"(python -m piip_llava.train.merge_lora --adapter {path} --out OUT_DIR) and use OUT_DIR")
    return CheckpointError(f"{role} {path}: is a {kind} checkpoint; expected {' or '.join(expect)}")


def _check_ours(path: str, role: str) -> None:
    files = weight_files(path, ("model.safetensors", "pytorch_model.bin"))
    if not files:
        if os.path.isfile(os.path.join(path, PROJECTOR_FILE)):
            raise CheckpointError(f"{role} {path}: is a stage-1 output (projector weights only, {PROJECTOR_FILE}), not a "
                                  "whole model: pass it to stage 2 as --pretrained_projector (PRETRAINED_PROJECTOR=) "
                                  "and build the model from the preset")
        raise CheckpointError(f"{role} {path}: has config.json but no weights (model.safetensors); the save or copy "
                              "is incomplete: copy the checkpoint again, or use another one")
    for f in files:
        check_weight_file(f)
    from .configuration_piip_llava import PiipLlavaConfig

    try:
        PiipLlavaConfig.from_pretrained(path)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: not a valid PIIP-LLaVA config ({e}); the file is "
                              "damaged or was edited: copy the checkpoint again") from None


def _check_official(path: str, role: str) -> None:
    files = _official_weight_files(path)
    if not files:
        raise CheckpointError(f"{role} {path}: has config.json but no weights (*.safetensors or *.bin shards); the "
                              "download is incomplete: download the checkpoint again")
    for f in files:
        check_weight_file(f)


def _check_adapter(path: str, role: str) -> None:
    files = weight_files(path, ("adapter_model.safetensors", "adapter_model.bin"))
    if not files:
        raise CheckpointError(f"{role} {path}: has adapter_config.json but no adapter_model.safetensors; the save or "
                              "copy is incomplete: copy the adapter again")
    for f in files:
        check_weight_file(f)


def adapter_base(path: str, base: str | None = None) -> str:
    """The base checkpoint of LoRA adapter folder `path` (`base` wins over the adapter's `base_model_name_or_path`)."""
    if base:
        return base
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path}: no adapter_config.json, so it is not a LoRA adapter folder (written by "
                              "training with --tune lora)")
    found = read_json(config_path, "adapter config").get("base_model_name_or_path")
    if not found:
        raise CheckpointError(f"{config_path}: names no base model (base_model_name_or_path); pass the base "
                              "checkpoint explicitly (--base / --lora-base)")
    return found


def check_checkpoint(path: str, expect: Kind | Sequence[Kind] = "piip_llava", role: str = "checkpoint") -> Kind:
    """Check folder `path` before loading it; returns its kind, one of `expect`.

    `role` names the argument in messages (e.g. `--model`, `--model_name_or_path`). A LoRA adapter's base is
    checked too when `lora_adapter` is expected (as `adapter_base(path)`; callers with an explicit base check it).
    """
    expect = (expect,) if isinstance(expect, str) else tuple(expect)
    kind = checkpoint_kind(path, role)
    if kind not in expect:
        raise _wrong_kind(path, role, kind, expect)
    {"piip_llava": _check_ours, "official": _check_official, "lora_adapter": _check_adapter}[kind](path, role)
    return kind


def check_tokenizer(path: str, role: str = "checkpoint") -> None:
    """Folder `path` holds a tokenizer (`tokenizer.json`, a SentencePiece model or a BPE `vocab.json`)."""
    if not any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES):
        raise CheckpointError(f"{role} {path}: no tokenizer (tokenizer.json or tokenizer.model); copy the tokenizer "
                              "files of the model into it")
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        read_json(os.path.join(path, "tokenizer_config.json"), "tokenizer config")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m piip_llava.models.loading",
                                     description="Check a checkpoint folder before loading it.")
    parser.add_argument("path")
    parser.add_argument("--expect", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--role", default="checkpoint", help="what the folder was given as (for messages)")
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one-line messages")
    args = parser.parse_args(argv)
    try:
        kind = check_checkpoint(args.path, args.expect, args.role)
        if kind == "lora_adapter":
            check_checkpoint(adapter_base(args.path), "piip_llava", f"the base of adapter {args.path}:")
    except CheckpointError as e:
        return cli_error(e, args.debug)
    print(f"{args.path}: {kind} checkpoint, complete")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
