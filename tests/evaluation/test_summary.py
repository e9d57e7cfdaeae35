"""The quickstart's results table: one row per summary JSON, lists shown by their length, floats rounded."""
import json

from piip_llava.evaluation.summary import main, summary_table


def test_summary_table_rows_and_compact_details():
    table = summary_table({
        "textvqa": {"benchmark": "textvqa", "score": 61.234, "metric": "vqa_accuracy", "samples": 200, "errors": 0},
        "mmbench": {"benchmark": "mmbench", "score": 12.5, "vanilla": 40.6789, "errors": [],
                    "unreadable": [{"index": i, "text": "D D B"} for i in range(92)], "per_category": {"ocr": 1.0}},
    })
    lines = table.splitlines()
    assert lines[:2] == ["| benchmark | score (%) | details |", "| --- | --- | --- |"]
    assert lines[2] == "| mmbench | 12.50 | vanilla=40.68, errors=0, unreadable=92 |"
    assert lines[3] == "| textvqa | 61.23 | metric=vqa_accuracy, samples=200, errors=0 |"


def test_summary_cli_reads_the_folder(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1  # nothing there: says so, non-zero exit
    (tmp_path / "textvqa_summary.json").write_text(json.dumps({"benchmark": "textvqa", "score": 55.0}))
    assert main([str(tmp_path), "--title", "run"]) == 0
    out = capsys.readouterr().out
    assert "### run" in out and "| textvqa | 55.00 |" in out
