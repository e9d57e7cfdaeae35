"""MME (LLaVA-1.5 protocol): LLaVA's answer conversion and MME's official calculation.

* Questions: ``llava_mme.jsonl`` through ``model_vqa_loader`` (``question_id`` = ``<category>/<image file>``;
  ``text`` = the MME question + LLaVA's short-answer suffix, sent and recorded verbatim).
* Conversion (``playground/data/eval/MME/convert_answer_to_mme.py``): the ground truth is read from
  ``MME_Benchmark_release_version/<category>/{questions_answers_YN/,}<stem>.txt`` (lines ``question<TAB>Yes|No``);
  an answer's key is (category, ``<stem before the first '.'>.txt``, prompt without the short-answer suffix, with
  " Please answer yes or no." appended when absent, or the two-space variant some MME files use). The
  ``<category>.txt`` files for MME's own ``eval_tool/calculation.py`` are written as well.
* Calculation (``eval_tool/calculation.py``): GT and prediction lower-cased; a prediction is "yes"/"no" when it is
  exactly that, else "yes" when its first 4 characters contain "yes", else "no" when they contain "no", else
  "other" (wrong). Per category ``acc`` (questions) and ``acc+`` (images with both questions right); category
  score = 100 acc + 100 acc+; Perception = sum of the 10 perception categories (max 2000), Cognition = sum of the
  4 cognition ones (max 800).

The official tool pairs lines two at a time in file order; here the two questions of an image are grouped by
image (identical on a complete file in question order, and still right when a line is missing or out of order).
With ``--question-file``, questions without an answer line count as wrong ("other"); error records are wrong.
"""
from __future__ import annotations

import argparse
import os
from collections import defaultdict
from pathlib import Path

from piip_llava.evaluation.io import answers_of, load_question_jsonl, read_jsonl
from piip_llava.evaluation.runner import QuestionRecord
from piip_llava.evaluation.task import DataLayout, Task

__all__ = ["COGNITION", "PERCEPTION", "TASK", "convert_answers", "load_mme_ground_truth", "mme_label",
           "score_mme"]

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SHORT_ANSWER = "Answer the question using a single word or phrase."
YES_NO = " Please answer yes or no."


def load_mme_ground_truth(mme_dir: str | os.PathLike) -> dict[tuple[str, str, str], str]:
    """``{(category, "<stem>.txt", question): "Yes"|"No"}`` from ``MME_Benchmark_release_version``."""
    root = Path(mme_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"MME folder not found: {mme_dir}")
    gt: dict[tuple[str, str, str], str] = {}
    for category_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = category_dir / "questions_answers_YN" if (category_dir / "images").is_dir() else category_dir
        for txt in sorted(qa_dir.glob("*.txt")):
            for lineno, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) != 2:
                    raise ValueError(f"{txt}:{lineno}: expected 'question<TAB>answer', got {line!r}")
                gt[(category_dir.name, txt.name, parts[0])] = parts[1]
    if not gt:
        raise ValueError(f"{mme_dir}: no <category>/[questions_answers_YN/]<image>.txt ground-truth files")
    return gt


def _clean_prompt(prompt: str, category: str, file: str, gt: dict) -> str:
    if SHORT_ANSWER in prompt:
        prompt = prompt.replace(SHORT_ANSWER, "").strip()
    if "Please answer yes or no." not in prompt:
        prompt = prompt + YES_NO
        if (category, file, prompt) not in gt:
            prompt = prompt.replace(YES_NO, "  Please answer yes or no.")
    return prompt


