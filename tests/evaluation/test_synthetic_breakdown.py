"""Per-skill scores of the synthetic quickstart: TextVQA by the way a question names its word, MMBench per category."""
import json

import pytest

from piip_llava.data import synthetic as syn
from piip_llava.evaluation.synthetic_breakdown import (
    OUTPUT_FILE,
    answer_form,
    main,
    question_kind,
    textvqa_by_kind,
)


def test_question_kind_covers_every_generated_reading_question():
    scene = syn.sample_scene(__import__("random").Random(3))
    kinds = {question_kind(syn.word_question(scene, role, by_color=False)[0]) for role in ("large", "top", "bottom")}
    assert kinds == {"large", "top", "bottom"}
    for role in ("large", "top", "bottom"):
        assert question_kind(syn.word_question(scene, role, by_color=True)[0]) == "colour"
    assert question_kind("what color is the large word?") == "other"


def test_breakdown_of_a_generated_eval_set(tmp_path, capsys):
    data = syn.generate_synthetic_dataset(str(tmp_path / "data"), num_train=0, num_eval=40)
    ann = json.loads(open(data["textvqa_annotations"]).read())["data"]
    lines = [json.loads(line) for line in open(data["textvqa_questions"])]
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    # answer every question right except the colour-referenced ones
    with open(eval_dir / "textvqa_answers.jsonl", "w") as f:
        for line, a in zip(lines, ann):
            majority = max(set(a["answers"]), key=a["answers"].count)  # the true word: >= 4 of the 10
            text = "zzz" if question_kind(a["question"]) == "colour" else majority
            f.write(json.dumps({"question_id": line["question_id"], "prompt": line["text"], "text": text}) + "\n")
    (eval_dir / "mmbench_summary.json").write_text(json.dumps({"benchmark": "mmbench", "per_category": {
        "ocr": {"circular": 40.0, "vanilla": 70.0, "questions": 5, "rows": 17}}}))
    by_kind = textvqa_by_kind(eval_dir / "textvqa_answers.jsonl", data["textvqa_annotations"])
    assert set(by_kind) == {"large", "top", "bottom", "colour", "all"}
    assert by_kind["colour"]["accuracy"] == 0.0 and by_kind["colour"]["questions"] > 0
    assert all(by_kind[k]["accuracy"] == 100.0 for k in ("large", "top", "bottom"))
    assert sum(by_kind[k]["questions"] for k in ("large", "top", "bottom", "colour")) == by_kind["all"]["questions"] == 40
    assert main([str(eval_dir), "--annotation-file", data["textvqa_annotations"]]) == 0
    written = json.loads((eval_dir / OUTPUT_FILE).read_text())
    assert written["mmbench"] == {"ocr": {"circular": 40.0, "vanilla": 70.0, "questions": 5}}
    out = capsys.readouterr().out
    assert "colour 0.0 %" in out and "ocr 40/70 (5)" in out


def test_missing_eval_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="textvqa_answers.jsonl"):
        main([str(tmp_path), "--annotation-file", str(tmp_path / "ann.json")])


def test_mmbench_scores_come_with_guessing_levels_and_the_most_frequent_answer(tmp_path, capsys):
    """2-option question (2 rows) + 4-option question (4 rows): guessing gets (2 x 1/2 + 4 x 1/4) / 6 = 33.3 % of
    rows and (1/2^2 + 1/4^4) / 2 = 12.7 % of questions circularly."""
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    rows = [(0, ["top", "bottom"]), (syn.MMBENCH_COPY_OFFSET, ["bottom", "top"])]
    rows += [(1 + k * syn.MMBENCH_COPY_OFFSET, ["red", "blue", "green", "black"]) for k in range(4)]
    with open(eval_dir / "mmbench_answers.jsonl", "w") as f:
        for qid, options in rows:
            f.write(json.dumps({"question_id": qid, "prompt": "q", "text": "A", "options": options}) + "\n")
    choices = {str(qid): "A" for qid, _ in rows}
    choices[str(syn.MMBENCH_COPY_OFFSET)] = "B"
    (eval_dir / "mmbench_summary.json").write_text(json.dumps({
        "benchmark": "mmbench", "circular": 0.0, "vanilla": 33.33, "choices": choices, "per_category": {}}))
    assert main([str(eval_dir), "--annotation-file", str(tmp_path / "unused.json")]) == 0
    overall = json.loads((eval_dir / OUTPUT_FILE).read_text())["mmbench_overall"]
    assert overall == {"circular": 0.0, "vanilla": 33.33, "chance_circular": 12.7, "chance_vanilla": 33.33,
                       "most_common_choice": "A", "most_common_choice_share": 83.3,
                       "answer_form": {"letter": 100.0, "option_text": 0.0, "unextractable": 0.0}}
    assert ("circular 0.0 % (guessing: 12.7 %), vanilla 33.3 % (guessing: 33.3 %); most frequent answer A (83 % of rows)"
            in capsys.readouterr().out)


@pytest.mark.parametrize("text, form", [
    ("B", "letter"), ("B. blue", "letter"), ("blue", "option_text"), ("The blue one.", "option_text"),
    ("purple", "unextractable"), ("red or blue", "unextractable"),
])
def test_answer_form_follows_the_rule_based_extraction(text, form):
    assert answer_form(text, ["red", "blue", "green", "black"]) == form
