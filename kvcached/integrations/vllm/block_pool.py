"""vLLM's BlockPool on kvcached's KV cache manager: free blocks give pages back, the limit is the pool's size.

Note: vLLM's pool is a fixed array of blocks and a free queue; here every block id comes from, and returns to, a
KVCacheManager whose pages are marked in the page table that the worker follows (kvcached/pagetable.py). A block freed
without a prefix-cache hash goes back at once; a freed block with a hash stays cached (its memory kept) until it is
reused, evicted to make room, or evicted because cached blocks exceed KVCACHED_MAX_CACHED_TOKENS (default: one page of
tokens). Both evictions take the blocks of pages that only cached blocks hold first (least recently used page first),
then the least recently used of the rest: a page empties whole and goes back to the device, where evicting by age
alone would leave a cached block or two pinning each of many pages. When no block is in use any more, the reserve of
premapped pages is given back at once.

Note [a free block is a promise]: vLLM asks `get_num_free_blocks()` before each allocation and then takes that many
blocks without a way to be refused. Memory that another engine can take in between (two engines racing for a GPU's
last pages) must not be promised. So during a scheduling step the answer counts only blocks already held: vLLM first
says how many blocks it needs (the coordinator's get_num_blocks_to_allocate, patched in autopatch.py, calls
`expect(n)`), the pool takes them from the manager and waits for the worker to answer that their pages are mapped
(kvcached/pagetable.py); pages it could not map go back, and the answer is short: vLLM waits or preempts, as with a
full static pool. Held blocks it did not take go back to the manager at the end of the step. vLLM's admission check
(will a new request's whole prompt fit?) promises nothing and is answered from what could still be mapped. The limit
cannot change within a step either: the scheduler holds the manager's limit lock across it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from typing import Iterable, Sequence

from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import KVCacheBlock

from ...config import Config
from ...opener import open_cache
from ...pagetable import TableVirtualMemory
from ...units import ceil_div, format_size
from . import versions
from .plan import current_plan, take_table

logger = logging.getLogger("vllm.kvcached")


class _Blocks:
    """vLLM's `pool.blocks[i]`, made on first use: the id space is sparse and mostly never handed out."""

    def __init__(self, pool: "ElasticBlockPool", null_block: KVCacheBlock) -> None:
        self._pool, self._made = pool, {null_block.block_id: null_block}

    def __getitem__(self, block_id: int) -> KVCacheBlock:
        block = self._made.get(block_id)
        if block is None:
            extra = {"pool": self._pool} if versions.running().block_has_pool else {}
            block = self._made[block_id] = KVCacheBlock(block_id, **extra)
        return block

    def __len__(self) -> int:
        return self._pool.num_gpu_blocks

    def __iter__(self):
        return iter(list(self._made.values()))


