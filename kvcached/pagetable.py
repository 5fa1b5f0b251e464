"""A shared-memory page table: one process decides which pages are wanted, another maps them.

Note: in vLLM the block pool (scheduler) and the KV tensors (worker) live in different processes. Rather than send
map/unmap orders over a side channel, the scheduler's page allocator writes one byte per page ("wanted") into a small
shared-memory file through `TableVirtualMemory`, a VirtualMemory whose map/unmap only flip those bytes. The worker
runs a `PageFollower`: a thread that makes the real mappings follow the table a few milliseconds later (so premapped
pages are mapped ahead, off the engine's thread), and a check before every step that maps whatever the step needs and
is still missing. Unmapping happens only between steps (the follower takes the step lock), and only for pages still
unwanted at that moment, so a page the scheduler wants again is never taken away under a running step. An idle engine
sends no steps, yet its pages are still released: the follower thread needs none.

Note [the worker never holds more than the table wants]: the scheduler's page allocator keeps the wanted pages under
the limit at every instant (it marks a page unwanted before it lets another page be wanted in its place), so the
worker stays under the limit if it never holds more pages than the table wants at that moment. Two things broke that
before (tests/test_vllm_e2e.py caught the worker's resident KV one partly populated page over the limit):
  1. A step held a page the scheduler had just released (its unmap waits for the step to end), while the follower
     thread went on mapping newly wanted pages: old page + new page, one page over, until the step ended.
  2. A follower pass read the table twice, once to unmap and once to map: a page released between the two reads was
     kept while the page wanted in its place was mapped.
So each pass works from one consistent snapshot of the table (`PageTable.snapshot`), unmaps what it may, and maps
only while the pages it holds number fewer than the snapshot wants: a page still held by a running step keeps the
page wanted in its place waiting until the step ends (the running step cannot need it: it was scheduled before).

Limits: one scheduler and one worker per table (tensor_parallel_size 1); the scheduler's accounting runs ahead of the
worker's mappings by the follower's poll interval (the worker's memory lags, never leads). The snapshot relies on
stores reaching other processes in order (x86-64's memory model).
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from typing import Callable, Optional

import numpy as np
import torch

from .errors import KVCachedError
from .vmm import VirtualMemory
from .vmm.probe import device_memory

_MAGIC = b"KVCPAGE1"
_VERSION = 2
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, num_pages, page_bytes, change counter
_COUNTER_AT = 24
_WANTED_AT = 64
POLL_S = 0.005


class PageTable:
    """The wanted-bytes file. Create it in the deciding process; attach to it in the mapping process."""

    def __init__(self, path: str, fd: int, owner: bool) -> None:
        self.path, self._owner = path, owner
        try:
            size = os.fstat(fd).st_size
            header = os.pread(fd, _HEADER.size, 0)
            magic, version, self.num_pages, self.page_bytes, _ = (
                _HEADER.unpack(header) if len(header) == _HEADER.size else (b"", 0, 0, 0, 0))
            if magic != _MAGIC or version != _VERSION or size != _WANTED_AT + self.num_pages:
                raise KVCachedError(f"{path} is not a kvcached page table (version {_VERSION})")
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.wanted = np.frombuffer(self._mm, dtype=np.uint8, count=self.num_pages, offset=_WANTED_AT)
        self._lock = threading.Lock()

    @classmethod
    def create(cls, path: str, num_pages: int, page_bytes: int) -> "PageTable":
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.ftruncate(fd, _WANTED_AT + num_pages)
        os.pwrite(fd, _HEADER.pack(_MAGIC, _VERSION, num_pages, page_bytes, 0), 0)
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

    def snapshot(self) -> np.ndarray:
        """The wanted bytes as they were at one moment (see the Note): a copy taken between two equal readings of
        the change counter. The writer stores a byte before it bumps the counter, so an equal pair means the copy
        saw every change before the first reading and at most the one change in progress: a state the table was in."""
        while True:
            before = self.changes
            wanted = self.wanted.copy()
            if self.changes == before:
                return wanted

    def set_wanted(self, page: int, wanted: bool) -> None:
        with self._lock:  # byte first, then the counter: a follower that sees the new count sees the byte
            self.wanted[page] = 1 if wanted else 0
            struct.pack_into("<Q", self._mm, _COUNTER_AT, self.changes + 1)

    def unlink(self) -> None:
        """Remove the file once every process has it mapped: nothing is left behind, even after kill -9."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.wanted = None  # release the numpy view before the mapping
        try:
            self._mm.close()
        except BufferError:  # a view is still alive somewhere; the OS frees it at exit
            pass
        if self._owner:
            self.unlink()


