"""Format-faithful TextVQA and MMBench fixture builders (spec eval_data_formats §6) and a fake engine."""
from __future__ import annotations

import base64
import hashlib
import io
import json

from PIL import Image

# --- TextVQA: (question, OCR tokens or None, prediction, 10 GT answers, expected soft score by hand) ----------
TEXTVQA_ITEMS = [
    ("is this a sign?", ["STOP"], "Yes.", ["yes"] * 10, 1.0),                                  # lower + period
    ("how many cars are there?", ["2"], "Two", ["2", "2", "two"] + ["3"] * 7, 0.9),             # number word
    ("what is the number?", ["3.14"], "3.14", ["3.14"] + ["3"] * 9, 0.3),                       # decimal kept
    ("what country is written?", ["U.S.A."], "U.S.A.", ["usa", "usa"] + ["us"] * 8, 0.6),       # periods gone
    ("whose shop is it?", None, "bob's", ["bob 's", "bob's"] + ["bobs"] * 8, 0.6),              # 's split, no OCR
    ("what does the shirt say?", ["I'M"], "I'm", ["i'm"] + ["Im"] * 9, 0.3),                   # dead Im key
    ("what is written below?", ["WELL", "DONE"], "well - done", ["well done"] * 3 + ["welldone"] * 7, 0.9),
    ("what fraction is shown?", ["1/2"], "1/2", ["1/2"] + ["half"] * 9, 0.3),                   # slash -> space
    ("what language is on the book?", ["C++"], "c++", ["c", "C++"] + ["java"] * 8, 0.6),        # + -> space
    ("what animal is on the poster?", ["DOG"], "A dog.", ["dog"] * 4 + ["cat"] * 6, 1.0),       # article
    ("how many people are there?", ["0"], "none", ["0", "zero"] + ["nothing"] * 8, 0.6),        # none -> 0
    ("what number is written?", None, "twenty three", ["twenty three"] + ["23"] * 9, 0.3),      # >10 kept, no OCR
    ("what company made this?", ["NIKE", "INC."], "Nike, Inc.", ["Nike Inc.", "Nike Inc."] + ["nike"] * 8, 0.6),
    ("what does the sign forbid?", ["DONT"], "dont", ["don't"] * 3 + ["no"] * 7, 0.9),           # contraction
    ("what website is shown?", ["www.abc.com"], "www.abc.com", ["wwwabccom"] + ["abc"] * 9, 0.3),
    ("where is the text?", ["@HOME"], "@home", ["home", "home"] + ["house"] * 8, 0.6),          # @ -> space
    ("what version is it?", ["v1.5"], "v1.5", ["v1.5", "V1.5"] + ["version"] * 8, 0.6),
    ("what color is the car?", ["RED"], "wrong", ["right"] * 10, 0.0),
    ("what is the price?", ["1,000"], "1,000", ["1000"] * 3 + ["1,000"] + ["one thousand"] * 6, 1.0),  # comma
    ("what time is it?", ["3", "P.M."], "3 p.m.", ["3 pm"] + ["3:00"] * 9, 0.3),
]
TEXTVQA_EXPECTED_ACCURACY = 58.5  # (1+.9+.3+.6+.6+.3+.9+.3+.6+1+.6+.3+.6+.9+.3+.6+.6+0+1+.3) / 20 * 100
INSTRUCTION = "\nAnswer the question using a single word or phrase."


def _image_id(k: int) -> str:
    return hashlib.md5(f"img{k}".encode()).hexdigest()[:16]


def textvqa_prompt(question: str, ocr: list[str] | None) -> str:
    text = question.capitalize()
    if ocr:
        text += "\nReference OCR token: " + ", ".join(ocr)
    return text + INSTRUCTION


def build_textvqa_fixture(tmp_path):
    """textvqa/{TextVQA_0.5.1_val.json, llava_textvqa_val_v051_ocr.jsonl, train_images/, answers/fake.jsonl}."""
    root = tmp_path / "textvqa"
    img_dir = root / "train_images"
    img_dir.mkdir(parents=True)
    for k in range(12):
        size = (64, 48) if k % 2 == 0 else (40, 72)
        if k == 5:
            img = Image.new("L", size, color=90)  # grayscale JPEG: the loader converts to RGB
        else:
            img = Image.new("RGB", size, color=(20 * k, 255 - 20 * k, 7 * k))
        img.save(img_dir / f"{_image_id(k)}.jpg", format="JPEG")
    data, questions, fake = [], [], []
    for i, (question, ocr, pred, gts, _) in enumerate(TEXTVQA_ITEMS):
        image_id = _image_id(i % 12)
        data.append({
            "question": question, "image_id": image_id, "image_classes": ["Poster"],
            "flickr_original_url": "", "flickr_300k_url": "", "image_width": 64, "image_height": 48,
            "answers": gts, "question_tokens": question.rstrip("?").split(), "question_id": 34602 + i,
            "set_name": "val",
        })
        text = textvqa_prompt(question, ocr)
        questions.append({"question_id": image_id, "image": f"{image_id}.jpg", "text": text, "category": "default"})
        fake.append({"question_id": image_id, "prompt": text, "text": pred, "answer_id": f"a{i}",
                     "model_id": "fake", "metadata": {}})
    ann = root / "TextVQA_0.5.1_val.json"
    ann.write_text(json.dumps({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
                               "data": data}))
    qf = root / "llava_textvqa_val_v051_ocr.jsonl"
    qf.write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "answers").mkdir()
    fake_path = root / "answers" / "fake.jsonl"
    fake_path.write_text("".join(json.dumps(f) + "\n" for f in fake))
    return {"root": root, "annotations": ann, "questions": qf, "images": img_dir, "fake_answers": fake_path}