def convert_answers(answers: list[dict] | str | os.PathLike, gt: dict[tuple[str, str, str], str],
                    results_dir: str | os.PathLike | None = None) -> dict[str, list[tuple[str, str, str, str]]]:
    """``convert_answer_to_mme.py``: ``{category: [(file, prompt, gt, prediction)]}`` in answers order; writes
    ``<results_dir>/<category>.txt`` when given. A line without ground truth raises naming the line."""
    results: dict[str, list[tuple[str, str, str, str]]] = defaultdict(list)
    for lineno, a in enumerate(answers_of(answers), start=1):
        qid = str(a.get("question_id", ""))
        category = qid.split("/")[0]
        file = qid.split("/")[-1].split(".")[0] + ".txt"
        prompt = _clean_prompt(str(a.get("prompt", "")), category, file, gt)
        if (category, file, prompt) not in gt:
            raise ValueError(f"answers record {lineno}: no MME ground truth for {category}/{file} {prompt!r}")
        text = "" if a.get("error") else str(a.get("text", ""))
        results[category].append((file, prompt, gt[(category, file, prompt)], text))
    if results_dir is not None:
        out = Path(results_dir)
        out.mkdir(parents=True, exist_ok=True)
        for category, rows in results.items():
            with open(out / f"{category}.txt", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write("\t".join(row) + "\n")
    return dict(results)


def mme_label(prediction: str) -> str:
    """``calculation.parse_pred_ans`` on the lower-cased prediction: "yes", "no" or "other"."""
    pred = prediction.lower()
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def score_mme(converted: dict[str, list[tuple[str, str, str, str]]],
              missing: dict[str, list[str]] | None = None) -> dict:
    """Per-category acc / acc+ / score, Perception and Cognition totals (the summary's score is Perception).

    ``missing``: ``{category: [image file, ...]}`` of questions without an answer line (counted as "other")."""
    per_cat: dict[str, dict] = {}
    for category in sorted(set(converted) | set(missing or {})):
        images: dict[str, list[bool]] = defaultdict(list)
        other = 0
        for file, _prompt, gt, pred in converted.get(category, []):
            label = mme_label(pred)
            other += label == "other"
            images[file].append(label == gt.lower())
        for file in (missing or {}).get(category, []):
            images[file.split(".")[0] + ".txt"].append(False)
            other += 1
        results = [hit for hits in images.values() for hit in hits]
        acc = sum(results) / len(results) if results else 0.0
        acc_plus = sum(1 for hits in images.values() if len(hits) == 2 and all(hits)) / len(images) if images else 0.0
        per_cat[category] = {"acc": 100 * acc, "acc_plus": 100 * acc_plus, "score": 100 * acc + 100 * acc_plus,
                             "questions": len(results), "images": len(images), "other": other,
                             "unpaired_images": sum(1 for hits in images.values() if len(hits) != 2)}
    perception = sum(per_cat[c]["score"] for c in PERCEPTION if c in per_cat)
    cognition = sum(per_cat[c]["score"] for c in COGNITION if c in per_cat)
    return {"benchmark": "mme", "metric": "perception", "score": round(perception, 2), "perception": perception,
            "cognition": cognition, "per_category": per_cat,
            "missing_categories": [c for c in PERCEPTION + COGNITION if c not in per_cat],
            "unknown_categories": [c for c in per_cat if c not in PERCEPTION + COGNITION]}


def _add_arguments(p) -> None:
    p.add_argument("--question-file", help="llava_mme.jsonl")
    p.add_argument("--image-folder", help="MME_Benchmark_release_version (default: --mme-dir)")
    p.add_argument("--mme-dir", required=True, help="MME_Benchmark_release_version (the ground-truth .txt files)")
    p.add_argument("--results-dir", help="where to write <category>.txt for MME's calculation.py "
                                         "(default: <answers dir>/mme_results)")


def _load(args: argparse.Namespace) -> list[QuestionRecord]:
    if not args.question_file:
        raise SystemExit("error: --question-file is required to generate")
    return load_question_jsonl(args.question_file, args.image_folder or args.mme_dir, image_decode=args.image_decode)


def _score(args: argparse.Namespace, answers: Path) -> dict:
    records = answers_of(answers)
    converted = convert_answers(records, load_mme_ground_truth(args.mme_dir),
                                args.results_dir or answers.parent / "mme_results")
    missing: dict[str, list[str]] = defaultdict(list)
    if args.question_file:
        have = {(str(a.get("question_id")), a.get("prompt")) for a in records}
        for q in read_jsonl(args.question_file):
            if (str(q["question_id"]), q.get("text")) not in have:
                missing[str(q["question_id"]).split("/")[0]].append(str(q["question_id"]).split("/")[-1])
    s = score_mme(converted, missing)
    s["missing_answers"] = sum(len(v) for v in missing.values())
    s["results_dir"] = str(args.results_dir or answers.parent / "mme_results")
    return s


def _format(s: dict) -> str:
    out = []
    for title, cats, total in (("Perception", PERCEPTION, s["perception"]), ("Cognition", COGNITION, s["cognition"])):
        out.append(f"=========== {title} ===========\ntotal score: {total:.2f}")
        for c in cats:
            if c in s["per_category"]:
                m = s["per_category"][c]
                out.append(f"\t {c}  score: {m['score']:.2f} (acc {m['acc']:.2f}, acc+ {m['acc_plus']:.2f})")
    if s["missing_categories"]:
        out.append(f"warning: no answers for {', '.join(s['missing_categories'])} (scored 0)")
    if s["missing_answers"]:
        out.append(f"warning: {s['missing_answers']} question(s) without an answer line (counted wrong)")
    return "\n".join(out)


def _layout(data: Path, out: Path) -> DataLayout:
    d = data / "MME"
    q, root = d / "llava_mme.jsonl", d / "MME_Benchmark_release_version"
    return DataLayout((q, root), ("--question-file", str(q), "--mme-dir", str(root),
                                  "--answers-file", str(out / "mme.jsonl")))


TASK = Task(
    name="mme", title="MME-P", description="MME: perception and cognition scores (official calculation)",
    add_arguments=_add_arguments, load_questions=_load, score=_score, format_summary=_format, layout=_layout,
    max_new_tokens=128, in_paper_row=False,
    usage="""example:
  python eval/mme.py --model-path CKPT --question-file playground/data/eval/MME/llava_mme.jsonl \\
      --mme-dir playground/data/eval/MME/MME_Benchmark_release_version --answers-file out/mme.jsonl""",
)
