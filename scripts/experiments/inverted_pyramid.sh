#!/usr/bin/env bash
# The paper's claim in miniature, on the synthetic data and one training budget for all runs:
#   (a) a single large branch at low resolution (64 px)         mini-clip-l_64
#   (b) the same branch at high resolution (128 px)              mini-clip-l_128
#   (c) PIIP: the large branch at 64 px + a small branch at 128 px with interactions   mini-piip2_clip-ls_64-128
# Each run goes through the real stage scripts and eval CLIs (scripts/train_eval_synthetic.sh); the encoder FLOPs
# come from piip_llava.models.flops. Writes results.md, results.json and accuracy_vs_flops.png to OUT_DIR.
# Under 60 minutes on 2 CPU cores.
#
#   OUT_DIR (outputs/inverted_pyramid), NUM_TRAIN (4000), NUM_EVAL (200), STAGE0_STEPS, STAGE1_STEPS, STAGE2_STEPS,
#   BATCH,
#   RUNS ("a b c"), QUICK=1 (a few steps: smoke run)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
OUT_DIR="${OUT_DIR:-outputs/inverted_pyramid}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
START=$SECONDS
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHON HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu
if [ "${QUICK:-0}" = 1 ]; then
  : "${NUM_TRAIN:=200}" "${NUM_EVAL:=20}" "${STAGE0_STEPS:=4}" "${STAGE1_STEPS:=3}" "${STAGE2_STEPS:=5}" "${BATCH:=4}"
fi
export STAGE0_STEPS="${STAGE0_STEPS:-1000}" STAGE1_STEPS="${STAGE1_STEPS:-100}" STAGE2_STEPS="${STAGE2_STEPS:-2400}"
export BATCH="${BATCH:-16}"
export DATA="$OUT_DIR/data" TOKENIZER_PATH="$OUT_DIR/tokenizer"

if [ ! -f "$DATA/stage2.json" ]; then
  "$PYTHON" -m piip_llava.data.synthetic --out "$DATA" --num-train "${NUM_TRAIN:-4000}" --num-eval "${NUM_EVAL:-200}"
fi
if [ ! -f "$TOKENIZER_PATH/tokenizer.model" ]; then
  "$PYTHON" -m piip_llava.data.tokenizer --out "$TOKENIZER_PATH" --vocab-size 2048 \
    --from-llava "$DATA/stage1.json" "$DATA/stage2.json"
fi

declare -A PRESETS=([a]=mini-clip-l_64 [b]=mini-clip-l_128 [c]=mini-piip2_clip-ls_64-128)
declare -A LABELS=([a]="(a) large@64" [b]="(b) large@128" [c]="(c) PIIP large@64+small@128")
REPORT_ARGS=()
for run in ${RUNS:-a b c}; do
  echo "=== run $run: ${PRESETS[$run]} ($(( (SECONDS - START) / 60 )) min so far)"
  if [ ! -f "$OUT_DIR/$run/eval/textvqa_summary.json" ]; then
    PRESET="${PRESETS[$run]}" RUN_DIR="$OUT_DIR/$run" bash "$REPO/scripts/train_eval_synthetic.sh"
  fi
  REPORT_ARGS+=(--run "${LABELS[$run]}=${PRESETS[$run]}=$OUT_DIR/$run")
done
"$PYTHON" -m piip_llava.evaluation.inverted_pyramid "${REPORT_ARGS[@]}" \
  --annotation-file "$DATA/eval/textvqa/TextVQA_0.5.1_val.json" --out "$OUT_DIR"
echo "done in $(( (SECONDS - START) / 60 )) min"
