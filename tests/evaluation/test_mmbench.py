"""MMBench: TSV loading, LLaVA prompt, VLMEvalKit-style letter extraction, circular scores, submission xlsx."""
import base64
import json

import pytest
from eval_fixtures import MMB_COLUMNS, mmbench_rows, write_tsv

from piip_llava.evaluation.tasks.mmbench import (build_mmbench_prompt, build_mmbench_questions, can_infer,
                                           extract_choice, load_mmbench_tsv, score_mmbench,
                                           write_submission_xlsx)


def test_loader_rows_options_hints(mmbench_fixture):
    rows, errors = load_mmbench_tsv(mmbench_fixture["tsv"])
    assert errors == []
    assert len(rows) == 20
    assert [r.index for r in rows[:5]] == [0, 1_000_000, 2_000_000, 3_000_000, 1]
    r0 = rows[0]
    assert r0.options == ["shopfront", "office", "beach", "forest"] and r0.answer == "C"
    assert r0.hint == "The image was taken outdoors." and r0.category == "image_scene"
    assert rows[1].options == ["office", "beach", "forest", "shopfront"] and rows[1].answer == "B"
    two = [r for r in rows if r.group == 5]
    assert [r.options for r in two] == [["left", "right"], ["right", "left"]]
    assert [r.answer for r in two] == ["B", "A"] and two[0].hint is None
    assert two[0].l2_category == "relation_reasoning"


def test_prompt_exactly_as_model_vqa_mmbench(mmbench_fixture):
    rows, _ = load_mmbench_tsv(mmbench_fixture["tsv"])
    qs = build_mmbench_questions(rows)
    assert qs[0].prompt == ("The image was taken outdoors.\nWhich scene category matches this image best?\n"
                            "A. shopfront\nB. office\nC. beach\nD. forest")
    assert qs[0].message == qs[0].prompt + "\nAnswer with the option's letter from the given choices directly."
    q5 = next(q for q in qs if q.question_id == 5)
    assert q5.prompt == "Where is the tree?\nA. left\nB. right"
    assert q5.extra == {"round_id": 0, "options": ["left", "right"], "option_char": ["A", "B"]}
    gray = next(q for q in qs if q.question_id == 2).image()
    assert gray.mode == "RGB" and gray.size == (80, 60)
    assert build_mmbench_questions(rows, lang="cn")[0].message.endswith("\n请直接回答选项字母。")


def test_prompt_stops_at_first_none_option():
    assert build_mmbench_prompt("Q?", float("nan"), ["x", "y"]) == "Q?\nA. x\nB. y"
    assert build_mmbench_prompt("Q?", "nan", ["x"]) == "Q?\nA. x"
    assert build_mmbench_prompt("Q?", "H", ["x"]) == "H\nQ?\nA. x"


@pytest.mark.parametrize("text,expected", [
    ("B", "B"), ("B.", "B"), ("The answer is B.", "B"), ("(C) beach", "C"), ("A dog", "A"),  # article problem
    ("forest", "D"), ("It is a beach.", "C"), ("A or B", None), ("I am not sure.", None),
    ("Cannot determine the answer", "Z"), ("Z", "Z"), ("b", None), ("**D**", "D"),
])
def test_letter_extraction(text, expected):
    assert extract_choice(text, ["shopfront", "office", "beach", "forest"]) == expected


def test_can_infer_text_needs_unique_option_text():
    assert can_infer("a big red ball", {"A": "red", "B": "blue"}) == "A"
    assert can_infer("red and blue", {"A": "red", "B": "blue"}) is False


