"""The experiment report: per-question-type TextVQA accuracy, FLOPs per preset, table and plot files."""
import json

from piip_llava.evaluation.inverted_pyramid import main, question_kind, textvqa_by_kind


def _write_run(tmp_path, name, texts):
    qs = [("aaaa000000000001", "What word is written in small letters at the top?", "cat"),
          ("aaaa000000000001", "What word is written in large letters?", "dog"),
          ("aaaa000000000002", "What color is the large word?", "red")]
    ann = {"data": [{"image_id": i, "question": q.lower(), "question_id": n, "answers": [a] * 10}
                    for n, (i, q, a) in enumerate(qs)]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    run = tmp_path / name / "eval"
    run.mkdir(parents=True)
    with open(run / "textvqa_answers.jsonl", "w") as f:
        for (i, q, _), text in zip(qs, texts):
            prompt = f"{q}\nReference OCR token: cat, dog\nAnswer the question using a single word or phrase."
            f.write(json.dumps({"question_id": i, "prompt": prompt, "text": text}) + "\n")
    (run / "mmbench_summary.json").write_text(json.dumps({"benchmark": "mmbench", "circular": 25.0, "vanilla": 50.0}))
    return tmp_path / name


def test_question_kinds_and_scores(tmp_path):
    assert question_kind("What word is written in small letters at the top?") == "small word"
    assert question_kind("What word is written in large letters?") == "large word"
    assert question_kind("What color is the large word?") == "other"
    run = _write_run(tmp_path, "r", ["cat", "cow", "Red."])
    scores = textvqa_by_kind(str(run / "eval" / "textvqa_answers.jsonl"), str(tmp_path / "ann.json"))
    assert scores["small word"] == (100.0, 1) and scores["large word"] == (0.0, 1) and scores["other"] == (100.0, 1)
    assert abs(scores["all"][0] - 200 / 3) < 1e-9 and scores["all"][1] == 3


def test_report_files(tmp_path, capsys):
    a = _write_run(tmp_path, "a", ["cow", "dog", "red"])
    c = _write_run(tmp_path, "c", ["cat", "dog", "red"])
    out = tmp_path / "out"
    assert main(["--run", f"(a)=mini-clip-l_64={a}", "--run", f"(c)=mini-piip2_clip-ls_64-128={c}",
                 "--annotation-file", str(tmp_path / "ann.json"), "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in rows] == ["(a)", "(c)"]
    assert rows[0]["textvqa_small"] == 0.0 and rows[1]["textvqa_small"] == 100.0
    assert rows[0]["visual_tokens"] == 16 and rows[1]["visual_tokens"] == 64
    assert rows[1]["vision_mflops"] > rows[0]["vision_mflops"] > 0
    assert rows[1]["mmbench_circular"] == 25.0
    assert (out / "accuracy_vs_flops.png").stat().st_size > 5000
    table = (out / "results.md").read_text()
    assert "| (c) | `mini-piip2_clip-ls_64-128` |" in table and "25.0 / 50.0" in table
