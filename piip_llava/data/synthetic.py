"""Synthetic "read the word" dataset: LLaVA training JSONs plus TextVQA- and MMBench-format eval files, PIL only.

Every image is a light canvas with one LARGE word (legible after downsampling to half size), two SMALL words (one near
the top edge, one near the bottom edge; legible at full size, not at half size) and 1-4 identical coloured shapes.
Words come from a closed 28-entry vocabulary of 3-character strings (`VOCABULARY`), so answers are a few tokens and a
tiny model can learn the task on CPU; the small words make part of the questions resolution-dependent, which is what a
parameter-inverted image pyramid (large branch at low resolution + small branch at high resolution) is for.

Outputs of `generate_synthetic_dataset(out_dir)` (layout mirrors `playground/data`, see the README written there):

* `stage0.json`: per-image classification labels (words, colours, shapes, count) for stage-0 vision pretraining.
* `images/NNNNNN.png` and `stage1.json` (caption data) / `stage2.json` (multi-turn QA, multiple choice, text-only
  records) in the LLaVA JSON format; `image` paths are relative to `out_dir`.
* `eval/textvqa/{llava_textvqa_val_v051_ocr.jsonl, TextVQA_0.5.1_val.json, train_images/<image_id>.jpg}` in the real
  TextVQA formats (question_id = image id, `Reference OCR token:` line, 10 answers per question).
* `eval/mmbench/mmbench_dev_synthetic.tsv` in the real MMBench dev TSV format (base64 PNGs, circular copies at
  `index + k * 1_000_000` with rotated options and answer letters).

Everything is a pure function of the seed: each image/question draws from its own `random.Random` stream keyed by
(seed, split, index), so files are byte-identical across runs and any single image can be re-rendered on its own.
"""
from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import io
import json
import os
import random
import time
from dataclasses import dataclass, field, replace
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

from piip_llava.constants import IMAGE_PLACEHOLDER

# ----------------------------------------------------------------------------------------------------------------------
# Vocabulary and prompts (values only)
# ----------------------------------------------------------------------------------------------------------------------

#: Closed answer vocabulary for the written words: all 3 characters wide (no word-width cue at low resolution).
VOCABULARY: tuple[str, ...] = (
    "cat", "dog", "sun", "box", "owl", "key", "jam", "bee", "fox", "hat", "pen", "cup", "bus", "egg",
    "map", "ink", "toy", "zip", "web", "gem", "mug", "jet", "ivy", "elk", "174", "385", "529", "960",
)
#: Text/shape colours (name -> RGB); all dark enough to contrast with the light backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "green": (20, 140, 50),
    "blue": (35, 70, 210),
    "orange": (235, 125, 0),
    "purple": (140, 50, 180),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (250, 248, 240), (240, 245, 252), (248, 240, 246), (240, 250, 240), (252, 252, 252), (246, 242, 230),
)

#: Share of stage-2 image records that ask the three words in a fixed order (see `_read_all_turns`): enough for the
#: LLM to start reading by place, few enough that it also learns to find a word by its colour (docs/quickstart.md).
READ_ALL_FRACTION = 0.3
#: Share of stage-2 image records that are one MMBench-style multiple-choice question (docs/quickstart.md).
MULTIPLE_CHOICE_FRACTION = 0.15
#: How training multiple-choice records are answered: "text" (the option's text, asked for by
#: `MC_TEXT_ANSWER_PROMPT`) or "letter" (`MC_ANSWER_PROMPT`, LLaVA's format). The quickstart's LLM starts random and
#: does not learn to point at a letter within its budget; the option's text is what MMBench's rule-based extraction
#: (VLMEvalKit `can_infer`, spec 4.5) maps back to the letter (docs/quickstart.md).
MULTIPLE_CHOICE_ANSWER = "text"
#: Text-only multiple-choice records per training image (the hint states the answer; see `_text_choice_record`).
TEXT_CHOICE_FRACTION = 0.0
#: Share of the random-order reading questions that name the word by its colour ("What word is written in red?"):
#: the TextVQA split asks about 1/3 of its questions this way, and routing by colour is learnt more slowly than by
#: place, so training asks more of them (docs/quickstart.md).
COLOR_REFERENCE_FRACTION = 0.6
#: Stage-2 caption records per training image, the words described in random order, each right after its colour
#: (`caption`): every word of a caption is supervised (docs/quickstart.md).
CAPTION_FRACTION = 0.25
#: Questions per text-only language-pretraining record (`lm_pretrain_record`): several lookups per description.
LM_PRETRAIN_TURNS = 6
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
MC_ANSWER_PROMPT = "Answer with the option's letter from the given choices directly."
MC_TEXT_ANSWER_PROMPT = "Answer with the option's text from the given choices directly."
#: The instruction of a multiple-choice prompt per answer form (`ChoiceAnswer`).
MC_PROMPTS = {"letter": MC_ANSWER_PROMPT, "text": MC_TEXT_ANSWER_PROMPT}
OCR_PREFIX = "Reference OCR token: "
CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image briefly.",
    "Provide a one-sentence caption for the provided image.",
    "Give a short caption of the picture.",
    "Summarize the visual content of the image.",
)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
MC_LETTERS = "ABCD"
MMBENCH_COLUMNS = (
    "index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
    "comment", "split",
)
MMBENCH_COPY_OFFSET = 1_000_000

# Geometry at the reference size 128 px; everything scales with image_size / 128.
_REF_SIZE = 128
SMALL_FONT_SIZE = 9.0  # cap height ~6.5 px: legible at 128 px, a 3 px smudge at 64 px
LARGE_FONT_RANGE = (26.0, 34.0)  # cap height 19-25 px: still 10+ px after halving
SHAPE_RANGE = (12.0, 18.0)
_PITCH = 0.78  # fixed character advance as a fraction of the font size (monospaced layout)

