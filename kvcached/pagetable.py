"""A shared-memory page table: one process decides which pages are wanted, its followers map them and say how it went.

Note: in vLLM the block pool (scheduler) and the KV tensors (workers) live in different processes. Rather than send
map/unmap orders over a side channel, the scheduler's page allocator writes one byte per page ("wanted") into a small
shared-memory file through `TableVirtualMemory`, a VirtualMemory whose map/unmap only flip those bytes. Each worker
runs a `PageFollower`: a thread, woken through a FIFO next to the table, that makes the real mappings follow the table
(so premapped pages are mapped ahead, off the engine's thread), and a check before every step that maps whatever is
still missing. Unmapping happens only between steps (the follower takes its step lock), and only for pages still
unwanted at that moment, so a page the scheduler wants again is never taken away under a running step. An idle engine
sends no steps, yet its pages are still released: the follower thread needs none.

Note [one deciding process, N followers]: with tensor parallelism every rank holds its own shard of every page (the
same page numbers, `page_bytes` each, on its own device). The table has one row of answers per rank, each rank's
follower has its own step lock and follows the one `wanted` array on its own device. Ranks step together (vLLM sends
each step to all of them), and the scheduler's ordering argument below holds per rank: a page released while rank 1
is still inside step N waits for rank 1's step to end, whatever rank 0 did meanwhile. A page counts as mapped only
when every rank has answered for it (`TableVirtualMemory.settle`), so a promise holds on every device.

Note [a promise is only made for memory the worker holds]: when two engines race for a GPU's last memory, the
scheduler may decide to map a page that a worker then cannot get (CUDA out of memory). So the workers answer every
request: each `map` bumps that page's request number, and each follower writes back, in its rank's row, the last
request it answered and whether the page is mapped or failed (it never raises for lack of memory).
`TableVirtualMemory.settle()` waits for every rank's answer on the pages asked about (those of the blocks about to be
promised, not the reserve premapped for later) and names those that failed on any rank: the block pool promises
blocks to vLLM only after that (integrations/vllm/block_pool.py), and gives failed pages back instead, so vLLM waits
as with a full pool.

Note [the worker never holds more than the table wants]: the scheduler's page allocator keeps the wanted pages under
the limit at every instant (it marks a page unwanted before it lets another page be wanted in its place), so a
worker stays under the limit if it never holds more pages than the table wants at that moment. Two things broke that
before (tests/test_vllm_e2e.py caught the worker's resident KV one partly populated page over the limit):
  1. A step held a page the scheduler had just released (its unmap waits for the step to end), while the follower
     thread went on mapping newly wanted pages: old page + new page, one page over, until the step ended.
  2. A follower pass read the table twice, once to unmap and once to map: a page released between the two reads was
     kept while the page wanted in its place was mapped.
So each pass works from one consistent snapshot of the table (`PageTable.snapshot`), unmaps what it may, and maps
only while the pages it holds number fewer than the snapshot wants: a page still held by a running step keeps the
page wanted in its place waiting until the step ends (the running step cannot need it: it was scheduled before).

Note [nothing new, nothing to do]: both sides run on every scheduling step (settle() after each allocation, before_step()
before each model step), and with small blocks and a fast model a step takes a few milliseconds: a full pass over a
table of thousands of pages (~50-80 us each on the H100's host) cost vLLM a measurable share of its throughput. The
change counter says whether anything was asked since: settle() returns at once when nothing was marked since every
rank answered everything without a failure, and before_step() skips its pass when nothing was marked since a pass left
the mappings matching the table. after_step() wakes the follower thread only when a pass during the step had to leave
unmapping for later.

Memory headroom: the deciding side's free/total memory is the tightest device's, per rank on it (min over devices of
free // ranks there): on GPUs a page is mapped only if every GPU has room for its shard; with all ranks on host
memory each page costs one shard per rank, and is counted so. With unequal GPUs the free and total minima may come
from different devices: an approximation.

Limits: the snapshot and the answers rely on stores reaching other processes in order (x86-64's memory model); all
followers must share the host's /dev/shm (one node).
"""

