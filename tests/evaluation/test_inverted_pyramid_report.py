"""The experiment report: TextVQA by question kind, mean and spread over seeds, FLOPs per preset, table and plot."""
import json
import math

import pytest

from piip_llava.evaluation.inverted_pyramid import collect, main, parse_run

QUESTIONS = [("aaaa000000000001", "What word is written in small letters at the top?", "cat"),
             ("aaaa000000000001", "What word is written in large letters?", "dog"),
             ("aaaa000000000002", "What word is written in red?", "owl"),
             ("aaaa000000000002", "What word is written in small letters at the bottom?", "jam")]


def _write_run(tmp_path, name, texts, circular=25.0):
    ann = {"data": [{"image_id": i, "question": q.lower(), "question_id": n, "answers": [a] * 10}
                    for n, (i, q, a) in enumerate(QUESTIONS)]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    run = tmp_path / name / "eval"
    run.mkdir(parents=True)
    with open(run / "textvqa_answers.jsonl", "w") as f:
        for (i, q, _), text in zip(QUESTIONS, texts):
            prompt = f"{q}\nReference OCR token: cat, dog\nAnswer the question using a single word or phrase."
            f.write(json.dumps({"question_id": i, "prompt": prompt, "text": text}) + "\n")
    (run / "mmbench_summary.json").write_text(json.dumps({"benchmark": "mmbench", "circular": circular,
                                                          "vanilla": 50.0}))
    return tmp_path / name


def test_scores_per_kind_and_spread_over_seeds(tmp_path):
    s0 = _write_run(tmp_path, "s0", ["cat", "dog", "owl", "jam"], circular=20.0)   # all right
    s1 = _write_run(tmp_path, "s1", ["cat", "cow", "Owl.", "ham"], circular=40.0)  # large wrong, bottom wrong
    [row] = collect([("(c)", "mini-piip2_clip-ls_64-128", [str(s0), str(s1)])], str(tmp_path / "ann.json"))
    assert row["seeds"] == 2
    assert [s["textvqa"] for s in row["per_seed"]] == [100.0, 50.0]
    assert row["textvqa"] == 75.0 and row["textvqa_std"] == pytest.approx(math.sqrt(2 * 25.0 ** 2))
    assert [s["textvqa_small"] for s in row["per_seed"]] == [100.0, 50.0]  # top right, bottom wrong in seed 1
    assert row["textvqa_large"] == 50.0 and row["textvqa_colour"] == 100.0 and row["textvqa_colour_std"] == 0.0
    assert row["mmbench_circular"] == 30.0 and row["mmbench_circular_std"] == pytest.approx(math.sqrt(200.0))


def test_parse_run_names_the_bad_spec():
    assert parse_run("(a)=p=d1,d2") == ("(a)", "p", ["d1", "d2"])
    assert parse_run("(d) small(d=32)=p=d1") == ("(d) small(d=32)", "p", ["d1"])
    for bad in ["(a)=p", "(a)=p=", "(a)=p=d1,,d2", "=p=d", "(a)==d"]:
        with pytest.raises(ValueError, match="expected LABEL=PRESET=RUN_DIR"):
            parse_run(bad)


def test_report_files(tmp_path, capsys):
    a = [_write_run(tmp_path, f"a{k}", ["cow", "dog", "owl", "cat"]) for k in range(2)]
    c = _write_run(tmp_path, "c", ["cat", "dog", "owl", "jam"])
    (c / "eval" / "mmbench_summary.json").unlink()  # a run without MMBench: n/a, null in the JSON
    out = tmp_path / "out"
    assert main(["--run", f"(a)=mini-clip-l_64={a[0]},{a[1]}", "--run", f"(c)=mini-piip2_clip-ls_64-128={c}",
                 "--annotation-file", str(tmp_path / "ann.json"), "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())  # strict JSON: NaN became null
    assert [r["label"] for r in rows] == ["(a)", "(c)"] and [r["seeds"] for r in rows] == [2, 1]
    assert rows[0]["textvqa_small"] == 0.0 and rows[1]["textvqa_small"] == 100.0
    assert rows[0]["visual_tokens"] == 16 and rows[1]["visual_tokens"] == 64
    assert rows[1]["vision_mflops"] > rows[0]["vision_mflops"] > 0
    assert rows[0]["mmbench_circular"] == 25.0 and rows[1]["mmbench_circular"] is None
    assert (out / "accuracy_vs_flops.png").stat().st_size > 5000
    table = (out / "results.md").read_text()
    assert "| (a) | `mini-clip-l_64` | 10.8 |" in table and "| 2 | 50.0 ± 0.0 |" in table
    assert "| (c) | `mini-piip2_clip-ls_64-128` |" in table and table.count("n/a") == 2
