"""The operator's side of the registry (kvctl, kvtop, scripts): list and read instances, set limits, remove dead ones.

Note: a limit request is written into the segment's control part under flock and saved beside it for restarts; the
engine's watcher applies it within WATCH_INTERVAL_S. Removal is for dead segments of this uid only (or any with
force), under flock and after checking that the path still names the same file, so a racing start never loses a live
segment.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError, RegistryError
from ..procinfo import start_ticks
from .format import CONTROL, CONTROL_AT, ENGINE, ENGINE_AT, SEQ, read_part, write_part
from .names import SEGMENT_PREFIX, TMP_PREFIX, is_valid_name, owner_name, shm_dir, validate_name
from .records import InstanceRecord, InstanceStatus
from .segment import Segment, open_segment, persist_limit, remove_limit_file

logger = logging.getLogger("kvcached")


def read_instance(name: str) -> InstanceRecord:
    """The record of instance `name`; RegistryError when there is none."""
    seg = open_segment(validate_name(name))
    if seg is None:
        raise RegistryError(f"unknown instance {name!r} (see 'kvctl list')")
    with seg:
        return seg.record()


def _segment_names() -> list[str]:
    names = []
    with os.scandir(shm_dir()) as entries:
        for entry in entries:
            name = entry.name[len(SEGMENT_PREFIX) :]
            if entry.name.startswith(SEGMENT_PREFIX) and is_valid_name(name):
                names.append(name)
    return sorted(names)


def list_instances(names: Optional[list[str]] = None, *, missing_ok: bool = False) -> list[InstanceRecord]:
    """Records of every segment (or of `names`, in that order; unknown ones raise RegistryError unless missing_ok)."""
    wanted = [validate_name(n) for n in names] if names else _segment_names()
    records = []
    for name in wanted:
        seg = open_segment(name)
        if seg is None:
            if names and not missing_ok:
                raise RegistryError(f"unknown instance {name!r} (see 'kvctl list')")
            continue
        with seg:
            records.append(seg.record())
    return records


# ---- what kvctl does -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LimitRequest:
    name: str
    limit_bytes: Optional[int]
    generation: int
    applied: Optional[bool]  # None: not waited for (the instance is dead, or wait_s was 0)
    apply_error: bool = False
    latency_s: Optional[float] = None


def _writable(name: str) -> Segment:
    seg = open_segment(validate_name(name), write=True)
    if seg is None:
        raise RegistryError(f"unknown instance {name!r} (see 'kvctl list')")
    record = seg.record()
    if record.status in (InstanceStatus.FOREIGN, InstanceStatus.INVALID):
        seg.close()
        raise RegistryError(f"instance {name!r} is {record.status} ({record.reason}); it is not changed")
    return seg


def request_limit(name: str, limit_bytes: Optional[int], *, wait_s: float = 1.0) -> LimitRequest:
    """Ask instance `name` to cap its memory at `limit_bytes` (None: no cap) and remember it for restarts.

    Waits up to `wait_s` for a live engine to apply it; its watcher does within WATCH_INTERVAL_S plus the unmapping.
    """
    if limit_bytes is not None and (not isinstance(limit_bytes, int) or limit_bytes < 0):
        raise ConfigError(f"a limit must be a number of bytes >= 0, got {limit_bytes!r}")
    with _writable(name) as seg:
        if not seg.lock():
            raise RegistryError(f"instance {name!r}: its segment stayed locked by another kvctl for 2 s")
        persist_limit(name, limit_bytes)
        generation = CONTROL.unpack_from(seg.mm, CONTROL_AT + 8)[0] + 1  # kvctl's own field, under the lock
        seq = SEQ.unpack_from(seg.mm, CONTROL_AT)[0]
        write_part(seg.mm, CONTROL_AT, seq, CONTROL, (generation, -1 if limit_bytes is None else limit_bytes))
        seg.unlock()
        start = time.monotonic()
        if wait_s <= 0 or not seg.record().alive:
            return LimitRequest(name, limit_bytes, generation, applied=None)
        while True:
            engine = read_part(seg.mm, ENGINE_AT, ENGINE)
            if engine is not None and engine[4] >= generation:
                return LimitRequest(name, limit_bytes, generation, applied=not engine[5], apply_error=bool(engine[5]),
                                    latency_s=time.monotonic() - start)
            if time.monotonic() - start > wait_s:
                return LimitRequest(name, limit_bytes, generation, applied=False)
            time.sleep(0.002)


def delete(name: str, *, force: bool = False) -> InstanceRecord | None:
    """Remove the segment of `name` (dead, or any with `force`) and its persisted limit; returns what was removed."""
    seg = open_segment(validate_name(name))
    record = None
    if seg is not None:
        with seg:
            record = seg.record()
            if record.status == InstanceStatus.FOREIGN:
                raise RegistryError(f"instance {name!r} is owned by {owner_name(record.uid)}; it is not changed")
            if record.status != InstanceStatus.DEAD and not force:
                why = f"alive (pid {record.pid})" if record.alive else f"invalid ({record.reason})"
                raise RegistryError(f"instance {name!r} is {why}; stop it first, or use --force")
            if seg.fd >= 0:
                if not seg.lock():
                    raise RegistryError(f"instance {name!r}: its segment stayed locked by another kvctl for 2 s")
                seg.unlink()
            else:
                os.unlink(seg.path)  # our own symlink or other non-file: never followed
    if not remove_limit_file(name) and record is None:
        raise RegistryError(f"unknown instance {name!r} (see 'kvctl list')")
    return record


def clean_dead(*, forget_limits: bool = False) -> list[str]:
    """Remove this user's segments whose process is gone (and stale temporary files); returns the names removed.

    With `forget_limits` (`kvctl clean`) their saved limits go too; an engine that starts cleans without it, so that
    a restart under a dead instance's name keeps the operator's limit."""
    removed = []
    for name in _segment_names():
        try:
            seg = open_segment(name)
        except OSError:
            continue
        if seg is None:
            continue
        with seg:
            if seg.stat.st_uid != os.geteuid() or seg.record().status != InstanceStatus.DEAD:
                continue
            if seg.lock(timeout_s=0) and seg.record().status == InstanceStatus.DEAD and seg.unlink():  # checked again, locked
                removed.append(name)
                if forget_limits:
                    remove_limit_file(name)
    with os.scandir(shm_dir()) as entries:
        for entry in entries:
            if entry.name.startswith(TMP_PREFIX):
                pid = entry.name[len(TMP_PREFIX) :].partition(".")[0]
                st = entry.stat(follow_symlinks=False)
                if pid.isdigit() and st.st_uid == os.geteuid() and start_ticks(int(pid)) is None:
                    try:
                        os.unlink(entry.path)
                    except FileNotFoundError:
                        pass
    if removed:
        logger.info("removed the segments of dead kvcached instances: %s", ", ".join(removed))
    return removed
