"""Devices as kvcached names them ("cpu", "cuda:N") and shows a list of them ("cuda:0,1", "cpu x2"), which GPU a CUDA
index is, and NVML's memory figures.

Note: one parser for device strings, so that every layer agrees on what "cuda" means (GPU 0) and refuses the same
typos. GPU memory for processes that only decide or watch (vLLM's scheduler, kvctl, kvtop) comes from NVML, never
from a CUDA context, which alone costs hundreds of MB of GPU memory (a lesson from the old kvcached's monitor).
NVML is imported on first use (nvidia-ml-py is optional); nothing here imports torch. A GPU is named across
processes by its UUID, which the driver gives without a context; CUDA indexes depend on CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import os
import re
import threading
from typing import NamedTuple, Optional, Sequence

from .errors import NoCudaDriverError

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


class Device(NamedTuple):
    kind: str  # "cpu" or "cuda"
    index: int  # the CUDA index (after CUDA_VISIBLE_DEVICES); 0 for the host

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"


def parse_device(text: object) -> Device:
    """"cpu", "cuda" (GPU 0) or "cuda:N"; ValueError naming the text for anything else."""
    match = _DEVICE.match(str(text).strip())
    if not match:
        raise ValueError(f"device {text!r} is not one of 'cpu', 'cuda', 'cuda:N'")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        if index is not None:
            raise ValueError(f"device {text!r}: the host backend has no index, use 'cpu'")
        return Device("cpu", 0)
    return Device("cuda", int(index or 0))


def devices_label(devices: Sequence[str]) -> str:
    """How the tools show an instance's devices (one per tensor-parallel rank): "cuda:0", "cuda:0,1", "cpu x2"."""
    if len(set(devices)) == 1:
        return devices[0] if len(devices) == 1 else f"{devices[0]} x{len(devices)}"
    try:
        parsed = [parse_device(d) for d in devices]
    except ValueError:  # read from a record: never fail to show it
        parsed = []
    if parsed and all(p.is_cuda for p in parsed):
        return "cuda:" + ",".join(str(p.index) for p in parsed)
    return ",".join(devices)


def gpu_id_of(device: str) -> str:
    """What NVML knows the GPU behind `device` by: its UUID, or else a CUDA_VISIBLE_DEVICES entry or the index
    ("" for the host)."""
    parsed = parse_device(device)
    if not parsed.is_cuda:
        return ""
    try:
        from cuda.bindings import driver as cu  # the engine has initialised the driver; no context is made

        err, dev = cu.cuDeviceGet(parsed.index)
        if err == cu.CUresult.CUDA_SUCCESS:
            err, uuid = cu.cuDeviceGetUuid(dev)
            if err == cu.CUresult.CUDA_SUCCESS:
                raw = uuid.bytes if isinstance(uuid.bytes, bytes) else bytes(uuid.bytes, "latin-1")
                h = raw[:16].hex()
                return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    except Exception:  # no bindings, or an API of another version: fall back on the environment
        pass
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[parsed.index] if parsed.index < len(visible) else str(parsed.index)


class GpuMemory(NamedTuple):
    label: str  # "GPU0 NVIDIA H100 80GB HBM3"
    free: int
    total: int


class Nvml:
    """NVML, initialised on first use (NoCudaDriverError when it cannot be), shut down by close()."""

    def __init__(self) -> None:
        self._nvml = None
        self._lock = threading.Lock()

    def _module(self):
        with self._lock:
            if self._nvml is None:
                try:
                    import pynvml
                except ImportError:
                    raise NoCudaDriverError(
                        "reading GPU memory needs NVML: pip install nvidia-ml-py (or 'kvcached[gpu]')") from None
                try:
                    pynvml.nvmlInit()
                except Exception as exc:  # NVMLError when there is no driver
                    raise NoCudaDriverError(f"NVML unavailable ({exc or type(exc).__name__})") from None
                self._nvml = pynvml
            return self._nvml

    def memory(self, gpu: str) -> GpuMemory:
        """Memory of a GPU named by NVML index ("0"), UUID ("GPU-...") or PCI bus id ("0000:3b:00.0")."""
        nvml = self._module()
        if gpu.isdigit():
            handle = nvml.nvmlDeviceGetHandleByIndex(int(gpu))
        elif gpu.startswith(("GPU-", "MIG-")):
            handle = nvml.nvmlDeviceGetHandleByUUID(gpu)
        else:
            handle = nvml.nvmlDeviceGetHandleByPciBusId(gpu)
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        name = nvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        return GpuMemory(f"GPU{nvml.nvmlDeviceGetIndex(handle)} {name}", int(info.free), int(info.total))

    def close(self) -> None:
        with self._lock:
            if self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except Exception:
                    pass
                self._nvml = None


_shared: Optional[Nvml] = None


def shared_nvml() -> Nvml:
    """The process's NVML reader for library code (kept open: NVML's init costs milliseconds)."""
    global _shared
    if _shared is None:
        _shared = Nvml()
    return _shared
