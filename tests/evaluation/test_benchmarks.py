"""POPE, GQA, ScienceQA-IMG, SEED-I, VQAv2, MM-Vet conversions/scores and the report, with hand-computed values."""
import json

import pytest
from PIL import Image

from piip_llava.evaluation.io import load_question_jsonl
from piip_llava.evaluation.tasks.gqa import score_gqa, write_gqa_predictions
from piip_llava.evaluation.tasks.mmvet import write_mmvet_results
from piip_llava.evaluation.tasks.pope import pope_yes_no, score_pope
from piip_llava.evaluation.tasks.scienceqa import (load_scienceqa_questions, parse_scienceqa_answer,
                                                   score_scienceqa)
from piip_llava.evaluation.tasks.seed import score_seed, write_seed_upload
from piip_llava.evaluation.tasks.vqav2 import write_vqav2_submission
from piip_llava.evaluation.report import PAPER_ROWS, collect_summaries, make_row, plot_bars, to_csv, to_markdown


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ans(qid, text, **kw):
    return {"question_id": qid, "prompt": kw.pop("prompt", "p"), "text": text, "answer_id": "x", "model_id": "m",
            "metadata": {}, **kw}


@pytest.mark.parametrize("text,expected", [
    ("Yes, there is a dog.", "yes"), ("No, there is not.", "no"), ("There is not a cat.", "no"),
    ("Yes. But no cat.", "yes"), ("nothing", "yes"), ("NO", "yes"), ("no", "no"), ("", "yes"),
])
def test_pope_keyword_mapping(text, expected):
    assert pope_yes_no(text) == expected


def test_pope_f1_per_category_and_mean(tmp_path):
    cats = {"adversarial": (["yes", "no", "yes", "no"],
                            ["Yes, there is a dog.", "No, there is not.", "There is not a cat.", "Yes."]),
            "popular": (["yes", "yes", "no", "no"], ["yes", "Yes", "no", "No."]),
            "random": (["yes", "no", "yes", "yes"], ["Yes. But no cat.", "nothing", None, "Yes"])}
    ann = tmp_path / "coco"
    ann.mkdir()
    questions, answers, qid = [], [], 0
    for cat, (labels, preds) in cats.items():
        _jsonl(ann / f"coco_pope_{cat}.json",
               [{"question_id": i + 1, "image": f"COCO_val2014_{i}.jpg", "text": "Is there a dog?", "label": lab}
                for i, lab in enumerate(labels)])
        for pred in preds:
            qid += 1
            questions.append({"question_id": qid, "image": "x.jpg", "text": "Is there a dog in the image?",
                              "category": cat})
            answers.append(_ans(qid, "", error="missing image") if pred is None else _ans(qid, pred))
    qf = _jsonl(tmp_path / "llava_pope_test.jsonl", questions)
    s = score_pope(answers, qf, ann)
    pc = s["per_category"]
    assert pc["adversarial"]["f1"] == pytest.approx(0.5)
    assert (pc["adversarial"]["TP"], pc["adversarial"]["FP"], pc["adversarial"]["TN"], pc["adversarial"]["FN"]) == (1, 1, 1, 1)
    assert pc["popular"]["f1"] == pytest.approx(1.0)
    assert pc["random"]["f1"] == pytest.approx(2 / 3) and pc["random"]["errors"] == 1
    assert s["mean_f1"] == pytest.approx(100 * (0.5 + 1 + 2 / 3) / 3)
    assert s["score"] == 72.22
    (ann / "README.txt").write_text("x")
    with pytest.raises(ValueError, match="coco_pope_"):
        score_pope(answers, qf, ann)


