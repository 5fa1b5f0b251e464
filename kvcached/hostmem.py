"""Host memory figures from /proc/meminfo and the cgroup (v2), importable without torch (kvctl and kvtop use it)."""

from __future__ import annotations

from typing import Optional


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
    return info


def _cgroup_limit() -> Optional[tuple[int, int]]:
    """(limit, usage) of this process's cgroup v2, when it has a memory limit."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return int(limit), int(f.read())
    except OSError:
        return None


def host_memory() -> tuple[int, int]:
    """(free, total) bytes: MemAvailable and MemTotal, or the cgroup's room and limit when that is tighter."""
    info = _meminfo()
    free, total = info.get("MemAvailable", info.get("MemFree", 0)), info["MemTotal"]
    cgroup = _cgroup_limit()
    if cgroup and cgroup[0] < total:
        return min(free, max(cgroup[0] - cgroup[1], 0)), cgroup[0]
    return free, total
