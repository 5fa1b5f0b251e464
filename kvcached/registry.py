"""Shared-memory registry: one record per KV cache instance, read by kvctl and kvtop, and the limit an operator sets.

Note (where): one file per instance, /dev/shm/kvcached.<name>, and beside it the operator's limit for that name,
/dev/shm/kvcached-limit.<name>, which outlives the instance so that a restart under the same name keeps it. /dev/shm
is a tmpfs (records never touch a disk); KVCACHED_IPC_DIR names another directory (containers, tests). A flat prefix
rather than a per-user directory, so that an operator sees every engine of the machine: its own user's, and other
users' as "foreign" (listed, never read, trusted or written). The shared sticky directory is handled at each open:
O_NOFOLLOW, a regular file owned by this uid (or by the KVCACHED_IPC_GROUP group with mode 0660), magic and format
version checked, the name inside equal to the file's: a segment is never found by its size. Names are 1-64 of
[A-Za-z0-9._-] without "..", so every path stays inside the directory. A segment is written whole under a temporary
name and hard-linked into place: nobody sees half a header, and two instances cannot both take a name.

Note (format): 512 bytes, little-endian, in three parts. The header (offset 0) never changes after the link. The
engine part (offset 256: sequence, limit, used, premapped, heartbeat, applied generation, apply error, CRC32) is
written only by the engine: by publish(), under the page allocator's lock, and by the watcher thread, the two kept
apart by a thread lock (no syscall when free; never a file lock). The control part (offset 384: sequence, generation,
requested limit, CRC32) is written only by kvctl, under flock on the segment, which the engine never takes. Each part
is a seqlock: the writer makes its sequence odd, writes, makes it even; a reader retries while the sequence is odd or
moved, or the CRC (which also covers weakly ordered CPUs, where CPython's stores are not fenced) does not match. The
two writers never share a word, so neither loses the other's update, and the generation makes each request distinct.

Note (liveness): an instance is alive while a process with its pid and the same start time (/proc/<pid>/stat field
22) exists, so a reused pid is not taken for it. An instance in another pid namespace (a container sharing /dev/shm)
cannot be checked that way: it counts as alive while its heartbeat, written every 0.25 s, is younger than 5 s.
Dead segments of this uid are removed by `kvctl delete|clean` and by every instance that starts, under flock and
after checking that the path still names the same file, so a racing start never removes a live segment.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from .errors import ConfigError, KVCachedError
from .shm_segment import (
    CONTROL, CONTROL_AT, ENGINE, ENGINE_AT, FORMAT_VERSION, HEADER, HEARTBEAT_S, LIMIT_PREFIX, MAGIC, NAME_PATTERN,
    NAME_RULE, RECORD_SIZE, SEGMENT_PREFIX, SEQ, STALE_S, TMP_PREFIX, WATCH_INTERVAL_S, InstanceRecord,
    Segment, create_private, default_name, gpu_id_of, is_trusted, limit_path, open_segment, owner_name, pack_part,
    pid_namespace, read_part, read_persisted_limit, segment_path, shm_dir, start_ticks, validate_name, write_part,
)

if TYPE_CHECKING:
    from .page_allocator import MemoryStats

__all__ = [
    "FORMAT_VERSION", "HEARTBEAT_S", "LIMIT_PREFIX", "NAME_RULE", "RECORD_SIZE", "SEGMENT_PREFIX", "STALE_S",
    "WATCH_INTERVAL_S", "InstanceRecord", "LimitRequest", "Registration", "RegistryError", "clean_dead",
    "default_name", "delete", "limit_path", "list_instances", "read_instance", "read_persisted_limit",
    "request_limit", "segment_path", "shm_dir", "validate_name",
]

logger = logging.getLogger("kvcached")


class RegistryError(KVCachedError):
    """An instance is unknown, foreign, alive where it must be dead, or its segment is unreadable."""


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
            if entry.name.startswith(SEGMENT_PREFIX) and NAME_PATTERN.match(name) and ".." not in name:
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


def _persist_limit(name: str, limit: Optional[int]) -> None:
    path = limit_path(name)
    if limit is None:
        _remove_limit_file(name)
        return
    tmp = create_private(TMP_PREFIX, f"{limit}\n".encode())
    try:
        os.rename(tmp, path)
    except OSError as exc:
        os.unlink(tmp)
        raise RegistryError(f"cannot save the limit of {name!r} in {path}: {exc.strerror}") from None


def _remove_limit_file(name: str) -> bool:
    path = limit_path(name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not is_trusted(st):
        raise RegistryError(f"{path} is owned by {owner_name(st.st_uid)}; kvctl changes only its own user's files")
    os.unlink(path)
    return True


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
    if record.status in ("foreign", "invalid"):
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
        _persist_limit(name, limit_bytes)
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
            if record.status == "foreign":
                raise RegistryError(f"instance {name!r} is owned by {owner_name(record.uid)}; it is not changed")
            if record.status != "dead" and not force:
                why = f"alive (pid {record.pid})" if record.alive else f"invalid ({record.reason})"
                raise RegistryError(f"instance {name!r} is {why}; stop it first, or use --force")
            if seg.fd >= 0:
                if not seg.lock():
                    raise RegistryError(f"instance {name!r}: its segment stayed locked by another kvctl for 2 s")
                seg.unlink()
            else:
                os.unlink(seg.path)  # our own symlink or other non-file: never followed
    if not _remove_limit_file(name) and record is None:
        raise RegistryError(f"unknown instance {name!r} (see 'kvctl list')")
    return record


def clean_dead() -> list[str]:
    """Remove this user's segments whose process is gone (and stale temporary files); returns the names removed."""
    removed = []
    for name in _segment_names():
        try:
            seg = open_segment(name)
        except OSError:
            continue
        if seg is None:
            continue
        with seg:
            if seg.stat.st_uid != os.geteuid() or seg.record().status != "dead":
                continue
            if seg.lock(timeout_s=0) and seg.record().status == "dead" and seg.unlink():  # checked again, locked
                removed.append(name)
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


