#!/usr/bin/env bash
# Stage 1 of PIIP-LLaVA: align the projector on LCS-558K (spec 3.1). Only the projector trains; the result is
# ${OUTPUT_DIR}/mm_projector.safetensors (+ config.json, tokenizer) for scripts/finetune_piip_llava.sh.
#
# Defaults are the official hyper-parameters: lr 1e-3, global batch 256 (32/GPU x 8), 1 epoch, cosine, warm-up 0.03,
# weight decay 0, max length 2048, DeepSpeed ZeRO-2, `plain` template, `square` images, bf16 + TF32.
# Everything is an environment variable; extra `python -m piip_llava.train` flags go in EXTRA_ARGS or after "--".
#
#   model      PRESET (default piip-llava_clip-bl_512-448_7B) | CONFIG (json) | MODEL_PATH (our checkpoint)
#              LLM_PATH (HF LLM; unset: random init), TOKENIZER_PATH (default LLM_PATH / MODEL_PATH)
#   data       DATA_PATH, IMAGE_FOLDER, TEMPLATE (plain), ASPECT (square), MAX_LEN (2048), WORKERS (4 on GPU, 0 on CPU)
#   schedule   LR (1e-3), EPOCHS (1), MAX_STEPS (-1: epochs decide), WARMUP (0.03: a ratio of the steps; >= 1: steps), WEIGHT_DECAY (0), SEED (42)
#   batch      PER_DEVICE_BATCH (32), GLOBAL_BATCH (256), GRAD_ACC (default GLOBAL_BATCH / (PER_DEVICE_BATCH x world);
#              on a machine without GPU default 1 unless GLOBAL_BATCH is set)
#   output     OUTPUT_DIR, SAVE_STEPS (24000), SAVE_TOTAL_LIMIT (1), LOGGING_STEPS (1), REPORT_TO (none)
#              RESUME (auto: the newest complete OUTPUT_DIR/checkpoint-N; a checkpoint folder; none: step 0)
#   trainable  TUNE (projector | projector+interactions)
#   launch     ZERO (2 | 3 | 3_offload | none), PRECISION (bf16 | fp16 | fp32; GPU only), GRAD_CKPT (true)
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
# Example (CPU, tiny):  PRESET=tiny-piip2_clip_64-128 TOKENIZER_PATH=tok DATA_PATH=s1.json IMAGE_FOLDER=img \
#                       OUTPUT_DIR=out/s1 PER_DEVICE_BATCH=4 MAX_STEPS=20 bash scripts/pretrain_piip_llava.sh
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$SCRIPT_DIR")"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"

: "${DATA_PATH:?set DATA_PATH to the LLaVA-format JSON (e.g. LLaVA-Pretrain/blip_laion_cc_sbu_558k.json)}"
: "${OUTPUT_DIR:?set OUTPUT_DIR}"
STAGE=1
TUNE="${TUNE:-projector}"
LR="${LR:-1e-3}"
PER_DEVICE_BATCH="${PER_DEVICE_BATCH:-32}"
DEFAULT_GLOBAL_BATCH=256
ZERO="${ZERO:-2}"
TEMPLATE="${TEMPLATE:-plain}"
ASPECT="${ASPECT:-square}"
SAVE_STEPS="${SAVE_STEPS:-24000}"
EXTRA_STAGE_ARGS=()

# shared launcher: world size, flags, launch
source "$SCRIPT_DIR/launch_train.sh" "$@"
