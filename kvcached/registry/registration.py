"""The engine's side of the registry: one Registration per KV cache instance, which publishes its memory and applies
the limits an operator requests.

Note: publish() is called by the page allocator under its lock after every change, so it is a seqlock write into the
mapping: no syscall, no file lock. A watcher thread polls the control part every WATCH_INTERVAL_S for a new request
generation, applies it through `apply_limit` (KVCacheManager.resize) and writes the heartbeat. The segment is made
whole under a temporary name and hard-linked into place; a name held by this user's dead instance is taken over. The
record is removed by close(), and at interpreter exit when close() was never called (atexit, holding only a weak
reference, so a forgotten Registration is not kept alive by it).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from ..devices import gpu_id_of, parse_device
from ..errors import ConfigError
from ..procinfo import pid_namespace, start_ticks
from .admin import clean_dead
from .format import (
    CONTROL, CONTROL_AT, DEVICE, DEVICES_AT, ENGINE, ENGINE_AT, FORMAT_VERSION, HEADER, HEARTBEAT_S, MAGIC,
    MAX_DEVICES, RECORD_SIZE, SEQ, WATCH_INTERVAL_S, pack_part, read_part, write_part,
)
from .names import TMP_PREFIX, default_name, owner_name, segment_path, validate_name
from .records import InstanceStatus
from .segment import Segment, create_private, open_segment, read_persisted_limit

if TYPE_CHECKING:
    from ..page_allocator import MemoryStats

logger = logging.getLogger("kvcached")


class Registration:
    """This process's segment for one KV cache instance (see the module's note). It is the manager's observer:
    publish(stats) and close()."""

    def __init__(self, name: str, seg: Segment, stats: Callable[[], "MemoryStats"],
                 apply_limit: Callable[[Optional[int]], None]) -> None:
        self.name = name
        self._seg = seg
        self._stats = stats
        self._apply_limit = apply_limit
        self._lock = threading.Lock()  # engine-side writers: publish() and the watcher
        self._values = [0, 0, 0, time.monotonic_ns(), 0, 0]  # the engine part, as last written
        self._seq = SEQ.unpack_from(seg.mm, ENGINE_AT)[0]
        self._published = 0
        self._closed = False
        self._seen_generation = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._release_at_exit: Optional[Callable[[], None]] = None

    @classmethod
    def open(cls, name: Optional[str], *, devices: Sequence[str], virtual_bytes: int, device_total_bytes: int,
             explicit_limit: Optional[int], stats: Callable[[], "MemoryStats"],
             apply_limit: Callable[[Optional[int]], None]) -> "Registration":
        """Register an instance on `devices` (rank order; one per tensor-parallel rank), whose figures (stats,
        virtual and device total bytes) are each device's."""
        name = default_name() if name is None else validate_name(name)
        kind = _device_kind(devices)
        ranks = [(device.encode()[:16], gpu_id_of(device).encode()[:48]) for device in devices]
        clean_dead()
        first = stats()
        header = HEADER.pack(
            MAGIC, FORMAT_VERSION, RECORD_SIZE, name.encode(), ranks[0][0], kind, ranks[0][1], os.getpid(),
            start_ticks(os.getpid()) or 0, pid_namespace(), time.time_ns(), virtual_bytes, device_total_bytes,
            first.page_bytes, len(ranks),
        )
        image = bytearray(RECORD_SIZE)
        image[: len(header)] = header
        for rank, (device, gpu_id) in enumerate(ranks):
            DEVICE.pack_into(image, DEVICES_AT + rank * DEVICE.size, device, gpu_id)
        engine = (first.limit_bytes, first.used_bytes, first.premapped_bytes, time.monotonic_ns(), 0, 0)
        image[ENGINE_AT : ENGINE_AT + 12 + ENGINE.size] = pack_part(0, ENGINE, engine)
        image[CONTROL_AT : CONTROL_AT + 12 + CONTROL.size] = pack_part(0, CONTROL, (0, -1))
        seg = _link_segment(name, bytes(image))
        self = cls(name, seg, stats, apply_limit)
        try:
            persisted = read_persisted_limit(name)
            if explicit_limit is None and persisted is not None:
                logger.info("instance %s: applying the limit %d bytes an operator set for this name", name, persisted)
                self._apply(persisted)
            self._refresh()
            self._thread = threading.Thread(target=self._watch, name=f"kvcached-registry-{name}", daemon=True)
            self._thread.start()
        except BaseException:
            self.close()
            raise
        self._release_at_exit = _weak_closer(self)
        atexit.register(self._release_at_exit)
        return self

    def publish(self, stats: "MemoryStats") -> None:
        """Write the engine's memory into the record: a seqlock write into the mapping, no syscall, no file lock."""
        with self._lock:
            if self._closed:
                return
            self._published += 1
            self._values[0:3] = stats.limit_bytes, stats.used_bytes, stats.premapped_bytes
            self._seq = write_part(self._seg.mm, ENGINE_AT, self._seq, ENGINE, tuple(self._values))

    def close(self) -> None:
        """Stop the watcher and remove the segment; the operator's persisted limit stays."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._release_at_exit is not None:
            atexit.unregister(self._release_at_exit)
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        seg = self._seg
        try:
            seg.unlink()  # only if the path is still this segment: after `kvctl delete --force` it may be another's
        except OSError as exc:
            logger.warning("instance %s: could not remove %s: %s", self.name, seg.path, exc)
        seg.close()

    # ---- the watcher thread ------------------------------------------------------------------------------------------

    def _watch(self) -> None:
        next_beat = 0.0
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                control = read_part(self._seg.mm, CONTROL_AT, CONTROL)
                if control is not None and control[0] != self._seen_generation:
                    generation, requested = control
                    self._seen_generation = generation
                    error = self._apply(None if requested < 0 else requested)
                    self._write(applied=generation, error=error)
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + HEARTBEAT_S
                    if not self._seg.still_linked():
                        logger.warning("instance %s: its registry segment was removed; limits no longer reach it",
                                       self.name)
                        return
                    self._refresh()
            except Exception:
                logger.exception("instance %s: the registry watcher failed", self.name)

    def _apply(self, limit: Optional[int]) -> bool:
        """apply_limit(limit), logging a failure; returns whether it failed."""
        try:
            self._apply_limit(limit)
            return False
        except Exception:
            logger.exception("instance %s: applying the limit %s failed", self.name, limit)
            return True

    def _refresh(self) -> None:
        """Heartbeat, and the engine's memory unless publish() wrote newer figures meanwhile."""
        published = self._published
        stats = self._stats()
        with self._lock:
            if self._published == published:
                self._values[0:3] = stats.limit_bytes, stats.used_bytes, stats.premapped_bytes
            self._write_locked()

    def _write(self, applied: int, error: bool) -> None:
        with self._lock:
            self._values[4:6] = applied, int(error)
            self._write_locked()

    def _write_locked(self) -> None:
        if not self._closed:
            self._values[3] = time.monotonic_ns()
            self._seq = write_part(self._seg.mm, ENGINE_AT, self._seq, ENGINE, tuple(self._values))


