"""Streaming LLaVA-format record reader and the data-mixture tool.

`iter_records(path)` streams a JSON array (LLaVA's format, e.g. the 1 GB `llava_v1_5_mix665k.json`) or a JSONL file
record by record with byte offsets and line numbers, in bounded memory (a 16 MB window, decoded element by element
with the C JSON decoder). `LazySupervisedDataset` and the mixture tool both index files with it.

    python -m piip_llava.data.mixture RECIPE.yaml --out DIR

assembles training files from several sources (file, image root, optional `count` or `weight`, template), validates
every record (schema, image file exists, placeholder count), and writes `DIR/<stage>.jsonl` plus `report.json`,
`report.md` and `dropped.jsonl` (every dropped record with its source, id, line and reason). Memory stays flat:
records are streamed; sub-/up-sampling picks record indices with a seeded generator over numpy offset arrays.
Recipe schema (YAML):

    seed: 0
    image_folder: playground/data        # optional: output `image` paths relative to it (else absolute)
    stages:                               # or a single top-level `sources:` list (stage name "mixture")
      finetune:
        shuffle: false
        sources:
          - {name: mix665k, file: ..., image_root: ..., template: vicuna_v1, count: 100000}   # or weight: 0.5
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from piip_llava.constants import IMAGE_PLACEHOLDER

_WS = " \t\r\n"
_ID_RE = re.compile(r'"id"\s*:\s*("(?:[^"\\\n]|\\.){0,200}"|-?\d{1,20})')


class DataFormatError(ValueError):
    """A data file that cannot be read past some point; the message names the file, line, column and record."""


@dataclass
class RawRecord:
    """One record of a LLaVA file: position, 1-based line, parsed object (None and `error` set when unparsable)."""

    index: int
    start: int
    end: int
    line: int
    obj: Any
    error: str | None = None


def _is_json_array(path: str) -> bool:
    with open(path, "rb") as f:
        while True:
            ch = f.read(1)
            if not ch:
                return False
            if ch not in b" \t\r\n\xef\xbb\xbf":
                return ch == b"["


def iter_records(path: str, block_size: int = 1 << 24, progress: bool = False) -> Iterator[RawRecord]:
    """Stream the records of a JSON-array or JSONL file with byte offsets `[start, end)` and line numbers."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=f"reading {os.path.basename(path)}",
                   mininterval=2.0)
    try:
        if _is_json_array(path):
            yield from _iter_json_array(path, block_size, bar)
        else:
            yield from _iter_jsonl(path, bar)
    finally:
        if bar is not None:
            bar.close()


def _iter_jsonl(path: str, bar) -> Iterator[RawRecord]:
    pos = 0
    index = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            start, pos = pos, pos + len(raw)
            if bar is not None and line_no % 4096 == 0:
                bar.update(pos - bar.n)
            text = raw.strip()
            if not text:
                continue
            try:
                yield RawRecord(index, start, pos, line_no, json.loads(text))
            except ValueError as e:
                yield RawRecord(index, start, pos, line_no, None, f"bad_json: {e}")
            index += 1
    if bar is not None:
        bar.update(pos - bar.n)


