"""SGLang's KV pool and token allocator on kvcached (SGLang 0.5.15.post1): the two classes autopatch.py swaps in.

Note: ElasticMHATokenToKVPool is MHATokenToKVPool with its buffers over a kvcached reservation instead of two
zero-filled tensors per layer (token_slots.py says how slots map to blocks); everything SGLang's kernels read (k_buffer,
v_buffer, data_ptrs, data_strides, and `size`, the bound its KV store checks slot ids against) is set as the original
sets it, for the sparse slot space. The buffers are made outside the memory saver's region: torch_memory_saver does
not see kvcached's mappings, and release_memory_occupation frees them through flush_cache -> allocator.clear(),
which gives every page but the padding slot's back at once. ElasticTokenToKVPoolAllocator hands out and frees slots
through the pool's TokenSlots; it has no free list (`free_pages` None), so SGLang's checks that read one skip it.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Optional

import numpy as np
import torch
from sglang.srt.mem_cache.allocator import BaseTokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from ...config import Config
from ...layout import KVGeometry, KVLayout, piece_page_bytes
from ...manager import KVCacheManager
from ...opener import open_cache
from ...units import ceil_div, format_size
from ...vmm.probe import device_memory, granularity_of
from .token_slots import TokenSlots

logger = logging.getLogger("sglang.kvcached")
# The registry name for the pool the model runner is about to make (set by autopatch.py from its ServerArgs).
pending_ipc_name: Optional[str] = None


def elastic_device(device: str) -> str:
    """kvcached's name for SGLang's device: on CUDA, the rank's GPU, which ModelRunner made the current device before
    any pool exists; "cpu" runs the pool over host memory (for tests: start-up refuses SGLang on CPU)."""
    if torch.device(device).type == "cpu":
        return "cpu"
    return f"cuda:{torch.cuda.current_device()}"


def elastic_virtual_bytes(config: Config, device: str) -> int:
    """Address space for the KV cache: KVCACHED_VIRTUAL_SIZE, else the device's total memory."""
    return config.virtual_size or device_memory(device)[1]


