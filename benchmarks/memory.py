"""Sample the memory of running servers in a background thread: RSS/PSS on CPU, per-process NVML memory on GPU.

Note (why): the demo's claim is about memory over time, measured from outside the engine, the same way for kvcached
on and off. Approach: a thread wakes at a fixed rate (5 Hz by default) and, for every watched server, sums over its
process tree (API server, EngineCore, Worker): RSS from /proc/<pid>/statm (cheap), PSS from /proc/<pid>/smaps_rollup
(walks page tables: ~60 ms for a Worker holding a 2 GiB pool, so it is read every `pss_every_s`, not every sample),
on a GPU the memory NVML reports per process (pynvml, imported lazily; NVML never creates a CUDA context), and, for
kvcached instances, their used and premapped KV bytes from the registry (benchmarks/registry_view.py, by name).
Each sample is one flat dict, so the whole run can be written as JSON and plotted. PSS is read by a second thread
into records of its own ({t, server, pss}): smaps_rollup takes the process's mmap lock, which a Worker mapping KV pages may hold for
a long time under CPU contention, and that must never stall the 5 Hz samples (statm and /proc/<pid>/comm take no
such lock; the process tree is listed every TREE_REFRESH_S).

Limits: RSS counts shared pages (libraries, the model file mapping) in every process of a tree, PSS divides them; both
include the model weights and the runtime, so KV memory is the movement above the idle level, not the absolute value.
On GPU only processes NVML reports (those with a context on the device) are counted.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from benchmarks.registry_view import kv_bytes

PAGE = os.sysconf("SC_PAGE_SIZE")
TREE_REFRESH_S = 2.0  # listing a process tree scans /proc: not every sample


def read_rss(pid: int) -> Optional[int]:
    """Resident bytes of one process (statm field 2), None if it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return None


def read_pss(pid: int) -> Optional[int]:
    """Proportional set size in bytes (smaps_rollup), None if unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def machine_memory() -> dict:
    """MemTotal and MemAvailable of this machine in bytes (from /proc/meminfo)."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                out[key] = int(rest.split()[0]) * 1024
    return {"total": out.get("MemTotal", 0), "available": out.get("MemAvailable", 0)}


class Nvml:
    """Per-process GPU memory through NVML (pynvml / nvidia-ml-py). No CUDA context is created."""

    def __init__(self, index: int) -> None:
        """Raises RuntimeError saying what is missing: nvidia-ml-py, a driver, or GPU `index`."""
        try:
            import pynvml  # lazily: only where a GPU and nvidia-ml-py exist
        except ImportError as e:
            raise RuntimeError("GPU memory is read through NVML: pip install nvidia-ml-py") from e
        self.nv = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise RuntimeError(f"NVML cannot start (no NVIDIA driver?): {e}") from e
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        if not 0 <= index < len(self.handles):
            self.close()
            raise RuntimeError(f"there is no GPU {index}: NVML sees {len(self.handles)}")

    def device_memory(self, index: int) -> dict:
        info = self.nv.nvmlDeviceGetMemoryInfo(self.handles[index])
        return {"total": int(info.total), "used": int(info.used), "free": int(info.free)}

    def process_memory(self, index: int) -> dict[int, int]:
        """pid -> used GPU bytes on device `index` (compute processes)."""
        out: dict[int, int] = {}
        getters = ["nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2",
                   "nvmlDeviceGetComputeRunningProcesses"]
        for name in getters:
            fn = getattr(self.nv, name, None)
            if fn is None:
                continue
            try:
                procs = fn(self.handles[index])
            except self.nv.NVMLError:
                continue
            for p in procs:
                used = p.usedGpuMemory
                if used is not None:
                    out[int(p.pid)] = out.get(int(p.pid), 0) + int(used)
            return out
        return out

    def close(self) -> None:
        try:
            self.nv.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


@dataclass
class Watched:
    name: str
    pids: Callable[[], dict[int, str]]  # pid -> role of the server's process tree, now
    registry_name: Optional[str] = None
    gpu_index: Optional[int] = None
    cached: Optional[dict[int, str]] = None  # the tree is listed again every TREE_REFRESH_S or when a pid is gone
    cached_at: float = -1e9