def _iter_json_array(path: str, block_size: int, bar) -> Iterator[RawRecord]:
    # The file is decoded as latin-1 so that character offsets are byte offsets; JSON structure is ASCII, and an
    # element holding non-ASCII bytes is re-decoded from its UTF-8 bytes.
    decoder = json.JSONDecoder()
    with open(path, "rb") as f:
        buf, base, pos, eof = "", 0, 0, False
        line, line_pos = 1, 0

        def fill() -> bool:
            nonlocal buf, eof
            chunk = f.read(block_size)
            if not chunk:
                eof = True
                return False
            buf += chunk.decode("latin-1")
            return True

        def skip_ws() -> bool:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in _WS:
                    pos += 1
                if pos < len(buf):
                    return True
                if not fill():
                    return False

        def line_col(p: int) -> tuple[int, int]:
            n = line + buf.count("\n", line_pos, p)
            return n, p - (buf.rfind("\n", 0, p) + 1) + 1

        def at(p: int) -> str:
            n, col = line_col(p)
            return f"line {n}, column {col} (byte {base + p})"

        def where(p: int) -> str:
            return f"{path}: {at(p)}"

        def bad_record(start: int, err: json.JSONDecodeError, index: int) -> DataFormatError:
            # the record's own start line and id, then where the decoder stopped (the same line for one-line records)
            start_line, _ = line_col(start)
            m = _ID_RE.search(buf, start, min(err.pos, start + 4096))
            rid = f" (id {m.group(1)})" if m else ""
            return DataFormatError(
                f"{path}: record {index}{rid}, starting at line {start_line}, is not valid JSON: {err.msg} at "
                f"{at(err.pos)}. Fix or remove this record: a JSON array cannot be read past a "
                "broken element (JSONL files skip bad lines instead)")

        fill()
        if buf.startswith("\xef\xbb\xbf"):
            pos = 3
        if not skip_ws() or buf[pos] != "[":
            raise DataFormatError(f"{where(pos)}: expected '[' at the start of a JSON array")
        pos += 1
        index = 0
        while True:
            if not skip_ws():
                raise DataFormatError(f"{where(pos)}: unexpected end of file inside the JSON array")
            if buf[pos] == "]" and index == 0:
                return
            while True:  # decode one element; a window that ends inside it is extended and decoded again
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:
                        break
                except json.JSONDecodeError as e:
                    if eof:
                        raise bad_record(pos, e, index) from None
                fill()
            line += buf.count("\n", line_pos, pos)
            line_pos = pos
            if not buf[pos:end].isascii():
                obj = json.loads(buf[pos:end].encode("latin-1").decode("utf-8", errors="replace"))
            yield RawRecord(index, base + pos, base + end, line, obj)
            index += 1
            pos = end
            if not skip_ws():
                raise DataFormatError(f"{where(pos)}: unexpected end of file after record {index - 1}")
            if buf[pos] == "]":
                if bar is not None:
                    bar.update(base + pos - bar.n)
                return
            if buf[pos] != ",":
                raise DataFormatError(f"{where(pos)}: expected ',' or ']' after record {index - 1}")
            pos += 1
            if pos > block_size:  # drop the consumed prefix: the window stays ~2 blocks
                line += buf.count("\n", line_pos, pos)
                buf, base, line_pos = buf[pos:], base + pos, 0
                pos = 0
                if bar is not None:
                    bar.update(base - bar.n)


def read_record(path: str, start: int, end: int, fh=None) -> Any:
    """Parse the record stored in bytes `[start, end)` of `path` (optionally through an open binary handle)."""
    if fh is None:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
    else:
        fh.seek(start)
        data = fh.read(end - start)
    return json.loads(data)


# --------------------------------------------------------------------------------------------------- validation
def record_images(record: dict) -> list[str]:
    """The record's image paths (`image` may be a string, a list of strings, absent or None)."""
    image = record.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(x, str) for x in image):
        return list(image)
    raise ValueError("`image` must be a string or a list of strings")


def validate_record(record: Any, image_root: str | None, check_files: bool = True) -> str | None:
    """Return None for a usable LLaVA record, else a short reason key.

    Reasons: `schema`, `no_assistant_turn`, `multi_image`, `image_tags` (more `<image>` tags than images),
    `missing_image`.
    """
    if not isinstance(record, dict):
        return "schema"
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "schema"
    for t in conv:
        if not isinstance(t, dict) or t.get("from") not in ("human", "gpt") or not isinstance(t.get("value"), str):
            return "schema"
    if not any(t["from"] == "gpt" for t in conv[1:]) or not any(t["from"] == "human" for t in conv):
        return "no_assistant_turn"
    try:
        images = record_images(record)
    except ValueError:
        return "schema"
    if len(images) > 1:
        return "multi_image"
    tags = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conv if t["from"] == "human")
    if tags > len(images):
        return "image_tags"
    if images and check_files:
        path = images[0] if image_root is None else os.path.join(image_root, images[0])
        if not os.path.isfile(path):
            return "missing_image"
    return None


# --------------------------------------------------------------------------------------------------- recipes
@dataclass
class SourceSpec:
    name: str
    file: str
    image_root: str | None = None
    template: str | None = None
    count: int | None = None
    weight: float | None = None

    def __post_init__(self):
        if self.count is not None and self.weight is not None:
            raise ValueError(f"source {self.name!r}: give `count` or `weight`, not both")
        if self.count is not None and self.count < 0 or self.weight is not None and self.weight < 0:
            raise ValueError(f"source {self.name!r}: count/weight must be >= 0")


@dataclass
class StageSpec:
    name: str
    sources: list[SourceSpec]
    shuffle: bool = False
    template: str | None = None


@dataclass
class Recipe:
    stages: list[StageSpec]
    seed: int = 0
    image_folder: str | None = None
    extra: dict = field(default_factory=dict)


