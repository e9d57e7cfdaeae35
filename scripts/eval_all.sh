#!/usr/bin/env bash
# Run every registered benchmark whose data is present (one model load), then print the results tables and paper row.
#   scripts/eval_all.sh CHECKPOINT [DATA_DIR=playground/data/eval] [OUT_DIR=eval_out/<checkpoint name>]
# Extra flags for every benchmark go in EVAL_ARGS (e.g. EVAL_ARGS="--batch-size 16 --conv-mode vicuna_v1", or
# EVAL_ARGS="--backend openai --base-url http://127.0.0.1:8000/v1"); PYTHON selects the interpreter. The benchmarks
# and their files under DATA_DIR (LLaVA's playground/data/eval layout) come from the task registry
# (python -m piip_llava.evaluation.eval_all).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 CHECKPOINT [DATA_DIR] [OUT_DIR]" >&2
  exit 2
fi
CKPT=$1
DATA=${2:-playground/data/eval}
OUT=${3:-eval_out/$(basename "$CKPT")}
read -r -a EXTRA <<< "${EVAL_ARGS:-}"
exec "${PYTHON:-python}" -m piip_llava.evaluation.eval_all --model-path "$CKPT" --data-dir "$DATA" --output-dir "$OUT" \
  "${EXTRA[@]}"
