"""Virtual-memory backends: `open_vmm("cpu")` for host memory, `open_vmm("cuda:N")` for GPU N."""

from __future__ import annotations

import re

from .base import VirtualMemory
from .host import HostVirtualMemory

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def open_vmm(device: str) -> VirtualMemory:
    """The backend for `device`: "cpu", "cuda" (GPU 0) or "cuda:N"."""
    match = _DEVICE.match(str(device).strip())
    if not match:
        raise ValueError(f"device {device!r} is not one of 'cpu', 'cuda', 'cuda:N'")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        if index is not None:
            raise ValueError(f"device {device!r}: the host backend has no index, use 'cpu'")
        return HostVirtualMemory()
    from .cuda import CudaVirtualMemory  # imported late: cuda-bindings is optional

    return CudaVirtualMemory(int(index or 0))


__all__ = ["VirtualMemory", "HostVirtualMemory", "open_vmm"]
