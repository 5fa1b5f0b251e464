"""Memory-aware waking: before a model starts or wakes, make room on its device by putting idle models away.

Note (why): with kvcached several models share one device, but their weights do not shrink. When a model must start
or wake and the device's free memory (NVML on GPUs, through kvcached's own reader that creates no CUDA context;
MemAvailable or the cgroup's room on hosts) is below what it needs (`memory` in its config, plus the router's
`memory_reserve`), the least recently used idle model gives memory back first: it is put to sleep when its engine
honours sleep, else stopped; a sleeping one is stopped. Free memory is measured again after each step (what a sleep
really freed is what counts). Memory promised to models that are still loading is subtracted, so two cold starts do
not both count the same free bytes. With nothing idle left to put away, the start goes ahead and the engine decides.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Iterable

from ..hostmem import host_memory
from ..units import format_size

if TYPE_CHECKING:
    from .lifecycle import ModelLifecycle

logger = logging.getLogger("kvcached.router")


def device_free_bytes(device: str) -> int:
    """Free memory of "cpu" (host) or "cuda:N" (NVML; imported only for GPUs)."""
    if device == "cpu":
        return host_memory()[0]
    from ..vmm.probe import device_memory

    return device_memory(device)[0]


class MemoryArbiter:
    """Decides, per device, which idle models give memory back before another one starts or wakes."""

    def __init__(self, models: Callable[[], Iterable["ModelLifecycle"]], reserve_bytes: int = 0,
                 free_bytes: Callable[[str], int] = device_free_bytes) -> None:
        self.models, self.reserve_bytes, self.free_bytes = models, reserve_bytes, free_bytes
        self.pending: dict[str, int] = {}  # model name -> bytes promised while it loads

    async def make_room(self, model: "ModelLifecycle") -> None:
        """Put idle models away (LRU first) until `model` fits; then promise its memory until done() is called."""
        need = model.cfg.memory_bytes
        if need is None:
            return
        device = model.cfg.device
        while True:
            free = self.free_bytes(device) - self._promised(device, model.cfg.name)
            if free >= need + self.reserve_bytes:
                break
            victims = sorted((m for m in self.models() if m is not model and m.cfg.device == device and m.evictable),
                             key=lambda m: m.last_used)
            if not victims:
                logger.warning("%s: needs %s on %s, %s free and no idle model to put away: starting anyway",
                               model.cfg.name, format_size(need), device, format_size(max(free, 0)))
                break
            logger.info("%s: needs %s on %s, %s free: %s gives memory back (least recently used)", model.cfg.name,
                        format_size(need), device, format_size(max(free, 0)), victims[0].cfg.name)
            await victims[0].give_memory_back()
        self.pending[model.cfg.name] = need

    def done(self, model: "ModelLifecycle") -> None:
        """The model has loaded (or failed): its memory shows in the device's figures from now on."""
        self.pending.pop(model.cfg.name, None)

    def _promised(self, device: str, besides: str) -> int:
        return sum(b for name, b in self.pending.items()
                   if name != besides and any(m.cfg.name == name and m.cfg.device == device for m in self.models()))