from __future__ import annotations

import mmap
import os
import select
import stat
import struct
import threading
import time
from collections import Counter
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from .devices import parse_device
from .errors import DriverError, KVCachedError
from .units import ceil_div
from .vmm import VirtualMemory
from .vmm.probe import device_memory

_MAGIC = b"KVCPAGES"
_VERSION = 4
_HEADER = struct.Struct("<8sIIQQI")  # magic, version, num_pages, page_bytes, change counter, ranks
_COUNTER_AT = 24
_ARRAYS_AT = 64
POLL_S = 0.1  # the follower's fallback poll (a wake-up takes the engine's GIL); the wake FIFO wakes it at once
ANSWER_TIMEOUT_S = 60.0  # a worker that answers nothing for this long is stuck or dead
MAPPED, FAILED = 1, 2


_ARRAYS = (("request", np.uint32, False), ("answered", np.uint32, True), ("wanted", np.uint8, False),
           ("state", np.uint8, True))  # name, type, one row per rank


def _layout(num_pages: int, ranks: int) -> dict[str, tuple[int, type]]:
    """Offsets of the arrays after the header: the scheduler writes `wanted` and `request`, each rank's follower its
    row of `answered` (the request number it last answered) and of `state` (MAPPED or FAILED)."""
    offsets, at = {}, _ARRAYS_AT
    for name, dtype, per_rank in _ARRAYS:
        offsets[name] = (at, dtype)
        at += ceil_div((ranks if per_rank else 1) * num_pages * np.dtype(dtype).itemsize, 8) * 8
    offsets["end"] = (at, np.uint8)
    return offsets


class Snapshot(NamedTuple):
    wanted: np.ndarray
    request: np.ndarray
    changes: int  # the change counter the copies correspond to