class ElasticBlockPool(BlockPool):
    def __init__(self, num_gpu_blocks: int, enable_caching: bool, hash_block_size: int, *args, **kwargs) -> None:
        plan = current_plan()
        layout = plan.layout()
        if num_gpu_blocks != layout.num_block_ids:
            raise RuntimeError(f"kvcached planned {layout.num_block_ids} block ids, vLLM's pool asks for {num_gpu_blocks}")
        super().__init__(1, enable_caching, hash_block_size, *args, **kwargs)  # builds only the null block, id 0
        self.num_gpu_blocks = num_gpu_blocks
        config = Config.from_env()
        self.table = take_table()
        self.vmm = TableVirtualMemory(self.table, plan.devices, plan.granularity)
        self.kv = open_cache(plan.geometry(), self.vmm, virtual_bytes=plan.virtual_bytes, config=config,
                             name=plan.ipc_name)
        assert self.kv.null_block == self.null_block.block_id == 0
        if self.vmm.settle():
            raise RuntimeError("kvcached: the worker could not map the null block's page: the device is out of memory")
        self._watchers = versions.running().pool_reuse_watchers
        self._held: list[int] = []  # blocks taken from the manager, mapped, promised to vLLM in this step
        self._in_step = self._admission = False
        self._warned_at = float("-inf")
        self.blocks = _Blocks(self, self.null_block)
        self.free_block_queue = None  # vLLM's queue is replaced by the manager and `_cached`; any use is a bug
        self._cached: dict[int, KVCacheBlock] = {}  # ref_cnt 0 blocks still holding prefix-cache content, LRU first
        self._cached_on_page: Counter[int] = Counter()  # of `_cached`, per page
        tokens = config.max_cached_tokens
        self.max_cached_blocks = layout.blocks_per_page if tokens is None else tokens // plan.block_size
        stats = self.kv.memory_stats()
        logger.info(
            "kvcached is active: elastic KV cache on %s, %s of address space in pages of %s (%d blocks of %d tokens), "
            "limit %s, registry name %s (see `kvctl list`)",
            _devices_text(plan.devices), format_size(layout.num_pages * layout.page_bytes),
            format_size(layout.page_bytes), layout.blocks_per_page, plan.block_size, format_size(stats.limit_bytes),
            self.kv.ipc_name,
        )

    # ---- what vLLM asks ----------------------------------------------------------------------------------------

    def get_num_free_blocks(self) -> int:
        if self._in_step and not self._admission:  # a promise (see the Note): held and cached blocks, all mapped
            return len(self._held) + len(self._cached)
        self._admission = False  # "would it fit?", or a figure for statistics: what could still be mapped too
        return len(self._held) + len(self._cached) + self.kv.available_size()

    def get_usage(self) -> float:
        total = self._in_use() + self.get_num_free_blocks()
        return self._in_use() / total if total else 0.0

    def step(self):
        """Around one scheduling step (autopatch.py): promises only what is held; held blocks go back after."""
        return _Step(self)

    def expect(self, num_blocks: int, admission: bool = False) -> None:
        """vLLM is about to check that `num_blocks` are free (see the Note): hold them, when memory allows. An
        admission check (will a new request's whole prompt fit, later chunks included?) holds nothing: it is answered
        from what could still be mapped, and each chunk's blocks are then promised as they are allocated."""
        if self._in_step and admission:
            self._admission = True
        elif self._in_step:
            self._hold_up_to(num_blocks)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        if num_blocks > len(self._held) + len(self._cached):  # a caller that did not say first (see expect)
            self._hold_up_to(num_blocks)
        if num_blocks > len(self._held) + len(self._cached):
            raise ValueError(f"Cannot get {num_blocks} free blocks from the pool")
        ids, self._held = self._held[:num_blocks], self._held[num_blocks:]
        if len(ids) < num_blocks:  # reuse cached blocks, pages held only by cached blocks first
            reused = self._eviction_order(num_blocks - len(ids))
            self._forget(reused)
            ids += [block.block_id for block in reused]
        blocks = [self.blocks[i] for i in ids]
        for block in blocks:
            assert block.ref_cnt == 0 and block.block_hash is None
            block.ref_cnt = 1
            if self.metrics_collector:
                self.metrics_collector.on_block_allocated(block)
        return blocks

    def touch(self, blocks: Sequence[KVCacheBlock]) -> None:
        for block in blocks:
            if block.ref_cnt == 0 and not block.is_null:
                self._uncache(block)
            block.ref_cnt += 1
            if self.metrics_collector:
                self.metrics_collector.on_block_accessed(block)

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        released, other_pools, pools = [], defaultdict(list), versions.running().block_has_pool
        for block in ordered_blocks:
            if pools and block.pool is not None and block.pool is not self:
                other_pools[block.pool].append(block)
                continue
            block.ref_cnt -= 1
            if block.ref_cnt == 0 and not block.is_null:
                if block.block_hash is None or not self.enable_caching:
                    released.append(block.block_id)
                else:
                    self._cache(block)
        if released:
            self.kv.free(released)
        self._bound_cache()
        if self._in_use() == 0:  # the engine went idle
            self.kv.trim()
        for pool, blocks in other_pools.items():
            pool.free_blocks(blocks)

    def unpin_blocks(self, blocks, on_reuse) -> None:
        for block in blocks:
            assert block.ref_cnt > 0 and not block.is_null
            block.ref_cnt -= 1
            self._reuse_watchers[block.block_id] = on_reuse
            if block.ref_cnt == 0:
                self._cache(block)  # readable until reused: kept like a cached block

    def evict_blocks(self, block_ids: set[int]) -> None:
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block_id in self._cached:
                self._evict([block])
            else:
                self._maybe_evict_cached_block(block)

    def reset_prefix_cache(self) -> bool:
        in_use = self._in_use()
        if in_use:
            logger.warning("Failed to reset prefix cache because some blocks (%d) are not freed yet", in_use)
            return False
        self._evict(list(self._cached.values()))
        for block in self.blocks:
            block.reset_hash()
        self.cached_block_hash_to_block.__init__()
        self.cached_block_hashes_by_block.clear()
        if self.metrics_collector:
            self.metrics_collector.reset()
        if self.enable_kv_cache_events:
            from vllm.distributed.kv_events import AllBlocksCleared

            self.kv_event_queue.append(AllBlocksCleared())
        logger.info("Successfully reset prefix cache")
        return True

    def shutdown(self) -> None:
        self.kv.shutdown()
        self.table.close()

    # ---- held and cached blocks -----------------------------------------------------------------------------------

    def _in_use(self) -> int:
        """Blocks vLLM holds (the null block, cached and held blocks are not)."""
        return self.kv.num_allocated() - 1 - len(self._cached) - len(self._held)

    def _hold_up_to(self, num_blocks: int) -> None:
        """Hold `num_blocks` blocks, mapped by the worker, when memory allows: new blocks first (the prefix cache
        stays), else as many as make up the count with the cached blocks."""
        missing = num_blocks - len(self._held)
        for count in (missing, missing - len(self._cached)):
            if count <= 0:
                return
            ids = self.kv.alloc(count)
            if ids is not None and self._mapped(ids):
                self._held += ids
                return

    def _mapped(self, ids: list[int]) -> bool:
        """Whether the worker mapped the pages of `ids`; if not, `ids` and the pages that failed go back."""
        failed = self.vmm.settle({self.kv.layout.page_of(block_id) for block_id in ids})
        if not failed:
            return True
        now = time.monotonic()
        if now - self._warned_at > 10:
            self._warned_at = now
            logger.warning("kvcached: the device is out of memory (another process took it): %d pages could not be "
                           "mapped; requests wait until memory is free", len(failed))
        self.kv.free(ids)
        self.kv.trim()  # unmaps the reserve, and with it the pages that failed
        in_use = set(self.vmm.settle()) & self.kv.pages.pages_in_use()
        if in_use:  # never: a page is handed out only after the worker mapped it
            raise RuntimeError(f"kvcached: pages {sorted(in_use)} are in use but the worker could not map them")
        return False

    def _release(self) -> None:
        held, self._held = self._held, []
        if held:
            self.kv.free(held)

    def _forget(self, blocks: list[KVCacheBlock]) -> None:
        """Drop cached blocks from the cache (their hashes, so no request can hit them), keeping their ids."""
        for block in blocks:
            self._uncache(block)
            self._maybe_evict_cached_block(block)
        if self._watchers and self._reuse_watchers:
            self._notify_reuse(blocks)

    def _evict(self, blocks: list[KVCacheBlock]) -> None:
        """Drop cached blocks and give their memory back."""
        self._forget(blocks)
        if blocks:
            self.kv.free([block.block_id for block in blocks])

    def _cache(self, block: KVCacheBlock) -> None:
        self._cached[block.block_id] = block
        self._cached_on_page[self.kv.layout.page_of(block.block_id)] += 1

    def _uncache(self, block: KVCacheBlock) -> None:
        del self._cached[block.block_id]
        page = self.kv.layout.page_of(block.block_id)
        self._cached_on_page[page] -= 1
        if not self._cached_on_page[page]:
            del self._cached_on_page[page]

    def _bound_cache(self) -> None:
        """Keep at most `max_cached_blocks` cached blocks, on at most as many pages as they fill, so the memory
        that an idle engine keeps for its prefix cache is bounded too, not only the block count. Runs at every
        free: the count of cache-only pages comes from the per-page tally, and the cached blocks are walked only
        when some must go."""
        excess = len(self._cached) - self.max_cached_blocks
        if excess > 0:
            self._evict(self._eviction_order(excess))
        allowed = ceil_div(self.max_cached_blocks, self.kv.layout.blocks_per_page)
        if len(self._cached_on_page) <= allowed:
            return
        if sum(self.kv.page_fill(page) == count for page, count in self._cached_on_page.items()) > allowed:
            pages = self._cache_only_pages()
            self._evict([block for blocks in pages[: len(pages) - allowed] for block in blocks])

    def _cache_only_pages(self) -> list[list[KVCacheBlock]]:
        """The cached blocks of each page that only cached blocks hold, least recently used page first (a page is as
        recent as its most recently freed block)."""
        by_page: dict[int, list[KVCacheBlock]] = {}
        for block in self._cached.values():  # oldest first: a page's last entry decides its place
            page = self.kv.layout.page_of(block.block_id)
            by_page.setdefault(page, []).append(block)
            by_page[page] = by_page.pop(page)
        return [blocks for page, blocks in by_page.items() if self.kv.page_fill(page) == len(blocks)]

    def _eviction_order(self, count: int) -> list[KVCacheBlock]:
        """`count` cached blocks: from pages only cached blocks hold first, least recently used first (evicting them
        unmaps whole pages), then the least recently used of the rest."""
        chosen = [block for blocks in self._cache_only_pages() for block in blocks][:count]
        if len(chosen) < count:
            taken = {block.block_id for block in chosen}
            chosen += [b for b in self._cached.values() if b.block_id not in taken][: count - len(chosen)]
        return chosen


def _devices_text(devices: tuple[str, ...]) -> str:
    """"cpu", or "cuda:0,cuda:1 (tensor parallel 2; sizes and the limit are per device)"."""
    if len(devices) == 1:
        return devices[0]
    return f"{','.join(devices)} (tensor parallel {len(devices)}; sizes and the limit are per device)"


class _Step:
    def __init__(self, pool: ElasticBlockPool) -> None:
        self.pool = pool

    def __enter__(self) -> None:
        self.pool._in_step = True

    def __exit__(self, *exc) -> None:
        self.pool._in_step = False
        self.pool._release()
