"""A shared-memory page table: one process decides which pages are wanted, another maps them.

Note: in vLLM the block pool (scheduler) and the KV tensors (worker) live in different processes. Rather than send
map/unmap orders over a side channel, the scheduler's page allocator writes one byte per page ("wanted") into a small
shared-memory file through `TableVirtualMemory`, a VirtualMemory whose map/unmap only flip those bytes. The worker
runs a `PageFollower`: a thread that makes the real mappings follow the table a few milliseconds later (so premapped
pages are mapped ahead, off the engine's thread), and a check before every step that maps whatever the step needs and
is still missing. Unmapping happens only between steps (the follower takes the step lock), and only for pages still
unwanted at that moment, so a page the scheduler wants again is never taken away under a running step. An idle engine
sends no steps, yet its pages are still released: the follower thread needs none.

Limits: one scheduler and one worker per table (tensor_parallel_size 1); the scheduler's accounting runs ahead of the
worker's mappings by the follower's poll interval.
"""

from __future__ import annotations

import json
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
_HEADER = struct.Struct("<8sIIQQI")  # magic, version, num_pages, page_bytes, change counter, meta length
_COUNTER_AT = 24
_META_AT = 64
_META_MAX = 4096
POLL_S = 0.005


class PageTable:
    """The wanted-bytes file. Create it in the deciding process; attach to it in the mapping process."""

    def __init__(self, path: str, fd: int, owner: bool) -> None:
        self.path, self._owner = path, owner
        size = os.fstat(fd).st_size
        self._mm = mmap.mmap(fd, size)
        os.close(fd)
        magic, version, self.num_pages, self.page_bytes, _, meta_len = _HEADER.unpack_from(self._mm, 0)
        if magic != _MAGIC or version != 1:
            raise KVCachedError(f"{path} is not a kvcached page table")
        self.meta: dict = json.loads(bytes(self._mm[_META_AT : _META_AT + meta_len]))
        self.wanted = np.frombuffer(self._mm, dtype=np.uint8, count=self.num_pages, offset=_META_AT + _META_MAX)
        self._lock = threading.Lock()

    @classmethod
    def create(cls, path: str, num_pages: int, page_bytes: int, meta: dict) -> "PageTable":
        encoded = json.dumps(meta).encode()
        if len(encoded) > _META_MAX:
            raise ValueError(f"page table metadata is {len(encoded)} bytes, more than {_META_MAX}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.ftruncate(fd, _META_AT + _META_MAX + num_pages)
        os.pwrite(fd, _HEADER.pack(_MAGIC, 1, num_pages, page_bytes, 0, len(encoded)), 0)
        os.pwrite(fd, encoded, _META_AT)
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
            self._sync(unmap=True)
            return True
        finally:
            self._step_lock.release()

    def _sync(self, unmap: bool) -> None:
        """Unmap first, then map: memory never exceeds what the table wants plus what a running step still holds."""
        size = self.table.page_bytes
        with self._map_lock:
            if unmap:
                for page in np.flatnonzero(self.table.wanted < self.mapped).tolist():
                    self._vmm.unmap(self._base + page * size, size)
                    self.mapped[page] = 0
            for page in np.flatnonzero(self.table.wanted > self.mapped).tolist():
                self._vmm.map(self._base + page * size, size)
                self.mapped[page] = 1

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
