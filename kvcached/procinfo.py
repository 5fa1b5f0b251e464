"""Whether a process is still the one that was recorded: pid plus start time, and the pid namespace.

Note: a pid alone names a process only until it exits; the kernel then reuses it. A record that keeps the pid and
the start time (/proc/<pid>/stat field 22, clock ticks since boot) names exactly one process: a reused pid has another
start time. Both are only comparable inside one pid namespace; callers that share files across containers (the
registry) also record `pid_namespace()` and judge a record from another namespace by other means (a heartbeat).
"""

from __future__ import annotations

import os
from typing import Optional


def start_ticks(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    return int(text[text.rindex(b")") + 2 :].split()[19])  # the comm field may hold spaces and ')'


def is_running(pid: int, ticks: Optional[int]) -> bool:
    """Whether the process recorded as (`pid`, `ticks`) still runs (a reused pid does not count)."""
    return ticks is not None and pid > 0 and start_ticks(pid) == ticks


def pid_namespace() -> int:
    """An id of this process's pid namespace (the inode of /proc/self/ns/pid), 0 when it cannot be read."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0
