#!/usr/bin/env bash
# Gradio chat demo: every argument goes to piip_llava.serve.gradio_demo, e.g.
#   bash scripts/demo.sh --model ./checkpoints/piip-llava-7b --port 7860
set -euo pipefail
exec "${PYTHON:-python}" -m piip_llava.serve.gradio_demo "$@"
