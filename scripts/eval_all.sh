#!/usr/bin/env bash
# Run every LLaVA-1.5 / PIIP benchmark whose data is present, then print the paper row.
#   scripts/eval_all.sh CHECKPOINT [DATA_DIR=playground/data/eval] [OUT_DIR=eval_out/<checkpoint name>]
# Extra flags for every benchmark CLI go in EVAL_ARGS (e.g. EVAL_ARGS="--batch-size 16 --conv-mode vicuna_v1");
# PYTHON selects the interpreter. Layout under DATA_DIR follows LLaVA's playground/data/eval.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 CHECKPOINT [DATA_DIR] [OUT_DIR]" >&2
  exit 2
fi
CKPT=$1
DATA=${2:-playground/data/eval}
OUT=${3:-eval_out/$(basename "$CKPT")}
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")/.." && pwd)
read -r -a EXTRA <<< "${EVAL_ARGS:-}"
mkdir -p "$OUT"

have() {  # have NAME PATH... : true when every path exists, otherwise print why NAME is skipped
  local name=$1; shift
  for p in "$@"; do
    if [[ ! -e $p ]]; then
      echo "skip $name: $p not found"
      return 1
    fi
  done
}

run() { echo "== $1"; shift; "$PY" "$@" --model-path "$CKPT" "${EXTRA[@]}"; }

if have textvqa "$DATA/textvqa/llava_textvqa_val_v051_ocr.jsonl" "$DATA/textvqa/train_images" "$DATA/textvqa/TextVQA_0.5.1_val.json"; then
  run textvqa "$HERE/eval/textvqa.py" --question-file "$DATA/textvqa/llava_textvqa_val_v051_ocr.jsonl" \
    --image-folder "$DATA/textvqa/train_images" --annotation-file "$DATA/textvqa/TextVQA_0.5.1_val.json" \
    --answers-file "$OUT/textvqa.jsonl"
fi
if have mmbench "$DATA/mmbench/mmbench_dev_20230712.tsv"; then
  run mmbench "$HERE/eval/mmbench.py" --question-file "$DATA/mmbench/mmbench_dev_20230712.tsv" \
    --answers-file "$OUT/mmbench.jsonl" --score --submission "$OUT/mmbench_upload"
fi
if have pope "$DATA/pope/llava_pope_test.jsonl" "$DATA/pope/val2014" "$DATA/pope/coco"; then
  run pope "$HERE/eval/pope.py" --question-file "$DATA/pope/llava_pope_test.jsonl" --image-folder "$DATA/pope/val2014" \
    --annotation-dir "$DATA/pope/coco" --answers-file "$OUT/pope.jsonl"
fi
if have gqa "$DATA/gqa/llava_gqa_testdev_balanced.jsonl" "$DATA/gqa/data/images"; then
  GQA_Q=()
  [[ -e $DATA/gqa/data/testdev_balanced_questions.json ]] && GQA_Q=(--gqa-questions "$DATA/gqa/data/testdev_balanced_questions.json")
  run gqa "$HERE/eval/gqa.py" --question-file "$DATA/gqa/llava_gqa_testdev_balanced.jsonl" \
    --image-folder "$DATA/gqa/data/images" --answers-file "$OUT/gqa.jsonl" "${GQA_Q[@]}"
fi
if have scienceqa "$DATA/scienceqa/llava_test_CQM-A.json" "$DATA/scienceqa/images/test" "$DATA/scienceqa/problems.json" "$DATA/scienceqa/pid_splits.json"; then
  run scienceqa "$HERE/eval/scienceqa.py" --question-file "$DATA/scienceqa/llava_test_CQM-A.json" \
    --image-folder "$DATA/scienceqa/images/test" --base-dir "$DATA/scienceqa" --answers-file "$OUT/scienceqa.jsonl"
fi
if have seed "$DATA/seed_bench/llava-seed-bench.jsonl" "$DATA/seed_bench/SEED-Bench.json"; then
  run seed "$HERE/eval/seed.py" --question-file "$DATA/seed_bench/llava-seed-bench.jsonl" \
    --image-folder "$DATA/seed_bench" --seed-json "$DATA/seed_bench/SEED-Bench.json" \
    --answers-file "$OUT/seed.jsonl" --upload "$OUT/seed_upload.jsonl"
fi
if have vqav2 "$DATA/vqav2/llava_vqav2_mscoco_test-dev2015.jsonl" "$DATA/vqav2/test2015" "$DATA/vqav2/llava_vqav2_mscoco_test2015.jsonl"; then
  run vqav2 "$HERE/eval/vqav2.py" --question-file "$DATA/vqav2/llava_vqav2_mscoco_test-dev2015.jsonl" \
    --image-folder "$DATA/vqav2/test2015" --test-split "$DATA/vqav2/llava_vqav2_mscoco_test2015.jsonl" \
    --answers-file "$OUT/vqav2.jsonl"
fi
if have mmvet "$DATA/mm-vet/llava-mm-vet.jsonl" "$DATA/mm-vet/images"; then
  run mmvet "$HERE/eval/mmvet.py" --question-file "$DATA/mm-vet/llava-mm-vet.jsonl" \
    --image-folder "$DATA/mm-vet/images" --answers-file "$OUT/mmvet.jsonl"
fi

echo "== report"
"$PY" "$HERE/eval/report.py" --summary-dir "$OUT" --name "$(basename "$CKPT")" --compare "LLaVA-1.5 7B (CLIP-L 336)"
