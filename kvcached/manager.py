"""The block-level API an engine calls: alloc(n) returns block ids or None, free(ids) gives them back.

Note: a page holds G blocks of every layer (see layout.py); the engine thinks in blocks. Memory goes back to the device
only when a page has no block in use, so placement decides how much an idle engine holds: alloc() fills the fullest
partly used page first (best fit), which keeps few pages partly used, and a page whose last block is freed goes back to
the page allocator at once. The null block's page never goes back, so its free blocks are handed out before any other
page's. While a lowered limit is below the pages in use, the emptiest pages other than the null block's take no new
blocks, so that they drain and memory comes down to the limit as the engine frees (the null block's page never drains:
taken as the emptiest, it kept memory a page above the limit for as long as requests kept coming, as SGLang showed on
the H100). Within a page, a fresh page hands out ascending ids and freed blocks are reused last-freed-first (no sorting
on the hot path). alloc() never raises for lack of memory: it returns None and changes nothing, and the engine waits or
preempts as it does when its own pool is full. Every call is validated before anything changes, so a bad call (double
free, an id never handed out) raises and leaves the state as it was. One lock makes the manager safe for several
threads; the page allocator below it has its own.
"""

from __future__ import annotations

import heapq
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Optional, Protocol, Union

import torch

from .config import Config, get_logger
from .errors import BlockError, ShutdownError
from .layout import KVGeometry, KVLayout, piece_page_bytes
from .page_allocator import MemoryStats, PageAllocator
from .units import ceil_div
from .vmm import VirtualMemory, open_vmm


@dataclass(frozen=True)
class BlockStats:
    allocated_blocks: int
    free_blocks_in_mapped_pages: int
    available_blocks: int  # what alloc() could hand out right now


class MemoryObserver(Protocol):
    """What the edge gives the manager to learn of memory changes (the registry's Registration is one)."""

    def publish(self, stats: MemoryStats) -> None:
        """Called under the page allocator's lock after every change of mapped memory: must not block."""

    def close(self) -> None:
        """Called once by shutdown()."""


