#!/usr/bin/env bash
# What a new GPU machine needs to know (GPU tests, matmul peak, tower throughput, training throughput/MFU with SDPA and
# flash-attention, peak memory, QLoRA loading): bash scripts/gpu_check.sh [--cpu] [benchmarks/gpu_check.py args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
exec timeout "${GPU_CHECK_TIMEOUT:-600}" "$PY" benchmarks/gpu_check.py "$@"
