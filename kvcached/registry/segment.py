"""Registry files as open objects: a segment's fd and mapping, its flock, the operator's saved limit, private files.

Note: the shared sticky directory is handled at each open: O_NOFOLLOW, a regular file that names.is_trusted accepts,
then the record's own checks (records.py). A file is written whole under a temporary name and renamed or hard-linked
into place: nobody sees half a header, and two instances cannot both take a name. flock on a segment is kvctl's side
only; the engine never takes it, so an operator can never stall an engine.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import stat
import time
from typing import Optional

from ..errors import RegistryError

from .format import HEADER, RECORD_SIZE
from .names import TMP_PREFIX, ipc_group, is_trusted, limit_path, owner_name, segment_path, shm_dir
from .records import InstanceRecord, InstanceStatus, parse_record

OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class Segment:
    """An open segment file: fd, its stat, and a mapping of its record (writable with `write`)."""

    def __init__(self, path: str, name: str, write: bool = False) -> None:
        self.path, self.name = path, name
        self.fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | OPEN_FLAGS)
        self.mm = None
        try:
            self.stat = os.fstat(self.fd)
            if is_trusted(self.stat) and stat.S_ISREG(self.stat.st_mode) and self.stat.st_size >= HEADER.size:
                access = mmap.ACCESS_WRITE if write else mmap.ACCESS_READ
                # A header is enough to tell an older format's segment; parse_record checks the whole record's size.
                self.mm = mmap.mmap(self.fd, min(self.stat.st_size, RECORD_SIZE), access=access)
        except BaseException:
            os.close(self.fd)
            raise

    def record(self) -> InstanceRecord:
        st = self.stat
        if not is_trusted(st):
            return InstanceRecord(name=self.name, status=InstanceStatus.FOREIGN, uid=st.st_uid,
                                  reason=f"owned by {owner_name(st.st_uid)}")
        if self.mm is None:
            kind = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"{st.st_size} bytes, too small"
            return InstanceRecord(name=self.name, status=InstanceStatus.INVALID, uid=st.st_uid, reason=kind)
        return parse_record(self.mm, self.name, st, read_persisted_limit)

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
            return InstanceRecord(name=self.name, status=InstanceStatus.INVALID, uid=self.stat.st_uid,
                                  reason=self.reason)
        return InstanceRecord(name=self.name, status=InstanceStatus.FOREIGN, uid=self.stat.st_uid,
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


def persist_limit(name: str, limit: Optional[int]) -> None:
    """Save (None: remove) the operator's limit for `name`, replacing the file whole."""
    if limit is None:
        remove_limit_file(name)
        return
    path = limit_path(name)
    tmp = create_private(TMP_PREFIX, f"{limit}\n".encode())
    try:
        os.rename(tmp, path)
    except OSError as exc:
        os.unlink(tmp)
        raise RegistryError(f"cannot save the limit of {name!r} in {path}: {exc.strerror}") from None


def remove_limit_file(name: str) -> bool:
    """Remove the saved limit of `name`; False when there was none. Never another user's file."""
    path = limit_path(name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not is_trusted(st):
        raise RegistryError(f"{path} is owned by {owner_name(st.st_uid)}; kvctl changes only its own user's files")
    os.unlink(path)
    return True
