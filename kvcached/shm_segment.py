"""The registry's segment format and files: names, paths, trust, liveness, seqlocked parts, reading a record.

kvcached/registry.py's notes say where segments live, what a record holds, and why; this module is the mechanism both
the engine's side (Registration) and the operator's side (kvctl, kvtop) stand on. Nothing here imports torch.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import secrets
import stat
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Optional

from .config import read_variable
from .errors import ConfigError

SEGMENT_PREFIX = "kvcached."
LIMIT_PREFIX = "kvcached-limit."
TMP_PREFIX = ".kvcached-tmp."
MAGIC = b"KVCACHED"
FORMAT_VERSION = 1
RECORD_SIZE = 512
WATCH_INTERVAL_S = 0.02  # how often the engine looks for a new requested limit
HEARTBEAT_S = 0.25
STALE_S = 5.0  # heartbeat age after which an instance of another pid namespace is dead
NAME_RULE = "1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, without '..'"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")

# magic, version, record size, name, device, backend, gpu id, pid, start ticks, pid namespace, created (ns since the
# epoch), virtual bytes, device total bytes, page bytes
HEADER = struct.Struct("<8sII64s16s8s48sqQQQQQQ")
ENGINE_AT, CONTROL_AT = 256, 384
SEQ = struct.Struct("<Q")
ENGINE = struct.Struct("<qqqQQq")  # limit, used, premapped, heartbeat (CLOCK_MONOTONIC ns), applied generation, error
CONTROL = struct.Struct("<Qq")  # generation, requested limit (-1: no limit)
OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


# ---- names and paths ---------------------------------------------------------------------------------------------


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise ConfigError(f"invalid IPC name {name!r}: use {NAME_RULE}")
    return name


def default_name() -> str:
    """A name no other instance has: the program's name, the pid and a random suffix (kvcached-1234-9f2c1a)."""
    program = os.path.splitext(os.path.basename(sys.argv[0] if sys.argv else ""))[0]
    program = re.sub(r"[^A-Za-z0-9_-]", "", program).lstrip("_-")[:24]
    return f"{program if len(program) > 1 else 'kvcached'}-{os.getpid()}-{secrets.token_hex(3)}"


def shm_dir() -> str:
    """Where segments live: KVCACHED_IPC_DIR, by default /dev/shm."""
    return read_variable("KVCACHED_IPC_DIR")


def segment_path(name: str) -> str:
    return os.path.join(shm_dir(), SEGMENT_PREFIX + validate_name(name))


def limit_path(name: str) -> str:
    return os.path.join(shm_dir(), LIMIT_PREFIX + validate_name(name))


def ipc_group() -> Optional[int]:
    return read_variable("KVCACHED_IPC_GROUP")


def is_trusted(st: os.stat_result) -> bool:
    """Ours: owned by this uid, or shared through the configured group with exactly mode 0660."""
    if st.st_uid == os.geteuid():
        return True
    group = ipc_group()
    return group is not None and st.st_gid == group and stat.S_IMODE(st.st_mode) == 0o660


def owner_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


# ---- processes -----------------------------------------------------------------------------------------------------