class TableVirtualMemory(VirtualMemory):
    """The deciding side's VirtualMemory: map/unmap mark pages in the table; memory figures come from the device."""

    def __init__(self, table: PageTable, device: str, granularity: int) -> None:
        self.table, self.device, self.granularity = table, device, granularity

    def reserve(self, size: int) -> int:
        return 0  # addresses are offsets into the worker's reservation

    def unreserve(self, address: int, size: int) -> None:
        pass

    def map(self, address: int, size: int) -> None:
        self.table.set_wanted(self._page(address, size), True)

    def unmap(self, address: int, size: int) -> None:
        self.table.set_wanted(self._page(address, size), False)

    def total_memory(self) -> int:
        return device_memory(self.device)[1]

    def free_memory(self) -> int:
        return device_memory(self.device)[0]

    def tensor(self, address: int, size: int) -> torch.Tensor:
        raise KVCachedError("the scheduler's side of a page table has no KV tensors: they live in the worker")

    def _page(self, address: int, size: int) -> int:
        if size != self.table.page_bytes or address % size:
            raise ValueError(f"page table pages are {self.table.page_bytes} bytes at page boundaries")
        return address // size


class PageFollower:
    """The mapping side: keeps [base, base + num_pages * page_bytes) of `vmm` mapped as the table says."""

    def __init__(self, table: PageTable, vmm: VirtualMemory, base: int, poll_s: float = POLL_S,
                 on_error: Optional[Callable[[BaseException], None]] = None) -> None:
        self.table, self._vmm, self._base = table, vmm, base
        self.mapped = np.zeros(table.num_pages, dtype=np.uint8)
        self._map_lock = threading.Lock()  # one mapper at a time
        self._step_lock = threading.Lock()  # held across a step: no unmap while one runs
        self._poll_s, self._on_error = poll_s, on_error
        self._seen = -1
        self._stop = threading.Event()
        self._sync(unmap=True)
        self._thread = threading.Thread(target=self._run, name="kvcached-follower", daemon=True)
        self._thread.start()

    def before_step(self) -> None:
        """Settle the table now: unmap what is no longer wanted, then map every wanted page (the step may touch it);
        then hold off unmapping until after_step()."""
        self._step_lock.acquire()
        try:
            self._sync(unmap=True)
        except BaseException:
            self._step_lock.release()
            raise

    def after_step(self) -> None:
        self._step_lock.release()

    def sync(self) -> bool:
        """Follow the table once; unmapping waits for the running step, if any. Returns whether all was done."""
        if not self._step_lock.acquire(blocking=False):
            self._sync(unmap=False)
            return False
        try:
            return self._sync(unmap=True)
        finally:
            self._step_lock.release()

    def _sync(self, unmap: bool) -> bool:
        """Unmap (when allowed) what the table no longer wants, then map what it wants, never holding more pages
        than it wants (see the Note). Returns whether the mappings now match the table."""
        size = self.table.page_bytes
        with self._map_lock:
            wanted = self.table.snapshot()
            if unmap:
                for page in np.flatnonzero(wanted < self.mapped).tolist():
                    self._vmm.unmap(self._base + page * size, size)
                    self.mapped[page] = 0
            room = int(np.count_nonzero(wanted)) - int(np.count_nonzero(self.mapped))
            for page in np.flatnonzero(wanted > self.mapped)[: max(0, room)].tolist():
                self._vmm.map(self._base + page * size, size)
                self.mapped[page] = 1
            return bool(np.array_equal(wanted, self.mapped))

    def mapped_bytes(self) -> int:
        return int(self.mapped.sum()) * self.table.page_bytes

    def close(self) -> None:
        """Stop following and unmap everything this follower mapped."""
        self._stop.set()
        self._thread.join()
        with self._map_lock:
            for page in np.flatnonzero(self.mapped).tolist():
                self._vmm.unmap(self._base + page * self.table.page_bytes, self.table.page_bytes)
                self.mapped[page] = 0

    def _run(self) -> None:
        settled = True
        while not self._stop.wait(self._poll_s):
            try:
                changes = self.table.changes
                if changes == self._seen and settled:
                    continue
                self._seen = changes
                settled = self.sync()
            except Exception as exc:  # keep following; report the failure
                if self._on_error is not None:
                    self._on_error(exc)
                time.sleep(0.1)
