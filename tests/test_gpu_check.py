"""`bash scripts/gpu_check.sh --cpu`: every step of the GPU check runs its code path on the tiny preset and reports
a number (the CUDA run is the same script without --cpu)."""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_cpu_mode_reports_every_step():
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout
    for step in ("1 machine", "2 gpu tests", "3 peak", "4 tower", "5 train", "6 qlora"):
        assert f"[{step}]" in lines, step
    assert float(re.search(r"\[3 peak\] .*: ([0-9.]+) TFLOP/s", lines).group(1)) > 0
    assert float(re.search(r"\[4 tower\] .*: ([0-9.]+) images/s", lines).group(1)) > 0
    train = re.search(r"\[5 train\] sdpa: ([0-9.]+) samples/s, ([0-9]+) tokens/s, MFU ([0-9.]+)%", lines)
    assert train and float(train.group(1)) > 0 and float(train.group(3)) > 0