# --- MMBench: 6 questions, 20 rows with circular copies -------------------------------------------------------
# (question, hint, options, correct position, category, l2-category)
MMB_QUESTIONS = [
    ("Which scene category matches this image best?", "The image was taken outdoors.",
     ["shopfront", "office", "beach", "forest"], 2, "image_scene", "coarse_perception"),
    ("What is the main color of the object?", None, ["red", "green", "blue", "yellow"], 0,
     "attribute_recognition", "finegrained_perception (instance-level)"),
    ("How many objects are there?", "Count carefully.", ["one", "two", "three", "four"], 3,
     "object_localization", "finegrained_perception (cross-instance)"),
    ("What is the topic of the image?", None, ["cat", "dog", "bird", "fish"], 1, "image_topic",
     "coarse_perception"),
    ("Is it daytime?", "Look at the sky.", ["yes", "no"], 0, "physical_property_reasoning", "attribute_reasoning"),
    ("Where is the tree?", None, ["left", "right"], 1, "spatial_relationship", "relation_reasoning"),
]
LETTERS = "ABCD"
MMB_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
               "l2-category", "comment", "split"]


def _png_b64(mode: str, size=(80, 60)) -> str:
    buf = io.BytesIO()
    Image.new(mode, size, color=(10, 120, 200) if mode == "RGB" else 100).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def mmbench_rows() -> list[dict]:
    rows = []
    rgb, gray = _png_b64("RGB"), _png_b64("L")
    for q, (question, hint, options, pos, cat, l2) in enumerate(MMB_QUESTIONS):
        n = len(options)
        for r in range(n):
            rot = options[r:] + options[:r]
            row = {"index": q + r * 1_000_000, "question": question, "hint": hint or "",
                   "A": "", "B": "", "C": "", "D": "", "answer": LETTERS[(pos - r) % n], "category": cat,
                   "image": gray if q == 2 else rgb, "source": "synthetic", "l2-category": l2, "comment": "",
                   "split": "dev"}
            for letter, opt in zip(LETTERS, rot):
                row[letter] = opt
            rows.append(row)
    return rows


def write_tsv(path, rows: list[dict]) -> None:
    lines = ["\t".join(MMB_COLUMNS)]
    for row in rows:
        lines.append("\t".join(str(row[c]) for c in MMB_COLUMNS))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def mmbench_fake_text(row: dict) -> str:
    """Correct letter everywhere except: 1000000 -> 'The answer is B.' (correct), 2000003 -> wrong letter,
    1000005 -> unreadable, 4 -> the option text 'yes' (correct), 1 -> 'A.' (correct)."""
    idx = row["index"]
    if idx == 1_000_000:
        return f"The answer is {row['answer']}."
    if idx == 2_000_003:
        return "A"  # correct is D
    if idx == 1_000_005:
        return "I am not sure."
    if idx == 4:
        return "yes"
    if idx == 1:
        return "A."
    return row["answer"]


def build_mmbench_fixture(tmp_path):
    root = tmp_path / "mmbench"
    root.mkdir()
    rows = mmbench_rows()
    tsv = root / "mmbench_dev_fake.tsv"
    write_tsv(tsv, rows)
    fake = []
    for row in rows:
        n_opt = sum(1 for c in LETTERS if row[c])
        fake.append({"question_id": row["index"], "round_id": 0, "prompt": "p", "text": mmbench_fake_text(row),
                     "options": [row[c] for c in LETTERS[:n_opt]], "option_char": list(LETTERS[:n_opt]),
                     "answer_id": "x", "model_id": "fake", "metadata": {}})
    (root / "answers").mkdir()
    fake_path = root / "answers" / "fake.jsonl"
    fake_path.write_text("".join(json.dumps(f) + "\n" for f in fake))
    return {"root": root, "tsv": tsv, "rows": rows, "fake_answers": fake_path}


class FakeEngine:
    """Deterministic stand-in for InferenceEngine: answer = f(message, image size); records every call."""

    def __init__(self, fail_after_calls: int | None = None):
        self.calls: list[list[str]] = []
        self.fail_after_calls = fail_after_calls

    def generate(self, requests, **gen_kwargs):
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated crash")
        self.calls.append([r.messages[0]["content"] for r in requests])
        outs = []
        for r in requests:
            size = None if r.image is None else (r.image.size, r.image.mode)
            outs.append(f" {len(r.messages[0]['content'])}|{size} ")
        return outs

    @property
    def asked(self) -> list[str]:
        return [m for call in self.calls for m in call]

