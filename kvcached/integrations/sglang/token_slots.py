"""SGLang's token slots on kvcached's manager: one kvcached block is one SGLang page (page_size tokens, 1 by default).

Note: SGLang stores KV per token slot: layer l's K buffer is a tensor of rows (head_num, head_dim), indexed by slot.
kvcached's layout gives one dense tensor per layer piece with block stride b, so with a block of page_size rows the
piece's tensor seen as rows IS SGLang's K (or V) buffer, and slot = block id * page_size + offset. Block ids are
sparse (layout.py), so slots are too; the buffers have num_block_ids * page_size rows. Block 0 is kvcached's null
block: SGLang's padding slot 0 (dummy writes of padded tokens land there), mapped for good and never handed out.
Pages of G blocks (G * page_size tokens of every layer) are mapped as slots are handed out and unmapped as they come
back, so SGLang's allocator calls map straight onto the manager: the scheduler and the model runner share one process
per rank in SGLang, so no page table is needed (unlike vLLM V1). `available_size()` is what the manager can hand out
now (limit and device memory included): SGLang checks it before every allocation and evicts, waits or retracts when
it is short, as with its full static pool. SGLang frees slots as device tensors: reading them back costs one copy
per free, and SGLang groups the frees of one step (free_group_begin/end), so that is one copy per step at most.
Imports no SGLang module, so that CI tests it without a CUDA driver (SGLang itself needs one to import).
"""

from __future__ import annotations

from array import array
from typing import Optional

import torch

from ...manager import KVCacheManager


class TokenSlots:
    """Token slots handed out from kvcached blocks of `page_size` tokens; all counts are in tokens."""

    def __init__(self, kv: KVCacheManager, page_size: int, device: str,
                 max_cached_tokens: Optional[int] = None) -> None:
        if kv.null_block != 0:
            raise ValueError("kvcached for SGLang needs the manager's null block (block 0, SGLang's padding slot)")
        self.kv, self.page_size, self.device = kv, page_size, torch.device(device)
        # KVCACHED_MAX_CACHED_TOKENS: the prefix cache's bound (cache_bound.py), default one page of tokens.
        self.max_cached_tokens = self.tokens_per_page if max_cached_tokens is None else max_cached_tokens
        self._group: Optional[list[torch.Tensor]] = None  # frees collected between free_group_begin/end
        self._journal: Optional[list[list[int]]] = None  # blocks allocated since backup_state()

    @property
    def capacity(self) -> int:
        """Tokens that can be handed out when every page is mapped (the null block excluded)."""
        return (self.kv.layout.num_blocks - 1) * self.page_size

    @property
    def num_rows(self) -> int:
        """Rows of each K/V buffer: the whole slot-id space, padding slot included."""
        return self.kv.num_block_ids * self.page_size

    @property
    def tokens_per_page(self) -> int:
        return self.kv.layout.blocks_per_page * self.page_size

    def buffers(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """SGLang's k_buffer and v_buffer: per layer, (num_rows, head_num, head_dim) over the reservation."""
        k_buffer, v_buffer = [], []
        for layer in self.kv.kv_tensors:  # (2, num_block_ids, page_size, head_num, head_dim), K and V
            k_buffer.append(layer[0].reshape(self.num_rows, *layer.shape[3:]))
            v_buffer.append(layer[1].reshape(self.num_rows, *layer.shape[3:]))
        for k in k_buffer + v_buffer:
            assert k.is_contiguous(), "a K/V buffer must be a view of the reservation, not a copy"
        return k_buffer, v_buffer

    # ---- SGLang's allocator calls -------------------------------------------------------------------------------

    def available_size(self) -> int:
        return self.kv.available_size() * self.page_size

    def allocated_tokens(self) -> int:
        """Tokens SGLang holds (in requests or in its prefix cache): what its pool accounting calls not free."""
        return (self.kv.num_allocated() - 1) * self.page_size

    def alloc(self, need_size: int) -> Optional[torch.Tensor]:
        """`need_size` slots (a multiple of page_size), whole pages of consecutive slots, or None when short."""
        if need_size % self.page_size:
            raise ValueError(f"kvcached: allocation of {need_size} tokens is not a multiple of page size "
                             f"{self.page_size}")
        blocks = self.alloc_blocks(need_size // self.page_size)
        if blocks is None:
            return None
        ids = self._to_device(blocks)
        if self.page_size == 1:
            return ids
        return (ids[:, None] * self.page_size + torch.arange(self.page_size, device=self.device)).reshape(-1)

    def alloc_blocks(self, count: int) -> Optional[list[int]]:
        """`count` kvcached blocks (SGLang pages). SGLang asked available_size() first; if another process took
        device memory since, the utilization cap is exceeded this once (never the limit), as an engine cannot take
        a refusal it was told it would not get."""
        if count == 0:
            return []
        blocks = self.kv.alloc(count)
        if blocks is None:
            blocks = self.kv.alloc(count, ignore_headroom=True)
        if blocks is not None and self._journal is not None:
            self._journal.append(blocks)
        return blocks

    def free(self, free_index: torch.Tensor) -> None:
        if free_index.numel() == 0:
            return
        if self._group is not None:
            self._group.append(free_index)
            return
        index = free_index if self.page_size == 1 else torch.unique(free_index // self.page_size)
        self.kv.free(index.tolist())

    def free_group_begin(self) -> None:
        self._group = []

    def free_group_end(self) -> None:
        group, self._group = self._group, None
        if group:
            self.free(torch.cat(group))

    def backup_state(self) -> object:
        """Start a journal of allocations; restore_state() gives back every block allocated since."""
        self._journal = []
        return self._journal

    def restore_state(self, state: object) -> None:
        if state is not self._journal:
            raise ValueError("kvcached: restore_state() got a state that is not the latest backup_state()")
        journal, self._journal = self._journal, None
        blocks = [block for blocks in journal for block in blocks]
        if blocks:
            self.kv.free(blocks)

    def clear(self) -> None:
        """Free every slot (SGLang's flush_cache, and release_memory_occupation through it): memory falls to the
        floor, the null block's page, at once."""
        self._group, self._journal = None, None
        self.kv.clear()
        self.kv.trim()

    def _to_device(self, blocks: list[int]) -> torch.Tensor:
        if not blocks:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        ids = torch.frombuffer(array("q", blocks), dtype=torch.int64)  # a quarter of torch.tensor(list)'s time
        if self.device.type == "cpu":
            return ids.clone()  # not a view of the temporary buffer
        return ids.pin_memory().to(self.device, non_blocking=True)  # a copy; no wait for the GPU's queue
