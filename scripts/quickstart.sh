#!/usr/bin/env bash
# The main job on the embedded default: no GPU, no download. Sets up .venv if needed (with progress), generates the
# synthetic dataset, trains a small PIIP-LLaVA (mini-piip2_clip-ls_64-128): stage 0 pretrains the random branches on
# the images' labels (standing in for pretrained backbones), then scripts/pretrain_piip_llava.sh and
# scripts/finetune_piip_llava.sh, evaluates it with eval/textvqa.py and eval/mmbench.py, prints the results and what
# they are made of (synthetic_breakdown), asks the Gradio demo about new images, and prints the command that opens the
# demo. About 14 minutes on 2 quiet CPU cores, 19.5 measured with another busy process beside it (README,
# benchmarks/busy_machine.py).
#
#   OUT_DIR (outputs/quickstart), PRESET, NUM_TRAIN (4000), NUM_EVAL (200), STAGE0_STEPS, STAGE1_STEPS, STAGE2_STEPS,
#   BATCH, NPROC (2 on a machine with 2+ cores: stages 1-2 in one single-thread DDP process per core),
#   LM_STEPS (0; > 0 adds language pretraining, scripts/train_eval_synthetic.sh),
#   SYNTH_ARGS (extra options of python -m piip_llava.data.synthetic), QUICK=1 (a few steps only: the CI smoke run)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT_DIR="${OUT_DIR:-outputs/quickstart}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
START=$SECONDS

if [ -z "${PYTHON:-}" ]; then
  if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import piip_llava, deepspeed, gradio" 2>/dev/null; then
    echo "== 0/5 setting up .venv"
    bash "$REPO/scripts/setup_venv.sh" train,serve,dev
  fi
  PYTHON="$REPO/.venv/bin/python"
fi
export PYTHON HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False \
       TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu

if [ "${QUICK:-0}" = 1 ]; then
  : "${NUM_TRAIN:=200}" "${NUM_EVAL:=20}" "${STAGE0_STEPS:=4}" "${STAGE1_STEPS:=3}" "${STAGE2_STEPS:=5}" "${BATCH:=4}"
fi
export PRESET="${PRESET:-mini-piip2_clip-ls_64-128}"
export STAGE0_STEPS="${STAGE0_STEPS:-1000}" STAGE1_STEPS="${STAGE1_STEPS:-100}" STAGE2_STEPS="${STAGE2_STEPS:-4000}"
export BATCH="${BATCH:-16}" NPROC="${NPROC:-$(( $(getconf _NPROCESSORS_ONLN) >= 2 ? 2 : 1 ))}"
export DATA="$OUT_DIR/data" TOKENIZER_PATH="$OUT_DIR/tokenizer" RUN_DIR="$OUT_DIR/run"

echo "== 1/5 synthetic dataset -> $DATA"
CORPUS=("$DATA/stage1.json" "$DATA/stage2.json")
if [ "${LM_STEPS:-0}" -gt 0 ]; then  # language pretraining (off by default: docs/quickstart.md) needs its records
  SYNTH_ARGS="${SYNTH_ARGS:-} --lm-pretrain-records ${NUM_TRAIN:-4000}"
  CORPUS+=("$DATA/lm_pretrain.json")
fi
# --stage0-regions: stage 0 also classifies the colour and object under each visual token, a colour code shared by
# all token positions that "what word is written in red?" can route by (docs/quickstart.md)
"$PYTHON" -m piip_llava.data.synthetic --out "$DATA" --num-train "${NUM_TRAIN:-4000}" --num-eval "${NUM_EVAL:-200}" \
  --stage0-regions ${SYNTH_ARGS:-}
echo "== 2/5 tokenizer trained on the dataset's text -> $TOKENIZER_PATH"
"$PYTHON" -m piip_llava.data.tokenizer --out "$TOKENIZER_PATH" --vocab-size 2048 --from-llava "${CORPUS[@]}"
echo "== 3/5 + 4/5 training and evaluation"
bash "$REPO/scripts/train_eval_synthetic.sh"

echo "== 5/5 results"
"$PYTHON" -m piip_llava.evaluation.summary "$RUN_DIR/eval" --title "quickstart: $PRESET on synthetic data"
"$PYTHON" -m piip_llava.evaluation.synthetic_breakdown "$RUN_DIR/eval" \
  --annotation-file "$DATA/eval/textvqa/TextVQA_0.5.1_val.json"
"$PYTHON" -m piip_llava.serve.demo_check --model "$RUN_DIR/stage2" --num 5 || echo "(the demo check got no answer right)"
echo
echo "done in $(( (SECONDS - START) / 60 )) min $(( (SECONDS - START) % 60 )) s. Chat with the trained model:"
echo "  $PYTHON -m piip_llava.serve.gradio_demo --model $RUN_DIR/stage2     # then open http://127.0.0.1:7860"
