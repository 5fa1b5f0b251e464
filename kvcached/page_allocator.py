"""Physical pages of one reservation: which are mapped, which are in use, and how many may be.

Note: every page is in exactly one state: unmapped, premapped (mapped and free: the reserve), or in use. The engine's
thread calls alloc()/free(); it takes a page from the reserve when there is one, which costs no driver call. A mapper
thread keeps the reserve between KVCACHED_MIN_RESERVED_PAGES and KVCACHED_MAX_RESERVED_PAGES while the engine is
busy, and unmaps it all once no alloc came for KVCACHED_TRIM_IDLE_S seconds, so idle memory falls to the pages in use.
Driver calls are made without holding the lock, so the engine's thread never waits for a map it did not ask for;
pages being mapped or unmapped are counted as mapped meanwhile, so the limit holds at every instant.

The limit (bytes) can change at any time: raising it takes effect at once; lowering it unmaps premapped pages at once,
in the caller's thread, and never touches a page in use: the excess shows as a deficit until the engine frees it, a
page freed meanwhile is unmapped at once (in the freeing thread, not put in the reserve), and no page is mapped while
mapped memory is at or above the limit. Before mapping, the device must stay under KVCACHED_GPU_UTILIZATION of its
total memory, as the driver (or OS) reports its free memory: several engines on one device each check this, so one
cannot take the last memory another one needs to make progress.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import DriverError, ShutdownError
from .vmm import VirtualMemory

logger = logging.getLogger("kvcached")

_HEADROOM_CACHE_S = 0.05


@dataclass(frozen=True)
class MemoryStats:
    limit_bytes: int
    used_bytes: int  # pages in use
    premapped_bytes: int  # pages mapped but free (the reserve)
    page_bytes: int
    virtual_bytes: int

    @property
    def mapped_bytes(self) -> int:
        return self.used_bytes + self.premapped_bytes


class PageAllocator:
    def __init__(
        self,
        vmm: VirtualMemory,
        base: int,
        page_bytes: int,
        num_pages: int,
        *,
        min_reserved: int,
        max_reserved: int,
        utilization: float,
        trim_idle_s: float,
        limit_bytes: Optional[int] = None,
        background: bool = True,
        on_change: Optional[Callable[[MemoryStats], None]] = None,
        free_memory: Optional[Callable[[], int]] = None,
    ) -> None:
        """`free_memory` is where the utilization cap reads the device's free bytes (default: the backend's
        free_memory(), which counts every process); `on_change` is called under the lock after every change."""
        self._vmm, self._base, self.page_bytes, self.num_pages = vmm, base, page_bytes, num_pages
        self._free_memory = free_memory or vmm.free_memory
        self._min_reserved, self._max_reserved = min_reserved, max_reserved
        self._utilization, self._trim_idle_s = utilization, trim_idle_s
        self._total_memory = vmm.total_memory()
        self._on_change = on_change
        self._lock = threading.Condition()
        self._unmapped = list(range(num_pages))  # a heap: lowest pages first keeps used addresses dense
        self._reserve: list[int] = []
        self._in_use: set[int] = set()
        self._in_flight = 0  # pages being mapped or unmapped right now
        self._limit_pages = num_pages
        self._limit_bytes = num_pages * page_bytes
        self._last_alloc = float("-inf")
        self._headroom: tuple[float, int, int] = (float("-inf"), 0, 0)  # (when, device used bytes, our pages then)
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self.set_limit(limit_bytes)
        if background:
            self._thread = threading.Thread(target=self._run_mapper, name="kvcached-mapper", daemon=True)
            self._thread.start()

    # ---- the engine's calls -------------------------------------------------------------------------------------

    def alloc(self, ignore_headroom: bool = False) -> Optional[int]:
        """A mapped page now in use, or None when the limit or the device's memory allows no more.

        `ignore_headroom` skips the utilization cap, never the limit."""
        with self._lock:
            self._check_open()
            self._last_alloc = time.monotonic()
            if self._reserve:
                page, must_map = self._reserve.pop(), False
            elif self._mappable_pages(ignore_headroom) > 0:
                page, must_map = heapq.heappop(self._unmapped), True
                self._in_flight += 1
            else:
                return None
            if not must_map:
                self._in_use.add(page)
                self._after_change()
        if must_map and not self._map_into_use(page):
            return None
        self._kick()
        return page

    def _map_into_use(self, page: int) -> bool:
        """Map a page taken off the unmapped heap for alloc(), in the caller's thread (the reserve was empty)."""
        mapped = self._map(page)
        with self._lock:
            self._in_flight -= 1
            if mapped:
                self._in_use.add(page)
            else:
                heapq.heappush(self._unmapped, page)
            self._after_change()
        return mapped

    def free(self, page: int) -> None:
        """Give back a page from alloc(); it joins the reserve, or is unmapped at once while mapped memory is above
        the limit, so that memory comes down to a lowered limit as pages are freed."""
        with self._lock:
            self._check_open()
            if page not in self._in_use:
                raise ValueError(f"page {page} is not in use")
            self._in_use.remove(page)
            over_limit = self._mapped_pages() >= self._limit_pages  # counting the page: the limit fell below use
            if over_limit:
                self._in_flight += 1
            else:
                self._reserve.append(page)
            self._after_change()
        if over_limit:  # unmapped now, in the caller's thread: never handed out again above the limit
            self._unmap_all([page])
        else:
            self._kick()

    def available_pages(self, ignore_headroom: bool = False) -> int:
        """Pages alloc() can hand out now: the reserve plus what may still be mapped."""
        with self._lock:
            return len(self._reserve) + self._mappable_pages(ignore_headroom)

    def pages_over_limit(self) -> int:
        """Pages in use above the limit (it was lowered below them): they are unmapped as they are freed."""
        with self._lock:
            return max(0, len(self._in_use) - self._limit_pages)

    def pages_in_use(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._in_use)

    def set_limit(self, limit_bytes: Optional[int]) -> None:
        """Cap mapped memory at `limit_bytes` (None: no cap); premapped pages above it are unmapped before returning."""
        if limit_bytes is not None and limit_bytes < 0:
            raise ValueError(f"limit must be >= 0 bytes, got {limit_bytes}")
        with self._lock:
            self._check_open()
            self._limit_bytes = self.num_pages * self.page_bytes if limit_bytes is None else limit_bytes
            self._limit_pages = min(self.num_pages, self._limit_bytes // self.page_bytes)
            excess = self._mapped_pages() - self._limit_pages
            victims = self._take_reserve(max(0, excess))
        self._unmap_all(victims)
        with self._lock:
            self._after_change()
            self._lock.notify_all()

    def stats(self) -> MemoryStats:
        with self._lock:
            return self._stats()

    def trim(self) -> None:
        """Unmap the whole reserve now, as after KVCACHED_TRIM_IDLE_S without an alloc: for an engine that knows
        it just went idle. The reserve is built again from the next alloc on."""
        with self._lock:
            self._check_open()
            self._last_alloc = float("-inf")
            victims = self._take_reserve(len(self._reserve))
        self._unmap_all(victims)

    def balance(self) -> bool:
        """One pass of the mapper's work: refill the reserve while busy, trim it when above bounds or idle.

        Returns whether anything was mapped or unmapped."""
        with self._lock:
            to_unmap = self._take_reserve(self._reserve_excess())
            to_map = self._pages_to_premap()
        self._unmap_all(to_unmap)
        mapped = [page for page in to_map if self._map(page)]
        with self._lock:
            self._in_flight -= len(to_map)
            self._reserve.extend(mapped)
            for page in to_map:
                if page not in mapped:
                    heapq.heappush(self._unmapped, page)
            late = self._take_reserve(self._mapped_pages() - self._limit_pages)  # the limit fell while mapping
            self._after_change()
        self._unmap_all(late)
        return bool(to_unmap or mapped)

    def close(self) -> None:
        """Stop the mapper and unmap every page, in use or not; the allocator cannot be used afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            pages = self._reserve + sorted(self._in_use)
            self._reserve, self._in_use = [], set()
            self._in_flight += len(pages)
        self._unmap_all(pages)

    # ---- internals (the lock is held where a name says so) ------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ShutdownError("the KV cache was shut down")

    def _mapped_pages(self) -> int:
        return len(self._in_use) + len(self._reserve) + self._in_flight

    def _mappable_pages(self, ignore_headroom: bool = False) -> int:
        room = min(self._limit_pages - self._mapped_pages(), len(self._unmapped))
        return max(0, room if ignore_headroom else min(room, self._headroom_pages()))

    def _headroom_pages(self) -> int:
        """Pages the device can still take under the utilization cap.

        The driver's free memory is read at most every 50 ms; pages this allocator mapped or unmapped since the
        reading are accounted exactly, so the cap holds for our own mappings even between readings.
        """
        now = time.monotonic()
        when, used, mapped_then = self._headroom
        if now - when > _HEADROOM_CACHE_S:
            used, mapped_then = self._total_memory - self._free_memory(), self._mapped_pages()
            self._headroom = (now, used, mapped_then)
        used += (self._mapped_pages() - mapped_then) * self.page_bytes
        return int((self._utilization * self._total_memory - used) // self.page_bytes)

    def _reserve_excess(self) -> int:
        idle = time.monotonic() - self._last_alloc >= self._trim_idle_s
        keep = 0 if idle else self._max_reserved
        over_limit = self._mapped_pages() - self._limit_pages
        return max(len(self._reserve) - keep, over_limit, 0)

    def _pages_to_premap(self) -> list[int]:
        if time.monotonic() - self._last_alloc >= self._trim_idle_s:
            return []
        want = self._min_reserved - len(self._reserve) - self._in_flight
        count = min(want, self._mappable_pages())
        pages = [heapq.heappop(self._unmapped) for _ in range(max(0, count))]
        self._in_flight += len(pages)
        return pages

    def _take_reserve(self, count: int) -> list[int]:
        """Remove `count` pages from the reserve (highest first) to be unmapped; they count as in flight."""
        if count <= 0:
            return []
        self._reserve.sort()
        victims, self._reserve = self._reserve[-count:], self._reserve[:-count]
        self._in_flight += len(victims)
        return victims

    def _after_change(self) -> None:
        if self._on_change is not None:
            self._on_change(self._stats())
        if self._thread is not None and self._needs_balance():
            self._lock.notify_all()

    def _needs_balance(self) -> bool:
        """Whether balance() has work it can do now (so the mapper never spins on work it cannot do)."""
        if self._reserve_excess() > 0:
            return True
        busy = time.monotonic() - self._last_alloc < self._trim_idle_s
        short = len(self._reserve) + self._in_flight < self._min_reserved
        return busy and short and self._mappable_pages() > 0

    def _kick(self) -> None:
        """Without a mapper thread, the caller does the mapper's work."""
        if self._thread is None:
            self.balance()

    def _stats(self) -> MemoryStats:
        return MemoryStats(
            limit_bytes=self._limit_bytes,
            used_bytes=len(self._in_use) * self.page_bytes,
            premapped_bytes=len(self._reserve) * self.page_bytes,
            page_bytes=self.page_bytes,
            virtual_bytes=self.num_pages * self.page_bytes,
        )

    # ---- driver calls, made without the lock ----------------------------------------------------------------------

    def _map(self, page: int) -> bool:
        try:
            self._vmm.map(self._base + page * self.page_bytes, self.page_bytes)
            return True
        except DriverError as exc:
            if not exc.out_of_memory:
                raise
            logger.warning("mapping page %d failed, the device is out of memory: %s", page, exc)
            return False

    def _unmap_all(self, pages: list[int]) -> None:
        for page in pages:
            self._vmm.unmap(self._base + page * self.page_bytes, self.page_bytes)
        if pages:
            with self._lock:
                self._in_flight -= len(pages)
                for page in pages:
                    heapq.heappush(self._unmapped, page)
                self._after_change()

    def _run_mapper(self) -> None:
        progressed = True
        while True:
            with self._lock:
                if self._closed:
                    return
                if not (progressed and self._needs_balance()):  # a notify sent while we balanced is not lost
                    self._lock.wait(timeout=self._next_wakeup())
                if self._closed:
                    return
            try:
                progressed = self.balance()
            except Exception:  # a failing driver must not kill the thread silently
                logger.exception("kvcached mapper: balancing the reserve failed")
                progressed = False

    def _next_wakeup(self) -> Optional[float]:
        """Seconds until the reserve must be trimmed for idleness; None when there is nothing to wait for."""
        if not self._reserve:
            return 0.1 if self._needs_balance() else None  # work that could not be done: retry later
        return max(0.0, self._last_alloc + self._trim_idle_s - time.monotonic()) + 0.001
