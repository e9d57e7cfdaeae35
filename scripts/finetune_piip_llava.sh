#!/usr/bin/env bash
# Stage 2 of PIIP-LLaVA: visual instruction tuning on LLaVA-1.5 mix-665K (spec 3.1), starting from the stage-1
# projector (PRETRAINED_PROJECTOR = the stage-1 OUTPUT_DIR). Writes a full `save_pretrained` checkpoint + tokenizer
# in ${OUTPUT_DIR} (ZeRO-3 weights gathered), or with TUNE=lora an adapter folder (+ its base in ${OUTPUT_DIR}/base;
# MERGE=1 also writes the merged checkpoint to ${OUTPUT_DIR}/merged).
#
# Defaults are the official hyper-parameters: lr 2e-5 for every module, global batch 128 (4/GPU x 4 accumulation x
# 8), 1 epoch, cosine, warm-up 0.03, weight decay 0, max length 2048, DeepSpeed ZeRO-3, `vicuna_v1` template, `pad`
# images, group_by_modality_length, everything trainable, bf16 + TF32.
# Everything is an environment variable; extra `python -m piip_llava.train` flags go in EXTRA_ARGS or after "--".
#
#   model      PRESET (default piip-llava_clip-bl_512-448_7B) | CONFIG (json) | MODEL_PATH (our checkpoint)
#              LLM_PATH (HF LLM; unset: random init), TOKENIZER_PATH (default LLM_PATH / MODEL_PATH)
#              PRETRAINED_PROJECTOR (stage-1 output folder or mm_projector.safetensors)
#   data       DATA_PATH, IMAGE_FOLDER, TEMPLATE (vicuna_v1), ASPECT (pad), MAX_LEN (2048), WORKERS (4 GPU, 0 CPU)
#              GROUP_BY_MODALITY (true)
#   schedule   LR (2e-5), EPOCHS (1), MAX_STEPS (-1: epochs decide), WARMUP (0.03: a ratio of the steps; >= 1: steps), WEIGHT_DECAY (0), SEED (42)
#              VISION_LR, INTERACTION_LR, PROJECTOR_LR (default: LR)
#   batch      PER_DEVICE_BATCH (4), GLOBAL_BATCH (128), GRAD_ACC (default GLOBAL_BATCH / (PER_DEVICE_BATCH x world);
#              on a machine without GPU default 1 unless GLOBAL_BATCH is set)
#   output     OUTPUT_DIR, SAVE_STEPS (50000), SAVE_TOTAL_LIMIT (1), LOGGING_STEPS (1), REPORT_TO (none)
#              RESUME (auto: the newest complete OUTPUT_DIR/checkpoint-N; a checkpoint folder; none: step 0)
#   trainable  TUNE (full | lora | projector+llm | llm | projector | projector+interactions), LORA_R (128), LORA_ALPHA (256), QLORA (false),
#              MERGE (0; 1 = merge the LoRA adapter after training)
#   launch     ZERO (3 | 2 | 3_offload | none), PRECISION (bf16 | fp16 | fp32; GPU only), GRAD_CKPT (true)
#              ENGINE (deepspeed | fsdp: PyTorch FSDP2, ZERO ignored), FSDP_RESHARD (true: like ZeRO-3 | false: like
#              ZeRO-2), FSDP_STATE_DICT (sharded: each rank writes its model/optimizer shards | full: gathered on rank 0)
#              GPU, one node:  NUM_GPUS (all visible)
#              GPU, many nodes with a hostfile (DeepSpeed launcher over ssh/pdsh, run on the first node):
#                HOSTFILE (lines "host slots=8"), MASTER_ADDR (first host), MASTER_PORT
#              GPU, many nodes without a hostfile (torchrun, run this script on every node):
#                NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NUM_GPUS (per node)
#              no GPU: the same entry point under torchrun with NPROC processes (2), DeepSpeed on the CPU, fp32
#   PYTHON (python), TORCH_EXTENSIONS_DIR (~/.cache/torch_extensions: DeepSpeed's CPU ops build once there)
#
# Example (CPU, tiny):  PRESET=tiny-piip2_clip_64-128 TOKENIZER_PATH=tok DATA_PATH=s2.json IMAGE_FOLDER=img \
#                       PRETRAINED_PROJECTOR=out/s1 OUTPUT_DIR=out/s2 PER_DEVICE_BATCH=4 MAX_STEPS=20 \
#                       bash scripts/finetune_piip_llava.sh
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$SCRIPT_DIR")"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"

: "${DATA_PATH:?set DATA_PATH to the LLaVA-format JSON (e.g. llava_v1_5_mix665k.json)}"
: "${OUTPUT_DIR:?set OUTPUT_DIR}"
STAGE=2
TUNE="${TUNE:-full}"
LR="${LR:-2e-5}"
PER_DEVICE_BATCH="${PER_DEVICE_BATCH:-4}"
DEFAULT_GLOBAL_BATCH=128
ZERO="${ZERO:-3}"
TEMPLATE="${TEMPLATE:-vicuna_v1}"
ASPECT="${ASPECT:-pad}"
SAVE_STEPS="${SAVE_STEPS:-50000}"
EXTRA_STAGE_ARGS=(--group_by_modality_length "${GROUP_BY_MODALITY:-true}")
[ -n "${PRETRAINED_PROJECTOR:-}" ] && EXTRA_STAGE_ARGS+=(--pretrained_projector "$PRETRAINED_PROJECTOR")
[ -n "${VISION_LR:-}" ] && EXTRA_STAGE_ARGS+=(--vision_lr "$VISION_LR")
[ -n "${INTERACTION_LR:-}" ] && EXTRA_STAGE_ARGS+=(--interaction_lr "$INTERACTION_LR")
[ -n "${PROJECTOR_LR:-}" ] && EXTRA_STAGE_ARGS+=(--projector_lr "$PROJECTOR_LR")
if [ "$TUNE" = lora ]; then
  EXTRA_STAGE_ARGS+=(--lora_r "${LORA_R:-128}" --lora_alpha "${LORA_ALPHA:-256}" --qlora "${QLORA:-false}")
fi

# shared launcher: world size, flags, launch
source "$SCRIPT_DIR/launch_train.sh" "$@"
if [ "$TUNE" = lora ] && [ "${MERGE:-0}" = 1 ]; then
  "$PYTHON" -m piip_llava.train.merge_lora --adapter "$OUTPUT_DIR" --out "$OUTPUT_DIR/merged"
  echo "merged checkpoint: $(cd "$OUTPUT_DIR/merged" && pwd)"
fi
