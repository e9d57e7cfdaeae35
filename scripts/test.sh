#!/usr/bin/env bash
# The test suite (CPU, tiny models, no download). Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False \
       DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/piip_llava/torch_extensions}
rc=0
"$PY" -m pytest -q -p no:cacheprovider "$@" || rc=$?
if [ "$rc" = 5 ]; then echo "no tests collected"; exit 1; fi
exit "$rc"
