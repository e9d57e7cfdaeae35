"""ScienceQA-IMG (LLaVA-1.5 protocol): ``model_vqa_science.py --single-pred-prompt`` prompts and
``eval_science_qa.py`` parsing (exact letter, ``"X. ..."``, a single ``The answer is X.``); Accuracy and
IMG-Accuracy (PIIP's SQA-I: items whose recorded prompt holds ``<image>``)."""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from piip_llava.evaluation.io import answers_of, read_json
from piip_llava.evaluation.runner import QuestionRecord, image_from_file
from piip_llava.evaluation.task import DataLayout, Task

__all__ = ["SQA_INSTRUCTION", "TASK", "load_scienceqa_questions", "parse_scienceqa_answer", "score_scienceqa"]

SQA_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SQA_OPTIONS = ("A", "B", "C", "D", "E")


def load_scienceqa_questions(question_file: str | os.PathLike, image_folder: str | os.PathLike,
                             single_pred_prompt: bool = True, image_decode: str = "official") -> list[QuestionRecord]:
    """``llava_test_CQM-A.json`` -> records with ``model_vqa_science.py`` prompts (``<image>\\n`` prefix in the
    recorded prompt of image items, letter instruction appended to both prompt and message)."""
    items = read_json(question_file)
    records = []
    for i, item in enumerate(items):
        try:
            idx = item["id"]
            qs = item["conversations"][0]["value"].replace("<image>", "").strip()
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            records.append(QuestionRecord(item.get("id", f"item{i}") if isinstance(item, dict) else f"item{i}",
                                          "", "", error=f"{question_file}: item {i}: malformed ({exc!r})"))
            continue
        cur_prompt, image = qs, None
        if "image" in item:
            image = image_from_file(Path(image_folder) / item["image"], decode=image_decode)
            cur_prompt = "<image>\n" + cur_prompt
        if single_pred_prompt:
            qs = qs + "\n" + SQA_INSTRUCTION
            cur_prompt = cur_prompt + "\n" + SQA_INSTRUCTION
        records.append(QuestionRecord(idx, cur_prompt, qs, image=image))
    return records


_SQA_PATTERN = re.compile(r"The answer is ([A-Z]).")


def parse_scienceqa_answer(text: str, options: tuple[str, ...] = SQA_OPTIONS) -> str:
    """``eval_science_qa.py``: exact letter; ``"X. ..."``; a single ``The answer is X.``; else ``FAILED``."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    res = _SQA_PATTERN.findall(text)
    return res[0] if len(res) == 1 else "FAILED"


def score_scienceqa(answers: list[dict] | str | os.PathLike, problems_json: str | os.PathLike,
                    pid_splits_json: str | os.PathLike, split: str = "test") -> dict:
    """Accuracy and IMG-Accuracy (PIIP's SQA-I). As in the reference, an unanswered problem has prompt
    "Unknown", so it counts in the overall total but not in the IMG total."""
    split_ids = read_json(pid_splits_json)[split]
    problems = read_json(problems_json)
    preds = {str(a["question_id"]): a for a in answers_of(answers)}
    correct = total = img_correct = img_total = 0
    for pid in split_ids:
        prob = problems[pid]
        pred = preds.get(str(pid))
        text = "FAILED" if pred is None or pred.get("error") else str(pred.get("text", ""))
        prompt = "Unknown" if pred is None else str(pred.get("prompt", ""))
        answer = parse_scienceqa_answer(text)
        pred_idx = SQA_OPTIONS.index(answer) if answer in SQA_OPTIONS[:len(prob["choices"])] else -1
        hit = pred_idx == prob["answer"]
        correct += hit
        total += 1
        if "<image>" in prompt:
            img_correct += hit
            img_total += 1
    img_acc = 100.0 * img_correct / img_total if img_total else 0.0
    return {"benchmark": "scienceqa", "metric": "img_accuracy", "score": round(img_acc, 2),
            "img_accuracy": img_acc, "accuracy": 100.0 * correct / total if total else 0.0,
            "total": total, "img_total": img_total}


def _add_arguments(p) -> None:
    p.add_argument("--question-file", help="llava_test_CQM-A.json")
    p.add_argument("--image-folder", help="images/test/")
    p.add_argument("--base-dir", required=True, help="folder with problems.json and pid_splits.json")
    p.add_argument("--split", default="test")
    p.add_argument("--no-single-pred-prompt", action="store_true")


def _load(args: argparse.Namespace) -> list[QuestionRecord]:
    if not (args.question_file and args.image_folder):
        raise SystemExit("error: --question-file and --image-folder are required to generate")
    return load_scienceqa_questions(args.question_file, args.image_folder,
                                    single_pred_prompt=not args.no_single_pred_prompt, image_decode=args.image_decode)


def _score(args: argparse.Namespace, answers: Path) -> dict:
    base = Path(args.base_dir)
    return score_scienceqa(answers, base / "problems.json", base / "pid_splits.json", args.split)


def _layout(data: Path, out: Path) -> DataLayout:
    d = data / "scienceqa"
    q, img = d / "llava_test_CQM-A.json", d / "images" / "test"
    return DataLayout((q, img, d / "problems.json", d / "pid_splits.json"),
                      ("--question-file", str(q), "--image-folder", str(img), "--base-dir", str(d),
                       "--answers-file", str(out / "scienceqa.jsonl")))


TASK = Task(
    name="scienceqa", title="SQA-I", description="ScienceQA test: IMG-Accuracy (SQA-I) and Accuracy",
    add_arguments=_add_arguments, load_questions=_load, score=_score, layout=_layout, max_new_tokens=1024,
    format_summary=lambda s: f"Total: {s['total']}, Accuracy: {s['accuracy']:.2f}%, "
                             f"IMG-Accuracy: {s['img_accuracy']:.2f}%",
    prompt_options=lambda a: {"single_pred_prompt": not a.no_single_pred_prompt},
    usage="""example:
  python eval/scienceqa.py --model-path CKPT --question-file playground/data/eval/scienceqa/llava_test_CQM-A.json \\
      --image-folder playground/data/eval/scienceqa/images/test --base-dir playground/data/eval/scienceqa \\
      --answers-file out/scienceqa.jsonl""",
)
