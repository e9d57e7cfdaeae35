#!/usr/bin/env bash
# Shared launcher of scripts/pretrain_piip_llava.sh and scripts/finetune_piip_llava.sh (sourced, not run): world size,
# gradient accumulation, model / DeepSpeed / precision flags, and the launch (DeepSpeed hostfile, torchrun on GPUs,
# torchrun on the CPU). Expects STAGE, TUNE, LR, PER_DEVICE_BATCH, DEFAULT_GLOBAL_BATCH, ZERO, TEMPLATE, ASPECT,
# SAVE_STEPS, EXTRA_STAGE_ARGS, SCRIPT_DIR, REPO, PYTHON from the caller; "$@" are extra train flags.
# Stopping the script stops the training: SIGTERM / SIGINT (Ctrl-C) reach torchrun, which stops its workers; after a
# SIGKILL the workers (in sessions of their own) see that this script ($PIIP_LAUNCHER) is gone and exit within a second.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PIIP_LAUNCHER="${HOSTNAME:-$(uname -n)}:$$"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
HAS_GPU="$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')"
if [ -n "${HOSTFILE:-}" ]; then
  WORLD="$(awk '{for (i = 1; i <= NF; i++) if ($i ~ /^slots=/) {split($i, a, "="); s += a[2]}} END {print s + 0}' "$HOSTFILE")"
elif [ "$HAS_GPU" = 1 ]; then
  NUM_GPUS="${NUM_GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}"
  WORLD=$(( NUM_GPUS * ${NNODES:-1} ))
else
  NPROC="${NPROC:-2}"
  WORLD="$NPROC"
fi
if [ -z "${GRAD_ACC:-}" ]; then
  if [ "$HAS_GPU" = 1 ] || [ -n "${GLOBAL_BATCH:-}" ]; then
    GLOBAL_BATCH="${GLOBAL_BATCH:-$DEFAULT_GLOBAL_BATCH}"
    if (( GLOBAL_BATCH % (PER_DEVICE_BATCH * WORLD) != 0 )); then
      echo "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of PER_DEVICE_BATCH=$PER_DEVICE_BATCH x world size $WORLD" >&2
      exit 2
    fi
    GRAD_ACC=$(( GLOBAL_BATCH / (PER_DEVICE_BATCH * WORLD) ))
  else
    GRAD_ACC=1
  fi
fi
echo "world size $WORLD, per-device batch $PER_DEVICE_BATCH, gradient accumulation $GRAD_ACC:" \
     "global batch $(( PER_DEVICE_BATCH * WORLD * GRAD_ACC ))"

MODEL_ARGS=()
if [ -n "${MODEL_PATH:-}" ]; then
  # a bad checkpoint fails here with one line naming the file, not in every worker under torchrun's report
  "$PYTHON" -m piip_llava.models.loading "$MODEL_PATH" --expect piip_llava --role MODEL_PATH >/dev/null
  MODEL_ARGS+=(--model_name_or_path "$MODEL_PATH")
elif [ -n "${CONFIG:-}" ]; then MODEL_ARGS+=(--config "$CONFIG")
else MODEL_ARGS+=(--preset "${PRESET:-piip-llava_clip-bl_512-448_7B}"); fi
[ -n "${LLM_PATH:-}" ] && MODEL_ARGS+=(--llm_path "$LLM_PATH")
[ -n "${TOKENIZER_PATH:-}" ] && MODEL_ARGS+=(--tokenizer_path "$TOKENIZER_PATH")

