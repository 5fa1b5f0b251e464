"""The 1024-byte record of one instance, and the seqlock that lets readers copy it while the engine writes.

Note (format): 1024 bytes, little-endian, in four parts. The header (offset 0) and the devices part (offset 512) are
written once, before the segment is linked into place, and never change. The devices part lists the instance's
devices in tensor-parallel rank order, one entry per rank (device name, and the GPU id of devices.gpu_id_of, "" for
the host), at most MAX_DEVICES; the header holds their number, and rank 0's device and GPU id for readers that want
one. The engine part (offset 256: sequence, limit, used, premapped, heartbeat, applied generation, apply error,
CRC32) is written only by the engine: by publish(), under the page allocator's lock, and by the watcher thread, the
two kept apart by a thread lock (no syscall when free; never a file lock). Its figures are one device's: every rank
maps the same pages. The control part (offset 384: sequence, generation, requested limit, CRC32) is written only by
kvctl, under flock on the segment, which the engine never takes. Each of these two parts is a seqlock: the writer
makes its sequence odd, writes, makes it even; a reader retries while the sequence is odd or moved, or the CRC (which
also covers weakly ordered CPUs, where CPython's stores are not fenced) does not match. The two writers never share a
word, so neither loses the other's update, and the generation makes each request distinct. Version 1 (512 bytes, one
device) is not read: such a segment lists as invalid while its process lives, and as dead (to be cleaned) once it is
gone; its header is this one's without the device count.
"""

from __future__ import annotations

import struct
import time
import zlib
from typing import Optional

MAGIC = b"KVCACHED"
FORMAT_VERSION = 2
RECORD_SIZE = 1024
WATCH_INTERVAL_S = 0.02  # how often the engine looks for a new requested limit
HEARTBEAT_S = 0.25
STALE_S = 5.0  # heartbeat age after which an instance of another pid namespace is dead

# magic, version, record size, name, device, backend, gpu id, pid, start ticks, pid namespace, created (ns since the
# epoch), virtual bytes, device total bytes (one device's), page bytes, number of devices
HEADER = struct.Struct("<8sII64s16s8s48sqQQQQQQI")
ENGINE_AT, CONTROL_AT, DEVICES_AT = 256, 384, 512
DEVICE = struct.Struct("<16s48s")  # one rank's device name and GPU id
MAX_DEVICES = (RECORD_SIZE - DEVICES_AT) // DEVICE.size  # 8
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
