"""Virtual-memory backends: `open_vmm("cpu")` for host memory, `open_vmm("cuda:N")` for GPU N."""

from __future__ import annotations

from ..devices import parse_device
from ..errors import NoCudaDriverError
from .base import VirtualMemory
from .host import HostVirtualMemory


def open_vmm(device: str) -> VirtualMemory:
    """The backend for `device`: "cpu", "cuda" (GPU 0) or "cuda:N"."""
    parsed = parse_device(device)
    if not parsed.is_cuda:
        return HostVirtualMemory()
    from .cuda import CudaVirtualMemory  # imported late: cuda-bindings is optional

    try:
        return CudaVirtualMemory(parsed.index)
    except NoCudaDriverError as exc:
        raise NoCudaDriverError(f"device {str(parsed)!r}: {exc}") from None


__all__ = ["VirtualMemory", "HostVirtualMemory", "open_vmm"]
