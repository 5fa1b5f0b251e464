"""The 512-byte record of one instance, and the seqlock that lets readers copy it while the engine writes.

Note (format): 512 bytes, little-endian, in three parts. The header (offset 0) never changes after the segment is
linked into place. The engine part (offset 256: sequence, limit, used, premapped, heartbeat, applied generation,
apply error, CRC32) is written only by the engine: by publish(), under the page allocator's lock, and by the watcher
thread, the two kept apart by a thread lock (no syscall when free; never a file lock). The control part (offset 384:
sequence, generation, requested limit, CRC32) is written only by kvctl, under flock on the segment, which the engine
never takes. Each part is a seqlock: the writer makes its sequence odd, writes, makes it even; a reader retries while
the sequence is odd or moved, or the CRC (which also covers weakly ordered CPUs, where CPython's stores are not
fenced) does not match. The two writers never share a word, so neither loses the other's update, and the generation
makes each request distinct.
"""

from __future__ import annotations

import struct
import time
import zlib
from typing import Optional

MAGIC = b"KVCACHED"
FORMAT_VERSION = 1
RECORD_SIZE = 512
WATCH_INTERVAL_S = 0.02  # how often the engine looks for a new requested limit
HEARTBEAT_S = 0.25
STALE_S = 5.0  # heartbeat age after which an instance of another pid namespace is dead

# magic, version, record size, name, device, backend, gpu id, pid, start ticks, pid namespace, created (ns since the
# epoch), virtual bytes, device total bytes, page bytes
HEADER = struct.Struct("<8sII64s16s8s48sqQQQQQQ")
ENGINE_AT, CONTROL_AT = 256, 384
SEQ = struct.Struct("<Q")
ENGINE = struct.Struct("<qqqQQq")  # limit, used, premapped, heartbeat (CLOCK_MONOTONIC ns), applied generation, error
CONTROL = struct.Struct("<Qq")  # generation, requested limit (-1: no limit)


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
