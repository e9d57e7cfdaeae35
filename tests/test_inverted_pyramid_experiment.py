"""scripts/experiments/inverted_pyramid.sh, shortened (QUICK=1, runs a and c): trains, evaluates, reports."""
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
    env = dict(os.environ, QUICK="1", OUT_DIR=str(out), PYTHON=sys.executable, RUNS="a c", NUM_TRAIN="80",
               NUM_EVAL="8")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "experiments" / "inverted_pyramid.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = json.loads((out / "results.json").read_text())
    assert [r["preset"] for r in rows] == ["mini-clip-l_64", "mini-piip2_clip-ls_64-128"]
    assert rows[0]["vision_mflops"] < rows[1]["vision_mflops"]  # PIIP adds the small branch + interactions
    assert [r["visual_tokens"] for r in rows] == [16, 64]
    assert all(0.0 <= r["textvqa"] <= 100.0 for r in rows)
    assert (out / "accuracy_vs_flops.png").stat().st_size > 5000
    assert "| (c) PIIP large@64+small@128 |" in (out / "results.md").read_text()
