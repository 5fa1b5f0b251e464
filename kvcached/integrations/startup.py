"""The interpreter start-up hook, run from kvcached_autopatch.pth in every Python process of the environment.

Note: it reads two environment variables and, when both ENABLE_KVCACHED and KVCACHED_AUTOPATCH are true, registers the
engine patches as post-import hooks; it imports no engine and no torch. A .pth file cannot stop Python (its errors are
printed and skipped), so a failure here is kept and raised again when an engine (vLLM, SGLang) is imported: an engine
never starts unpatched while kvcached is enabled. `ACTIVE` tells the engine's plugin check that this hook ran.
"""

from __future__ import annotations

import os
from typing import Optional

ACTIVE = False
ERROR: Optional[BaseException] = None
_RAN = False


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def run() -> None:
    """Idempotent: site may process the .pth more than once (a venv's lib and lib64 are the same folder)."""
    global ACTIVE, ERROR, _RAN
    if _RAN or not (_flag("ENABLE_KVCACHED") and _flag("KVCACHED_AUTOPATCH")):
        return
    _RAN = True
    from . import importhook

    try:
        from ..config import Config

        Config.from_env()  # a bad variable stops the engine with its message
        from .sglang import autopatch as sglang_autopatch
        from .vllm import autopatch as vllm_autopatch

        vllm_autopatch.install()
        sglang_autopatch.install()
        ACTIVE = True
    except BaseException as exc:  # noqa: BLE001 - re-raised when an engine is imported
        ERROR = exc
        for engine in ("vllm", "sglang"):
            importhook.when_imported(engine, _raise_startup_error)


def _raise_startup_error(_module) -> None:
    raise RuntimeError(f"kvcached is enabled (ENABLE_KVCACHED, KVCACHED_AUTOPATCH) but could not start: {ERROR}") from ERROR