def _resolve(path: str | None, base: str) -> str | None:
    if path is None:
        return None
    path = os.path.expanduser(os.path.expandvars(str(path)))
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def load_recipe(path: str, root: str | None = None) -> Recipe:
    """Parse and validate a recipe YAML. Relative paths resolve against `root` (default: the current directory)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a recipe is a mapping")
    root = root or os.getcwd()
    known = {"seed", "image_folder", "stages", "sources", "name", "description"}
    unknown = set(cfg) - known
    if unknown:
        raise ValueError(f"{path}: unknown recipe keys {sorted(unknown)}; known: {sorted(known)}")
    stages_cfg = cfg.get("stages")
    if stages_cfg is None:
        if "sources" not in cfg:
            raise ValueError(f"{path}: needs `stages` or `sources`")
        stages_cfg = {"mixture": {"sources": cfg["sources"]}}
    stages = []
    for sname, scfg in stages_cfg.items():
        srcs = []
        for i, s in enumerate(scfg.get("sources") or []):
            bad = set(s) - {"name", "file", "image_root", "template", "count", "weight", "note"}
            if bad or "file" not in s:
                raise ValueError(f"{path}: stage {sname!r} source {i}: needs `file`; unknown keys {sorted(bad)}")
            srcs.append(SourceSpec(name=str(s.get("name") or os.path.basename(s["file"])),
                                   file=_resolve(s["file"], root), image_root=_resolve(s.get("image_root"), root),
                                   template=s.get("template", scfg.get("template")), count=s.get("count"),
                                   weight=s.get("weight")))
        if not srcs:
            raise ValueError(f"{path}: stage {sname!r} has no sources")
        templates = {s.template for s in srcs if s.template}
        if len(templates) > 1:
            raise ValueError(f"{path}: stage {sname!r} mixes templates {sorted(templates)}; a stage trains with one")
        names = [s.name for s in srcs]
        if len(set(names)) != len(names):
            raise ValueError(f"{path}: stage {sname!r} has duplicate source names")
        stages.append(StageSpec(sname, srcs, bool(scfg.get("shuffle", False)), next(iter(templates), None)))
    return Recipe(stages, int(cfg.get("seed", 0)), _resolve(cfg.get("image_folder"), root))


# --------------------------------------------------------------------------------------------------- the tool
def _output_record(rec: dict, src: SourceSpec, image_folder: str | None, idx: int) -> dict:
    out = dict(rec)
    if "id" not in out:
        out["id"] = f"{src.name}:{idx}"
    images = record_images(rec)
    if images:
        path = images[0] if src.image_root is None else os.path.join(src.image_root, images[0])
        path = os.path.abspath(path)
        out["image"] = os.path.relpath(path, image_folder) if image_folder else path
    out["source"] = src.name
    return out


def _needs_all(src: SourceSpec) -> bool:
    return src.count is None and (src.weight is None or src.weight == 1.0)


def _selection(n_valid: int, src: SourceSpec, rng: np.random.Generator) -> np.ndarray | None:
    """Indices (into the valid records) to write, in file order; None means all of them once.

    `count` > valid repeats the whole source and samples the remainder without replacement (seeded).
    """
    if _needs_all(src):
        return None
    target = src.count if src.count is not None else int(round(src.weight * n_valid))
    if n_valid == 0:
        return np.zeros(0, dtype=np.int64)
    full, rest = divmod(target, n_valid)
    parts = [np.arange(n_valid, dtype=np.int64)] * full
    parts.append(np.sort(rng.choice(n_valid, size=rest, replace=False)).astype(np.int64))
    return np.sort(np.concatenate(parts), kind="stable")


def build_mixture(recipe: Recipe, out_dir: str, progress: bool = True, check_files: bool = True,
                  max_examples: int = 20) -> dict:
    """Validate, sample and write every stage of `recipe` into `out_dir`; return the report dict."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(recipe.seed)
    report: dict[str, Any] = {"seed": recipe.seed, "image_folder": recipe.image_folder, "stages": {}}
    t0 = time.time()
    with open(os.path.join(out_dir, "dropped.jsonl"), "w", encoding="utf-8") as dropped_f:
        for stage in recipe.stages:
            out_path = os.path.join(out_dir, f"{stage.name}.jsonl")
            tmp_order = []  # per source: (valid offsets array) for the shuffle pass
            srep = {"output": out_path, "template": stage.template, "written": 0, "sources": []}
            with open(out_path, "w", encoding="utf-8") as out_f:
                for src in stage.sources:
                    if not os.path.isfile(src.file):
                        raise FileNotFoundError(f"source {src.name!r}: {src.file} does not exist")
                    drops: Counter = Counter()
                    examples: list[dict] = []
                    direct = _needs_all(src) and not stage.shuffle  # write while reading: one pass
                    starts, ends = array("q"), array("q")  # offsets of valid records: 16 bytes each
                    n_read = n_valid = n_written = 0
                    for raw in iter_records(src.file, progress=progress):
                        n_read += 1
                        reason = raw.error.split(":")[0] if raw.error else validate_record(
                            raw.obj, src.image_root, check_files)
                        if reason is not None:
                            drops[reason] += 1
                            rid = raw.obj.get("id") if isinstance(raw.obj, dict) else None
                            entry = {"stage": stage.name, "source": src.name, "id": rid, "index": raw.index,
                                     "line": raw.line, "reason": reason}
                            dropped_f.write(json.dumps(entry) + "\n")
                            if len(examples) < max_examples:
                                examples.append(entry)
                            continue
                        if direct:
                            out_f.write(json.dumps(_output_record(raw.obj, src, recipe.image_folder, raw.index),
                                                   ensure_ascii=False) + "\n")
                            n_written += 1
                        else:
                            starts.append(raw.start)
                            ends.append(raw.end)
                        n_valid += 1
                    if not direct:
                        sel = _selection(n_valid, src, rng)
                        sel = np.arange(n_valid, dtype=np.int64) if sel is None else sel
                        s_arr = np.frombuffer(starts, dtype=np.int64)
                        e_arr = np.frombuffer(ends, dtype=np.int64)
                        if stage.shuffle:
                            tmp_order.append((src, s_arr[sel], e_arr[sel]))
                        else:
                            with open(src.file, "rb") as fh:
                                for k in sel:
                                    rec = read_record(src.file, int(s_arr[k]), int(e_arr[k]), fh)
                                    out_f.write(json.dumps(_output_record(rec, src, recipe.image_folder, int(k)),
                                                           ensure_ascii=False) + "\n")
                        n_written = len(sel)
                    srep["sources"].append({
                        "name": src.name, "file": src.file, "image_root": src.image_root, "template": src.template,
                        "count": src.count, "weight": src.weight, "read": n_read, "valid": n_valid,
                        "dropped": dict(sorted(drops.items())), "written": n_written,
                        "upsampled": n_written > n_valid, "dropped_examples": examples,
                    })
                    srep["written"] += n_written
                if stage.shuffle and tmp_order:
                    src_ids = np.concatenate([np.full(len(s), i, dtype=np.int32) for i, (_, s, _) in enumerate(tmp_order)])
                    pos = np.concatenate([np.arange(len(s), dtype=np.int64) for _, s, _ in tmp_order])
                    perm = rng.permutation(len(src_ids))
                    handles = [open(src.file, "rb") for src, _, _ in tmp_order]  # noqa: SIM115
                    try:
                        for p in perm:
                            i, k = int(src_ids[p]), int(pos[p])
                            src, s_arr, e_arr = tmp_order[i]
                            rec = read_record(src.file, int(s_arr[k]), int(e_arr[k]), handles[i])
                            out_f.write(json.dumps(_output_record(rec, src, recipe.image_folder, k),
                                                   ensure_ascii=False) + "\n")
                    finally:
                        for h in handles:
                            h.close()
            report["stages"][stage.name] = srep
    report["seconds"] = round(time.time() - t0, 2)
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(render_report_md(report))
    return report


