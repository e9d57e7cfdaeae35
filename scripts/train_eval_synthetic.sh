#!/usr/bin/env bash
# Train one preset on the synthetic dataset through the real stage scripts, then evaluate it with the real eval CLIs.
# Used by scripts/quickstart.sh and scripts/experiments/inverted_pyramid.sh.
#
#   DATA (synthetic dataset folder), TOKENIZER_PATH, PRESET, RUN_DIR (outputs: stage0/, stage1/, stage2/, eval/)
#   STAGE1_STEPS, STAGE2_STEPS, STAGE1_LR, STAGE2_LR, STAGE2_SCHEDULER (constant_with_warmup), BATCH (per step),
#   NPROC (1: one process; >1: stages 1 and 2 in NPROC processes, plain DDP unless ZERO=2|3), EVAL_BATCH, PYTHON,
#   RELIANCE_RECORDS (128: records for the image-reliance check, python -m piip_llava.evaluation.image_reliance)
#   OMP_NUM_THREADS (1): torch threads per process. These models are too small for a second thread to pay when the
#     machine is busy: two threads on two cores stall at every parallel region while any other process holds a
#     core, and one process per core (NPROC) is as fast on a quiet machine (benchmarks/busy_machine.py).
#   STAGE0_STEPS (1500; 0 skips it), STAGE0_LR (3e-4): stage 0 pretrains branches + interactions + projector on the
#     dataset's labels (python -m piip_llava.train.vision_pretrain); real branches come pretrained, random ones give
#     visual tokens an LLM learns to ignore, so this stands in for backbone pretraining. Stage 1 continues from it.
#   LM_STEPS (0: skipped), LM_LR (1e-3): language pretraining between stages 0 and 1, the LLM alone (TUNE=llm) on
#     DATA/lm_pretrain.json (text-only lookups in a described scene, written with --lm-pretrain-records): it stands in
#     for the text pretraining a real LLM brings. Off: 1,000 steps did not form the lookups and cost the reading.
#   STAGE1_TUNE (projector): what stage 1 trains: the official policy (projector only, on the captions); stage 2 then
#     starts from the stage-0 checkpoint + this projector. STAGE1_TUNE=full trains the whole model in stage 1 and
#     stage 2 continues from it.
#   STAGE1_LR (1e-4, the official 1e-3 / 10): the LLM here is random, so there is no embedding space to align the
#     projector to; a gentle stage 1 keeps what stage 0 taught the projector. It stays because the real recipe has it.
#   STAGE2_TUNE (projector+llm): what stage 2 trains. The stage-0 tower stays frozen (LLaVA-1.5's stage-2 policy), so
#     the fresh LLM learns to read features that do not move under it.
#   SEED (0): the training seed of all stages (initialisation, data order); the data are the same for every seed.
# The measurements behind these defaults are in docs/quickstart.md.
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$SCRIPT_DIR")"
: "${DATA:?}" "${TOKENIZER_PATH:?}" "${PRESET:?}" "${RUN_DIR:?}"
PYTHON="${PYTHON:-python}"
NPROC="${NPROC:-1}"
BATCH="${BATCH:-16}"
SEED="${SEED:-0}"
ZERO="${ZERO:-none}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PER_DEVICE=$(( BATCH / NPROC ))
export PYTHON NPROC ZERO TOKENIZER_PATH PRESET
export GRAD_CKPT=false MAX_LEN="${MAX_LEN:-512}" LOGGING_STEPS="${LOGGING_STEPS:-25}" SAVE_STEPS=100000 RESUME=auto

STAGE0_STEPS="${STAGE0_STEPS:-1500}"
STAGE1_FROM=()
if [ "$STAGE0_STEPS" -gt 0 ]; then
  if [ -f "$RUN_DIR/stage0/vision_pretrain_metrics.json" ]; then
    echo "== [$PRESET] stage 0: $RUN_DIR/stage0 exists, reusing it"
  else
    echo "== [$PRESET] stage 0: vision pretraining on the image labels ($STAGE0_STEPS steps)"
    "$PYTHON" -m piip_llava.train.vision_pretrain --data-path "$DATA/stage0.json" --image-folder "$DATA" \
      --preset "$PRESET" --tokenizer-path "$TOKENIZER_PATH" --output-dir "$RUN_DIR/stage0" \
      --max-steps "$STAGE0_STEPS" --batch-size "$BATCH" --learning-rate "${STAGE0_LR:-3e-4}" \
      --eval-steps "$(( STAGE0_STEPS > 4 ? STAGE0_STEPS / 4 : 1 ))" --seed "$SEED"
  fi
  STAGE1_FROM=(MODEL_PATH="$RUN_DIR/stage0")
fi

# The synthetic pipeline's figures (README) were measured with clipping at 1.0 and transformers 5's token-level loss
# mean; the official recipe (the stage scripts' defaults) clips nothing and averages per micro-batch.
SYNTH_TRAIN_ARGS=(--max_grad_norm "${MAX_GRAD_NORM:-1.0}" --loss_normalization "${LOSS_NORMALIZATION:-tokens}" --seed "$SEED")

