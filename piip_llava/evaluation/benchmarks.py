"""The other LLaVA-1.5 / PIIP benchmarks: POPE, GQA, ScienceQA-IMG, SEED-Bench (image), VQAv2, MM-Vet.

Each follows the LLaVA-1.5 question file and conversion/scoring script (spec eval_data_formats §5):

* jsonl question files (``model_vqa_loader`` / ``model_vqa``): ``text`` is sent and recorded verbatim;
* POPE: ``eval_pope.py`` keyword yes/no mapping, answers zipped **positionally** with each
  ``coco_pope_<category>.json`` label file, F1 (yes = positive) per category, score = mean F1;
* GQA: ``convert_gqa_for_eval.py`` predictions file (text ``rstrip('.')`` + lower), plus a local exact-match
  accuracy when the testdev-balanced questions JSON is available;
* ScienceQA: ``model_vqa_science.py --single-pred-prompt`` prompt, ``eval_science_qa.py`` parsing
  (exact letter, ``"X. ..."``, ``The answer is X.``), IMG-Accuracy on items whose prompt holds ``<image>``;
* SEED-Bench: exact string equality of ``text`` and the answer letter (``"A."`` is wrong), image questions;
* VQAv2: ``convert_vqav2_for_submission.py`` (EvalAI processing, ``""`` for unanswered ids);
* MM-Vet: ``convert_mmvet_for_eval.py`` (``{"v1_<id>": text}``) for the GPT-4 grader.

Error records written by the runner (``"error"`` field) count as wrong wherever a local score is computed.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from piip_llava.evaluation.answer_processing import EvalAIAnswerProcessor
from piip_llava.evaluation.runner import QuestionRecord, image_from_file, read_answers

__all__ = [
    "SQA_INSTRUCTION",
    "load_question_jsonl",
    "load_scienceqa_questions",
    "parse_scienceqa_answer",
    "pope_yes_no",
    "score_gqa",
    "score_pope",
    "score_scienceqa",
    "score_seed",
    "write_gqa_predictions",
    "write_mmvet_results",
    "write_seed_upload",
    "write_vqav2_submission",
]

SQA_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SQA_OPTIONS = ("A", "B", "C", "D", "E")


def _answers(answers: list[dict] | str | os.PathLike) -> list[dict]:
    return answers if isinstance(answers, list) else read_answers(answers)


def _read_jsonl(path: str | os.PathLike) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
    return out


def load_question_jsonl(question_file: str | os.PathLike, image_folder: str | os.PathLike | None,
                        keep: Any = None) -> list[QuestionRecord]:
    """LLaVA ``model_vqa_loader`` question file (``question_id``, ``image``, ``text``): text sent and recorded
    verbatim. ``keep(row) -> bool`` filters rows. Malformed lines become error records (id = line)."""
    records: list[QuestionRecord] = []
    with open(question_file, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{question_file}:{lineno}"
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                records.append(QuestionRecord(f"line{lineno}", "", "", error=f"{where}: invalid JSON ({exc})"))
                continue
            if not isinstance(row, dict) or "question_id" not in row:
                records.append(QuestionRecord(f"line{lineno}", "", "", error=f"{where}: missing field 'question_id'"))
                continue
            if keep is not None and not keep(row):
                continue
            qid = row["question_id"]
            if not isinstance(row.get("text"), str):
                records.append(QuestionRecord(qid, "", "", error=f"{where}: missing or non-string field 'text'"))
                continue
            image = None
            if row.get("image") is not None:
                if image_folder is None:
                    raise ValueError(f"{where}: question has an image but no image folder was given")
                image = image_from_file(Path(image_folder) / row["image"])
            records.append(QuestionRecord(qid, row["text"], row["text"], image=image))
    return records


# ---------------------------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------------------------
def pope_yes_no(text: str) -> str:
    """``eval_pope.py``: first sentence, commas removed, split on spaces; "no" if No/not/no is a word."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _binary_metrics(preds: list[int], labels: list[int]) -> dict:
    tp = sum(1 for p, l in zip(preds, labels) if p == 1 and l == 1)
    fp = sum(1 for p, l in zip(preds, labels) if p == 1 and l == 0)
    tn = sum(1 for p, l in zip(preds, labels) if p == 0 and l == 0)
    fn = sum(1 for p, l in zip(preds, labels) if p == 0 and l == 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(preds)
    return {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "accuracy": (tp + tn) / n if n else 0.0,
            "precision": precision, "recall": recall, "f1": f1, "yes_ratio": sum(preds) / n if n else 0.0}


def score_pope(answers: list[dict] | str | os.PathLike, question_file: str | os.PathLike,
               annotation_dir: str | os.PathLike) -> dict:
    """Per-category F1 and the mean (x100). Every file in ``annotation_dir`` must be ``coco_pope_*.json``."""
    answers = _answers(answers)
    category_of = {q["question_id"]: q.get("category") for q in _read_jsonl(question_file)}
    per_cat, warnings = {}, []
    for name in sorted(os.listdir(annotation_dir)):
        if not (name.startswith("coco_pope_") and name.endswith(".json")):
            raise ValueError(f"{annotation_dir}: unexpected file {name!r}; POPE wants only coco_pope_<category>.json")
        category = name[len("coco_pope_"):-len(".json")]
        labels = [0 if row["label"] == "no" else 1 for row in _read_jsonl(Path(annotation_dir) / name)]
        cur = [a for a in answers if category_of.get(a.get("question_id")) == category]
        if len(cur) != len(labels):
            warnings.append(f"{category}: {len(cur)} answers vs {len(labels)} labels (zipped positionally)")
        preds = []
        for a, label in zip(cur, labels):
            if a.get("error"):
                preds.append(1 - label)  # an error record is a wrong answer
            else:
                preds.append(0 if pope_yes_no(str(a.get("text", ""))) == "no" else 1)
        m = _binary_metrics(preds, labels[:len(preds)])
        m["samples"] = len(preds)
        m["errors"] = sum(1 for a in cur if a.get("error"))
        per_cat[category] = m
    f1s = [m["f1"] for m in per_cat.values()]
    mean_f1 = 100.0 * sum(f1s) / len(f1s) if f1s else 0.0
    return {"benchmark": "pope", "metric": "mean_f1", "score": round(mean_f1, 2), "mean_f1": mean_f1,
            "per_category": per_cat, "warnings": warnings}


# ---------------------------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------------------------
def write_gqa_predictions(answers: list[dict] | str | os.PathLike, dst: str | os.PathLike) -> list[dict]:
    """``testdev_balanced_predictions.json`` for the official GQA ``eval.py``."""
    preds = [{"questionId": a["question_id"], "prediction": str(a.get("text", "")).rstrip(".").lower()}
             for a in _answers(answers)]
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(preds, f)
    return preds


def score_gqa(answers: list[dict] | str | os.PathLike, questions_json: str | os.PathLike) -> dict:
    """Exact-match accuracy over the questions of ``testdev_balanced_questions.json`` (missing = wrong)."""
    answers = _answers(answers)
    with open(questions_json, encoding="utf-8") as f:
        questions = json.load(f)
    preds = {str(a["question_id"]): ("" if a.get("error") else str(a.get("text", "")).rstrip(".").lower())
             for a in answers}
    hits = missing = 0
    for qid, q in questions.items():
        if str(qid) not in preds:
            missing += 1
            continue
        hits += preds[str(qid)] == q["answer"]
    acc = 100.0 * hits / len(questions) if questions else 0.0
    return {"benchmark": "gqa", "metric": "accuracy", "score": round(acc, 2), "accuracy": acc,
            "questions": len(questions), "missing": missing}


# ---------------------------------------------------------------------------------------------------------------
# ScienceQA-IMG
# ---------------------------------------------------------------------------------------------------------------
def load_scienceqa_questions(question_file: str | os.PathLike, image_folder: str | os.PathLike,
                             single_pred_prompt: bool = True) -> list[QuestionRecord]:
    """``llava_test_CQM-A.json`` -> records with ``model_vqa_science.py`` prompts (``<image>\\n`` prefix in the
    recorded prompt of image items, letter instruction appended to both prompt and message)."""
    with open(question_file, encoding="utf-8") as f:
        items = json.load(f)
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
            image = image_from_file(Path(image_folder) / item["image"])
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
    with open(pid_splits_json, encoding="utf-8") as f:
        split_ids = json.load(f)[split]
    with open(problems_json, encoding="utf-8") as f:
        problems = json.load(f)
    preds = {str(a["question_id"]): a for a in _answers(answers)}
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


# ---------------------------------------------------------------------------------------------------------------
# SEED-Bench
# ---------------------------------------------------------------------------------------------------------------
def _seed_qid(qid: Any) -> Any:
    try:
        return int(qid)
    except (TypeError, ValueError):
        return qid


def score_seed(answers: list[dict] | str | os.PathLike, seed_json: str | os.PathLike,
               data_type: str | None = "image") -> dict:
    """``convert_seed_for_submission.eval_single``: exact equality ``text == answer`` (so ``"A."`` is wrong),
    over the questions of ``data_type`` (missing answers are wrong); per question type accuracy."""
    with open(seed_json, encoding="utf-8") as f:
        data = json.load(f)
    results = {_seed_qid(a["question_id"]): a for a in _answers(answers)}
    type_names = {v: k for k, v in data.get("question_type", {}).items()}
    counts: dict[Any, list[int]] = defaultdict(lambda: [0, 0])
    for q in data["questions"]:
        if data_type is not None and q["data_type"] != data_type:
            continue
        c = counts[q["question_type_id"]]
        c[1] += 1
        row = results.get(_seed_qid(q["question_id"]))
        if row is not None and not row.get("error") and row.get("text") == q["answer"]:
            c[0] += 1
    hits = sum(c[0] for c in counts.values())
    total = sum(c[1] for c in counts.values())
    acc = 100.0 * hits / total if total else 0.0
    return {"benchmark": "seed", "metric": f"{data_type or 'total'}_accuracy", "score": round(acc, 2),
            "accuracy": acc, "questions": total,
            "per_type": {str(type_names.get(k, k)): 100.0 * c[0] / c[1] for k, c in sorted(counts.items())}}


def write_seed_upload(answers: list[dict] | str | os.PathLike, seed_json: str | os.PathLike,
                      dst: str | os.PathLike) -> int:
    """Upload jsonl of ``{question_id, prediction}`` for every answered question of ``SEED-Bench.json``."""
    with open(seed_json, encoding="utf-8") as f:
        data = json.load(f)
    results = {_seed_qid(a["question_id"]): a for a in _answers(answers)}
    n = 0
    with open(dst, "w", encoding="utf-8") as f:
        for q in data["questions"]:
            row = results.get(_seed_qid(q["question_id"]))
            if row is not None:
                f.write(json.dumps({"question_id": q["question_id"], "prediction": row.get("text", "")}) + "\n")
                n += 1
    return n


# ---------------------------------------------------------------------------------------------------------------
# VQAv2 and MM-Vet (server-graded: only the upload files)
# ---------------------------------------------------------------------------------------------------------------
def write_vqav2_submission(answers: list[dict] | str | os.PathLike, test_split_jsonl: str | os.PathLike,
                           dst: str | os.PathLike) -> dict:
    """One ``{"question_id", "answer"}`` per question of the full test2015 split; EvalAI-processed answer, or
    ``""`` when unanswered (or an error record)."""
    processor = EvalAIAnswerProcessor()
    results = {a["question_id"]: a.get("text", "") for a in _answers(answers) if not a.get("error")}
    split = _read_jsonl(test_split_jsonl)
    out = [{"question_id": x["question_id"],
            "answer": processor(results[x["question_id"]]) if x["question_id"] in results else ""}
           for x in split]
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(out, f)
    return {"total_split": len(split), "answered": sum(1 for x in split if x["question_id"] in results)}


def write_mmvet_results(answers: list[dict] | str | os.PathLike, dst: str | os.PathLike) -> dict[str, str]:
    """``{"v1_<question_id>": text}`` for the MM-Vet GPT-4 grader."""
    result = {f"v1_{a['question_id']}": a.get("text", "") for a in _answers(answers)}
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return result
