"""What the benchmarks read from and ask of kvcached's registry: KV bytes per instance, registration, limits.

Note (why): the demo and bench_vllm watch kvcached instances from outside, as an operator does with `kvctl`: by
registry name (the servers are started with KVCACHED_IPC_NAME). Only the registry's public names are used. The
static-pool baseline runs without kvcached, and a sample or a limit must never kill a run, so the readers return
"unknown" ({} or None) on a registry error instead of raising; setters return a line saying what happened.
"""

from __future__ import annotations

import time
from typing import Optional

from kvcached import registry

from benchmarks.analysis import fmt_bytes


def kv_bytes(names: list[str]) -> dict[str, dict]:
    """name -> {"kv_used", "kv_premapped", "kv_limit", "kv_devices"} of the alive instances among `names` ({} when
    unreadable). The bytes are one device's; a tensor-parallel instance holds them on each of its kv_devices."""
    if not names:
        return {}
    try:
        records = registry.list_instances(names, missing_ok=True)
    except Exception:  # noqa: BLE001  (a segment being written or removed: this sample goes without)
        return {}
    return {r.name: {"kv_used": int(r.used_bytes), "kv_premapped": int(r.premapped_bytes),
                     "kv_limit": int(r.limit_bytes or 0), "kv_devices": r.num_devices} for r in records if r.alive}


def wait_registered(name: str, timeout_s: float = 10.0) -> bool:
    """True once `name` is alive in the registry, False if it is not within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if name in kv_bytes([name]):
            return True
        time.sleep(0.25)
    return False


def set_limit(name: str, limit: Optional[int]) -> str:
    """Cap instance `name` at `limit` bytes per device (None: lift the cap), as `kvctl limit` does; says what
    happened."""
    try:
        request = registry.request_limit(name, limit, wait_s=2.0)
    except Exception as e:  # noqa: BLE001
        return f"not set ({type(e).__name__}: {e})"
    what = "removed" if limit is None else fmt_bytes(limit)
    return f"{what} (applied)" if request.applied else f"{what} (requested; not confirmed)"


def clear_persisted_limit(name: str) -> Optional[str]:
    """Remove a limit an earlier run left for `name` (`kvctl limit` keeps limits per name across restarts): it must
    not cap this run. Returns a line to log when something was done or went wrong, else None."""
    try:
        if registry.read_persisted_limit(name) is None:
            return None
        registry.delete(name)
        return f"removed a persisted kvcached limit left for {name} by an earlier run"
    except Exception as e:  # noqa: BLE001
        return f"WARNING: could not clear the persisted limit of {name}: {e} (kvctl delete {name})"