class ElasticMHATokenToKVPool(MHATokenToKVPool):
    def __init__(self, size: int, page_size: int, dtype: torch.dtype, head_num: int, head_dim: int, *args,
                 v_head_dim: Optional[int] = None, swa_head_num=None, swa_head_dim=None, swa_v_head_dim=None,
                 **kwargs) -> None:
        if v_head_dim not in (None, head_dim) or (swa_head_num, swa_head_dim, swa_v_head_dim) != (None,) * 3:
            raise RuntimeError(f"kvcached needs K and V of one shape; this model has head_dim {head_dim}, "
                               f"v_head_dim {v_head_dim} (unset ENABLE_KVCACHED to run it without kvcached)")
        super().__init__(size, page_size, dtype, head_num, head_dim, *args, v_head_dim=v_head_dim, **kwargs)

    def _create_buffers(self) -> None:
        if self.use_hnd or self.kv_cache_layout != "nhd":
            raise RuntimeError(f"kvcached supports SGLang's NHD KV layout, not {self.kv_cache_layout!r}")
        config = Config.from_env()
        self.slots = TokenSlots(self._open_manager(config), self.page_size, elastic_device(self.device),
                                config.max_cached_tokens)
        self.k_buffer, self.v_buffer = self.slots.buffers()
        # The KV store kernel and the OOB check bound slot ids by size + page_size rows (the padding slot's page).
        self.size = self.slots.num_rows - self.page_size
        self.k_data_ptrs = torch.tensor([x.data_ptr() for x in self.k_buffer], dtype=torch.uint64, device=self.device)
        self.v_data_ptrs = torch.tensor([x.data_ptr() for x in self.v_buffer], dtype=torch.uint64, device=self.device)
        self.data_ptrs = torch.cat([self.k_data_ptrs, self.v_data_ptrs], dim=0)
        self.data_strides = torch.tensor(
            [np.prod(x.shape[1:]) * x.dtype.itemsize for x in self.k_buffer + self.v_buffer], device=self.device
        )

    def _open_manager(self, config: Config) -> KVCacheManager:
        """The manager, with no more address space than SGLang's token budget needs (`--max-total-tokens` caps it)."""
        device = elastic_device(self.device)
        geometry = KVGeometry(self.layer_num, (self.page_size, self.head_num, self.head_dim), self.store_dtype)
        granularity = granularity_of(device)
        piece = piece_page_bytes(config.page_size_bytes, device, geometry.block_bytes, granularity)
        layout = KVLayout(geometry, piece, granularity, elastic_virtual_bytes(config, device))
        blocks = ceil_div(self.size, self.page_size) + 1  # SGLang's budget plus the padding slot's block
        pages = min(layout.num_pages, ceil_div(blocks, layout.blocks_per_page))
        kv = open_cache(geometry, device, virtual_bytes=pages * layout.page_bytes, config=config,
                        name=config.ipc_name or pending_ipc_name)
        stats = kv.memory_stats()
        logger.info(
            "kvcached is active: elastic KV cache on %s, %s of address space in pages of %s (%d tokens of %d layers), "
            "limit %s, registry name %s (see `kvctl list`)",
            device, format_size(pages * layout.page_bytes), format_size(layout.page_bytes),
            layout.blocks_per_page * self.page_size, self.layer_num, format_size(stats.limit_bytes), kv.ipc_name,
        )
        return kv

    def get_kv_size_bytes(self):
        """K and V bytes mapped now (SGLang logs this, and reports it as the pool's memory usage)."""
        mapped = self.slots.kv.memory_stats().mapped_bytes
        return mapped // 2, mapped - mapped // 2

    def shutdown(self) -> None:
        """Unmap everything and leave the registry (SGLang itself never calls this: its process exits)."""
        self.slots.kv.shutdown()


class ElasticTokenToKVPoolAllocator(BaseTokenToKVPoolAllocator):
    """TokenToKVPoolAllocator's signature (page size 1); slots come from the pool's kvcached manager."""

    def __init__(self, size: int, dtype: torch.dtype, device: str, kvcache: ElasticMHATokenToKVPool,
                 need_sort: bool) -> None:
        if not isinstance(kvcache, ElasticMHATokenToKVPool):
            raise RuntimeError(f"kvcached: the token allocator needs kvcached's KV pool, got {type(kvcache).__name__}")
        super().__init__(kvcache.slots.capacity, 1, dtype, device, kvcache, need_sort)
        self.slots: TokenSlots = kvcache.slots

    def available_size(self) -> int:
        return self.slots.available_size()

    def alloc(self, need_size: int):
        return self.slots.alloc(need_size)

    def free(self, free_index: torch.Tensor) -> None:
        self.slots.free(free_index)

    def free_group_begin(self) -> None:
        self.slots.free_group_begin()

    def free_group_end(self) -> None:
        self.slots.free_group_end()

    def backup_state(self):
        return self.slots.backup_state()

    def restore_state(self, state) -> None:
        self.slots.restore_state(state)

    def merge_and_sort_free(self) -> None:
        pass  # no free list: the manager places blocks itself

    def clear(self) -> None:
        self.slots.clear()

    def get_cpu_copy(self, indices, mamba_indices=None):
        return self._kvcache.get_cpu_copy(indices, mamba_indices=mamba_indices)

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None):
        return self._kvcache.load_cpu_copy(kv_cache_cpu, indices, mamba_indices=mamba_indices)


def default_ipc_name(server_args) -> str:
    """sglang-<served model name>-<pid>: unique per engine, and readable in `kvctl list`."""
    served = server_args.served_model_name or server_args.model_path
    model = re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(str(served).rstrip("/")))
    model = re.sub(r"\.{2,}", ".", model)[:40].strip("-.") or "model"  # registry names never hold ".."
    return f"sglang-{model}-{os.getpid()}"