def test_gqa_predictions_and_accuracy(tmp_path):
    answers = [_ans("q1", "Yes."), _ans("q2", "Red"), _ans("q3", "left side")]
    preds = write_gqa_predictions(answers, tmp_path / "p.json")
    assert preds == [{"questionId": "q1", "prediction": "yes"}, {"questionId": "q2", "prediction": "red"},
                     {"questionId": "q3", "prediction": "left side"}]
    assert json.loads((tmp_path / "p.json").read_text()) == preds
    qs = tmp_path / "testdev_balanced_questions.json"
    qs.write_text(json.dumps({"q1": {"answer": "yes"}, "q2": {"answer": "red"}, "q3": {"answer": "left"},
                              "q4": {"answer": "no"}}))
    s = score_gqa(answers, qs)
    assert s["accuracy"] == 50.0 and s["missing"] == 1


@pytest.mark.parametrize("text,expected", [
    ("A", "A"), ("B. because", "B"), ("B.", "FAILED"), ("The answer is C.", "C"), ("The answer is C", "FAILED"),
    ("The answer is A. The answer is B.", "FAILED"), ("a", "FAILED"), ("E", "E"),
])
def test_scienceqa_parser(text, expected):
    assert parse_scienceqa_answer(text) == expected


def test_scienceqa_prompt_and_img_accuracy(tmp_path):
    base = "Question: Which is a mammal?\nContext: N/A\nOptions: (A) cat (B) fish"
    items = [{"id": str(i), "conversations": [{"from": "human", "value": ("<image>\n" if i != 4 else "") + base},
                                              {"from": "gpt", "value": "A"}]} for i in (1, 2, 3, 4, 6)]
    for it in items:
        if it["id"] != "4":
            it["image"] = f"{it['id']}/image.png"
    qf = tmp_path / "llava_test_CQM-A.json"
    qf.write_text(json.dumps(items))
    qs = load_scienceqa_questions(qf, tmp_path / "images")
    instr = "\nAnswer with the option's letter from the given choices directly."
    assert qs[0].prompt == "<image>\n" + base + instr and qs[0].message == base + instr
    assert qs[3].prompt == base + instr and qs[3].image is None
    problems = {"1": {"choices": ["cat", "fish"], "answer": 0}, "2": {"choices": ["x", "y"], "answer": 1},
                "3": {"choices": ["x", "y", "z"], "answer": 1}, "4": {"choices": ["x", "y"], "answer": 0},
                "5": {"choices": ["x", "y"], "answer": 0}, "6": {"choices": ["x", "y", "z"], "answer": 2}}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4", "5", "6"]}))
    texts = {"1": "A", "2": "B. because", "3": "B.", "4": "A", "6": "The answer is C."}
    answers = [_ans(q.question_id, texts[q.question_id], prompt=q.prompt) for q in qs]
    s = score_scienceqa(answers, tmp_path / "problems.json", tmp_path / "pid_splits.json")
    assert s["total"] == 6 and s["accuracy"] == pytest.approx(400 / 6)  # 5 unanswered: wrong, not an IMG item
    assert s["img_total"] == 4 and s["img_accuracy"] == 75.0


def test_seed_exact_letter_image_only(tmp_path):
    seed = tmp_path / "SEED-Bench.json"
    seed.write_text(json.dumps({"question_type": {"Scene Understanding": 1, "Instance Identity": 2}, "questions": [
        {"question_id": "101", "answer": "A", "data_type": "image", "question_type_id": 1},
        {"question_id": "102", "answer": "B", "data_type": "image", "question_type_id": 1},
        {"question_id": "103", "answer": "C", "data_type": "image", "question_type_id": 2},
        {"question_id": "104", "answer": "D", "data_type": "image", "question_type_id": 2},
        {"question_id": "105", "answer": "A", "data_type": "video", "question_type_id": 1}]}))
    answers = [_ans(101, "A"), _ans(102, "B."), _ans(103, "C"), _ans(105, "A")]
    s = score_seed(answers, seed)
    assert s["accuracy"] == 50.0 and s["questions"] == 4
    assert s["per_type"] == {"Scene Understanding": 50.0, "Instance Identity": 50.0}
    assert score_seed(answers, seed, data_type=None)["accuracy"] == 60.0
    up = tmp_path / "up.jsonl"
    assert write_seed_upload(answers, seed, up) == 4
    assert json.loads(up.read_text().splitlines()[1]) == {"question_id": "102", "prediction": "B."}