WordRole = Literal["large", "top", "bottom"]
QuestionType = Literal["large_word", "small_word", "color", "shape", "count"]
ChoiceAnswer = Literal["letter", "text"]
Layout = Literal["fixed", "random"]


# ----------------------------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WordItem:
    """One rendered word: text (lower case), role, colour name, font size (px) and drawn bbox (x0, y0, x1, y1)."""

    word: str
    role: WordRole
    color: str
    font_size: float
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    """Everything needed to render an image and to ask questions about it with known answers."""

    image_size: int
    background: tuple[int, int, int]
    words: tuple[WordItem, ...]  # (large, top, bottom)
    shape: str
    shape_color: str
    shape_boxes: tuple[tuple[int, int, int, int], ...] = field(default_factory=tuple)

    @property
    def count(self) -> int:
        return len(self.shape_boxes)

    def word(self, role: WordRole) -> WordItem:
        return next(w for w in self.words if w.role == role)


@functools.lru_cache(maxsize=64)
def _font(size: float) -> ImageFont.FreeTypeFont:
    # Pillow >= 10.1 ships a scalable FreeType font (Aileron); no system font is needed.
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("piip_llava.data.synthetic needs Pillow >= 10.1 built with FreeType (scalable default font)")
    return font


def word_extent(word: str, font_size: float) -> tuple[int, int, int, int]:
    """Bbox (x0, y0, x1, y1) of `word` drawn by `draw_word` at the origin; x1 is the same for all vocabulary words."""
    font = _font(font_size)
    top = min(font.getbbox(ch)[1] for ch in word.upper())
    bottom = max(font.getbbox(ch)[3] for ch in word.upper())
    pitch = _PITCH * font_size
    return 0, top, int(round(pitch * len(word))), bottom


def draw_word(draw: ImageDraw.ImageDraw, xy: tuple[float, float], word: str, font_size: float,
              color: tuple[int, int, int]) -> None:
    """Draw `word` in upper case with a fixed character pitch (each glyph centred in its cell) at `xy` (top-left)."""
    font = _font(font_size)
    pitch = _PITCH * font_size
    for i, ch in enumerate(word.upper()):
        x = xy[0] + i * pitch + (pitch - font.getlength(ch)) / 2
        draw.text((round(x), round(xy[1])), ch, fill=color, font=font)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def sample_scene(rng: random.Random, image_size: int = _REF_SIZE, layout: Layout = "fixed") -> Scene:
    """Draw a random scene: 3 distinct words in 3 distinct colours, 1-4 shapes of one kind and colour, no overlaps.

    `layout="fixed"` puts the words at fixed places (small words centred at the top and bottom edges, the large word
    centred at one size): a model trained from random weights on a CPU budget learns to read them. `"random"` moves
    words and sizes around (harder: needs far more data or pretrained branches).
    """
    if layout not in ("fixed", "random"):
        raise ValueError(f"layout must be 'fixed' or 'random', got {layout!r}")
    fixed = layout == "fixed"
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64 (small words need ~9 px at 128), got {image_size}")
    s = image_size / _REF_SIZE
    background = tuple(min(255, c + rng.randint(-4, 3)) for c in rng.choice(BACKGROUNDS))
    texts = rng.sample(VOCABULARY, 3)
    colors = rng.sample(sorted(COLORS), 3)
    edge = max(1, round(2 * s))
    words: list[WordItem] = []
    # Small words hug the top and bottom edges at a random x.
    small = SMALL_FONT_SIZE * s
    for role, text, color in (("top", texts[1], colors[1]), ("bottom", texts[2], colors[2])):
        x0, y0, x1, y1 = word_extent(text, small)
        x = (image_size - x1) // 2 if fixed else rng.randint(edge, image_size - x1 - edge)
        jitter = 0 if fixed else rng.randint(0, round(3 * s))
        y = edge + jitter - y0 if role == "top" else image_size - edge - jitter - y1
        words.append(WordItem(text, role, color, small, (x, y + y0, x + x1, y + y1)))
    band = (round(18 * s), image_size - round(18 * s))  # the middle band holds the large word and the shapes
    gap = max(2, round(3 * s))
    while True:  # rejection sampling; almost always succeeds on the first or second try
        large = round((sum(LARGE_FONT_RANGE) / 2 if fixed else rng.uniform(*LARGE_FONT_RANGE)) * s)
        x0, y0, x1, y1 = word_extent(texts[0], large)
        if fixed:  # centred horizontally, in the upper half of the band (shapes go around it)
            x, y = (image_size - x1) // 2, band[0] - y0 + round(4 * s)
        else:
            x = rng.randint(round(4 * s), image_size - x1 - round(4 * s))
            y = rng.randint(band[0] - y0, band[1] - y1)
        large_box = (x, y + y0, x + x1, y + y1)
        count = rng.randint(1, 4)
        size = round(rng.uniform(*SHAPE_RANGE) * s)
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(200):
            bx = rng.randint(round(4 * s), image_size - size - round(4 * s))
            by = rng.randint(band[0], band[1] - size)
            box = (bx, by, bx + size, by + size)
            if _overlaps(box, large_box, gap) or any(_overlaps(box, b, gap) for b in boxes):
                continue
            boxes.append(box)
            if len(boxes) == count:
                break
        if len(boxes) == count:
            break
    words.insert(0, WordItem(texts[0], "large", colors[0], float(large), large_box))
    return Scene(image_size, background, tuple(words), rng.choice(SHAPES), rng.choice(sorted(COLORS)), tuple(boxes))


