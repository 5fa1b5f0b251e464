"""The worker's side: KV tensors over a kvcached reservation, kept mapped as the scheduler's page table says.

Note: vLLM allocates zero-filled KV memory (versions.py: one buffer for all layers, or one per layer). Here the memory is
a reservation of address space (nothing mapped), cut the way the plan put in the config (plan.py), and vLLM's own view
code shapes it for whichever attention backend it chose. A PageFollower maps and unmaps pages as the engine core's
page table says; the model runner's step maps whatever is still missing before it runs, and no page is unmapped while
a step runs. With tensor parallelism every rank does this for its own shard, on its own device, after the one table.
A rank >= 1 that cannot map before a step ends its process: vLLM reports errors of rank 0 only, and the other ranks
would wait for it in the step's first all-reduce until vLLM's execute timeout (minutes); a dead worker stops the
engine at once. The reservation is made once: if vLLM initialises its KV cache again with the same plan, the same
addresses come back (CUDA graphs captured over them stay valid). vLLM's sizing is skipped: the worker reports a token
amount of KV memory (the engine core's plan decides the real capacity), which keeps vLLM's checks against free memory
from refusing a large reservation.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional

import torch

from ...devices import parse_device
from ...errors import KVCachedError
from ...pagetable import PageFollower, PageTable
from ...vmm import VirtualMemory, open_vmm
from .plan import ElasticPlan, plan_of

logger = logging.getLogger("vllm.kvcached")

PLACEHOLDER_KV_BYTES = 64 << 20


def tensor_parallel_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


class WorkerKV:
    """What one worker process (tensor-parallel rank `rank`) holds: the reservation (and an int8 tensor over it), the
    page table, the follower."""

    def __init__(self, plan: ElasticPlan, device: torch.device, rank: int) -> None:
        name = str(parse_device(torch.device(device)))
        planned = plan.devices[rank] if rank < plan.world_size else "no device"
        if name != planned:
            raise KVCachedError(
                f"kvcached planned tensor-parallel rank {rank} on {planned} (ranks on {', '.join(plan.devices)}), but "
                f"this worker runs on {name}; unset ENABLE_KVCACHED to run this engine without kvcached")
        self.plan, self.rank, self.size = plan, rank, plan.layout().reserved_bytes
        self.vmm: VirtualMemory = open_vmm(name)
        self.base = self.vmm.reserve(self.size)
        self.table = PageTable.attach(plan.table_path)
        self.follower = PageFollower(self.table, self.vmm, self.base, rank=rank,
                                     on_error=lambda exc: logger.error("kvcached follower (rank %d): %s", rank, exc))
        self.raw = self.vmm.tensor(self.base, self.size).view(torch.int8)
        logger.info("kvcached: rank %d (pid %d): %d layers of KV over a reservation of %d bytes at %#x on %s; pages "
                    "are mapped on demand", rank, os.getpid(), plan.num_layers, self.size, self.base, self.vmm.device)

    def close(self) -> None:
        self.follower.close()
        self.vmm.unreserve(self.base, self.size)
        self.table.close()


_worker_kv: Optional[WorkerKV] = None  # this worker process's KV, for the step hook


def reservation(kv_cache_config: Any, device: torch.device) -> WorkerKV:
    """This worker's KV reservation for the plan in `kv_cache_config`: made on first use, the same one afterwards."""
    global _worker_kv
    plan = plan_of(kv_cache_config)
    if _worker_kv is not None and _worker_kv.plan == plan:
        return _worker_kv
    if _worker_kv is not None:  # another plan: a fresh reservation
        _worker_kv.close()
    _worker_kv = WorkerKV(plan, device, tensor_parallel_rank())
    return _worker_kv


def allocate_kv_cache(kv_cache_config: Any, device: torch.device, layout: Any, kernel_block_sizes=None) -> dict:
    """Replacement for vllm.v1.worker.utils.allocate_kv_cache (one KV tensor for all layers; same signature and
    result): vLLM's create_kv_cache_views over the reservation."""
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs, create_kv_cache_views

    (tensor,) = kv_cache_config.kv_cache_tensors
    raw = reservation(kv_cache_config, device).raw
    group_id, group = next(
        (i, g) for i, g in enumerate(kv_cache_config.kv_cache_groups) if tensor.layers[0] in g.layer_names
    )
    spec = group.kv_cache_spec
    if isinstance(spec, UniformTypeKVCacheSpecs):
        spec = spec.kv_cache_specs[tensor.layers[0]]
    kernel_block_size = kernel_block_sizes[group_id] if kernel_block_sizes and group_id < len(kernel_block_sizes) else None
    views = create_kv_cache_views(raw, spec, kv_cache_config.num_blocks, layout, tensor, kernel_block_size=kernel_block_size)
    return dict(zip(tensor.layers, views))


def allocate_kv_cache_per_layer(runner: Any, kv_cache_config: Any) -> dict[str, torch.Tensor]:
    """Replacement for the V1 runner's GPUModelRunner._allocate_kv_cache_tensors (one KV tensor per layer): layer
    l's raw int8 tensor is its slice of the reservation; vLLM's _reshape_kv_cache_tensors shapes it."""
    return _layer_slices(kv_cache_config, runner.device)