LM_STEPS="${LM_STEPS:-0}"
if [ "$LM_STEPS" -gt 0 ]; then
  if [ ! -f "$DATA/lm_pretrain.json" ]; then
    echo "error: LM_STEPS=$LM_STEPS needs $DATA/lm_pretrain.json (python -m piip_llava.data.synthetic --lm-pretrain-records N)" >&2
    exit 1
  fi
  echo "== [$PRESET] language pretraining: the LLM alone on text-only lookups ($LM_STEPS steps)"
  env "${STAGE1_FROM[@]}" TUNE=llm DATA_PATH="$DATA/lm_pretrain.json" IMAGE_FOLDER="$DATA" OUTPUT_DIR="$RUN_DIR/lm" \
    MAX_STEPS="$LM_STEPS" LR="${LM_LR:-1e-3}" SCHEDULER="${LM_SCHEDULER:-constant_with_warmup}" \
    PER_DEVICE_BATCH="$PER_DEVICE" WARMUP="${LM_WARMUP:-0.03}" \
    bash "$SCRIPT_DIR/finetune_piip_llava.sh" "${SYNTH_TRAIN_ARGS[@]}"
  STAGE1_FROM=(MODEL_PATH="$RUN_DIR/lm")
fi

STAGE1_TUNE="${STAGE1_TUNE:-projector}"
echo "== [$PRESET] stage 1: alignment on captions, trainable: $STAGE1_TUNE (${STAGE1_STEPS:-100} steps)"
env "${STAGE1_FROM[@]}" TUNE="$STAGE1_TUNE" DATA_PATH="$DATA/stage1.json" IMAGE_FOLDER="$DATA" OUTPUT_DIR="$RUN_DIR/stage1" \
  MAX_STEPS="${STAGE1_STEPS:-100}" LR="${STAGE1_LR:-1e-4}" PER_DEVICE_BATCH="$PER_DEVICE" WARMUP="${STAGE1_WARMUP:-0.03}" \
  bash "$SCRIPT_DIR/pretrain_piip_llava.sh" "${SYNTH_TRAIN_ARGS[@]}"

STAGE2_TUNE="${STAGE2_TUNE:-projector+llm}"
echo "== [$PRESET] stage 2: instruction tuning, trainable: $STAGE2_TUNE (${STAGE2_STEPS:-1000} steps)"
case "$STAGE1_TUNE" in  # projector policies save only the projector; the others a full checkpoint
  projector|projector+interactions) STAGE2_FROM=("${STAGE1_FROM[@]}" PRETRAINED_PROJECTOR="$RUN_DIR/stage1") ;;
  *) STAGE2_FROM=(MODEL_PATH="$RUN_DIR/stage1") ;;
esac
env "${STAGE2_FROM[@]}" TUNE="$STAGE2_TUNE" DATA_PATH="$DATA/stage2.json" IMAGE_FOLDER="$DATA" OUTPUT_DIR="$RUN_DIR/stage2" \
  MAX_STEPS="${STAGE2_STEPS:-1000}" LR="${STAGE2_LR:-1e-3}" SCHEDULER="${STAGE2_SCHEDULER:-constant_with_warmup}" \
  PER_DEVICE_BATCH="$PER_DEVICE" WARMUP="${STAGE2_WARMUP:-0.03}" \
  bash "$SCRIPT_DIR/finetune_piip_llava.sh" "${SYNTH_TRAIN_ARGS[@]}"

echo "== [$PRESET] evaluation: synthetic TextVQA and MMBench"
# --overwrite: this run's stage 2 may be a new model in the same folder; its answers must not be resumed from the last
mkdir -p "$RUN_DIR/eval"
"$PYTHON" "$REPO/eval/textvqa.py" --model-path "$RUN_DIR/stage2" \
  --question-file "$DATA/eval/textvqa/llava_textvqa_val_v051_ocr.jsonl" \
  --image-folder "$DATA/eval/textvqa/train_images" --annotation-file "$DATA/eval/textvqa/TextVQA_0.5.1_val.json" \
  --answers-file "$RUN_DIR/eval/textvqa_answers.jsonl" --batch-size "${EVAL_BATCH:-16}" --max-new-tokens 8 --overwrite
"$PYTHON" "$REPO/eval/mmbench.py" --model-path "$RUN_DIR/stage2" \
  --question-file "$DATA/eval/mmbench/mmbench_dev_synthetic.tsv" \
  --answers-file "$RUN_DIR/eval/mmbench_answers.jsonl" --batch-size "${EVAL_BATCH:-16}" --max-new-tokens 8 \
  --submission "$RUN_DIR/eval" --overwrite
"$PYTHON" -m piip_llava.evaluation.synthetic_breakdown "$RUN_DIR/eval" \
  --annotation-file "$DATA/eval/textvqa/TextVQA_0.5.1_val.json"
echo "== [$PRESET] image reliance: answer loss with the right images vs another record's (stage-2 records)"
"$PYTHON" -m piip_llava.evaluation.image_reliance --model-path "$RUN_DIR/stage2" --data-path "$DATA/stage2.json" \
  --image-folder "$DATA" --num-records "${RELIANCE_RECORDS:-128}" --batch-size "${EVAL_BATCH:-16}" \
  --output "$RUN_DIR/eval/image_reliance.json"
