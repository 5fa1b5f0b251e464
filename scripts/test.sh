#!/usr/bin/env bash
# The test command (README): sets up what the tests need, then runs every test this machine can run.
#
#   bash scripts/test.sh                 # all CPU tests: core, registry and CLI, vLLM CPU end to end
#   bash scripts/test.sh -k reserve      # extra arguments go to pytest
#
# Setup is idempotent and reuses caches: the vLLM CPU venv (scripts/setup_vllm_cpu.sh), the converted SmolLM2 model
# and its copy with zero-padded heads for tensor parallel (scripts/prepare_model.py). GPU tests (marker `gpu`) need a
# CUDA GPU: run them there with
#   python -m pytest -m gpu tests/
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v tmux >/dev/null 2>&1; then  # kvtop's screen is tested in a real terminal
    echo "[test] installing tmux"
    (apt-get update -qq && apt-get install -y -qq tmux) >/dev/null 2>&1 || echo "[test] WARNING: could not install tmux"
fi
SETUP_LOG=$(mktemp)  # not `tee /dev/stderr`: reopening stderr when it is a file truncates what it holds
trap 'rm -f "$SETUP_LOG"' EXIT
bash scripts/setup_vllm_cpu.sh 2>&1 | tee "$SETUP_LOG"
PY=$(tail -n 1 "$SETUP_LOG")
"$PY" -m pip install -q pytest psutil pexpect matplotlib aiohttp pyyaml prometheus-client 2>&1 | grep -v "^WARNING: Location" || true
export KVCACHED_MODEL_DIR="${KVCACHED_MODEL_DIR:-$HOME/.cache/kvcached/models/SmolLM2-135M-Instruct}"
"$PY" scripts/prepare_model.py --out "$KVCACHED_MODEL_DIR" | tail -n 1
echo "[test] running pytest with $PY"
"$PY" -m pytest -m "not gpu" -p no:cacheprovider "$@"
