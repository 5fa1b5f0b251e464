"""Device memory for kvtop's device bars: GPUs through NVML (kvcached/devices.py), the host through /proc/meminfo.

Note: a GPU NVML cannot read (no nvidia-ml-py, no driver, an unknown UUID) gets a bar with the reason instead of
numbers, so kvtop runs on machines without NVML. Each instance's record names the GPU of each of its ranks by UUID
(or CUDA_VISIBLE_DEVICES entry, or index), so the bars are the right GPUs, not GPU 0. Each bar also carries the KV
the live instances hold on that device, an instance counted once per rank there: a tensor-parallel instance on
cuda:0,1 on both GPUs' bars, one on the host with two ranks twice on the host's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from itertools import zip_longest
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
    kv: int = 0  # bytes the live kvcached instances have mapped on it


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


def _gpus_of(record: InstanceRecord) -> list[str]:
    """NVML's name of each rank's GPU: its recorded id, else the CUDA index."""
    gpus = []
    for device, gpu_id in zip_longest(record.devices, record.gpu_ids, fillvalue=""):
        try:
            gpus.append(gpu_id or str(parse_device(device).index))
        except ValueError:
            gpus.append("0")
    return gpus


def device_memory(records: Iterable[InstanceRecord], nvml: Nvml) -> list[DeviceMemory]:
    """One bar per device the readable instances use: the host first, then each GPU once, each with the KV mapped
    there by the live instances (once per rank on that device)."""
    records = [r for r in records if r.status in (InstanceStatus.ALIVE, InstanceStatus.DEAD)]
    host = [r for r in records if r.backend == "host"]
    gpu_kv: Counter = Counter()
    for r in records:
        if r.backend == "cuda":
            for gpu in _gpus_of(r):
                gpu_kv[gpu] += r.mapped_bytes if r.alive else 0
    bars = [replace(host_memory(), kv=sum(r.total_mapped_bytes for r in host if r.alive))] if host else []
    return bars + [replace(gpu_memory(nvml, gpu), kv=gpu_kv[gpu]) for gpu in sorted(gpu_kv)]