class PageTable:
    """The table file and its wake FIFO. Create them in the deciding process; attach in the mapping process."""

    def __init__(self, path: str, fd: int, owner: bool) -> None:
        self.path, self._owner = path, owner
        try:
            size = os.fstat(fd).st_size
            header = os.pread(fd, _HEADER.size, 0)
            magic, version, self.num_pages, self.page_bytes, _, self.ranks = (
                _HEADER.unpack(header) if len(header) == _HEADER.size else (b"", 0, 0, 0, 0, 0))
            layout = _layout(self.num_pages, self.ranks)
            if magic != _MAGIC or version != _VERSION or self.ranks < 1 or size != layout["end"][0]:
                raise KVCachedError(f"{path} is not a kvcached page table (version {_VERSION})")
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        for name, dtype, per_rank in _ARRAYS:
            rows = self.ranks if per_rank else 1
            array = np.frombuffer(self._mm, dtype=dtype, count=rows * self.num_pages, offset=layout[name][0])
            setattr(self, name, array.reshape(rows, self.num_pages) if per_rank else array)
        # Read and write ends in one descriptor: writes never block or fail for want of a reader, and a reader never
        # sees end-of-file (which select would report as readable forever).
        self.wake_fd = os.open(path + ".wake", os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW)
        wake = os.fstat(self.wake_fd)
        if not stat.S_ISFIFO(wake.st_mode) or wake.st_uid != os.geteuid():
            os.close(self.wake_fd)
            raise KVCachedError(f"{path}.wake is not this user's FIFO; refusing to use it")
        self._lock = threading.Lock()

    @classmethod
    def create(cls, path: str, num_pages: int, page_bytes: int, ranks: int = 1) -> "PageTable":
        """A table for `ranks` followers (one per tensor-parallel rank), each answering in its own row."""
        if ranks < 1:
            raise ValueError(f"a page table needs at least one follower, got ranks={ranks}")
        os.mkfifo(path + ".wake", 0o600)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.ftruncate(fd, _layout(num_pages, ranks)["end"][0])
        os.pwrite(fd, _HEADER.pack(_MAGIC, _VERSION, num_pages, page_bytes, 0, ranks), 0)
        return cls(path, fd, owner=True)

    @classmethod
    def attach(cls, path: str) -> "PageTable":
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        if os.fstat(fd).st_uid != os.geteuid():
            os.close(fd)
            raise KVCachedError(f"{path} belongs to another user; refusing to use it")
        return cls(path, fd, owner=False)

    @property
    def changes(self) -> int:
        return struct.unpack_from("<Q", self._mm, _COUNTER_AT)[0]

    def snapshot(self) -> Snapshot:
        """What the scheduler wanted at one moment (see the Note): copies taken between two equal readings of the
        change counter. The writer stores the bytes before it bumps the counter, so an equal pair means the copies
        saw every change before the first reading and at most the one change in progress: a state the table was in."""
        while True:
            before = self.changes
            shot = Snapshot(self.wanted.copy(), self.request.copy(), before)
            if self.changes == before:
                return shot

    def set_wanted(self, page: int, wanted: bool) -> int:
        """Mark a page (un)wanted and wake the follower; returns the page's request number."""
        with self._lock:
            if wanted:
                self.request[page] += 1
            self.wanted[page] = 1 if wanted else 0
            struct.pack_into("<Q", self._mm, _COUNTER_AT, self.changes + 1)  # after the bytes: see snapshot()
            self.wake()
            return int(self.request[page])

    def answer(self, rank: int, page: int, request: int, state: int) -> None:
        """Rank `rank`'s answer to a page's request number: MAPPED or FAILED (state first, then the number)."""
        self.state[rank, page] = state
        self.answered[rank, page] = request

    def wake(self) -> None:
        try:
            os.write(self.wake_fd, b"!")
        except BlockingIOError:  # the FIFO is full of wake-ups not yet read: the follower is awake anyway
            pass

    def unlink(self) -> None:
        """Remove the files once every process has them open: nothing is left behind, even after kill -9."""
        for path in (self.path, self.path + ".wake"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        for name, _, _ in _ARRAYS:
            setattr(self, name, None)  # release the numpy views before the mapping
        try:
            self._mm.close()
        except BufferError:  # a view is still alive somewhere; the OS frees it at exit
            pass
        os.close(self.wake_fd)
        if self._owner:
            self.unlink()


class TableVirtualMemory(VirtualMemory):
    """The deciding side's VirtualMemory: map/unmap mark pages in the table; memory figures come from the followers'
    devices (one per rank, in rank order), per rank (see the Note on headroom)."""

    def __init__(self, table: PageTable, devices: Sequence[str], granularity: int) -> None:
        if isinstance(devices, str) or len(devices) != table.ranks:
            raise ValueError(f"the page table has {table.ranks} followers: give one device per rank, got {devices!r}")
        self._devices = tuple(str(parse_device(device)) for device in devices)
        self.table, self.device, self.granularity = table, self._devices[0], granularity
        self._settled_at: Optional[int] = None  # change counter when every rank had answered all, no failure

    @property
    def devices(self) -> tuple[str, ...]:
        """The followers' devices, in rank order."""
        return self._devices

    def reserve(self, size: int) -> int:
        return 0  # addresses are offsets into the worker's reservation

    def unreserve(self, address: int, size: int) -> None:
        pass

    def map(self, address: int, size: int) -> None:
        self.table.set_wanted(self._page(address, size), True)

    def unmap(self, address: int, size: int) -> None:
        self.table.set_wanted(self._page(address, size), False)

    def settle(self, pages: Optional[Iterable[int]] = None, timeout_s: float = ANSWER_TIMEOUT_S) -> list[int]:
        """Wait until every rank has answered for `pages` (wanted ones; default: every wanted page); returns those
        some rank could not map (see the Notes). A caller about to promise blocks names their pages: pages premapped
        ahead for later (the reserve) are no reason to wait.

        Raises DriverError, naming the ranks, when answers are missing after `timeout_s` (a worker is stuck or dead)."""
        table, deadline = self.table, time.monotonic() + timeout_s
        changes = table.changes  # read before the arrays: a page marked meanwhile makes the next call look again
        if changes == self._settled_at:
            return []  # see the Note [nothing new, nothing to do]
        if pages is not None:
            return self._settle_pages(sorted(set(pages)), deadline, timeout_s)
        while True:
            wanted = table.wanted.astype(bool)
            late = (table.answered[:, wanted] != table.request[wanted]).any(axis=1)
            if not late.any():
                failed = np.flatnonzero(wanted & (table.state == FAILED).any(axis=0)).tolist()
                self._settled_at = None if failed else changes
                return failed
            if time.monotonic() > deadline:
                raise _no_answer(np.flatnonzero(late).tolist(), timeout_s)
            time.sleep(0.0001)

    def _settle_pages(self, pages: list[int], deadline: float, timeout_s: float) -> list[int]:
        """settle() for the few pages of one allocation, every step or so: plain indexing, no whole-table arrays."""
        table, ranks = self.table, range(self.table.ranks)
        answered, request, state = table.answered, table.request, table.state
        while True:
            late = [rank for rank in ranks if any(answered[rank, page] != request[page] for page in pages)]
            if not late:
                return [page for page in pages if any(state[rank, page] == FAILED for rank in ranks)]
            if time.monotonic() > deadline:
                raise _no_answer(late, timeout_s)
            time.sleep(0.0001)

    def total_memory(self) -> int:
        return self._per_rank(1)

    def free_memory(self) -> int:
        return self._per_rank(0)

    def _per_rank(self, which: int) -> int:
        """device_memory's figure `which` (0 free, 1 total) for one rank: the tightest device's, divided among the
        ranks on it (see the Note on headroom)."""
        return min(device_memory(device)[which] // ranks for device, ranks in Counter(self._devices).items())

    def tensor(self, address: int, size: int) -> torch.Tensor:
        raise KVCachedError("the scheduler's side of a page table has no KV tensors: they live in the worker")

    def _page(self, address: int, size: int) -> int:
        if size != self.table.page_bytes or address % size:
            raise ValueError(f"page table pages are {self.table.page_bytes} bytes at page boundaries")
        return address // size


def _no_answer(ranks: list[int], timeout_s: float) -> DriverError:
    return DriverError(f"the worker (rank {', '.join(map(str, ranks))}) did not map the KV pages the scheduler wants "
                       f"within {timeout_s:.0f} s")


class PageFollower:
    """The mapping side of rank `rank`: keeps [base, base + num_pages * page_bytes) of `vmm` mapped as the table
    says, and answers in the rank's row."""

    def __init__(self, table: PageTable, vmm: VirtualMemory, base: int, poll_s: float = POLL_S,
                 on_error: Optional[Callable[[BaseException], None]] = None, rank: int = 0) -> None:
        if not 0 <= rank < table.ranks:
            raise ValueError(f"rank {rank} is not one of the page table's {table.ranks} followers")
        self.table, self._vmm, self._base, self.rank = table, vmm, base, rank
        self.mapped = np.zeros(table.num_pages, dtype=np.uint8)
        self._failed = np.zeros(table.num_pages, dtype=np.uint32)  # request number whose map failed, per page
        self._map_lock = threading.Lock()  # one mapper at a time
        self._step_lock = threading.Lock()  # held across a step: no unmap while one runs
        self._poll_s, self._on_error = poll_s, on_error
        self._synced_at: Optional[int] = None  # change counter of the last pass that left the mappings as wanted
        self._deferred = False  # a pass during a step left unmapping for after it
        self._extra: set[int] = set()  # pages mapped for the worker's own use, not the table's (map_extra)
        self._stop = threading.Event()
        self._sync(unmap=True)
        self._thread = threading.Thread(target=self._run, name="kvcached-follower", daemon=True)
        self._thread.start()

    def before_step(self) -> None:
        """Settle the table now: unmap what is no longer wanted, then map every wanted page; then hold off unmapping
        until after_step()."""
        self._step_lock.acquire()
        try:
            if self.table.changes != self._synced_at:  # see the Note [nothing new, nothing to do]
                self._sync(unmap=True)
        except BaseException:
            self._step_lock.release()
            raise

    def after_step(self) -> None:
        self._step_lock.release()
        if self._deferred:
            self._deferred = False
            self.table.wake()  # unmapping that waited for the step can go on now

    def sync(self) -> bool:
        """Follow the table once; unmapping waits for the running step, if any. Returns whether all was done."""
        if not self._step_lock.acquire(blocking=False):
            self._deferred = True
            self._sync(unmap=False)
            return False
        try:
            return self._sync(unmap=True)
        finally:
            self._step_lock.release()

    def map_extra(self, pages: Iterable[int]) -> None:
        """Map pages the table does not want, for KV that the worker writes on its own (vLLM's V2 warm-up makes up
        requests with blocks 1, 2, ... that no scheduler handed out), until unmap_extra(). A page the table comes to
        want meanwhile becomes the table's. Raises DriverError when the device has no memory for them."""
        size = self.table.page_bytes
        with self._map_lock:
            for page in sorted(set(pages) - self._extra):
                if not self.mapped[page]:
                    self._vmm.map(self._base + page * size, size)
                    self._extra.add(page)

    def unmap_extra(self) -> None:
        """Unmap what map_extra() mapped (the caller has made sure no kernel still uses it)."""
        size = self.table.page_bytes
        with self._map_lock:
            for page in sorted(self._extra):
                self._vmm.unmap(self._base + page * size, size)
            self._extra.clear()

    def _sync(self, unmap: bool) -> bool:
        """Unmap (when allowed) what the table no longer wants, then map what it wants, never holding more pages than
        it wants, and answer every request (see the Notes). Returns whether the mappings now match the table."""
        size, table = self.table.page_bytes, self.table
        with self._map_lock:
            wanted, request, changes = table.snapshot()
            for page in [page for page in self._extra if wanted[page]]:  # mapped already: the table's now
                self._extra.discard(page)
                self.mapped[page] = 1
            if unmap:
                for page in np.flatnonzero(wanted < self.mapped).tolist():
                    self._vmm.unmap(self._base + page * size, size)
                    self.mapped[page] = 0
            self._failed[wanted == 0] = 0
            missing = np.flatnonzero((wanted > self.mapped) & (self._failed != request))
            room = int(np.count_nonzero(wanted)) - int(np.count_nonzero(self.mapped))
            for page in missing[: max(0, room)].tolist():
                try:
                    self._vmm.map(self._base + page * size, size)
                except DriverError as exc:
                    if not exc.out_of_memory:
                        raise
                    self._failed[page] = request[page]
                    table.answer(self.rank, page, int(request[page]), FAILED)
                    continue
                self.mapped[page] = 1
            held = (wanted & self.mapped).astype(bool)
            for page in np.flatnonzero(held & (table.answered[self.rank] != request)).tolist():
                table.answer(self.rank, page, int(request[page]), MAPPED)
            done = bool(np.array_equal(wanted.astype(bool) & (self._failed != request), self.mapped.astype(bool)))
            self._synced_at = changes if done else None
            return done

    def mapped_bytes(self) -> int:
        return int(self.mapped.sum()) * self.table.page_bytes

    def close(self) -> None:
        """Stop following and unmap everything this follower mapped."""
        self._stop.set()
        self.table.wake()
        self._thread.join()
        self.unmap_extra()
        with self._map_lock:
            for page in np.flatnonzero(self.mapped).tolist():
                self._vmm.unmap(self._base + page * self.table.page_bytes, self.table.page_bytes)
                self.mapped[page] = 0

    def _run(self) -> None:
        settled, seen = True, -1
        while not self._stop.is_set():
            readable, _, _ = select.select([self.table.wake_fd], [], [], self._poll_s)
            if readable:
                try:
                    os.read(self.table.wake_fd, 65536)
                except BlockingIOError:
                    pass
            try:
                changes = self.table.changes
                if changes == seen and settled:
                    continue
                seen = changes
                settled = self.sync()
            except Exception as exc:  # keep following; report the failure
                if self._on_error is not None:
                    self._on_error(exc)
                time.sleep(0.1)