def render_scene(scene: Scene) -> Image.Image:
    """Render a `Scene` to an RGB PIL image of size (image_size, image_size)."""
    img = Image.new("RGB", (scene.image_size, scene.image_size), scene.background)
    draw = ImageDraw.Draw(img)
    for w in scene.words:
        # word_extent's y0 is the glyph top offset from the draw origin; undo it to draw at the stored box.
        _, y0, _, _ = word_extent(w.word, w.font_size)
        draw_word(draw, (w.box[0], w.box[1] - y0), w.word, w.font_size, COLORS[w.color])
    fill = COLORS[scene.shape_color]
    for x0, y0, x1, y1 in scene.shape_boxes:
        if scene.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif scene.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon([(x0, y1 - 1), ((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1)], fill=fill)
    return img


# ----------------------------------------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------------------------------------

def word_question(scene: Scene, role: WordRole, by_color: bool) -> tuple[str, str]:
    """(lower-case question ending in '?', answer) asking which word has `role`, referred to by role or by colour."""
    item = scene.word(role)
    if by_color:
        return f"what word is written in {item.color}?", item.word
    where = {"large": "in large letters", "top": "in small letters at the top", "bottom": "in small letters at the bottom"}
    return f"what word is written {where[role]}?", item.word


def ocr_tokens(scene: Scene, rng: random.Random) -> list[str]:
    """The words in the image, shuffled (what an OCR system would list); the question still decides which one."""
    tokens = [w.word for w in scene.words]
    rng.shuffle(tokens)
    return tokens


def textvqa_prompt(question: str, tokens: list[str] | None) -> str:
    """The `text` field of LLaVA's TextVQA question file: capitalised question, optional OCR line, instruction."""
    ocr = f"\n{OCR_PREFIX}{', '.join(tokens)}" if tokens else ""
    return f"{question.capitalize()}{ocr}\n{SHORT_ANSWER_PROMPT}"


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def attribute_question(scene: Scene, kind: Literal["large_color", "shape", "count", "shape_color"]) -> tuple[str, str]:
    """(question, answer) about colours, the shape kind or the shape count (answers: colour name, shape, digit)."""
    if kind == "large_color":
        return "What color is the large word?", scene.word("large").color
    if kind == "shape":
        return "What shape is shown?", scene.shape
    if kind == "count":
        return f"How many {scene.shape}s are there?", str(scene.count)
    return "What color are the shapes?", scene.shape_color


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """A one-sentence caption listing every word (with size, colour, position) and the shapes.

    With `rng` (stage-2 caption records) the words come in random order, each right after its colour ("The image
    shows red jet in large letters, green cat in small letters at the top, ..."): predicting a word is then one
    lookup from the colour token before it to the visual tokens of that colour, the step that "what word is written
    in red?" needs (docs/quickstart.md).
    """
    large, top, bottom = scene.word("large"), scene.word("top"), scene.word("bottom")
    n = scene.count
    shapes = f"{NUMBER_WORDS[n]} {scene.shape_color} {_plural(scene.shape, n)}"
    if rng is None:
        return (f"The word {large.word} in large {large.color} letters, the small {top.color} word {top.word} at the "
                f"top, the small {bottom.color} word {bottom.word} at the bottom, and {shapes}.")
    clauses = [f"{large.color} {large.word} in large letters", f"{top.color} {top.word} in small letters at the top",
               f"{bottom.color} {bottom.word} in small letters at the bottom"]
    rng.shuffle(clauses)
    return f"The image shows {', '.join(clauses)}, and {shapes}."


@dataclass(frozen=True)
class ChoiceQuestion:
    """An MMBench-style question: options in display order, the index of the correct one, categories, hint."""

    question: str
    options: tuple[str, ...]
    answer: int
    category: str
    l2_category: str
    hint: str = ""

    def rotated(self, r: int) -> ChoiceQuestion:
        """Options rotated left by r (MMBench circular evaluation); the answer index moves with its option."""
        n = len(self.options)
        opts = tuple(self.options[(i + r) % n] for i in range(n))
        return ChoiceQuestion(self.question, opts, (self.answer - r) % n, self.category, self.l2_category, self.hint)

    def with_stated_answer(self) -> ChoiceQuestion:
        """The same question with the hint "The answer is <correct option>." (text-only records: the lookup alone)."""
        return replace(self, hint=f"The answer is {self.options[self.answer]}.")

    def prompt(self, answer: ChoiceAnswer = "letter") -> str:
        """The text after `<image>\\n` in LLaVA's `model_vqa_mmbench.py` with `--single-pred-prompt`; with
        `answer="text"` the instruction asks for the option's text instead of its letter."""
        if answer not in MC_PROMPTS:
            raise ValueError(f"multiple-choice answer must be one of {sorted(MC_PROMPTS)}, got {answer!r}")
        text = f"{self.hint}\n{self.question}" if self.hint else self.question
        for letter, opt in zip(MC_LETTERS, self.options):
            text += f"\n{letter}. {opt}"
        return f"{text}\n{MC_PROMPTS[answer]}"

    @property
    def answer_letter(self) -> str:
        return MC_LETTERS[self.answer]

    def turn(self, answer: ChoiceAnswer = "letter") -> tuple[str, str]:
        """(prompt, answer) of a training record: the letter or the option's text, as the instruction asks."""
        return self.prompt(answer), self.answer_letter if answer == "letter" else self.options[self.answer]


_INSTANCE = "finegrained_perception (instance-level)"
_CROSS = "finegrained_perception (cross-instance)"


def choice_question(scene: Scene, rng: random.Random) -> ChoiceQuestion:
    """A random 2-, 3- or 4-option question about the scene (real MMBench category names)."""
    kind = rng.choices(["ocr", "color", "count", "shape", "larger", "position"], weights=[4, 1, 1, 1, 1, 2])[0]
    hint = "The image shows one large word, two small words and some shapes." if rng.random() < 0.3 else ""
    if kind == "ocr":
        role = rng.choice(["large", "top", "bottom"])
        where = {"large": "in large letters", "top": "in small letters at the top",
                 "bottom": "in small letters at the bottom"}[role]
        correct = scene.word(role).word
        others = [w.word for w in scene.words if w.role != role]
        others.append(rng.choice([v for v in VOCABULARY if v not in others and v != correct]))
        opts = [correct, *others]
        question, category, l2 = f"Which word is written {where}?", "ocr", _INSTANCE
    elif kind == "color":
        correct = scene.word("large").color
        opts = [correct, *rng.sample([c for c in sorted(COLORS) if c != correct], 3)]
        question, category, l2 = "What color is the large word?", "attribute_recognition", _INSTANCE
    elif kind == "count":
        correct = str(scene.count)
        opts = [correct, *[str(k) for k in range(1, 5) if k != scene.count]]
        question, category, l2 = f"How many {scene.shape}s are in the image?", "object_localization", _INSTANCE
    elif kind == "shape":
        correct = scene.shape
        opts = [correct, *[s for s in SHAPES if s != correct]]
        question, category, l2 = "Which shape appears in the image?", "attribute_recognition", _INSTANCE
    elif kind == "larger":
        correct = scene.word("large").word
        opts = [correct, scene.word(rng.choice(["top", "bottom"])).word]
        question, category, l2 = "Which word is written in larger letters?", "attribute_comparison", _CROSS
    else:
        item = scene.word(rng.choice(["top", "bottom"]))
        correct = item.role
        opts = ["top", "bottom"]
        question = f"Where is the small word {item.word.upper()} written?"
        category, l2 = "spatial_relationship", _CROSS
    rng.shuffle(opts)
    return ChoiceQuestion(question, tuple(opts), opts.index(correct), category, l2, hint)


def textvqa_answers(answer: str, distractors: list[str], rng: random.Random) -> list[str]:
    """10 annotator answers: mostly `answer`, some case/period/article variants, sometimes 1-2 wrong readings.

    Variants normalise to `answer` under the TextVQA/EvalAI processor; 0-2 wrong answers exercise min(#/3, 1).
    """
    n_wrong = rng.choices([0, 1, 2], weights=[15, 4, 1])[0]
    n_right = 10 - n_wrong
    n_exact = rng.randint(max(4, n_right - 3), n_right)
    variants = [answer.upper(), answer.capitalize(), answer + ".", "the " + answer, answer.upper() + "."]
    answers = [answer] * n_exact + [rng.choice(variants) for _ in range(n_right - n_exact)]
    answers += [rng.choice(distractors) for _ in range(n_wrong)]
    rng.shuffle(answers)
    return answers


def render_question_image(seed: int = 0, image_size: int = _REF_SIZE, question_type: QuestionType = "large_word",
                          with_instruction: bool = True, layout: Layout = "fixed") -> tuple[Image.Image, str, str]:
    """A new image with a known answer (for demos and tests): returns (PIL image, question, answer).

    The question is phrased as in training; with `with_instruction` it ends with the short-answer instruction.
    Different `seed`s give different images; the streams are disjoint from those of `generate_synthetic_dataset`.
    """
    rng = random.Random(f"piip-synthetic-demo-{seed}-{question_type}")
    scene = sample_scene(rng, image_size, layout)
    if question_type == "large_word":
        question, answer = word_question(scene, "large", by_color=False)
    elif question_type == "small_word":
        question, answer = word_question(scene, rng.choice(["top", "bottom"]), by_color=False)
    elif question_type == "color":
        question, answer = attribute_question(scene, "large_color")
    elif question_type in ("shape", "count"):
        question, answer = attribute_question(scene, question_type)
    else:
        raise ValueError(f"question_type must be one of {QuestionType.__args__}, got {question_type!r}")
    question = question[0].upper() + question[1:]
    if with_instruction:
        question = f"{question}\n{SHORT_ANSWER_PROMPT}"
    return render_scene(scene), question, answer


# ----------------------------------------------------------------------------------------------------------------------
# Record builders
# ----------------------------------------------------------------------------------------------------------------------

def _rng(seed: int, split: str, index: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across processes and Python versions.
    return random.Random(f"piip-synthetic-{seed}-{split}-{index}")


def _stage2_turns(scene: Scene, rng: random.Random,
                  color_reference_fraction: float = COLOR_REFERENCE_FRACTION) -> list[tuple[str, str]]:
    """2-4 distinct short-answer (question, answer) turns; word-reading questions dominate."""
    pool: list[tuple[str, str]] = []
    for role in ("large", "top", "bottom"):
        by_color = rng.random() < color_reference_fraction
        q, a = word_question(scene, role, by_color)
        tokens = ocr_tokens(scene, rng) if rng.random() < 0.5 else None
        pool.append((textvqa_prompt(q, tokens), a))
    for kind in ("large_color", "shape", "count", "shape_color"):
        pool.append(attribute_question(scene, kind))
    # Always at least two reading questions, then 0-2 attribute questions, in random order.
    turns = rng.sample(pool[:3], rng.randint(2, 3)) + rng.sample(pool[3:], rng.randint(0, 2))
    rng.shuffle(turns)
    out = []
    for i, (q, a) in enumerate(turns):
        if SHORT_ANSWER_PROMPT not in q and (i == 0 or rng.random() < 0.7):
            q = f"{q}\n{SHORT_ANSWER_PROMPT}"
        out.append((q, a))
    return out


def _read_all_turns(scene: Scene) -> list[tuple[str, str]]:
    """The three reading questions in a fixed order (large, top, bottom): the turn tells which word is asked.

    Meant as the way in for a from-scratch LLM: the answer's place in the conversation routes it to the right visual
    tokens, so it starts to read before it can route by the question's words (docs/quickstart.md).
    """
    return [(f"{word_question(scene, role, by_color=False)[0].capitalize()}\n{SHORT_ANSWER_PROMPT}",
             scene.word(role).word) for role in ("large", "top", "bottom")]


def _conversation(turns: list[tuple[str, str]], with_image: bool) -> list[dict[str, str]]:
    conv = []
    for i, (q, a) in enumerate(turns):
        value = f"{IMAGE_PLACEHOLDER}\n{q}" if (with_image and i == 0) else q
        conv += [{"from": "human", "value": value}, {"from": "gpt", "value": a}]
    return conv


def _text_only_record(index: int, rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.sample([v for v in VOCABULARY if v.isalpha()], 2)
        turns = [(f"Which word comes first in alphabetical order, {a} or {b}?\n{SHORT_ANSWER_PROMPT}", min(a, b))]
    elif kind == 1:
        x, y = rng.randint(1, 4), rng.randint(1, 4)
        turns = [(f"What is {x} plus {y}?\n{SHORT_ANSWER_PROMPT}", str(x + y))]
    else:
        w = rng.choice(VOCABULARY)
        turns = [(f"Write the word {w.upper()} in lower case.\n{SHORT_ANSWER_PROMPT}", w),
                 (f"How many characters does {w} have?", str(len(w)))]
    return {"id": f"text-{index:06d}", "conversations": _conversation(turns, with_image=False)}


def _text_choice_record(index: int, rng: random.Random, image_size: int, layout: Layout) -> dict:
    """A multiple-choice question whose hint states the answer ("The answer is jet."), with no image.

    The record teaches only the format: find the option that holds a given answer and reply with its letter (the
    copy an LLM pretrained on text can already do; the quickstart's LLM starts random). Image records then need the
    reading on top of it.
    """
    mc = choice_question(sample_scene(rng, image_size, layout), rng).with_stated_answer()
    return {"id": f"text-choice-{index:06d}", "conversations": _conversation([(mc.prompt(), mc.answer_letter)],
                                                                             with_image=False)}


def describe_scene(scene: Scene, rng: random.Random) -> str:
    """The scene in words, what language pretraining reads instead of the image: one sentence per object, in random
    order (so a question is answered by what it names, not by where it looks), each colour right before its word
    ("Large letters: red jet."), the adjacency that an in-context copy finds most easily."""
    large, top, bottom = scene.word("large"), scene.word("top"), scene.word("bottom")
    n = scene.count
    sentences = [f"Large letters: {large.color} {large.word}.",
                 f"Small letters at the top: {top.color} {top.word}.",
                 f"Small letters at the bottom: {bottom.color} {bottom.word}.",
                 f"Shapes: {NUMBER_WORDS[n]} {scene.shape_color} {_plural(scene.shape, n)}."]
    rng.shuffle(sentences)
    return " ".join(sentences)


def lm_pretrain_record(index: int, rng: random.Random, image_size: int, layout: Layout,
                       turns: int = LM_PRETRAIN_TURNS) -> dict:
    """A text-only conversation: a scene described in words, then `turns` questions: multiple choice (about the
    scene, or with the answer stated in the hint) and the short-answer questions of stage 2, mostly colour-referenced.

    Every answer is a lookup by content in the context (the word after the named colour, the option that holds the
    answer): the in-context skill a pretrained LLM brings and the multiple-choice and colour-referenced questions
    need (docs/quickstart.md).
    """
    scene = sample_scene(rng, image_size, layout)
    out = []
    for _ in range(turns):
        kind = rng.choices(["mc_scene", "mc_stated", "color_word", "role_word", "attribute"],
                           weights=[2, 2, 3, 1, 1])[0]
        if kind.startswith("mc"):
            mc = choice_question(scene, rng)
            if kind == "mc_stated":
                mc = mc.with_stated_answer()
            out.append((mc.prompt(), mc.answer_letter))
            continue
        if kind == "attribute":
            q, a = attribute_question(scene, rng.choice(["large_color", "shape", "count", "shape_color"]))
        else:
            q, a = word_question(scene, rng.choice(["large", "top", "bottom"]), by_color=kind == "color_word")
            q = q.capitalize()
        out.append((f"{q}\n{SHORT_ANSWER_PROMPT}", a))
    q0, a0 = out[0]
    out[0] = (f"{describe_scene(scene, rng)}\n{q0}", a0)
    return {"id": f"lm-{index:06d}", "conversations": _conversation(out, with_image=False)}


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------------------

def _write_json(path: str, obj: object, indent: int | None = None) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def scene_labels(scene: Scene) -> dict[str, str]:
    """Classification labels of a scene (stage-0 vision pretraining): the three words, their colours, the shapes."""
    labels = {}
    for role in ("large", "top", "bottom"):
        labels[f"{role}_word"] = scene.word(role).word
        labels[f"{role}_color"] = scene.word(role).color
    labels.update(shape=scene.shape, shape_color=scene.shape_color, count=str(scene.count))
    return labels


def scene_regions(scene: Scene) -> list[dict]:
    """Boxes of the words and shapes with what they are and their colour: stage-0 per-token labels
    (`vision_pretrain.TokenProbe`), written with `--stage0-regions`."""
    regions = [{"box": list(w.box), "labels": {"object": w.word, "color": w.color}} for w in scene.words]
    regions += [{"box": list(box), "labels": {"object": scene.shape, "color": scene.shape_color}}
                for box in scene.shape_boxes]
    return regions


def _write_train(out_dir: str, seed: int, num_train: int, image_size: int, layout: Layout = "fixed",
                 multiple_choice_fraction: float = MULTIPLE_CHOICE_FRACTION,
                 read_all_fraction: float = READ_ALL_FRACTION,
                 text_choice_fraction: float = TEXT_CHOICE_FRACTION,
                 stage0_regions: bool = False,
                 color_reference_fraction: float = COLOR_REFERENCE_FRACTION,
                 multiple_choice_answer: ChoiceAnswer = MULTIPLE_CHOICE_ANSWER,
                 caption_fraction: float = CAPTION_FRACTION) -> tuple[str, str, str]:
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    stage0, stage1, stage2 = [], [], []
    scenes = []  # the caption records below describe the first images again
    for i in range(num_train):
        rng = _rng(seed, "train", i)
        scene = sample_scene(rng, image_size, layout)
        scenes.append(scene)
        rel = f"images/{i:06d}.png"
        render_scene(scene).save(os.path.join(out_dir, rel))
        sid = f"{i:06d}"
        stage0.append({"id": sid, "image": rel, "labels": scene_labels(scene)})
        if stage0_regions:
            stage0[-1]["regions"] = scene_regions(scene)
        stage1.append({"id": sid, "image": rel, "conversations": _conversation(
            [(rng.choice(CAPTION_PROMPTS), caption(scene))], with_image=True)})
        kind = rng.random()
        if kind < multiple_choice_fraction:
            turns = [choice_question(scene, rng).turn(multiple_choice_answer)]
        elif kind < multiple_choice_fraction + read_all_fraction:
            turns = _read_all_turns(scene)
        else:
            turns = _stage2_turns(scene, rng, color_reference_fraction)
        stage2.append({"id": sid, "image": rel, "conversations": _conversation(turns, with_image=True)})
    for j in range(max(1, num_train // 20) if num_train else 0):
        stage2.append(_text_only_record(j, _rng(seed, "text", j)))
    for j in range(round(num_train * caption_fraction)):  # images 0.. again, described in a random word order
        rng = _rng(seed, "caption", j)
        stage2.append({"id": f"caption-{j:06d}", "image": f"images/{j:06d}.png", "conversations": _conversation(
            [(rng.choice(CAPTION_PROMPTS), caption(scenes[j], rng))], with_image=True)})
    for j in range(round(num_train * text_choice_fraction)):
        stage2.append(_text_choice_record(j, _rng(seed, "text-choice", j), image_size, layout))
    paths = tuple(os.path.join(out_dir, f"stage{k}.json") for k in range(3))
    for path, records in zip(paths, (stage0, stage1, stage2)):
        _write_json(path, records)
    return paths


def _write_lm_pretrain(out_dir: str, seed: int, num_records: int, image_size: int, layout: Layout) -> str:
    path = os.path.join(out_dir, "lm_pretrain.json")
    _write_json(path, [lm_pretrain_record(j, _rng(seed, "lm", j), image_size, layout) for j in range(num_records)])
    return path


def _write_textvqa(out_dir: str, seed: int, num_eval: int, image_size: int, layout: Layout = "fixed") -> tuple[str, str, str]:
    """Two questions per image (2 of large/top/bottom), so ~2/3 of the questions need the small words."""
    root = os.path.join(out_dir, "eval", "textvqa")
    img_dir = os.path.join(root, "train_images")
    os.makedirs(img_dir, exist_ok=True)
    lines, data = [], []
    qid = 34602  # the first question_id of the real val split
    k = 0
    while len(lines) < num_eval:
        rng = _rng(seed, "textvqa", k)
        scene = sample_scene(rng, image_size, layout)
        image_id = hashlib.md5(f"piip-synthetic-{seed}-textvqa-{k}".encode()).hexdigest()[:16]
        # Real TextVQA images are JPEGs named <image_id>.jpg; quality 95 without chroma subsampling keeps 1 px strokes.
        render_scene(scene).save(os.path.join(img_dir, f"{image_id}.jpg"), quality=95, subsampling=0)
        for role in rng.sample(["large", "top", "bottom"], 2):
            if len(lines) >= num_eval:
                break
            question, answer = word_question(scene, role, by_color=rng.random() < 1 / 3)
            # Every 10th question has no OCR tokens: the 2-line prompt form of the real file.
            tokens = None if len(lines) % 10 == 5 else ocr_tokens(scene, rng)
            others = [w.word for w in scene.words if w.word != answer]
            lines.append({"question_id": image_id, "image": f"{image_id}.jpg",
                          "text": textvqa_prompt(question, tokens), "category": "default"})
            data.append({
                "question": question,
                "image_id": image_id,
                "image_classes": ["Text", scene.shape.capitalize()],
                "flickr_original_url": "",
                "flickr_300k_url": "",
                "image_width": image_size,
                "image_height": image_size,
                "answers": textvqa_answers(answer, others, rng),
                "question_tokens": question.rstrip("?").split(),
                "question_id": qid,
                "set_name": "val",
            })
            qid += 1
        k += 1
    q_path = os.path.join(root, "llava_textvqa_val_v051_ocr.jsonl")
    with open(q_path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    a_path = os.path.join(root, "TextVQA_0.5.1_val.json")
    _write_json(a_path, {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data})
    return q_path, a_path, img_dir


def _tsv_cell(value: object) -> str:
    text = str(value)
    if any(c in text for c in "\t\n\r\""):
        raise ValueError(f"MMBench TSV cell must not contain tabs, newlines or quotes: {text!r}")
    return text


def _write_mmbench(out_dir: str, seed: int, num_questions: int, image_size: int, layout: Layout = "fixed") -> str:
    root = os.path.join(out_dir, "eval", "mmbench")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "mmbench_dev_synthetic.tsv")
    rows = []
    for g in range(num_questions):
        rng = _rng(seed, "mmbench", g)
        scene = sample_scene(rng, image_size, layout)
        b64 = base64.b64encode(_png_bytes(render_scene(scene))).decode("ascii")
        base = choice_question(scene, rng)
        for r in range(len(base.options)):  # r = 0 is the original row, r >= 1 the circular copies
            q = base.rotated(r)
            opts = list(q.options) + [""] * (4 - len(q.options))  # empty cells read as NaN in pandas
            rows.append([g + r * MMBENCH_COPY_OFFSET, q.question, q.hint, *opts, q.answer_letter, q.category, b64,
                         "synthetic", q.l2_category, "", "dev"])
    rows.sort(key=lambda row: row[0])  # originals first, then the copies, by index
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\t".join(MMBENCH_COLUMNS) + "\n")
        for row in rows:
            f.write("\t".join(_tsv_cell(v) for v in row) + "\n")
    return path


_README = """# Synthetic PIIP-LLaVA task: read the large and the small words

Generated by `python -m piip_llava.data.synthetic --out {out} --seed {seed} --num-train {num_train} \\
--num-eval {num_eval} --image-size {image_size}` (deterministic: same arguments, same bytes).

## The images
{image_size}x{image_size} RGB, light background, containing
* one LARGE word (font {large_lo:.0f}-{large_hi:.0f} px) in the middle band: legible after downsampling to half size;
* two SMALL words (font {small:.1f} px), one near the top edge, one near the bottom edge: legible at full size,
  a smudge after downsampling to half size (so questions about them need the high-resolution branch);
* 1-4 identical shapes (circle / square / triangle) of one colour.
The three words are distinct, drawn in upper case with a fixed character pitch, in three distinct colours from
{colors}. Vocabulary ({nvocab} entries, all 3 characters): {vocab}.

## Files
* `images/NNNNNN.png`: training images ({num_train}); `image` paths in the JSONs are relative to this folder's root,
  so train with `--image_folder {out}`.
* `stage0.json`: classification labels per training image (`{{"image", "labels": {{"large_word", "top_word",
  "bottom_word", "large_color", "top_color", "bottom_color", "shape", "shape_color", "count"}}}}`) for stage-0 vision
  pretraining (`python -m piip_llava.train.vision_pretrain`), which stands in for pretrained backbones.
* `stage1.json`: LLaVA caption data (one `<image>` caption request + caption per image).
* `stage2.json`: LLaVA multi-turn data: TextVQA-style reading questions ("What word is written in large letters?",
  "... in small letters at the top?", "... in blue?"; {read_all:.0%} of the records ask the three words in a fixed order),
  half of the random-order ones with a `Reference OCR token:` line, with
  "{short}"; colour / shape / count questions; MMBench-style multiple choice ({mc_fraction:.0%} of the records) ending
  in "{mc}"; {captions} caption records (`caption-NNNNNN`: the words in random order, each
  right after its colour); plus text-only records (no `image`).
* `lm_pretrain.json` (with `--lm-pretrain-records N`): N text-only LLaVA conversations for language pretraining
  (`LM_STEPS` of scripts/train_eval_synthetic.sh; the tiny LLM starts random): a scene described in words
  (sentences in random order), then {lm_turns} questions about it: multiple choice (about the scene, or with the answer
  stated in the hint) and the short-answer questions of stage 2, most of them "What word is written in <colour>?".
* `eval/textvqa/llava_textvqa_val_v051_ocr.jsonl`, `eval/textvqa/TextVQA_0.5.1_val.json`,
  `eval/textvqa/train_images/<image_id>.jpg`: {num_eval} questions in the real TextVQA formats, two per image,
  about 2/3 of them about a small word; 10 answers each (case / period / article variants, sometimes 1-2 wrong
  readings). Image folder for the eval CLI: `eval/textvqa/train_images`.
* `eval/mmbench/mmbench_dev_synthetic.tsv`: {num_mmbench} questions (2-, 3- and 4-option) in the MMBench dev TSV
  format, with circular copies at `index + k * 1000000`.

## What to expect
An untrained model scores ~0 on TextVQA. With the OCR line a reader that cannot see the small words can still guess
between the words it cannot read, so a low-resolution-only model is expected to plateau well below a model that sees
the image at {image_size} px.
"""


def generate_synthetic_dataset(out_dir: str, seed: int = 0, num_train: int = 4000, num_eval: int = 200,
                               image_size: int = _REF_SIZE, num_mmbench: int | None = None,
                               layout: Layout = "fixed", multiple_choice_fraction: float = MULTIPLE_CHOICE_FRACTION,
                               read_all_fraction: float = READ_ALL_FRACTION,
                               text_choice_fraction: float = TEXT_CHOICE_FRACTION,
                               stage0_regions: bool = False,
                               color_reference_fraction: float = COLOR_REFERENCE_FRACTION,
                               lm_pretrain_records: int = 0,
                               multiple_choice_answer: ChoiceAnswer = MULTIPLE_CHOICE_ANSWER,
                               caption_fraction: float = CAPTION_FRACTION) -> dict[str, str]:
    """Write the whole synthetic dataset under `out_dir` and return its paths.

    Returns a dict with keys `root`, `image_folder`, `stage0`, `stage1`, `stage2`, `lm_pretrain` (only with
    `lm_pretrain_records`), `textvqa_questions`,
    `textvqa_annotations`, `textvqa_image_folder`, `mmbench_tsv`, `readme`. `num_mmbench` (distinct MMBench
    questions) defaults to max(4, num_eval // 2). `layout`: "fixed" word positions (default; learnable from random weights on a CPU) or
    "random" positions and sizes (see `sample_scene`).
    """
    if num_train < 0 or num_eval < 0:
        raise ValueError(f"num_train and num_eval must be >= 0, got {num_train}, {num_eval}")
    if not (multiple_choice_fraction >= 0 and read_all_fraction >= 0
            and multiple_choice_fraction + read_all_fraction <= 1):
        raise ValueError("multiple_choice_fraction and read_all_fraction must be >= 0 and sum to <= 1, got "
                         f"{multiple_choice_fraction} and {read_all_fraction}")
    if text_choice_fraction < 0:
        raise ValueError(f"text_choice_fraction must be >= 0, got {text_choice_fraction}")
    if multiple_choice_answer not in MC_PROMPTS:
        raise ValueError(f"multiple_choice_answer must be 'letter' or 'text', got {multiple_choice_answer!r}")
    if caption_fraction < 0:
        raise ValueError(f"caption_fraction must be >= 0, got {caption_fraction}")
    if lm_pretrain_records < 0:
        raise ValueError(f"lm_pretrain_records must be >= 0, got {lm_pretrain_records}")
    if not 0 <= color_reference_fraction <= 1:
        raise ValueError(f"color_reference_fraction must be in [0, 1], got {color_reference_fraction}")
    num_mmbench = max(4, num_eval // 2) if num_mmbench is None else num_mmbench
    os.makedirs(out_dir, exist_ok=True)
    stage0, stage1, stage2 = _write_train(out_dir, seed, num_train, image_size, layout, multiple_choice_fraction,
                                          read_all_fraction, text_choice_fraction, stage0_regions,
                                          color_reference_fraction, multiple_choice_answer, caption_fraction)
    lm_pretrain = {}
    if lm_pretrain_records:
        lm_pretrain["lm_pretrain"] = _write_lm_pretrain(out_dir, seed, lm_pretrain_records, image_size, layout)
    tq, ta, timg = _write_textvqa(out_dir, seed, num_eval, image_size, layout)
    mmb = _write_mmbench(out_dir, seed, num_mmbench, image_size, layout)
    s = image_size / _REF_SIZE
    readme = os.path.join(out_dir, "README.md")
    with open(readme, "w", encoding="utf-8") as f:
        f.write(_README.format(
            out=out_dir, seed=seed, num_train=num_train, num_eval=num_eval, image_size=image_size,
            num_mmbench=num_mmbench, large_lo=LARGE_FONT_RANGE[0] * s, large_hi=LARGE_FONT_RANGE[1] * s,
            small=SMALL_FONT_SIZE * s, colors=", ".join(COLORS), nvocab=len(VOCABULARY), vocab=", ".join(VOCABULARY),
            short=SHORT_ANSWER_PROMPT, lm_turns=LM_PRETRAIN_TURNS, read_all=read_all_fraction,
            mc=MC_PROMPTS[multiple_choice_answer],
            mc_fraction=multiple_choice_fraction, captions=round(num_train * caption_fraction)))
    return {"root": out_dir, "image_folder": out_dir, "stage0": stage0, "stage1": stage1, "stage2": stage2,
            **lm_pretrain, "textvqa_questions": tq,
            "textvqa_annotations": ta, "textvqa_image_folder": timg, "mmbench_tsv": mmb, "readme": readme}


DEMO_EXAMPLES: tuple[tuple[str, QuestionType, int], ...] = (
    ("synthetic_large_word.png", "large_word", 1),
    ("synthetic_small_word.png", "small_word", 2),
    ("synthetic_shapes.png", "count", 3),
)


def write_demo_examples(out_dir: str, image_size: int = _REF_SIZE) -> str:
    """Write the chat-demo examples (`piip_llava/serve/examples/`): 3 PNGs plus `examples.json` with
    [{"image", "question", "answer"}] (question without the short-answer instruction). Returns the JSON path."""
    os.makedirs(out_dir, exist_ok=True)
    entries = []
    for name, question_type, seed in DEMO_EXAMPLES:
        img, question, answer = render_question_image(seed, image_size, question_type, with_instruction=False)
        img.save(os.path.join(out_dir, name))
        entries.append({"image": name, "question": question, "answer": answer})
    path = os.path.join(out_dir, "examples.json")
    _write_json(path, entries, indent=1)
    return path


def text_corpus(stage_json_paths: list[str]) -> list[str]:
    """Every conversation turn of the given LLaVA JSON files (e.g. to train the tiny tokenizer on the task's text)."""
    lines = []
    for path in stage_json_paths:
        with open(path, encoding="utf-8") as f:
            for record in json.load(f):
                lines.extend(turn["value"] for turn in record["conversations"])
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m piip_llava.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=4000, help="training images (stage1 and stage2 records)")
    parser.add_argument("--num-eval", type=int, default=200, help="TextVQA eval questions (2 per image)")
    parser.add_argument("--num-mmbench", type=int, default=None, help="MMBench base questions [max(4, num_eval//2)]")
    parser.add_argument("--image-size", type=int, default=_REF_SIZE, help="side in pixels (highest branch resolution)")
    parser.add_argument("--layout", choices=["fixed", "random"], default="fixed",
                        help="fixed word positions (learnable from scratch) or random positions and sizes")
    parser.add_argument("--multiple-choice-fraction", type=float, default=MULTIPLE_CHOICE_FRACTION,
                        help="share of stage-2 image records that are one MMBench-style multiple-choice question")
    parser.add_argument("--multiple-choice-answer", choices=["text", "letter"], default=MULTIPLE_CHOICE_ANSWER,
                        help="training multiple-choice records answer with the option's text or its letter")
    parser.add_argument("--caption-fraction", type=float, default=CAPTION_FRACTION,
                        help="stage-2 caption records (words in random order), per training image")
    parser.add_argument("--read-all-fraction", type=float, default=READ_ALL_FRACTION,
                        help="share of stage-2 image records that ask the three words in a fixed order")
    parser.add_argument("--text-choice-fraction", type=float, default=TEXT_CHOICE_FRACTION,
                        help="text-only multiple-choice records (scene described in the hint), per training image")
    parser.add_argument("--color-reference-fraction", type=float, default=COLOR_REFERENCE_FRACTION,
                        help="share of the random-order reading questions that name the word by its colour")
    parser.add_argument("--lm-pretrain-records", type=int, default=0,
                        help="also write lm_pretrain.json with this many text-only language-pretraining records")
    parser.add_argument("--stage0-regions", action="store_true",
                        help="add the boxes of words and shapes to stage0.json (per-token stage-0 labels)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = generate_synthetic_dataset(args.out, seed=args.seed, num_train=args.num_train, num_eval=args.num_eval,
                                       image_size=args.image_size, num_mmbench=args.num_mmbench, layout=args.layout,
                                       multiple_choice_fraction=args.multiple_choice_fraction,
                                       read_all_fraction=args.read_all_fraction,
                                       text_choice_fraction=args.text_choice_fraction,
                                       stage0_regions=args.stage0_regions,
                                       color_reference_fraction=args.color_reference_fraction,
                                       lm_pretrain_records=args.lm_pretrain_records,
                                       multiple_choice_answer=args.multiple_choice_answer,
                                       caption_fraction=args.caption_fraction)
    print(f"wrote synthetic dataset to {args.out} in {time.perf_counter() - start:.1f} s")
    for key, path in paths.items():
        print(f"  {key}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
