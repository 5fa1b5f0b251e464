"""Where registry files live and who may use them: names, paths, trust.

Note: one file per instance, <dir>/kvcached.<name>, and beside it the operator's limit for that name,
<dir>/kvcached-limit.<name>, which outlives the instance so that a restart under the same name keeps it. The
directory is /dev/shm, a tmpfs (records never touch a disk), or KVCACHED_IPC_DIR (containers, tests). A flat prefix
rather than a per-user directory, so that an operator sees every engine of the machine: its own user's, and other
users' as "foreign" (listed, never read, trusted or written). Names are 1-64 of [A-Za-z0-9._-] without "..", so every
path stays inside the directory. A file is trusted when this uid owns it, or the KVCACHED_IPC_GROUP group does with
exactly mode 0660.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import sys
from typing import Optional

from ..config import read_variable
from ..errors import ConfigError

SEGMENT_PREFIX = "kvcached."
LIMIT_PREFIX = "kvcached-limit."
TMP_PREFIX = ".kvcached-tmp."
NAME_RULE = "1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, without '..'"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise ConfigError(f"invalid IPC name {name!r}: use {NAME_RULE}")
    return name


def is_valid_name(name: str) -> bool:
    return bool(NAME_PATTERN.match(name)) and ".." not in name


def default_name() -> str:
    """A name no other instance has: the program's name, the pid and a random suffix (kvcached-1234-9f2c1a)."""
    program = os.path.splitext(os.path.basename(sys.argv[0] if sys.argv else ""))[0]
    program = re.sub(r"[^A-Za-z0-9_-]", "", program).lstrip("_-")[:24]
    return f"{program if len(program) > 1 else 'kvcached'}-{os.getpid()}-{secrets.token_hex(3)}"


def shm_dir() -> str:
    """Where segments live: KVCACHED_IPC_DIR, by default /dev/shm (read at each call: tools and tests change it)."""
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