# ENGINE=deepspeed (default): ZeRO stage ZERO (3 | 2 | 3_offload | none = plain DDP).
# ENGINE=fsdp: PyTorch FSDP2 through the Trainer; units = the model's `_no_split_modules` blocks (train.py,
# fsdp_wrap_classes); FSDP_RESHARD=true frees the gathered weights after each unit's forward (ZeRO-3-like),
# false keeps them until the backward (ZeRO-2-like, more memory, less communication). FSDP_STATE_DICT=sharded
# (default) writes each rank's model and optimizer shards to checkpoint-N with torch.distributed.checkpoint;
# full gathers both onto rank 0 (host memory of the whole optimizer state there). Either way the final folder and
# every checkpoint also hold the gathered model.safetensors. ZERO is ignored.
DS_ARGS=()
case "${ENGINE:-deepspeed}" in
  deepspeed) [ "$ZERO" != none ] && DS_ARGS+=(--deepspeed "$SCRIPT_DIR/zero${ZERO}.json") ;;
  fsdp)
    case "${FSDP_RESHARD:=true}" in true | false) ;; *) echo "FSDP_RESHARD must be true or false" >&2; exit 2 ;; esac
    case "${FSDP_STATE_DICT:=sharded}" in
      sharded) FSDP_SD=SHARDED_STATE_DICT ;;
      full) FSDP_SD=FULL_STATE_DICT ;;
      *) echo "FSDP_STATE_DICT must be sharded or full, got '$FSDP_STATE_DICT'" >&2; exit 2 ;;
    esac
    DS_ARGS+=(--fsdp --fsdp_config "{\"version\": 2, \"reshard_after_forward\": $FSDP_RESHARD, \"state_dict_type\": \"$FSDP_SD\"}") ;;
  *) echo "ENGINE must be deepspeed or fsdp, got '$ENGINE'" >&2; exit 2 ;;
esac
if [ "$HAS_GPU" = 1 ]; then
  case "${PRECISION:-bf16}" in
    bf16) PREC_ARGS=(--bf16 true --tf32 true) ;;
    fp16) PREC_ARGS=(--fp16 true) ;;
    *) PREC_ARGS=() ;;
  esac
  WORKERS="${WORKERS:-4}"
else
  PREC_ARGS=()  # fp32 on the CPU (bf16 is slower there and the Trainer refuses it with DeepSpeed)
  WORKERS="${WORKERS:-0}"
  export DS_ACCELERATOR=cpu
  if [ "$WORLD" -gt 1 ]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi
fi

ARGS=(
  --stage "$STAGE" --tune "$TUNE" "${MODEL_ARGS[@]}"
  --data_path "$DATA_PATH" ${IMAGE_FOLDER:+--image_folder "$IMAGE_FOLDER"}
  --template "$TEMPLATE" --image_aspect_ratio "$ASPECT" --model_max_length "${MAX_LEN:-2048}"
  --output_dir "$OUTPUT_DIR" --num_train_epochs "${EPOCHS:-1}" --max_steps "${MAX_STEPS:--1}"
  --per_device_train_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACC"
  --learning_rate "$LR" --weight_decay "${WEIGHT_DECAY:-0}" --warmup_steps "${WARMUP:-0.03}"
  --lr_scheduler_type "${SCHEDULER:-cosine}" --seed "${SEED:-42}"
  --save_strategy steps --save_steps "$SAVE_STEPS" --save_total_limit "${SAVE_TOTAL_LIMIT:-1}"
  --logging_steps "${LOGGING_STEPS:-1}" --report_to "${REPORT_TO:-none}" --resume "${RESUME:-auto}"
  --gradient_checkpointing "${GRAD_CKPT:-true}" --dataloader_num_workers "$WORKERS" --disable_tqdm true
  "${DS_ARGS[@]}" "${PREC_ARGS[@]}" "${EXTRA_STAGE_ARGS[@]}"
)
# shellcheck disable=SC2206
ARGS+=(${EXTRA_ARGS:-} "$@")

MASTER_PORT="${MASTER_PORT:-$(( 29500 + RANDOM % 1000 ))}"
if [ -n "${HOSTFILE:-}" ]; then
  "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" \
    --master_port "$MASTER_PORT" --module piip_llava.train "${ARGS[@]}"
elif [ "$HAS_GPU" = 1 ]; then
  "$PYTHON" -m torch.distributed.run --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT" --nproc_per_node "$NUM_GPUS" \
    -m piip_llava.train "${ARGS[@]}"
else
  "$PYTHON" -m torch.distributed.run --nnodes 1 --nproc_per_node "$NPROC" --master_addr 127.0.0.1 \
    --master_port "$MASTER_PORT" -m piip_llava.train "${ARGS[@]}"
fi
echo "stage-${STAGE} output: $(cd "$OUTPUT_DIR" && pwd)"
