#!/usr/bin/env bash
# Merge a LoRA adapter (finetune_piip_llava.sh with TUNE=lora) into a plain checkpoint:
#   ADAPTER=checkpoints/piip-llava-lora OUT=checkpoints/piip-llava-merged [BASE=...] bash scripts/merge_lora.sh
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-$(command -v python || command -v python3)}" -m piip_llava.train.merge_lora --adapter "${ADAPTER:?set ADAPTER}" --out "${OUT:?set OUT}" \
  ${BASE:+--base "$BASE"} "$@"
