"""Device memory for kvtop's device bars: GPUs through NVML (kvcached/devices.py), the host through /proc/meminfo.

Note: a GPU NVML cannot read (no nvidia-ml-py, no driver, an unknown UUID) gets a bar with the reason instead of
numbers, so kvtop runs on machines without NVML. Each instance's record names its GPU by UUID (or
CUDA_VISIBLE_DEVICES entry, or index), so the bar is the right GPU, not GPU 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .. import hostmem
from ..devices import Nvml, parse_device
from ..errors import NoCudaDriverError
from ..registry import InstanceRecord, InstanceStatus


@dataclass(frozen=True)
class DeviceMemory:
    label: str
    total: int = 0
    used: int = 0
    error: str = ""


def host_memory() -> DeviceMemory:
    free, total = hostmem.host_memory()
    return DeviceMemory("HOST", total, total - free)


def gpu_memory(nvml: Nvml, gpu_id: str) -> DeviceMemory:
    try:
        gpu = nvml.memory(gpu_id)
    except NoCudaDriverError as exc:  # no nvidia-ml-py, or no driver
        return DeviceMemory(f"GPU {gpu_id}", error=str(exc))
    except Exception as exc:  # NVMLError, for a GPU it does not know
        return DeviceMemory(f"GPU {gpu_id}", error=f"NVML: {exc or type(exc).__name__}")
    return DeviceMemory(gpu.label, gpu.total, gpu.total - gpu.free)


def _gpu_of(record: InstanceRecord) -> str:
    if record.gpu_id:
        return record.gpu_id
    try:
        return str(parse_device(record.device).index)
    except ValueError:
        return "0"


def device_memory(records: Iterable[InstanceRecord], nvml: Nvml) -> list[DeviceMemory]:
    """One bar per device the readable instances use: the host first, then each GPU once."""
    records = [r for r in records if r.status in (InstanceStatus.ALIVE, InstanceStatus.DEAD)]
    bars = [host_memory()] if any(r.backend == "host" for r in records) else []
    gpus = sorted({_gpu_of(r) for r in records if r.backend == "cuda"})
    return bars + [gpu_memory(nvml, gpu) for gpu in gpus]