def test_circular_vanilla_and_tables_by_hand(mmbench_fixture):
    rows, _ = load_mmbench_tsv(mmbench_fixture["tsv"])
    s = score_mmbench(rows, mmbench_fixture["fake_answers"])
    # groups: q0 hit ("The answer is B." on 1000000), q1 hit ("A."), q2 hit, q3 miss (2000003 wrong),
    # q4 hit (option text "yes"), q5 miss (1000005 unreadable) -> 4/6; rows: 18/20 right; main rows 6/6
    assert s["circular"] == pytest.approx(400 / 6)
    assert s["score"] == 66.67
    assert s["vanilla"] == pytest.approx(90.0)
    assert s["circ0"] == pytest.approx(100.0)
    assert s["questions"] == 6 and s["rows"] == 20
    assert s["unreadable"] == [{"index": 1_000_005, "text": "I am not sure."}]
    assert s["choices"]["2000003"] == "A" and s["choices"]["1000000"] == "B" and s["choices"]["4"] == "A"
    l2 = s["per_l2_category"]
    assert l2["coarse_perception"] == {"circular": 50.0, "vanilla": 87.5, "questions": 2, "rows": 8}
    assert l2["relation_reasoning"] == {"circular": 0.0, "vanilla": 50.0, "questions": 1, "rows": 2}
    assert l2["attribute_reasoning"]["circular"] == 100.0
    assert s["per_category"]["image_topic"] == {"circular": 0.0, "vanilla": 75.0, "questions": 1, "rows": 4}
    assert len(s["per_category"]) == 6


def test_missing_and_error_answers_count_as_wrong(mmbench_fixture):
    rows, _ = load_mmbench_tsv(mmbench_fixture["tsv"])
    answers = [json.loads(x) for x in mmbench_fixture["fake_answers"].read_text().splitlines()]
    answers = [a for a in answers if a["question_id"] != 2]  # q2 main row unanswered
    for a in answers:
        if a["question_id"] == 1:
            a.update(text="", error="ValueError: undecodable")
    s = score_mmbench(rows, answers)
    assert s["missing"] == [2] and s["errors"] == [1]
    assert s["circular"] == pytest.approx(200 / 6)  # q0 and q4 remain
    assert s["vanilla"] == pytest.approx(100 * 16 / 20)


def test_submission_xlsx_matches_llava_converter(mmbench_fixture, tmp_path):
    import pandas as pd

    out = write_submission_xlsx(mmbench_fixture["tsv"], mmbench_fixture["fake_answers"], tmp_path / "up" / "exp.xlsx")
    df = pd.read_excel(out, engine="openpyxl")
    assert list(df.columns) == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert len(df) == 20
    pred = dict(zip(df["index"], df["prediction"]))
    assert pred[1_000_000] == "The answer is B." and pred[2_000_003] == "A" and pred[1_000_005] == "I am not sure."
    assert pred[4] == "yes" and pred[0] == "C"
    two = df[df["index"] == 5].iloc[0]
    assert pd.isna(two["C"]) and pd.isna(two["D"]) and two["B"] == "right"


def test_submission_needs_comment_column(mmbench_fixture, tmp_path):
    rows = mmbench_rows()
    lines = ["\t".join(c for c in MMB_COLUMNS if c != "comment")]
    lines += ["\t".join(str(r[c]) for c in MMB_COLUMNS if c != "comment") for r in rows]
    tsv = tmp_path / "nocomment.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="comment"):
        write_submission_xlsx(tsv, [], tmp_path / "x.xlsx")


def test_malformed_rows_are_recorded_with_row_index(tmp_path):
    rows = mmbench_rows()[:4]
    rows[1] = dict(rows[1], index="abc")
    rows[2] = dict(rows[2], A="", B="", C="", D="")
    rows[3] = dict(rows[3], image=base64.b64encode(b"not an image").decode())
    tsv = tmp_path / "bad.tsv"
    write_tsv(tsv, rows)
    good, errors = load_mmbench_tsv(tsv)
    assert [e["row"] for e in errors] == [1, 2]
    assert "field 'index'" in errors[0]["error"] and errors[0]["index"] == "row1"
    assert "0 option" in errors[1]["error"] and errors[1]["index"] == 2_000_000
    qs = build_mmbench_questions(good, errors)
    assert [q.question_id for q in qs] == [0, "row1", 2_000_000, 3_000_000]
    assert qs[1].error and qs[2].error and qs[3].error is None
    with pytest.raises(ValueError, match="undecodable base64"):
        qs[3].image()


def test_image_references_to_other_rows_are_resolved(tmp_path):
    rows = mmbench_rows()[:4]
    rows[2] = dict(rows[2], image=str(rows[0]["index"]))  # VLMEvalKit-style reference to row index 0
    tsv = tmp_path / "ref.tsv"
    write_tsv(tsv, rows)
    good, errors = load_mmbench_tsv(tsv)
    assert errors == [] and good[2].image_b64 == rows[0]["image"]
    assert build_mmbench_questions(good)[2].image().size == (80, 60)
