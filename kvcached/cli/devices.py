"""Device memory for kvtop's device bars: GPUs through NVML, the host through /proc/meminfo.

Note: NVML (pynvml, from the nvidia-ml-py package) reads memory without creating a CUDA context, which would cost a few
hundred MB of GPU memory per tool (a lesson from the old kvcached's monitor). It is imported on first use, so kvtop
runs on machines without it; a GPU it cannot read gets a bar with the reason instead of numbers. Each instance's
record names its GPU by UUID (or CUDA_VISIBLE_DEVICES entry, or index), so the bar is the right GPU, not GPU 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .. import hostmem
from ..registry import InstanceRecord


@dataclass(frozen=True)
class DeviceMemory:
    label: str
    total: int = 0
    used: int = 0
    error: str = ""


def host_memory() -> DeviceMemory:
    free, total = hostmem.host_memory()
    return DeviceMemory("HOST", total, total - free)


class Nvml:
    """NVML, initialised on first use and shut down by close()."""

    def __init__(self) -> None:
        self._nvml = None
        self._error = ""

    def _init(self):
        if self._nvml is None and not self._error:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception as exc:  # ImportError, or NVMLError when there is no driver
                self._error = f"NVML unavailable ({exc or type(exc).__name__})"
        return self._nvml

    def memory(self, gpu_id: str) -> DeviceMemory:
        nvml = self._init()
        if nvml is None:
            return DeviceMemory(f"GPU {gpu_id}", error=self._error)
        try:
            if gpu_id.isdigit():
                handle = nvml.nvmlDeviceGetHandleByIndex(int(gpu_id))
            else:
                handle = nvml.nvmlDeviceGetHandleByUUID(gpu_id)
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            return DeviceMemory(f"GPU{nvml.nvmlDeviceGetIndex(handle)} {name}", int(info.total), int(info.used))
        except Exception as exc:
            return DeviceMemory(f"GPU {gpu_id}", error=f"NVML: {exc or type(exc).__name__}")

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None


def device_memory(records: Iterable[InstanceRecord], nvml: Nvml) -> list[DeviceMemory]:
    """One bar per device the readable instances use: the host first, then each GPU once."""
    records = [r for r in records if r.status in ("alive", "dead")]
    bars = [host_memory()] if any(r.backend == "host" for r in records) else []
    gpus = sorted({r.gpu_id or r.device.partition(":")[2] or "0" for r in records if r.backend == "cuda"})
    return bars + [nvml.memory(gpu) for gpu in gpus]
