"""SGLang's `sglang.srt.plugins` entry point: a second line of defence against running its static pool while enabled.

Note: SGLang loads its general plugins in every process it starts (the engine and each scheduler, before the model
runner) and logs, without stopping, any Exception one raises. SystemExit is not an Exception: raising it stops the
process, which is what must happen when kvcached is enabled but its start-up hook did not patch SGLang (the .pth is
missing, KVCACHED_AUTOPATCH is unset, or the hook failed).
"""

import os


def check() -> None:
    from .. import startup

    if not startup._flag("ENABLE_KVCACHED"):
        return
    if startup.ERROR is not None:
        raise SystemExit(f"kvcached is enabled but could not start, so SGLang stops here: {startup.ERROR}")
    if not startup._flag("KVCACHED_AUTOPATCH"):
        raise SystemExit("ENABLE_KVCACHED is set but KVCACHED_AUTOPATCH is not, so SGLang would run its static KV "
                         "pool: set KVCACHED_AUTOPATCH=1 as well, or unset ENABLE_KVCACHED")
    if not startup.ACTIVE:
        raise SystemExit(f"kvcached is enabled but its start-up hook did not patch this SGLang process (pid "
                         f"{os.getpid()}): kvcached_autopatch.pth is not in site-packages. Reinstall kvcached "
                         f"(pip install --force-reinstall kvcached)")
