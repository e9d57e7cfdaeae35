"""TextVQA: EvalAI normalisation, soft accuracy, prompt matching quirks, scoring of LLaVA-format answers files."""
import json

import pytest
from eval_fixtures import TEXTVQA_EXPECTED_ACCURACY, TEXTVQA_ITEMS

from piip_llava.evaluation.answer_processing import EvalAIAnswerProcessor
from piip_llava.evaluation.tasks.textvqa import (drop_ocr_line, load_textvqa_annotations, load_textvqa_questions,
                                           prompt_processor, score_answers, vqa_accuracy, vqa_answer_scores)

# spec eval_data_formats §3.6 (outputs of the reference code) plus the remaining rules of §3.5
TRICKY = [
    ("Yes.", "yes"), ("Two", "2"), ("ten", "10"), ("zero", "0"), ("none", "0"), ("twenty three", "twenty 3"),
    ("eleven", "eleven"), ("3.14", "3.14"), (".5", ".5"), ("v1.5", "v1.5"), ("U.S.A.", "usa"), ("T.V.", "tv"),
    ("a.m.", "am"), ("3 p.m.", "3 pm"), ("bob's", "bob 's"), ("it's", "it 's"), ("I'm", "i'm"), ("Im", "im"),
    ("Ive", "ive"), ("well - done", "well done"), ("1/2", "1 2"), ("and/or", "and or"), ("c++", "c"),
    ("x+y", "x y"), ("@home", "home"), ("[5]", "5"), ("A dog.", "dog"), ("AN apple", "apple"),
    ("the end", "end"), ("Nike, Inc.", "nike inc"), ("Mr. Smith", "mr smith"), ("1,000", "1000"),
    ("What?", "what"), ("dont", "don't"), ("whats up", "what's up"), ("somebody'd", "somebodyd"),
    ("hello\tworld\n", "hello world"), ("5.", "5"), ("www.abc.com", "wwwabccom"), ("50%", "50%"),
    ("$5 & #1: *ok*", "$5 & #1: *ok*"), ("rock'n'roll", "rock'n'roll"), ("(left)", "left"),
    ("a - b", "b"),  # spaced hyphen deleted, then the article a is dropped
    ("x -y", "x y"),  # " -" present -> '-' deleted (not replaced), giving "x y"
    ("e-mail", "e mail"),
]


@pytest.mark.parametrize("raw,expected", TRICKY)
def test_evalai_processor_tricky_strings(raw, expected):
    assert EvalAIAnswerProcessor()(raw) == expected


def test_period_removal_capped_at_32():
    # re.UNICODE (32) lands in re.sub's count slot in the reference code
    assert EvalAIAnswerProcessor()("." * 40) == "." * 8
    assert EvalAIAnswerProcessor()("a" + ".b" * 35) == "a" + "b" * 32 + ".b" * 3