class KVCacheManager:
    def __init__(
        self,
        geometry: KVGeometry,
        device: Union[str, VirtualMemory] = "cpu",
        *,
        config: Optional[Config] = None,
        limit_bytes: Optional[int] = None,
        virtual_bytes: Optional[int] = None,
        reserve_null_block: bool = True,
        background: bool = True,
        observer: Optional[MemoryObserver] = None,
    ) -> None:
        """Reserve address space for `geometry` on `device` ("cpu", "cuda:N", or a VirtualMemory to use).

        `config` defaults to Config() (the manager never reads the environment: kvcached.open_cache does).
        `virtual_bytes` defaults to config.virtual_size, else the device's total memory; `limit_bytes` to
        config.memory_limit, else none. With `reserve_null_block`, block `null_block` is taken at start and never
        handed out: engines point padding at it, so it must stay mapped. `observer` learns of every change of mapped
        memory and is closed by shutdown().
        """
        config = config if config is not None else Config()
        self.config = config
        self.observer = observer
        self.vmm = device if isinstance(device, VirtualMemory) else open_vmm(device)
        self.device = self.vmm.device
        virtual = virtual_bytes or config.virtual_size or self.vmm.total_memory()
        piece = piece_page_bytes(config.page_size_bytes, self.device, geometry.block_bytes, self.vmm.granularity)
        self.layout = KVLayout(geometry, piece, self.vmm.granularity, virtual)
        self._base = self.vmm.reserve(self.layout.reserved_bytes)
        self.explicit_limit = limit_bytes if limit_bytes is not None else config.memory_limit
        self.pages = PageAllocator(
            self.vmm,
            self._base,
            self.layout.page_bytes,
            self.layout.num_pages,
            min_reserved=config.min_reserved_pages,
            max_reserved=config.max_reserved_pages,
            utilization=config.gpu_utilization,
            trim_idle_s=config.trim_idle_s,
            limit_bytes=self.explicit_limit,
            background=background,
            on_change=self._publish,
        )
        self._lock = threading.Lock()
        self._limit_lock = threading.RLock()
        self._allocated: set[int] = set()
        self._free_in_page: dict[int, list[int]] = {}  # page in use -> its free block ids (absent when full)
        self._fullest: list[tuple[int, int]] = []  # heap of (rank key, page); stale entries are skipped
        self._num_free = 0
        self._closed = False
        self.null_block: Optional[int] = None
        self._pinned_page: Optional[int] = None  # the null block's page: mapped for good
        if reserve_null_block:
            ids = self.alloc(1)
            if ids is None:
                self.shutdown()
                raise MemoryError("no memory for the null block: the limit or the device's free memory is below one page")
            self.null_block = ids[0]
            self._pinned_page = self.layout.page_of(self.null_block)
            if self._pinned_page in self._free_in_page:  # ranked again, now first
                self._rank(self._pinned_page, len(self._free_in_page[self._pinned_page]))
        get_logger(config).debug(
            "KV cache on %s: %d pages of %d bytes (%d blocks each), %d block ids",
            self.device, self.layout.num_pages, self.layout.page_bytes, self.layout.blocks_per_page,
            self.layout.num_block_ids,
        )

    @cached_property
    def kv_tensors(self) -> list[torch.Tensor]:
        """One tensor per layer over the reservation (see layout.py), made on first use."""
        return self.layout.layer_views(self.vmm.tensor(self._base, self.layout.reserved_bytes))

    @property
    def ipc_name(self) -> Optional[str]:
        """The registry name when the observer is a registration (kvcached.open_cache), else None."""
        return getattr(self.observer, "name", None)

    @property
    def num_block_ids(self) -> int:
        """Size of the block-id space (first dimension of each layer tensor); ids handed out are sparse within it."""
        return self.layout.num_block_ids

    # ---- blocks ---------------------------------------------------------------------------------------------------

    def alloc(self, n: int, *, ignore_headroom: bool = False) -> Optional[list[int]]:
        """`n` block ids, or None (and no change) when the limit or the device's memory does not allow them.

        `ignore_headroom` skips the utilization cap (never the limit): for an engine that was already told the
        blocks are available and cannot take a refusal, when another process took memory in between.
        """
        if not isinstance(n, int) or n <= 0:
            raise ValueError(f"alloc() needs a block count > 0, got {n!r}")
        g = self.layout.blocks_per_page
        with self._lock:
            self._check_open()
            over = self.pages.pages_over_limit()
            if over and n > self._kept_free_blocks(over):
                return None
            new_pages = ceil_div(n - self._num_free, g) if n > self._num_free and not over else 0
            if new_pages and new_pages > self.pages.available_pages(ignore_headroom):
                return None
            if not self._map_pages(new_pages, ignore_headroom):
                return None
            ids: list[int] = []
            while len(ids) < n:
                page = self._fullest_page()
                free = self._free_in_page[page]
                take = min(n - len(ids), len(free))
                ids += free[: -take - 1 : -1]  # ascending
                del free[-take:]
                self._set_free_count(page, free)
            self._num_free -= n
            self._allocated.update(ids)
            return ids

    def free(self, ids: Iterable[int]) -> None:
        """Give back ids from alloc(); raises BlockError, changing nothing, if any is unknown, free or repeated."""
        ids = list(ids)
        with self._lock:
            self._check_open()
            self._check_freeable(ids)
            self._allocated.difference_update(ids)
            m = self.layout.ids_per_page
            first, last = min(ids) // m, max(ids) // m
            if first == last:  # the common case, one page: no per-id Python loop
                self._free_in_page.setdefault(first, []).extend(ids)
                touched = (first,)
            else:
                touched = {}
                for block in ids:
                    touched.setdefault(block // m, []).append(block)
                for page, blocks in touched.items():
                    self._free_in_page.setdefault(page, []).extend(blocks)
            self._num_free += len(ids)
            for page in touched:
                self._settle(page)

    def clear(self) -> None:
        """Free every block handed out (the null block stays)."""
        with self._lock:
            self._check_open()
            ids = sorted((i for i in self._allocated if i != self.null_block), reverse=True)
        if ids:
            self.free(ids)  # freed highest first, so that allocation restarts at the lowest ids as when fresh

    def available_size(self) -> int:
        """Blocks alloc() can hand out now: free blocks in mapped pages plus the pages still allowed."""
        with self._lock:
            self._check_open()
            return self._available_blocks()

    def num_allocated(self) -> int:
        with self._lock:
            return len(self._allocated)

    # ---- memory -------------------------------------------------------------------------------------------------

    def resize(self, limit_bytes: Optional[int]) -> None:
        """Cap mapped memory (None: no cap). Premapped memory above it is released now; blocks in use are kept.

        Waits while an engine holds `limit_lock` (see there)."""
        self._check_open()
        with self._limit_lock:
            self.pages.set_limit(limit_bytes)

    @property
    def limit_lock(self) -> threading.RLock:
        """Held by an engine across one scheduling step, so that the limit cannot fall between its question
        "how many blocks are available?" and its alloc() of them."""
        return self._limit_lock

    def page_fill(self, page: int) -> int:
        """Blocks of `page` that are allocated (0 for a page not in use)."""
        with self._lock:
            free = self._free_in_page.get(page)
            if free is None:
                return self.layout.blocks_per_page if page in self.pages.pages_in_use() else 0
            return self.layout.blocks_per_page - len(free)

    def trim(self) -> None:
        """Give premapped pages back now (an engine calls this when it goes idle); blocks in use are untouched."""
        self._check_open()
        self.pages.trim()

    def memory_stats(self) -> MemoryStats:
        return self.pages.stats()

    def block_stats(self) -> BlockStats:
        with self._lock:
            return BlockStats(
                allocated_blocks=len(self._allocated),
                free_blocks_in_mapped_pages=self._num_free,
                available_blocks=self._available_blocks(),
            )

    def shutdown(self) -> None:
        """Unmap everything and give the address space back. The KV tensors must not be touched afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self.observer is not None:
                self.observer.close()
        finally:
            self.pages.close()
            self.vmm.unreserve(self._base, self.layout.reserved_bytes)
            self.vmm.close()

    def _publish(self, stats: MemoryStats) -> None:
        """Called by the page allocator, under its lock, after every change of mapped memory."""
        if self.observer is not None:
            self.observer.publish(stats)

    # ---- internals (under self._lock) -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ShutdownError("the KV cache manager was shut down")

    def _check_freeable(self, ids: list[int]) -> None:
        unique = set(ids)
        if len(unique) != len(ids):
            raise BlockError(f"free() got repeated block ids: {sorted(i for i in unique if ids.count(i) > 1)[:8]}")
        if unique <= self._allocated and self.null_block not in unique:
            return
        if self.null_block in unique:
            raise BlockError(f"block {self.null_block} is the null block; it is never freed")
        bad = sorted(i for i in unique if i not in self._allocated)
        kinds = ["not a block id of this cache" if not self._is_id(i) else "not allocated" for i in bad[:8]]
        raise BlockError("free() got ids that are not allocated: " + ", ".join(f"{i} ({k})" for i, k in zip(bad, kinds)))

    def _is_id(self, block: object) -> bool:
        return isinstance(block, int) and self.layout.is_valid(block)

    def _available_blocks(self) -> int:
        over = self.pages.pages_over_limit()
        if over:
            return self._kept_free_blocks(over)
        return self._num_free + self.pages.available_pages() * self.layout.blocks_per_page

    def _kept_free_blocks(self, over: int) -> int:
        """Free blocks alloc() may hand out while `over` pages in use are above the limit: those of all but the
        `over` emptiest pages that can drain (not the null block's). alloc() fills the null block's page first and
        then the fullest, so it never touches those: they drain as the engine frees, and each is unmapped when its
        last block is freed."""
        draining = (len(f) for page, f in self._free_in_page.items() if page != self._pinned_page)
        return self._num_free - sum(heapq.nlargest(over, draining))

    def _map_pages(self, count: int, ignore_headroom: bool = False) -> bool:
        """Add `count` fresh pages; on a shortfall, give back those already taken and return False."""
        taken = []
        for _ in range(count):
            page = self.pages.alloc(ignore_headroom)
            if page is None:
                for p in taken:
                    self.pages.free(p)
                return False
            taken.append(page)
        g = self.layout.blocks_per_page
        for page in taken:
            self._free_in_page[page] = list(reversed(self.layout.block_ids(page)))  # lowest id handed out first
            self._num_free += g
            self._rank(page, g)
        return True

    def _fullest_page(self) -> int:
        """The null block's page while it has free blocks, else the page with the fewest free blocks, not full."""
        while True:
            key, page = self._fullest[0]
            free = self._free_in_page.get(page)
            if free and key == self._rank_key(page, len(free)):
                return page
            heapq.heappop(self._fullest)

    def _set_free_count(self, page: int, free: list[int]) -> None:
        if free:
            self._rank(page, len(free))
        else:
            del self._free_in_page[page]

    def _rank(self, page: int, free_count: int) -> None:
        heapq.heappush(self._fullest, (self._rank_key(page, free_count), page))
        if len(self._fullest) > 4 * len(self._free_in_page) + 64:  # drop stale entries now and then
            self._fullest = [(self._rank_key(p, len(f)), p) for p, f in self._free_in_page.items()]
            heapq.heapify(self._fullest)

    def _rank_key(self, page: int, free_count: int) -> int:
        """Pages are filled in ascending key order: the null block's page first (0: below any page with a free
        block), then the fullest."""
        return 0 if page == self._pinned_page else free_count

    def _settle(self, page: int) -> None:
        """After blocks of `page` were freed: give the page back when it is empty, else re-rank it."""
        free = self._free_in_page[page]
        if len(free) == self.layout.blocks_per_page:
            del self._free_in_page[page]
            self._num_free -= len(free)
            self.pages.free(page)
        else:
            self._rank(page, len(free))
