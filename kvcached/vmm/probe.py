"""Device facts read without mapping anything and without creating a CUDA context.

Note: a process that only decides (vLLM's scheduler) must not create a CUDA context: that alone costs hundreds of MB
of GPU memory. Free and total memory come from NVML (kvcached/devices.py), the GPU found by its PCI bus id so that the
CUDA index and CUDA_VISIBLE_DEVICES are honoured; granularity comes from the driver, which answers without a context.
"""

from __future__ import annotations

import mmap
from functools import lru_cache

from ..devices import parse_device, shared_nvml
from ..hostmem import host_memory


def granularity_of(device: str) -> int:
    parsed = parse_device(device)
    if not parsed.is_cuda:
        return mmap.PAGESIZE
    from .cuda import CudaVirtualMemory, _check, _cu, init_driver

    init_driver()
    prop = CudaVirtualMemory.allocation_prop(parsed.index)
    flag = _cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
    return int(_check("cuMemGetAllocationGranularity", _cu.cuMemGetAllocationGranularity(prop, flag)))


@lru_cache(maxsize=None)
def _pci_bus_id(index: int) -> str:
    from .cuda import _check, _cu, init_driver

    init_driver()
    bus_id = _check("cuDeviceGetPCIBusId", _cu.cuDeviceGetPCIBusId(32, index))
    return (bus_id.decode() if isinstance(bus_id, bytes) else str(bus_id)).strip("\x00")


def device_memory(device: str) -> tuple[int, int]:
    """(free, total) bytes of `device`: host memory (or its cgroup's) for "cpu", NVML's figures for "cuda:N"."""
    parsed = parse_device(device)
    if not parsed.is_cuda:
        return host_memory()
    gpu = shared_nvml().memory(_pci_bus_id(parsed.index))
    return gpu.free, gpu.total