def allocate_kv_cache_v2(kv_cache_config: Any, shared_layers: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """Replacement for the V2 runner's attn_utils._allocate_kv_cache (one KV tensor per layer; layers that share
    another's KV are in `shared_layers` and get none): the same slices; vLLM's _reshape_kv_cache shapes them."""
    return _layer_slices(kv_cache_config, device)


def _layer_slices(kv_cache_config: Any, device: torch.device) -> dict[str, torch.Tensor]:
    kv = reservation(kv_cache_config, device)
    layout = kv.plan.layout()
    slices = [layout.piece_view(kv.raw, layer).view(-1) for layer in range(len(kv_cache_config.kv_cache_tensors))]
    return {name: raw for raw, t in zip(slices, kv_cache_config.kv_cache_tensors) for name in t.shared_by}


def check_blocks_first(kv_caches: dict) -> None:
    """Refuse KV views whose blocks are not each one contiguous piece of a layer's slice (a backend that puts K and V
    apart, say): their pages would not be the pages kvcached maps."""
    kv = _worker_kv
    if kv is None:
        return
    ids = kv.plan.layout().num_block_ids
    span = ids * kv.plan.block_bytes
    for name, tensor in kv_caches.items():
        if not isinstance(tensor, torch.Tensor):
            raise KVCachedError(f"kvcached supports attention KV caches only; layer {name} has {type(tensor).__name__}")
        block = tensor.stride(0) * tensor.element_size()
        # Dimension 0 is the blocks (vLLM may split a block into kernel blocks), each `block` bytes, the outermost.
        if tensor.shape[0] % ids or block * tensor.shape[0] != span or tensor.stride(0) != max(tensor.stride()):
            raise KVCachedError(
                f"kvcached needs each layer's KV cache blocks first, one block contiguous; layer {name} has shape "
                f"{tuple(tensor.shape)} and strides {tensor.stride()} (choose another attention backend, or unset "
                f"ENABLE_KVCACHED)")


def run_step(execute_model, self, *args, **kwargs):
    """Around the model runner's step: every page the scheduler wants is mapped, none is unmapped meanwhile."""
    kv = _worker_kv
    if kv is None:
        return execute_model(self, *args, **kwargs)
    try:
        kv.follower.before_step()
    except Exception:
        if kv.rank == 0:
            raise  # rank 0's errors reach the engine core
        logger.exception("kvcached: rank %d (pid %d) could not map its KV pages before a step; ending this worker so "
                         "that the engine stops instead of waiting for it", kv.rank, os.getpid())
        logging.shutdown()
        os._exit(1)
    try:
        return execute_model(self, *args, **kwargs)
    finally:
        kv.follower.after_step()


def warm_up(warmup_kernels, model_runner: Any, execute_model, sample_tokens) -> Any:
    """Around the V2 runner's kernel warm-up (vllm.v1.worker.gpu.warmup.warmup_kernels): it runs real steps on
    made-up requests whose blocks 1, 2, ... no scheduler handed out, so their pages are mapped for it (touching an
    unmapped address would kill the CUDA context), and unmapped once its kernels are done."""
    kv = _worker_kv
    if kv is None:
        return warmup_kernels(model_runner, execute_model, sample_tokens)
    layout = kv.plan.layout()

    def execute(scheduler_output, *args, **kwargs):
        kv.follower.map_extra(layout.pages_under(block_ids_of(scheduler_output)))
        return execute_model(scheduler_output, *args, **kwargs)

    try:
        return warmup_kernels(model_runner, execute, sample_tokens)
    finally:
        if parse_device(kv.vmm.device).is_cuda:  # unmapping does not wait for kernels in flight
            torch.cuda.synchronize(kv.vmm.device)
        kv.follower.unmap_extra()


def block_ids_of(scheduler_output: Any) -> list[int]:
    """Every block id a scheduler output gives its requests, new and running, in every KV cache group."""
    groups = [req.block_ids for req in scheduler_output.scheduled_new_reqs]
    groups += [ids for ids in scheduler_output.scheduled_cached_reqs.new_block_ids if ids is not None]
    return [block for per_group in groups for ids in per_group for block in ids]


def use_placeholder_kv_size(vllm_config: Any) -> None:
    """Make the worker report a small explicit KV size instead of sizing a static pool from free memory."""
    cache = vllm_config.cache_config
    if cache.kv_cache_memory_bytes not in (None, PLACEHOLDER_KV_BYTES):
        logger.info("kvcached: the KV cache is elastic; kv_cache_memory_bytes=%d is ignored "
                    "(cap an instance with KVCACHED_MEMORY_LIMIT or `kvctl limit`)", cache.kv_cache_memory_bytes)
    cache.kv_cache_memory_bytes = PLACEHOLDER_KV_BYTES


def requested_memory(init_snapshot: Any, cache_config: Any) -> int:
    """Replacement for vllm.v1.worker.utils.request_memory in the GPU worker: vLLM's share of the device, without
    refusing to start when other processes (another kvcached engine) hold some of it: kvcached's KV cache takes
    only what is free (KVCACHED_GPU_UTILIZATION), and vLLM's own sizing is skipped (use_placeholder_kv_size)."""
    wanted = math.ceil(init_snapshot.total_memory * cache_config.gpu_memory_utilization)
    return min(wanted, init_snapshot.free_memory)
