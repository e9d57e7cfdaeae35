"""MME: LLaVA's answer conversion + MME's calculation on a hand-computed fixture."""
import json

import pytest
from PIL import Image

from piip_llava.evaluation.cli import task_main
from piip_llava.evaluation.tasks.mme import convert_answers, load_mme_ground_truth, mme_label, score_mme

SUFFIX = "\nAnswer the question using a single word or phrase."
YN = " Please answer yes or no."
# (question_id, image path, question text as in llava_mme.jsonl, GT line question, GT, prediction)
ITEMS = [
    ("existence/000000.jpg", "existence/000000.jpg", "Is there a dog?" + YN, "Is there a dog?" + YN, "Yes", "Yes"),
    ("existence/000000.jpg", "existence/000000.jpg", "Is there a cat?" + YN, "Is there a cat?" + YN, "No", "No"),
    ("existence/000001.jpg", "existence/000001.jpg", "Is there a car?" + YN, "Is there a car?" + YN, "Yes",
     "No, there is not."),                                                            # prefix "no, " -> no: wrong
    ("existence/000001.jpg", "existence/000001.jpg", "Is there a bus?" + YN, "Is there a bus?" + YN, "No", "no"),
    ("count/10.jpg", "count/images/10.jpg", "Are there two apples?" + YN, "Are there two apples?" + YN, "Yes",
     "Yessir"),                                                                       # prefix "yess" -> yes
    ("count/10.jpg", "count/images/10.jpg", "Are there three apples?", "Are there three apples?  Please answer yes or no.",
     "No", "I think no"),                                                             # two-space GT; "other"
    ("code_reasoning/0020.png", "code_reasoning/0020.png", "Does it print 3?" + YN, "Does it print 3?" + YN, "Yes",
     None),                                                                           # error record: wrong
    ("code_reasoning/0020.png", "code_reasoning/0020.png", "Does it print 4?" + YN, "Does it print 4?" + YN, "No",
     "NO"),
]
# existence: 3/4 right, 1/2 images both right -> 75 + 50 = 125; count: 1/2, 0/1 -> 50; code_reasoning: 1/2, 0 -> 50
EXPECTED = {"existence": 125.0, "count": 50.0, "code_reasoning": 50.0}
PERCEPTION, COGNITION = 175.0, 50.0


@pytest.fixture
def mme(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    gt_lines: dict = {}
    for qid, image, _text, gt_q, gt, _pred in ITEMS:
        category, name = qid.split("/")
        qa_dir = root / category / "questions_answers_YN" if "/images/" in image else root / category
        qa_dir.mkdir(parents=True, exist_ok=True)
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 24), (9, 9, 9)).save(root / image)
        gt_lines.setdefault(qa_dir / (name.split(".")[0] + ".txt"), []).append(f"{gt_q}\t{gt}")
    for path, lines in gt_lines.items():
        path.write_text("\n".join(lines) + "\n")
    questions = tmp_path / "llava_mme.jsonl"
    questions.write_text("".join(json.dumps({"question_id": qid, "image": image, "text": text + SUFFIX,
                                             "category": qid.split("/")[0]}) + "\n"
                                 for qid, image, text, *_ in ITEMS))
    answers = tmp_path / "out" / "mme.jsonl"
    answers.parent.mkdir()
    recs = []
    for qid, _image, text, _gt_q, _gt, pred in ITEMS:
        rec = {"question_id": qid, "prompt": text + SUFFIX, "text": pred or "", "answer_id": "x", "model_id": "m",
               "metadata": {}}
        if pred is None:
            rec["error"] = "ImageLoadError: broken"
        recs.append(rec)
    answers.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return {"root": root, "questions": questions, "answers": answers, "records": recs}


@pytest.mark.parametrize("pred,label", [("Yes", "yes"), ("no", "no"), ("No, there is not.", "no"),
                                        ("Yessir", "yes"), ("I think no", "other"), ("", "other"),
                                        ("nope", "no"), ("The answer is yes", "other")])
def test_mme_label_is_calculation_parse_pred_ans(pred, label):
    assert mme_label(pred) == label


def test_conversion_and_scores_by_hand(mme, tmp_path):
    gt = load_mme_ground_truth(mme["root"])
    assert gt[("count", "10.txt", "Are there three apples?  Please answer yes or no.")] == "No"
    converted = convert_answers(mme["answers"], gt, tmp_path / "results")
    assert converted["count"][1] == ("10.txt", "Are there three apples?  Please answer yes or no.", "No", "I think no")
    # the files MME's calculation.py reads: file, prompt, gt, prediction
    assert (tmp_path / "results" / "existence.txt").read_text().splitlines()[0] == \
        "000000.txt\tIs there a dog? Please answer yes or no.\tYes\tYes"
    s = score_mme(converted)
    assert {c: m["score"] for c, m in s["per_category"].items()} == pytest.approx(EXPECTED)
    assert s["per_category"]["existence"]["acc"] == 75.0 and s["per_category"]["existence"]["acc_plus"] == 50.0
    assert s["per_category"]["count"]["other"] == 1
    assert s["perception"] == PERCEPTION and s["cognition"] == COGNITION and s["score"] == PERCEPTION
    assert "artwork" in s["missing_categories"] and s["unknown_categories"] == []


def test_cli_score_only_counts_missing_answers_wrong(mme, capsys):
    # drop the first existence answer: existence becomes 2/4 right, 0/2 images -> 50
    mme["answers"].write_text("".join(json.dumps(r) + "\n" for r in mme["records"][1:]))
    rc = task_main("mme")(["--score-only", str(mme["answers"]), "--mme-dir", str(mme["root"]),
                           "--question-file", str(mme["questions"])])
    assert rc == 0
    out = capsys.readouterr().out
    summary = json.loads((mme["answers"].parent / "mme_summary.json").read_text())
    assert summary["per_category"]["existence"]["score"] == 50.0 and summary["missing_answers"] == 1
    assert summary["perception"] == 100.0 and summary["cognition"] == 50.0
    assert "=========== Perception ===========\ntotal score: 100.00" in out
    assert (mme["answers"].parent / "mme_results" / "count.txt").exists()


def test_answer_without_ground_truth_names_the_record(mme):
    recs = mme["records"][:2] + [{**mme["records"][2], "prompt": "Is there a zebra?"}]
    with pytest.raises(ValueError, match="answers record 3: no MME ground truth for existence/000001.txt"):
        convert_answers(recs, load_mme_ground_truth(mme["root"]))


def test_questions_load_with_images(mme):
    from argparse import Namespace

    from piip_llava.evaluation.tasks.mme import TASK

    qs = TASK.load_questions(Namespace(question_file=str(mme["questions"]), image_folder=None,
                                       mme_dir=str(mme["root"]), image_decode="official"))
    assert [q.question_id for q in qs] == [i[0] for i in ITEMS]
    assert qs[5].prompt == "Are there three apples?" + SUFFIX and qs[4].image().size == (32, 24)
