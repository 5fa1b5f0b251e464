"""Device facts read without mapping anything and without creating a CUDA context.

Note: a process that only decides (vLLM's scheduler, kvctl, kvtop) must not create a CUDA context: that alone costs
hundreds of MB of GPU memory. Free and total memory come from NVML (found by the device's PCI bus id, so the CUDA
index and CUDA_VISIBLE_DEVICES are honoured), granularity from the driver, which answers that without a context.
"""

from __future__ import annotations

import mmap
import re
from functools import lru_cache

from ..errors import NoCudaDriverError
from ..hostmem import host_memory


def _cuda_index(device: str) -> int | None:
    match = re.match(r"^cuda(?::(\d+))?$", device)
    return int(match.group(1) or 0) if match else None


def granularity_of(device: str) -> int:
    index = _cuda_index(device)
    if index is None:
        return mmap.PAGESIZE
    from .cuda import _check, _cu, init_driver

    init_driver()
    from .cuda import CudaVirtualMemory

    prop = CudaVirtualMemory.allocation_prop(index)
    flag = _cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
    return int(_check("cuMemGetAllocationGranularity", _cu.cuMemGetAllocationGranularity(prop, flag)))


@lru_cache(maxsize=None)
def _nvml_handle(index: int):
    try:
        import pynvml
    except ImportError:
        raise NoCudaDriverError("reading GPU memory needs NVML: pip install nvidia-ml-py (or 'kvcached[gpu]')") from None
    from .cuda import _check, _cu, init_driver

    init_driver()
    bus_id = _check("cuDeviceGetPCIBusId", _cu.cuDeviceGetPCIBusId(32, index))
    bus_id = bus_id.decode() if isinstance(bus_id, bytes) else str(bus_id)
    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id.strip("\x00"))


def device_memory(device: str) -> tuple[int, int]:
    """(free, total) bytes of `device`: host memory (or its cgroup's) for "cpu", NVML's figures for "cuda:N"."""
    index = _cuda_index(device)
    if index is None:
        return host_memory()
    import pynvml

    info = pynvml.nvmlDeviceGetMemoryInfo(_nvml_handle(index))
    return int(info.free), int(info.total)