def test_vqav2_submission_and_mmvet(tmp_path):
    split = _jsonl(tmp_path / "test2015.jsonl", [{"question_id": i, "image": "x.jpg", "text": "t"} for i in (1, 2, 3, 4)])
    answers = [_ans(1, "Two dogs."), _ans(3, "Yes"), _ans(4, "", error="bad image")]
    info = write_vqav2_submission(answers, split, tmp_path / "sub.json")
    assert json.loads((tmp_path / "sub.json").read_text()) == [
        {"question_id": 1, "answer": "2 dogs"}, {"question_id": 2, "answer": ""}, {"question_id": 3, "answer": "yes"},
        {"question_id": 4, "answer": ""}]
    assert info == {"total_split": 4, "answered": 2}
    res = write_mmvet_results([_ans(0, "a cat"), _ans(1, "42")], tmp_path / "mmvet.json")
    assert res == {"v1_0": "a cat", "v1_1": "42"}
    assert json.loads((tmp_path / "mmvet.json").read_text()) == res


def test_question_jsonl_loader(tmp_path):
    Image.new("RGB", (5, 3)).save(tmp_path / "a.jpg")
    qf = tmp_path / "q.jsonl"
    qf.write_text('{"question_id": 7, "image": "a.jpg", "text": "Q?\\nAnswer the question."}\n'
                  '{"question_id": 8, "text": "text only"}\n{"question_id": 9}\n{oops\n')
    qs = load_question_jsonl(qf, tmp_path)
    assert [q.question_id for q in qs] == [7, 8, 9, "line4"]
    assert qs[0].prompt == qs[0].message == "Q?\nAnswer the question." and qs[0].image().size == (5, 3)
    assert qs[1].image is None and qs[1].error is None
    assert "'text'" in qs[2].error and "invalid JSON" in qs[3].error
    assert [q.question_id for q in load_question_jsonl(qf, tmp_path, keep=lambda r: r["question_id"] != 8)] == [7, 9, "line4"]


def test_report_row_markdown_csv_png(tmp_path):
    llava = PAPER_ROWS["LLaVA-1.5 7B (CLIP-L 336)"]
    keys = ["mmbench", "mmvet", "textvqa", "scienceqa", "gqa", "vqav2", "seed", "pope"]
    for k, v in zip(keys, llava):
        (tmp_path / f"{k}_summary.json").write_text(json.dumps({"benchmark": k, "score": v + 0.04}))
    (tmp_path / "other.json").write_text(json.dumps([1, 2]))  # ignored
    row = make_row(collect_summaries(tmp_path))
    assert row == [64.3, 31.1, 58.2, 66.8, 62.0, 78.5, 66.1, 85.9, 64.1]  # Avg = 512.9 / 8
    (tmp_path / "vqav2_summary.json").write_text(json.dumps({"benchmark": "vqav2", "score": None}))
    partial = make_row(collect_summaries(tmp_path))
    assert partial[5] is None and partial[8] is None
    rows = {"ours": partial, "paper": list(llava)}
    md = to_markdown(rows)
    assert md.splitlines()[0] == "| model | MMB-EN | MMVet | TextVQA | SQA-I | GQA | VQAv2 | SEED-I | POPE | Avg |"
    assert md.splitlines()[2] == "| ours | 64.3 | 31.1 | 58.2 | 66.8 | 62.0 | - | 66.1 | 85.9 | - |"
    assert to_csv(rows).splitlines()[1] == "ours,64.3,31.1,58.2,66.8,62.0,,66.1,85.9,"
    png = plot_bars(rows, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.size[0] > 500
