"""The worker's side: KV tensors over a kvcached reservation, kept mapped as the scheduler's page table says.

Note: vLLM's `allocate_kv_cache` makes one zero-filled buffer for the whole pool. Here the buffer is a reservation of
address space (nothing mapped), and vLLM's own `create_kv_cache_views` cuts it into per-layer views with the strides
the plan put in the config, so any attention backend's shape works unchanged. A PageFollower maps and unmaps pages as
the engine core's page table says; the model runner's step maps whatever is still missing before it runs, and no page
is unmapped while a step runs. vLLM's sizing is skipped: the worker reports a token amount of KV memory (the engine
core's plan decides the real capacity), which keeps vLLM's checks against free memory from refusing a large
reservation.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ...pagetable import PageFollower, PageTable
from ...vmm import VirtualMemory, open_vmm
from .plan import plan_of

logger = logging.getLogger("vllm.kvcached")

PLACEHOLDER_KV_BYTES = 64 << 20


class WorkerKV:
    """What one worker process holds: the reservation, the page table, the follower."""

    def __init__(self, vmm: VirtualMemory, base: int, size: int, table: PageTable, follower: PageFollower) -> None:
        self.vmm, self.base, self.size, self.table, self.follower = vmm, base, size, table, follower

    def close(self) -> None:
        self.follower.close()
        self.vmm.unreserve(self.base, self.size)
        self.table.close()


_worker_kv: Optional[WorkerKV] = None  # this worker process's KV, for the step hook


def allocate_kv_cache(kv_cache_config: Any, device: torch.device, layout: Any, kernel_block_sizes=None) -> dict:
    """Replacement for vllm.v1.worker.utils.allocate_kv_cache (same signature and result)."""
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs, create_kv_cache_views

    global _worker_kv
    plan = plan_of(kv_cache_config)
    if _worker_kv is not None:  # re-initialised (e.g. after a reset): start from a fresh reservation
        _worker_kv.close()
    (tensor,) = kv_cache_config.kv_cache_tensors
    vmm = open_vmm(_device_name(device))
    base = vmm.reserve(tensor.size)
    table = PageTable.attach(plan.table_path)
    follower = PageFollower(table, vmm, base, on_error=lambda exc: logger.error("kvcached follower: %s", exc))
    _worker_kv = WorkerKV(vmm, base, tensor.size, table, follower)
    raw = vmm.tensor(base, tensor.size).view(torch.int8)

    group_id, group = next(
        (i, g) for i, g in enumerate(kv_cache_config.kv_cache_groups) if tensor.layers[0] in g.layer_names
    )
    spec = group.kv_cache_spec
    if isinstance(spec, UniformTypeKVCacheSpecs):
        spec = spec.kv_cache_specs[tensor.layers[0]]
    kernel_block_size = kernel_block_sizes[group_id] if kernel_block_sizes and group_id < len(kernel_block_sizes) else None
    views = create_kv_cache_views(raw, spec, kv_cache_config.num_blocks, layout, tensor, kernel_block_size=kernel_block_size)
    logger.info("kvcached: %d layers of KV over a reservation of %d bytes at %#x on %s; pages are mapped on demand",
                len(views), tensor.size, base, vmm.device)
    return dict(zip(tensor.layers, views))


def run_step(execute_model, self, *args, **kwargs):
    """Around the model runner's step: every page the scheduler wants is mapped, none is unmapped meanwhile."""
    kv = _worker_kv
    if kv is None:
        return execute_model(self, *args, **kwargs)
    kv.follower.before_step()
    try:
        return execute_model(self, *args, **kwargs)
    finally:
        kv.follower.after_step()


def use_placeholder_kv_size(vllm_config: Any) -> None:
    """Make the worker report a small explicit KV size instead of sizing a static pool from free memory."""
    cache = vllm_config.cache_config
    if cache.kv_cache_memory_bytes not in (None, PLACEHOLDER_KV_BYTES):
        logger.info("kvcached: the KV cache is elastic; kv_cache_memory_bytes=%d is ignored "
                    "(cap an instance with KVCACHED_MEMORY_LIMIT or `kvctl limit`)", cache.kv_cache_memory_bytes)
    cache.kv_cache_memory_bytes = PLACEHOLDER_KV_BYTES


def _device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    return f"cuda:{device.index or 0}"
