#!/usr/bin/env bash
# The paper's claim in miniature, on the synthetic data and one training budget for all runs:
#   (a) a single large branch at low resolution (64 px)                              mini-clip-l_64
#   (b) the same branch at high resolution (128 px)                                   mini-clip-l_128
#   (c) PIIP: the large branch at 64 px + a small branch at 128 px with interactions  mini-piip2_clip-ls_64-128
#   (d) PIIP at (a)'s encoder FLOPs: the large branch at 48 px + a cheaper small branch (d=32) at 128 px
#                                                                                       mini-piip2_clip-ls_48-128
# Each run trains once per seed (SEEDS; the seed sets initialisation and data order, the data and the evaluation
# questions are the same for all) through the real stage scripts and eval CLIs (scripts/train_eval_synthetic.sh);
# the encoder FLOPs come from piip_llava.models.flops. Writes results.md (mean ± standard deviation over the seeds),
# results.json and accuracy_vs_flops.png (error bars) to OUT_DIR. 58 minutes on 2 CPU cores with the defaults (README).
# JOBS runs train side by side (default: one per core).
# Finished runs (their eval summary exists) are reused, so an interrupted experiment continues where it stopped.
#
#   OUT_DIR (outputs/inverted_pyramid), NUM_TRAIN (4000), NUM_EVAL (200), STAGE0_STEPS, STAGE1_STEPS, STAGE2_STEPS,
#   BATCH, RUNS ("a b c d"), SEEDS ("0 1 2"), JOBS (nproc), QUICK=1 (a few steps: smoke run)
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
export STAGE0_STEPS="${STAGE0_STEPS:-1000}" STAGE1_STEPS="${STAGE1_STEPS:-50}" STAGE2_STEPS="${STAGE2_STEPS:-1200}"
export BATCH="${BATCH:-16}"
export DATA="$OUT_DIR/data" TOKENIZER_PATH="$OUT_DIR/tokenizer"

# The stage-2 mix of this comparison: 45 % fixed-order reading records and 35 % colour-named questions, with which
# reading forms within its 1,200 steps; with the quickstart's mix (30 % / 60 %, for colour routing over 4,000 steps)
# (d) stayed at (a)'s level and (b)/(c) spread 10-30 points between seeds (docs/inverted_pyramid/with_quickstart_mix.md).
# 5 % multiple choice answered by letter and no caption records: the data of the published table (its TextVQA is
# what it compares).
if [ ! -f "$DATA/stage2.json" ]; then
  "$PYTHON" -m piip_llava.data.synthetic --out "$DATA" --num-train "${NUM_TRAIN:-4000}" --num-eval "${NUM_EVAL:-200}" \
    --read-all-fraction 0.45 --color-reference-fraction 0.35 --multiple-choice-fraction 0.05 \
    --multiple-choice-answer letter --caption-fraction 0
fi
if [ ! -f "$TOKENIZER_PATH/tokenizer.model" ]; then
  "$PYTHON" -m piip_llava.data.tokenizer --out "$TOKENIZER_PATH" --vocab-size 2048 \
    --from-llava "$DATA/stage1.json" "$DATA/stage2.json"
fi

declare -A PRESETS=([a]=mini-clip-l_64 [b]=mini-clip-l_128 [c]=mini-piip2_clip-ls_64-128 [d]=mini-piip2_clip-ls_48-128)
declare -A LABELS=([a]="(a) large@64" [b]="(b) large@128" [c]="(c) PIIP large@64+small@128"
                   [d]="(d) PIIP large@48+small(d=32)@128")
SEEDS="${SEEDS:-0 1 2}"
# Each training run is one process of one thread (train_eval_synthetic.sh), so JOBS runs go side by side, one per
# core; a run's output goes to RUN_DIR/log.txt.
JOBS="${JOBS:-$(getconf _NPROCESSORS_ONLN)}"
REPORT_ARGS=()
FAILED=0
for run in ${RUNS:-a b c d}; do
  dirs=()
  for seed in $SEEDS; do
    dir="$OUT_DIR/$run/seed$seed"
    dirs+=("$dir")
    if [ -f "$dir/eval/textvqa_summary.json" ]; then
      echo "=== run $run seed $seed: done before, reusing $dir"
      continue
    fi
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || FAILED=1; done
    echo "=== run $run seed $seed: ${PRESETS[$run]} started ($(( (SECONDS - START) / 60 )) min so far; log: $dir/log.txt)"
    mkdir -p "$dir"
    ( SEED="$seed" PRESET="${PRESETS[$run]}" RUN_DIR="$dir" bash "$REPO/scripts/train_eval_synthetic.sh" \
        >"$dir/log.txt" 2>&1 \
      && echo "=== run $run seed $seed: done ($(( (SECONDS - START) / 60 )) min so far)" \
      || { echo "=== run $run seed $seed: FAILED, see $dir/log.txt"; exit 1; } ) &
  done
  REPORT_ARGS+=(--run "${LABELS[$run]}=${PRESETS[$run]}=$(IFS=,; echo "${dirs[*]}")")
done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || FAILED=1; done
if [ "$FAILED" != 0 ]; then echo "error: a run failed (its log.txt says why); finished runs are kept" >&2; exit 1; fi
"$PYTHON" -m piip_llava.evaluation.inverted_pyramid "${REPORT_ARGS[@]}" \
  --annotation-file "$DATA/eval/textvqa/TextVQA_0.5.1_val.json" --out "$OUT_DIR"
echo "done in $(( (SECONDS - START) / 60 )) min"