class MemorySampler:
    """Background sampling of watched servers. Samples: list of dicts with keys t (s since epoch), server, rss,
    rss_by_role, n_procs, and when known kv_used, kv_premapped, kv_limit (registry: bytes per device), kv_devices,
    gpu_used and gpu_device_used (NVML, bytes: the server's processes, the whole device); and, from the PSS thread
    every pss_every_s, records {t, server, pss}."""

    def __init__(self, hz: float = 5.0, epoch: Optional[float] = None, pss_every_s: float = 3.0,
                 gpu_index: Optional[int] = None) -> None:
        self.period = 1.0 / hz
        self.epoch = time.monotonic() if epoch is None else epoch
        self.pss_every_s = pss_every_s
        self.samples: list[dict] = []
        self._watched: dict[str, Watched] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pss_thread: Optional[threading.Thread] = None
        self._nvml: Optional[Nvml] = Nvml(gpu_index) if gpu_index is not None else None

    def watch(self, name: str, pids: Callable[[], dict[int, str]], registry_name: Optional[str] = None,
              gpu_index: Optional[int] = None) -> None:
        with self._lock:
            self._watched[name] = Watched(name, pids, registry_name, gpu_index)

    def unwatch(self, name: str) -> None:
        with self._lock:
            self._watched.pop(name, None)

    def start(self) -> "MemorySampler":
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()
        if self.pss_every_s > 0:
            self._pss_thread = threading.Thread(target=self._run_pss, name="pss-sampler", daemon=True)
            self._pss_thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._pss_thread):
            if thread is not None:
                thread.join(timeout=5)
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None

    def now(self) -> float:
        return time.monotonic() - self.epoch

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.sample_once()
            next_at += self.period
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (a slow PSS read): skip, do not burst
                next_at = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    def sample_once(self) -> list[dict]:
        with self._lock:
            watched = list(self._watched.values())
        t = self.now()
        registry = kv_bytes([w.registry_name for w in watched if w.registry_name])
        gpu_cache: dict[int, dict[int, int]] = {}
        out = []
        for w in watched:
            if w.cached is None or time.monotonic() - w.cached_at > TREE_REFRESH_S:
                self._refresh(w)
            pids = w.cached or {}
            rec: dict = {"t": round(t, 3), "server": w.name, "n_procs": len(pids)}
            by_role: dict[str, int] = {}
            total = 0
            for pid, role in pids.items():
                rss = read_rss(pid)
                if rss is None:
                    w.cached = None  # a process went away: list the tree again next time
                    continue
                total += rss
                by_role[role] = by_role.get(role, 0) + rss
            rec["rss"] = total
            rec["rss_by_role"] = by_role
            if w.registry_name and w.registry_name in registry:
                rec.update(registry[w.registry_name])
            if self._nvml is not None and w.gpu_index is not None:
                if w.gpu_index not in gpu_cache:
                    gpu_cache[w.gpu_index] = self._nvml.process_memory(w.gpu_index)
                    gpu_cache[-1 - w.gpu_index] = {0: self._nvml.device_memory(w.gpu_index)["used"]}
                rec["gpu_used"] = sum(gpu_cache[w.gpu_index].get(pid, 0) for pid in pids)
                # the whole device too: in a container NVML may report pids of another namespace
                rec["gpu_device_used"] = gpu_cache[-1 - w.gpu_index][0]
            out.append(rec)
        with self._lock:
            self.samples.extend(out)
        return out

    def _run_pss(self) -> None:
        while not self._stop.wait(self.pss_every_s):
            with self._lock:
                watched = [(w.name, dict(w.cached or {})) for w in self._watched.values()]
            t = self.now()
            out = [{"t": round(t, 3), "server": name, "pss": sum(p for p in (read_pss(pid) for pid in pids) if p)}
                   for name, pids in watched if pids]
            with self._lock:
                self.samples.extend(out)

    @staticmethod
    def _refresh(w: Watched) -> None:
        try:
            w.cached = w.pids()
        except Exception:  # noqa: BLE001
            w.cached = {}
        w.cached_at = time.monotonic()

    def gpu_device_memory(self, index: int) -> Optional[dict]:
        return self._nvml.device_memory(index) if self._nvml is not None else None
