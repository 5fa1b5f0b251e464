"""Host virtual memory: the VirtualMemory interface over mmap, for CPU engines and for tests without a GPU.

Note: `reserve` maps an inaccessible range (PROT_NONE, MAP_NORESERVE), so it costs address space only. `map` replaces a
piece of it, at the same address, with a readable/writable anonymous mapping populated at once (MAP_POPULATE), so the
memory shows in the process's RSS when map returns, as memory shows in nvidia-smi at cuMemCreate. `unmap` replaces the
piece with an inaccessible one again, which gives the pages back to the OS at once (RSS falls) and makes a stray access
fault instead of reading stale data. libc is reached through ctypes: nothing is compiled.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
import torch

from ..errors import DriverError
from ..hostmem import host_memory
from .base import VirtualMemory

_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MAP_FIXED = 0x10
_PROT_NONE = 0
_MAP_FAILED = ctypes.c_void_p(-1).value
_PRIVATE_ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _mmap(call: str, address: int, size: int, prot: int, flags: int) -> int:
    result = _libc.mmap(address or None, size, prot, flags, -1, 0)
    if result is None or result == _MAP_FAILED:
        errno = ctypes.get_errno()
        message = f"mmap for {call}({address:#x}, {size}) failed: {os.strerror(errno)} (errno {errno})"
        raise DriverError(message, out_of_memory=errno == 12)  # ENOMEM
    return result


class HostVirtualMemory(VirtualMemory):
    def __init__(self) -> None:
        self.device = "cpu"
        self.granularity = mmap.PAGESIZE

    def reserve(self, size: int) -> int:
        self.check_aligned(0, size)
        return _mmap("reserve", 0, size, _PROT_NONE, _PRIVATE_ANON | _MAP_NORESERVE)

    def unreserve(self, address: int, size: int) -> None:
        self.check_aligned(address, size)
        if _libc.munmap(address, size) != 0:
            errno = ctypes.get_errno()
            raise DriverError(f"munmap({address:#x}, {size}) failed: {os.strerror(errno)} (errno {errno})")

    def map(self, address: int, size: int) -> None:
        self.check_aligned(address, size)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        _mmap("map", address, size, prot, _PRIVATE_ANON | _MAP_FIXED | _MAP_POPULATE)

    def unmap(self, address: int, size: int) -> None:
        # CPU kernels run on the caller's threads and have returned by now: nothing is in flight.
        self.check_aligned(address, size)
        _mmap("unmap", address, size, _PROT_NONE, _PRIVATE_ANON | _MAP_FIXED | _MAP_NORESERVE)

    def total_memory(self) -> int:
        return host_memory()[1]

    def free_memory(self) -> int:
        return host_memory()[0]

    def tensor(self, address: int, size: int) -> torch.Tensor:
        # numpy wraps the raw pointer without touching the memory; torch shares numpy's buffer.
        array = np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(ctypes.c_uint8)), shape=(size,))
        return torch.from_numpy(array)
