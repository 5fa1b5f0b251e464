"""vLLM's `vllm.general_plugins` entry point: a second line of defence against running vanilla while enabled.

Note: vLLM calls this in every process it starts. It must stay import-light: vLLM only logs a plugin that fails to
import, but an exception raised by the function itself stops vLLM, which is what we want when kvcached is enabled and
its start-up hook did not run (or failed).
"""

import os


def check() -> None:
    from .. import startup

    if not startup._flag("ENABLE_KVCACHED"):
        return
    if startup.ERROR is not None:
        raise RuntimeError(f"kvcached is enabled but could not start: {startup.ERROR}") from startup.ERROR
    if not startup._flag("KVCACHED_AUTOPATCH"):
        raise RuntimeError(
            "ENABLE_KVCACHED is set but KVCACHED_AUTOPATCH is not: vLLM would run its static KV pool. "
            "Set KVCACHED_AUTOPATCH=1 as well (or unset ENABLE_KVCACHED)."
        )
    if not startup.ACTIVE:
        raise RuntimeError(
            "kvcached is enabled but its start-up hook did not run in this process (pid %d): kvcached_autopatch.pth "
            "is missing from site-packages. Reinstall kvcached (pip install --force-reinstall kvcached)." % os.getpid()
        )
