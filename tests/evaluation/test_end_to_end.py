"""End to end from a tiny random checkpoint through eval/textvqa.py and eval/mmbench.py (real InferenceEngine)."""
import importlib.util
import json
from pathlib import Path

import pytest

from piip_llava.evaluation.tasks.mmbench import load_mmbench_tsv, score_mmbench
from piip_llava.evaluation.runner import read_answers
from piip_llava.evaluation.tasks.textvqa import load_textvqa_annotations, prompt_processor, vqa_accuracy

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _cli(name):
    spec = importlib.util.spec_from_file_location(f"eval_cli_{name}", REPO / "eval" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(autouse=True)
def one_torch_thread():
    """On the small shared CI box, 2 competing OpenMP threads make each decoding step 10-40x slower."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tokenizer_dir):
    from piip_llava.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")), tokenizer_dir=tokenizer_dir)


def test_textvqa_cli_end_to_end(tiny_ckpt, textvqa_fixture, tmp_path, capsys):
    main = _cli("textvqa")
    fx = textvqa_fixture
    common = ["--model-path", tiny_ckpt, "--question-file", str(fx["questions"]), "--image-folder", str(fx["images"]),
              "--annotation-file", str(fx["annotations"]), "--max-new-tokens", "4", "--no-progress"]
    a16 = tmp_path / "b16" / "textvqa.jsonl"
    assert main(common + ["--answers-file", str(a16), "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    recs = read_answers(a16)
    questions = [json.loads(x) for x in fx["questions"].read_text().splitlines()]
    assert [(r["question_id"], r["prompt"]) for r in recs] == [(q["question_id"], q["text"]) for q in questions]
    assert not any(r.get("error") for r in recs)  # grayscale and non-square JPEGs all answered
    # the printed / saved accuracy is the mean soft accuracy of exactly these texts
    ann = load_textvqa_annotations(fx["annotations"])
    expected = 100 * sum(vqa_accuracy(r["text"], ann[(r["question_id"], prompt_processor(r["prompt"]))])
                         for r in recs) / 20
    summary = json.loads((a16.parent / "textvqa_summary.json").read_text())
    assert summary["samples"] == 20 and summary["accuracy"] == pytest.approx(expected)
    assert f"Samples: 20\nAccuracy: {expected:.2f}%" in out

    # batch size 1 gives identical greedy answers
    a1 = tmp_path / "b1" / "textvqa.jsonl"
    assert main(common + ["--answers-file", str(a1), "--batch-size", "1"]) == 0
    assert [r["text"] for r in read_answers(a1)] == [r["text"] for r in recs]

    # a second run resumes: nothing is re-asked, the file is unchanged
    before = a16.read_text()
    assert main(common + ["--answers-file", str(a16), "--batch-size", "16"]) == 0
    assert a16.read_text() == before


def test_mmbench_cli_end_to_end_sharded(tiny_ckpt, mmbench_fixture, tmp_path, capsys):
    import pandas as pd

    main = _cli("mmbench")
    fx = mmbench_fixture
    common = ["--model-path", tiny_ckpt, "--question-file", str(fx["tsv"]), "--max-new-tokens", "3",
              "--batch-size", "16", "--no-progress"]
    full = tmp_path / "full" / "mmbench.jsonl"
    assert main(common + ["--answers-file", str(full), "--score", "--submission", str(tmp_path / "up")]) == 0
    recs = read_answers(full)
    rows, _ = load_mmbench_tsv(fx["tsv"])
    assert [r["question_id"] for r in recs] == [r.index for r in rows]
    assert recs[0]["prompt"].endswith("\nD. forest") and recs[0]["option_char"] == ["A", "B", "C", "D"]
    assert not any(r.get("error") for r in recs)
    summary = json.loads((full.parent / "mmbench_summary.json").read_text())
    ref = score_mmbench(rows, recs)
    assert summary["circular"] == pytest.approx(ref["circular"]) and summary["vanilla"] == pytest.approx(ref["vanilla"])
    assert summary["questions"] == 6 and summary["rows"] == 20
    assert "Circular accuracy:" in capsys.readouterr().out
    df = pd.read_excel(tmp_path / "up" / "mmbench.xlsx", engine="openpyxl")
    assert list(df.columns) == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    got = dict(zip(df["index"], df["prediction"].fillna("")))
    assert all(got[r["question_id"]] == r["text"] for r in recs)

    # two chunks + merge == the unsharded run
    sharded = tmp_path / "sharded" / "mmbench.jsonl"
    for k in range(2):
        assert main(common + ["--answers-file", str(sharded), "--num-chunks", "2", "--chunk-idx", str(k)]) == 0
    assert len(read_answers(sharded.with_name("mmbench.chunk0of2.jsonl"))) == 10
    assert main(["--question-file", str(fx["tsv"]), "--answers-file", str(sharded), "--merge-chunks", "2",
                 "--score"]) == 0
    assert [(r["question_id"], r["text"]) for r in read_answers(sharded)] == [(r["question_id"], r["text"]) for r in recs]


def test_eval_all_script_runs_present_benchmarks_and_skips_others(tiny_ckpt, textvqa_fixture, tmp_path):
    import os
    import subprocess
    import sys

    data = textvqa_fixture["root"].parent  # <tmp>/textvqa/... is the LLaVA layout
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", EVAL_ARGS="--max-new-tokens 2 --batch-size 16 --no-progress")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "eval_all.sh"), tiny_ckpt, str(data), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("mmbench", "pope", "gqa", "scienceqa", "seed", "vqav2", "mmvet"):
        assert f"skip {name}: " in proc.stdout
    assert "skip textvqa" not in proc.stdout
    score = json.loads((out / "textvqa_summary.json").read_text())["score"]
    row = next(line for line in proc.stdout.splitlines() if line.startswith(f"| {Path(tiny_ckpt).name} |"))
    assert row.split(" | ")[3] == f"{score:.1f}" and row.endswith("| - |")  # TextVQA column; no Avg
    assert "| LLaVA-1.5 7B (CLIP-L 336) | 64.3 | 31.1 | 58.2 |" in proc.stdout
    assert (out / "report.png").stat().st_size > 0 and (out / "report.csv").exists()


def test_throughput_benchmark_runs_and_batches_agree(tiny_ckpt, capsys):
    """The benchmark script works and its batch-1 and batch-16 answers agree. The >= 4x speed-up is a figure the
    script prints (benchmarks/, not a timed test: a busy CI machine must not fail the suite)."""
    spec = importlib.util.spec_from_file_location("eval_throughput", REPO / "benchmarks" / "eval_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--checkpoint", tiny_ckpt, "--num-questions", "48", "--max-new-tokens", "16"])
    out = capsys.readouterr().out
    assert "greedy answers identical across batch sizes: True" in out
    assert "questions/s" in out
    assert rc == 0, out
