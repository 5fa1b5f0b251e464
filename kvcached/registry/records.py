"""What a reader learns from one segment: an InstanceRecord, with its status.

Note (liveness): an instance is alive while a process with its pid and the same start time exists
(kvcached/procinfo.py), so a reused pid is not taken for it. An instance in another pid namespace (a container sharing
/dev/shm) cannot be checked that way: it counts as alive while its heartbeat, written every 0.25 s, is younger than
5 s. A segment is never judged by its size: magic, format version and the name inside must match.

Note (devices): `devices` lists an instance's devices in tensor-parallel rank order (one entry for an engine without
TP). Its figures (limit, used, premapped, virtual, device total) are each device's: every rank maps the same pages,
so a limit is per device, and the instance as a whole holds `total_used_bytes` = used x ranks.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Callable, Optional

from ..procinfo import is_running, pid_namespace
from .format import (
    CONTROL, CONTROL_AT, DEVICE, DEVICES_AT, ENGINE, ENGINE_AT, FORMAT_VERSION, HEADER, MAGIC, MAX_DEVICES,
    RECORD_SIZE, STALE_S, read_part,
)


class InstanceStatus(str, Enum):
    """Compares equal to its value ("alive" == InstanceStatus.ALIVE), and prints as it."""

    ALIVE = "alive"
    DEAD = "dead"
    FOREIGN = "foreign"  # another user's segment: listed, never read
    INVALID = "invalid"  # ours but unreadable: `reason` says why

    __hash__ = str.__hash__  # so that dicts keyed by the strings find the members

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class InstanceRecord:
    """One segment as read now. `status`: alive, dead, foreign (another user's: not read) or invalid (`reason`).
    Byte figures are per device; `device`/`gpu_id` are rank 0's, `devices`/`gpu_ids` every rank's (default: the one
    `device`)."""

    name: str
    status: InstanceStatus
    uid: int
    reason: str = ""
    pid: int = 0
    device: str = ""
    backend: str = ""
    gpu_id: str = ""
    virtual_bytes: int = 0
    device_total_bytes: int = 0  # what one rank has of its device (the VirtualMemory's total_memory())
    page_bytes: int = 0
    limit_bytes: int = 0
    used_bytes: int = 0
    premapped_bytes: int = 0
    heartbeat_age_s: Optional[float] = None
    applied_generation: int = 0
    apply_error: bool = False
    requested_generation: int = 0
    requested_limit: Optional[int] = None
    persisted_limit: Optional[int] = None
    created_ns: int = 0
    format_version: int = 0
    devices: tuple[str, ...] = ()
    gpu_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.devices and self.device:  # a record built with one device: it is the only rank
            object.__setattr__(self, "devices", (self.device,))
            object.__setattr__(self, "gpu_ids", (self.gpu_id,))

    @property
    def alive(self) -> bool:
        return self.status == InstanceStatus.ALIVE

    @property
    def mapped_bytes(self) -> int:
        return self.used_bytes + self.premapped_bytes

    @property
    def num_devices(self) -> int:
        """Tensor-parallel ranks, each with its own device (0 for a record that could not be read)."""
        return len(self.devices)

    @property
    def total_used_bytes(self) -> int:
        """Used bytes on all the instance's devices together."""
        return self.used_bytes * self.num_devices

    @property
    def total_mapped_bytes(self) -> int:
        """Mapped bytes (used and premapped) on all the instance's devices together."""
        return self.mapped_bytes * self.num_devices

    @property
    def free_bytes(self) -> int:
        """Bytes that may still be mapped under the limit."""
        return max(0, self.limit_bytes - self.mapped_bytes)

    @property
    def deficit_bytes(self) -> int:
        """Bytes in use above the limit (after the limit was lowered below them): given back as the engine frees."""
        return max(0, self.used_bytes - self.limit_bytes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(status=self.status.value, alive=self.alive, mapped_bytes=self.mapped_bytes,
                 free_bytes=self.free_bytes, deficit_bytes=self.deficit_bytes, devices=list(self.devices),
                 gpu_ids=list(self.gpu_ids), num_devices=self.num_devices, total_used_bytes=self.total_used_bytes,
                 total_mapped_bytes=self.total_mapped_bytes)
        return d


def _decode(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def parse_record(buf, name: str, st: os.stat_result, persisted_limit: Callable[[str], Optional[int]]) -> InstanceRecord:
    """The record in `buf` (a trusted, mapped segment of `name`), judged alive or dead now."""
    def invalid(reason: str) -> InstanceRecord:
        return InstanceRecord(name=name, status=InstanceStatus.INVALID, uid=st.st_uid, reason=reason)

    (magic, version, size, raw_name, device, backend, gpu_id, pid, ticks, pidns, created, virtual, total,
     page, count) = HEADER.unpack_from(buf, 0)
    other_namespace = bool(pidns) and pidns != pid_namespace()
    if magic != MAGIC:
        return invalid("not a kvcached segment (bad magic)")
    if version != FORMAT_VERSION or size != RECORD_SIZE:
        reason = f"format version {version} ({size} bytes); this kvcached reads version {FORMAT_VERSION}"
        # Version 1's header is this one's without the device count: when its process is gone, the segment is dead
        # (cleaned as any), so an engine restarted under the name after an upgrade takes it over.
        old = (version, size) == (1, 512) and _decode(raw_name) == name
        if old and not other_namespace and not is_running(pid, ticks):
            return InstanceRecord(name=name, status=InstanceStatus.DEAD, uid=st.st_uid, reason=reason, pid=pid,
                                  format_version=version)
        return invalid(reason)
    if len(buf) < RECORD_SIZE:
        return invalid(f"{len(buf)} bytes, too small")
    if _decode(raw_name) != name:
        return invalid(f"holds the name {_decode(raw_name)!r}")
    if not 1 <= count <= MAX_DEVICES:
        return invalid(f"lists {count} devices (1 to {MAX_DEVICES} are possible)")
    ranks = [DEVICE.unpack_from(buf, DEVICES_AT + i * DEVICE.size) for i in range(count)]
    engine = read_part(buf, ENGINE_AT, ENGINE)
    control = read_part(buf, CONTROL_AT, CONTROL)
    reason = ""
    if engine is None:  # its engine died in the middle of an update: the figures are lost, the header is not
        engine, reason = (0, 0, 0, 0, 0, 0), "the engine stopped in the middle of an update"
    if control is None:  # a kvctl died in the middle of a request: the next request repairs it
        control, reason = (CONTROL.unpack_from(buf, CONTROL_AT + 8)[0], -1), "a request was left half written"
    limit, used, premapped, heartbeat, applied, error = engine
    generation, requested = control
    age = max(0.0, (time.monotonic_ns() - heartbeat) / 1e9)
    if other_namespace:
        alive = age < STALE_S
    else:
        alive = is_running(pid, ticks)
    return InstanceRecord(
        name=name, status=InstanceStatus.ALIVE if alive else InstanceStatus.DEAD, uid=st.st_uid, reason=reason,
        pid=pid, device=_decode(device), backend=_decode(backend), gpu_id=_decode(gpu_id), virtual_bytes=virtual,
        device_total_bytes=total, page_bytes=page, limit_bytes=limit, used_bytes=used, premapped_bytes=premapped,
        heartbeat_age_s=age, applied_generation=applied, apply_error=bool(error), requested_generation=generation,
        requested_limit=None if requested < 0 else requested, persisted_limit=persisted_limit(name),
        created_ns=created, format_version=version, devices=tuple(_decode(d) for d, _ in ranks),
        gpu_ids=tuple(_decode(g) for _, g in ranks),
    )