def start_ticks(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    return int(text[text.rindex(b")") + 2 :].split()[19])


def pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def gpu_id_of(device: str) -> str:
    """What NVML knows the GPU behind `device` by: its UUID, or else a CUDA_VISIBLE_DEVICES entry or the index."""
    if not device.startswith("cuda"):
        return ""
    index = int(device.partition(":")[2] or 0)
    try:
        from cuda.bindings import driver as cu  # the engine has initialised the driver; no context is made

        err, dev = cu.cuDeviceGet(index)
        if err == cu.CUresult.CUDA_SUCCESS:
            err, uuid = cu.cuDeviceGetUuid(dev)
            if err == cu.CUresult.CUDA_SUCCESS:
                raw = uuid.bytes if isinstance(uuid.bytes, bytes) else bytes(uuid.bytes, "latin-1")
                h = raw[:16].hex()
                return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    except Exception:  # no bindings, or an API of another version: fall back on the environment
        pass
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


# ---- seqlocked parts -------------------------------------------------------------------------------------------------


def pack_part(seq: int, fields: struct.Struct, values: tuple) -> bytes:
    body = fields.pack(*values)
    return SEQ.pack(seq) + body + zlib.crc32(body).to_bytes(4, "little")


def write_part(buf, at: int, seq: int, fields: struct.Struct, values: tuple) -> int:
    """Seqlock write: odd sequence, body and CRC, even sequence. `seq` is the current (even or stale odd) value."""
    odd = seq | 1
    SEQ.pack_into(buf, at, odd)
    body = fields.pack(*values)
    buf[at + 8 : at + 12 + fields.size] = body + zlib.crc32(body).to_bytes(4, "little")
    SEQ.pack_into(buf, at, odd + 1)
    return odd + 1


def read_part(buf, at: int, fields: struct.Struct, patience_s: float = 0.05) -> Optional[tuple]:
    """A consistent copy of a part, or None if none came within `patience_s` (a writer died in the middle)."""
    deadline = None
    end = at + 8 + fields.size
    for attempt in range(1 << 30):
        seq = SEQ.unpack_from(buf, at)[0]
        blob = bytes(buf[at + 8 : end + 4])
        if not seq & 1 and SEQ.unpack_from(buf, at)[0] == seq:
            body = blob[: fields.size]
            if zlib.crc32(body) == int.from_bytes(blob[fields.size :], "little"):
                return fields.unpack(body)
        now = time.monotonic()
        deadline = deadline or now + patience_s
        if now > deadline:
            return None
        time.sleep(0 if attempt < 100 else 0.0002)
    return None


# ---- reading records -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceRecord:
    """One segment as read now. `status`: alive, dead, foreign (another user's: not read) or invalid (`reason`)."""

    name: str
    status: str
    uid: int
    reason: str = ""
    pid: int = 0
    device: str = ""
    backend: str = ""
    gpu_id: str = ""
    virtual_bytes: int = 0
    device_total_bytes: int = 0
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

    @property
    def alive(self) -> bool:
        return self.status == "alive"

    @property
    def mapped_bytes(self) -> int:
        return self.used_bytes + self.premapped_bytes

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
        d.update(alive=self.alive, mapped_bytes=self.mapped_bytes, free_bytes=self.free_bytes,
                 deficit_bytes=self.deficit_bytes)
        return d


def _decode(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def _parse(buf, name: str, st: os.stat_result) -> InstanceRecord:
    def invalid(reason: str) -> InstanceRecord:
        return InstanceRecord(name=name, status="invalid", uid=st.st_uid, reason=reason)

    (magic, version, size, raw_name, device, backend, gpu_id, pid, ticks, pidns, created, virtual, total,
     page) = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        return invalid("not a kvcached segment (bad magic)")
    if version != FORMAT_VERSION or size != RECORD_SIZE:
        return invalid(f"format version {version} ({size} bytes); this kvcached reads version {FORMAT_VERSION}")
    if _decode(raw_name) != name:
        return invalid(f"holds the name {_decode(raw_name)!r}")
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
    if pidns and pidns != pid_namespace():
        alive = age < STALE_S
    else:
        alive = start_ticks(pid) == ticks
    return InstanceRecord(
        name=name, status="alive" if alive else "dead", uid=st.st_uid, reason=reason, pid=pid, device=_decode(device),
        backend=_decode(backend), gpu_id=_decode(gpu_id), virtual_bytes=virtual, device_total_bytes=total,
        page_bytes=page, limit_bytes=limit, used_bytes=used, premapped_bytes=premapped, heartbeat_age_s=age,
        applied_generation=applied, apply_error=bool(error), requested_generation=generation,
        requested_limit=None if requested < 0 else requested, persisted_limit=read_persisted_limit(name),
        created_ns=created, format_version=version,
    )


class Segment:
    """An open segment file: fd, its stat, and a mapping of its record (writable with `write`)."""

    def __init__(self, path: str, name: str, write: bool = False) -> None:
        self.path, self.name = path, name
        self.fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | OPEN_FLAGS)
        self.mm = None
        try:
            self.stat = os.fstat(self.fd)
            if is_trusted(self.stat) and stat.S_ISREG(self.stat.st_mode) and self.stat.st_size >= RECORD_SIZE:
                access = mmap.ACCESS_WRITE if write else mmap.ACCESS_READ
                self.mm = mmap.mmap(self.fd, RECORD_SIZE, access=access)
        except BaseException:
            os.close(self.fd)
            raise

    def record(self) -> InstanceRecord:
        st = self.stat
        if not is_trusted(st):
            return InstanceRecord(name=self.name, status="foreign", uid=st.st_uid,
                                  reason=f"owned by {owner_name(st.st_uid)}")
        if self.mm is None:
            kind = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"{st.st_size} bytes, too small"
            return InstanceRecord(name=self.name, status="invalid", uid=st.st_uid, reason=kind)
        return _parse(self.mm, self.name, st)

    def lock(self, timeout_s: float = 2.0) -> bool:
        """flock the segment (kvctl's side only; the engine never takes it); False if it stayed busy `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.001)

    def unlock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def still_linked(self) -> bool:
        """Whether the path still names this file (not removed, not replaced by a newer segment)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == (self.stat.st_dev, self.stat.st_ino)

    def unlink(self) -> bool:
        """Remove the path if it still names this file; the caller holds the lock."""
        if not self.still_linked():
            return False
        os.unlink(self.path)
        return True

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
        os.close(self.fd)  # also drops the flock

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_segment(name: str, write: bool = False) -> Optional[Segment]:
    path = segment_path(name)
    try:
        return Segment(path, name, write)
    except FileNotFoundError:
        return None
    except PermissionError:
        return None if not os.path.lexists(path) else _Unreadable(path, name)
    except OSError as exc:  # a symlink (ELOOP) or some other odd file under our prefix
        return _Unreadable(path, name, str(exc))


class _Unreadable(Segment):
    """A path under the prefix that could not be opened: another user's file, or a link."""

    def __init__(self, path: str, name: str, reason: str = "") -> None:
        self.path, self.name, self.mm, self.fd = path, name, None, -1
        self.stat = os.lstat(path)
        self.reason = reason

    def record(self) -> InstanceRecord:
        if self.reason and self.stat.st_uid == os.geteuid():
            return InstanceRecord(name=self.name, status="invalid", uid=self.stat.st_uid, reason=self.reason)
        return InstanceRecord(name=self.name, status="foreign", uid=self.stat.st_uid,
                              reason=f"owned by {owner_name(self.stat.st_uid)}")

    def close(self) -> None:
        pass


# ---- the operator's persisted limit ----------------------------------------------------------------------------------


def read_persisted_limit(name: str) -> Optional[int]:
    """The limit an operator set for `name`, or None. A file not ours or not well formed is ignored."""
    try:
        fd = os.open(limit_path(name), os.O_RDONLY | OPEN_FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not (is_trusted(st) and stat.S_ISREG(st.st_mode)):
            return None
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return int(text) if text.isdigit() else None


def _file_mode() -> tuple[int, Optional[int]]:
    group = ipc_group()
    return (0o600, None) if group is None else (0o660, group)


def create_private(prefix: str, content: bytes) -> str:
    """A new file `prefix`<random> in shm_dir() with `content`, mode 0600 (0660 and the group when one is set)."""
    mode, group = _file_mode()
    path = os.path.join(shm_dir(), f"{prefix}{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, 0o600)
    try:
        if group is not None:
            os.fchown(fd, -1, group)
        os.fchmod(fd, mode)  # after fchown, which may clear mode bits; and the umask does not apply
        os.write(fd, content)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path