def _device_kind(devices: Sequence[str]) -> bytes:
    """The record's backend for `devices` ("cuda" or "host"); ConfigError unless they are 1 to MAX_DEVICES devices of
    one kind."""
    if not 1 <= len(devices) <= MAX_DEVICES:
        listed = f": {', '.join(map(str, devices))}" if devices else ""
        raise ConfigError(f"a kvcached instance is registered with 1 to {MAX_DEVICES} devices (one per tensor-parallel "
                          f"rank); this one has {len(devices)}{listed}")
    kinds = {parse_device(d).kind for d in devices}
    if len(kinds) != 1:
        raise ConfigError(f"an instance's devices must all be GPUs or all the host, got {', '.join(devices)}")
    return b"cuda" if kinds == {"cuda"} else b"host"


def _link_segment(name: str, image: bytes) -> Segment:
    """Put `image` in place as the segment of `name`: written under a temporary name, then hard-linked (atomic)."""
    path = segment_path(name)
    tmp = create_private(TMP_PREFIX, image)
    try:
        made = os.stat(tmp)
        for _ in range(3):
            try:
                os.link(tmp, path)
            except FileExistsError:
                _claim(name)
                continue
            seg = Segment(path, name, write=True)
            if (seg.stat.st_dev, seg.stat.st_ino) != (made.st_dev, made.st_ino) or seg.mm is None:
                seg.close()
                raise ConfigError(f"IPC name {name!r}: {path} was replaced while it was being made")
            return seg
        raise ConfigError(f"IPC name {name!r}: another instance keeps taking it; pick another KVCACHED_IPC_NAME")
    finally:
        os.unlink(tmp)


def _claim(name: str) -> None:
    """The path of `name` exists: remove it if it is this user's dead segment, else say why the name is taken."""
    seg = open_segment(name)
    if seg is None:
        return
    with seg:
        record = seg.record()
        if record.status == InstanceStatus.DEAD and seg.stat.st_uid == os.geteuid():
            if seg.lock() and seg.record().status == InstanceStatus.DEAD:
                seg.unlink()
            return
    hint = "pick another KVCACHED_IPC_NAME"
    if record.status == InstanceStatus.ALIVE:
        raise ConfigError(f"IPC name {name!r} is in use by a live instance (pid {record.pid}); {hint}")
    if record.status == InstanceStatus.DEAD:
        raise ConfigError(f"IPC name {name!r} belongs to a dead instance of {owner_name(record.uid)}; {hint}")
    raise ConfigError(f"IPC name {name!r} is taken by {seg.path}, {record.status}: {record.reason}; {hint}")


def _weak_closer(registration: Registration) -> Callable[[], None]:
    """A function that closes `registration` if it still exists, holding it only weakly."""
    ref = weakref.ref(registration)

    def release() -> None:
        alive = ref()
        if alive is not None:
            alive.close()

    return release