# ---- what the engine does --------------------------------------------------------------------------------------------


class Registration:
    """This process's segment for one KV cache instance; made by KVCacheManager (see the module's notes)."""

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

    @classmethod
    def open(cls, name: Optional[str], *, device: str, virtual_bytes: int, device_total_bytes: int,
             explicit_limit: Optional[int], stats: Callable[[], "MemoryStats"],
             apply_limit: Callable[[Optional[int]], None]) -> "Registration":
        name = default_name() if name is None else validate_name(name)
        clean_dead()
        first = stats()
        header = HEADER.pack(
            MAGIC, FORMAT_VERSION, RECORD_SIZE, name.encode(), device.encode()[:16],
            (b"host" if device == "cpu" else b"cuda"), gpu_id_of(device).encode()[:48], os.getpid(),
            start_ticks(os.getpid()) or 0, pid_namespace(), time.time_ns(), virtual_bytes, device_total_bytes,
            first.page_bytes,
        )
        image = bytearray(RECORD_SIZE)
        image[: len(header)] = header
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
        if record.status == "dead" and seg.stat.st_uid == os.geteuid():
            if seg.lock() and seg.record().status == "dead":
                seg.unlink()
            return
    hint = "pick another KVCACHED_IPC_NAME"
    if record.status == "alive":
        raise ConfigError(f"IPC name {name!r} is in use by a live instance (pid {record.pid}); {hint}")
    if record.status == "dead":
        raise ConfigError(f"IPC name {name!r} belongs to a dead instance of {owner_name(record.uid)}; {hint}")
    raise ConfigError(f"IPC name {name!r} is taken by {seg.path}, {record.status}: {record.reason}; {hint}")
