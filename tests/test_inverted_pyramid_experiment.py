"""scripts/experiments/inverted_pyramid.sh, shortened (QUICK=1, runs a and d, two seeds): trains, evaluates, reports."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_experiment_script_writes_table_and_plot(tmp_path):
    out = tmp_path / "exp"
    env = dict(os.environ, QUICK="1", OUT_DIR=str(out), PYTHON=sys.executable, RUNS="a d", SEEDS="0 1",
               NUM_TRAIN="80", NUM_EVAL="8", RELIANCE_RECORDS="8")
    script = ["bash", str(REPO / "scripts" / "experiments" / "inverted_pyramid.sh")]
    proc = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = json.loads((out / "results.json").read_text())
    assert [r["preset"] for r in rows] == ["mini-clip-l_64", "mini-piip2_clip-ls_48-128"]
    assert [r["seeds"] for r in rows] == [2, 2]
    assert [len(r["per_seed"]) for r in rows] == [2, 2]
    for r in rows:
        assert [Path(d).name for d in r["run_dirs"]] == ["seed0", "seed1"]
        assert all(0.0 <= s["textvqa"] <= 100.0 for s in r["per_seed"])
    # (d) is PIIP at (a)'s encoder FLOPs: within 5 %, with 64 visual tokens against 16
    assert abs(rows[1]["vision_mflops"] / rows[0]["vision_mflops"] - 1) < 0.05
    assert [r["visual_tokens"] for r in rows] == [16, 64]
    assert (out / "accuracy_vs_flops.png").stat().st_size > 5000
    assert "| (d) PIIP large@48+small(d=32)@128 |" in (out / "results.md").read_text()
    # a second call reuses every finished run instead of training again
    again = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done before, reusing") == 4