def render_report_md(report: dict) -> str:
    lines = ["# Data mixture report", "", f"seed {report['seed']}, {report.get('seconds', 0)} s", ""]
    for sname, srep in report["stages"].items():
        lines += [f"## Stage `{sname}` -> `{srep['output']}` ({srep['written']:,} records, template "
                  f"{srep['template'] or 'unspecified'})", "",
                  "| source | read | valid | dropped | written | drop reasons |", "|---|---:|---:|---:|---:|---|"]
        for s in srep["sources"]:
            reasons = ", ".join(f"{k}: {v:,}" for k, v in s["dropped"].items()) or "-"
            lines.append(f"| {s['name']} | {s['read']:,} | {s['valid']:,} | {sum(s['dropped'].values()):,} | "
                         f"{s['written']:,}{' (upsampled)' if s['upsampled'] else ''} | {reasons} |")
        lines.append("")
        for s in srep["sources"]:
            if s["dropped_examples"]:
                lines += [f"Dropped examples from `{s['name']}` (all in dropped.jsonl):", ""]
                lines += [f"- id `{e['id']}`, line {e['line']}: {e['reason']}" for e in s["dropped_examples"]]
                lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m piip_llava.data.mixture", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument("--out", required=True, help="output folder (stage JSONL files + report.json/md)")
    parser.add_argument("--root", default=None, help="folder that relative recipe paths resolve against (default: cwd)")
    parser.add_argument("--no-check-files", action="store_true", help="skip the image-exists check")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.root)
    try:
        report = build_mixture(recipe, args.out, progress=not args.no_progress, check_files=not args.no_check_files)
    except (DataFormatError, FileNotFoundError) as e:  # a broken JSON array, a missing source file: one line
        from piip_llava.models.loading import cli_error

        return cli_error(e)
    for sname, srep in report["stages"].items():
        dropped = sum(sum(s["dropped"].values()) for s in srep["sources"])
        print(f"{sname}: wrote {srep['written']:,} records to {srep['output']} ({dropped:,} dropped)")
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
