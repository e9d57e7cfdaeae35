"""The README's main job, shortened (QUICK=1: a few training steps): every stage runs and writes its files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "qs"
    # LM_STEPS: the optional language-pretraining stage runs too (tests/test_inverted_pyramid_experiment.py covers
    # the default pipeline without it)
    env = dict(os.environ, QUICK="1", OUT_DIR=str(out), PYTHON=sys.executable, NUM_TRAIN="120", NUM_EVAL="12",
               LM_STEPS="2")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "quickstart.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for step in ("== 1/5", "== 2/5", "stage 0: vision pretraining", "stage 1: alignment on captions", "stage 2: instruction tuning", "== 5/5 results"):
        assert step in log
    # the data, the tokenizer, both stages and the evaluation files exist and have the right content
    stage2 = json.loads((out / "data" / "stage2.json").read_text())
    assert len(stage2) > 120
    assert sum(r["id"].startswith("caption-") for r in stage2) == 30  # one caption record per 4 images
    assert any(r["conversations"][0]["value"].endswith("Answer with the option's text from the given choices directly.")
               for r in stage2)  # multiple choice answered with the option's text
    stage0 = json.loads((out / "run" / "stage0" / "vision_pretrain_metrics.json").read_text())
    assert stage0["num_train"] + stage0["num_eval"] == 120
    assert set(stage0["final_eval_accuracy"]) >= {"top_word", "tokens:color"}  # --stage0-regions: per-token labels
    assert "language pretraining: the LLM alone" in log and "tune llm" in log
    lm_records = json.loads((out / "data" / "lm_pretrain.json").read_text())
    assert len(lm_records) == 120 and not any("image" in r for r in lm_records)
    assert (out / "run" / "lm" / "model.safetensors").is_file()
    assert log.count(f"model: the checkpoint {out / 'run' / 'lm'}") == 2  # stages 1 and 2 continue from it
    assert (out / "run" / "stage1" / "mm_projector.safetensors").is_file()  # official stage-1 policy: projector
    assert (out / "run" / "stage2" / "model.safetensors").is_file()
    answers = (out / "run" / "eval" / "textvqa_answers.jsonl").read_text().splitlines()
    assert len(answers) == 12  # NUM_EVAL questions (2 per image)
    tv = json.loads((out / "run" / "eval" / "textvqa_summary.json").read_text())
    assert tv["benchmark"] == "textvqa" and tv["samples"] == 12 and 0.0 <= tv["score"] <= 100.0
    mmb = json.loads((out / "run" / "eval" / "mmbench_summary.json").read_text())
    assert mmb["benchmark"] == "mmbench" and mmb["rows"] > 0
    assert "| textvqa |" in log and "| mmbench |" in log
    assert "synthetic TextVQA by the way the word is named: " in log  # the per-skill split of the scores
    assert "synthetic MMBench per category" in log
    assert "synthetic MMBench answers name their choice by letter in " in log
    breakdown = json.loads((out / "run" / "eval" / "synthetic_breakdown.json").read_text())
    assert breakdown["textvqa"]["all"]["questions"] == 12 and set(breakdown["mmbench"]) >= {"ocr"}
    if os.cpu_count() >= 2:  # stages 1 and 2 in one single-thread DDP process per core
        assert "world size 2, per-device batch 2" in log
    assert "answers right on new synthetic images" in log
    assert "piip_llava.serve.gradio_demo --model" in log