@pytest.mark.parametrize("k,score", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_soft_accuracy_closed_form(k, score):
    gts = ["yes"] * k + ["no"] * (10 - k)
    assert vqa_accuracy("yes", gts) == pytest.approx(score)


def test_answer_scores_need_ten_answers():
    with pytest.raises(ValueError, match="10"):
        vqa_answer_scores(["a"] * 9)


def test_prompt_processor_forms():
    assert prompt_processor("What is it?\nReference OCR token: A, B\nAnswer the question using a single word or phrase.") == "what is it?"
    assert prompt_processor("Reference OCR token: A, B\nWhat is it?\nAnswer briefly.") == "what is it?"
    assert prompt_processor("What is it?\nAnswer the question using a single word or phrase.") == "what is it?"
    assert prompt_processor("OCR tokens: a b. Question: What Is It? Short answer:") == "what is it?"
    with pytest.raises(ValueError, match="lines"):
        prompt_processor("one line only")
    with pytest.raises(ValueError):  # 4 lines
        prompt_processor("a\nReference OCR token: x\nb\nc")


def test_drop_ocr_line_gives_two_line_prompt():
    text = "What is it?\nReference OCR token: A, B\nAnswer the question using a single word or phrase."
    assert drop_ocr_line(text) == "What is it?\nAnswer the question using a single word or phrase."
    assert prompt_processor(drop_ocr_line(text)) == "what is it?"


def test_fixture_item_scores_by_hand():
    for question, _, pred, gts, expected in TEXTVQA_ITEMS:
        assert vqa_accuracy(pred, gts) == pytest.approx(expected), question


def test_score_llava_format_answers(textvqa_fixture):
    s = score_answers(textvqa_fixture["fake_answers"], textvqa_fixture["annotations"])
    assert s["samples"] == 20
    assert s["accuracy"] == pytest.approx(TEXTVQA_EXPECTED_ACCURACY)
    assert s["score"] == 58.5
    assert s["errors"] == 0 and s["unanswered_annotations"] == 0


def test_mean_is_over_answer_lines_and_error_records_score_zero(textvqa_fixture, tmp_path):
    lines = textvqa_fixture["fake_answers"].read_text().splitlines()
    # keep the first 10 lines only (sum of their scores = 6.5) plus one error record
    sub = tmp_path / "partial.jsonl"
    err = {"question_id": "x", "prompt": "", "text": "", "error": "FileNotFoundError: missing"}
    sub.write_text("\n".join(lines[:10] + [json.dumps(err)]) + "\n")
    s = score_answers(sub, textvqa_fixture["annotations"])
    assert s["samples"] == 11
    assert s["accuracy"] == pytest.approx(650 / 11)
    assert s["errors"] == 1 and s["error_ids"] == ["x"]
    assert s["unanswered_annotations"] == 10


def test_altered_prompt_raises_with_line_number(textvqa_fixture, tmp_path):
    lines = [json.loads(x) for x in textvqa_fixture["fake_answers"].read_text().splitlines()]
    lines[3]["prompt"] = lines[3]["prompt"].replace("What", "Which")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(ValueError, match="record 4: no annotation"):
        score_answers(bad, textvqa_fixture["annotations"])


def test_duplicate_annotation_key_later_wins(tmp_path):
    base = {"image_id": "0" * 16, "question": "what?", "question_id": 1}
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"data": [dict(base, answers=["x"] * 10), dict(base, answers=["y"] * 10)]}))
    assert load_textvqa_annotations(ann)[("0" * 16, "what?")] == ["y"] * 10


@pytest.mark.parametrize("data,field", [
    ({"nodata": []}, "'data'"),
    ({"data": [{"image_id": "a", "question": "q?", "answers": ["x"] * 9}]}, "data\\[0\\]: field 'answers' has 9"),
    ({"data": [{"question": "q?", "answers": ["x"] * 10}]}, "data\\[0\\]: field 'image_id'"),
    ({"data": [{"image_id": "a", "question": 3, "answers": ["x"] * 10}]}, "field 'question'"),
])
def test_malformed_annotations_name_the_field(tmp_path, data, field):
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=field):
        load_textvqa_annotations(ann)


def test_question_loader_ocr_and_images(textvqa_fixture):
    qs = load_textvqa_questions(textvqa_fixture["questions"], textvqa_fixture["images"])
    assert len(qs) == 20
    assert qs[0].prompt == qs[0].message == "Is this a sign?\nReference OCR token: STOP\n" \
                                            "Answer the question using a single word or phrase."
    assert qs[4].prompt.count("\n") == 1  # no OCR tokens -> 2-line form
    img = qs[5].image()  # the grayscale JPEG
    assert img.mode == "RGB" and img.size == (40, 72)
    assert qs[0].question_id == qs[12].question_id  # two questions on one image
    no_ocr = load_textvqa_questions(textvqa_fixture["questions"], textvqa_fixture["images"], ocr=False)
    assert all("Reference OCR token" not in q.prompt for q in no_ocr)
    assert no_ocr[0].prompt == "Is this a sign?\nAnswer the question using a single word or phrase."


def test_question_loader_malformed_line_becomes_error_record(tmp_path):
    qf = tmp_path / "q.jsonl"
    qf.write_text('{"question_id": "ab", "image": "ab.jpg", "text": "Q?\\nAnswer."}\n{not json\n'
                  '{"question_id": "cd", "text": "Q?\\nAnswer."}\n')
    qs = load_textvqa_questions(qf, tmp_path)
    assert [q.error is None for q in qs] == [True, False, False]
    assert qs[1].question_id == "line2" and "invalid JSON" in qs[1].error
    assert qs[2].question_id == "cd" and "'image'" in qs[2].error


def test_cli_score_only_writes_summary(textvqa_fixture, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("eval_textvqa", Path(__file__).parents[2] / "eval" / "textvqa.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--score-only", str(textvqa_fixture["fake_answers"]),
                   "--annotation-file", str(textvqa_fixture["annotations"])])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Samples: 20\nAccuracy: 58.50%" in out
    summary = json.loads((textvqa_fixture["fake_answers"].parent / "textvqa_summary.json").read_text())
    assert summary["benchmark"] == "textvqa" and summary["score"] == 58.5
