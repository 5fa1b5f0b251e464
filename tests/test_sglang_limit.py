"""A limit lowered by an operator in the middle of an SGLang burst, with the background mapper on (host backend).

`Scheduler` is SGLang's scheduling as far as memory goes: each step, under the limit lock (as autopatch.py holds it
around get_next_batch_to_run), every running request gets one token, the newest are retracted while tokens are short,
and waiting requests are admitted while their prompt fits; finished requests free their slots in one group after the
step, outside the lock, as SGLang does after the forward pass. The limit comes from another thread through
KVCacheManager.resize (the registry's watcher calls it so). Every change of memory is recorded in order by the
manager's observer, under the page allocator's lock, so the bounds are checked at every alloc and free, not sampled.
`RadixScheduler` adds SGLang's radix cache, its retraction order and its admission ratio, for the H100's limited burst.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from conftest import quiet_config
from kvcached import KVCacheManager, KVGeometry, MemoryStats
from kvcached.integrations.sglang.token_slots import TokenSlots

PAGE, TOKENS_PER_PAGE = 2 << 20, 1024  # SGLang's rows of 4 layers x 2 heads x 64 dims in bf16, 256 KiB per piece


class Recorder:
    """The manager's observer: every published change of memory, in order."""

    def __init__(self) -> None:
        self.stats: list[MemoryStats] = []

    def publish(self, stats: MemoryStats) -> None:
        self.stats.append(stats)

    def close(self) -> None:
        pass


@dataclass
class Request:
    prompt: int
    output: int
    slots: list[torch.Tensor] = field(default_factory=list)
    decoded: int = 0


class Scheduler:
    def __init__(self, slots: TokenSlots, requests: list[Request]) -> None:
        self.slots, self.waiting, self.running = slots, deque(requests), []
        self.finished: list[Request] = []

    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> None:
        with self.slots.kv.limit_lock:
            while self.running and self.slots.available_size() < len(self.running):
                self._retract(self.running.pop())
            if self.running:
                for request, slot in zip(self.running, self.slots.alloc(len(self.running)).split(1)):
                    request.slots.append(slot)
                    request.decoded += 1
            while self.waiting and self.slots.available_size() >= self.waiting[0].prompt + 64:
                request = self.waiting.popleft()
                request.slots.append(self.slots.alloc(request.prompt))
                self.running.append(request)
        done = [r for r in self.running if r.decoded == r.output]
        self.running = [r for r in self.running if r.decoded < r.output]
        self.slots.free_group_begin()
        for request in done:
            self.slots.free(torch.cat(request.slots))
        self.slots.free_group_end()
        self.finished += done

    def _retract(self, request: Request) -> None:
        self.slots.free(torch.cat(request.slots))
        request.slots, request.decoded = [], 0
        self.waiting.appendleft(request)


def test_a_limit_lowered_mid_burst_is_never_exceeded_and_memory_comes_down_to_it_as_slots_are_freed():
    recorder = Recorder()
    geometry = KVGeometry(4, (1, 2, 64), torch.bfloat16)
    kv = KVCacheManager(geometry, "cpu", virtual_bytes=32 * PAGE, background=True, observer=recorder,
                        config=quiet_config(page_size_mb=0.25, min_reserved_pages=1, max_reserved_pages=4,
                                            trim_idle_s=60.0))
    try:
        rng = random.Random(7)
        requests = [Request(prompt=300, output=rng.randint(50, 400)) for _ in range(48)]
        scheduler = Scheduler(TokenSlots(kv, 1, "cpu"), requests)
        limit, over, applied = 4 * PAGE, threading.Event(), threading.Event()

        def operator() -> None:  # `kvctl limit`, as the registry's watcher applies it
            over.wait()
            kv.resize(limit)
            applied.set()

        thread = threading.Thread(target=operator)
        thread.start()
        down_while_busy = False
        for _ in range(20000):  # a guard against a scheduler that never finishes, not a time limit
            if not scheduler.busy():
                break
            scheduler.step()
            mapped = kv.memory_stats().mapped_bytes
            if not over.is_set() and mapped > 2 * limit:
                over.set()
                applied.wait(300)  # the operator's request lands between two steps
            down_while_busy |= applied.is_set() and scheduler.busy() and mapped <= limit
            time.sleep(0.0002)  # the forward pass: the mapper thread runs meanwhile
        thread.join()
        assert sorted(r.output for r in scheduler.finished) == sorted(r.output for r in requests)
        assert [r.decoded for r in scheduler.finished] == [r.output for r in scheduler.finished]

        history = recorder.stats
        first = next(i for i, s in enumerate(history) if s.limit_bytes == limit)
        assert history[first].used_bytes > limit  # the limit came below what was in use: a deficit to give back
        lowest_used, exceeded = history[first].used_bytes, []
        for i, stats in enumerate(history[first:], first):
            lowest_used = min(lowest_used, stats.used_bytes)
            if stats.mapped_bytes > max(limit, lowest_used):
                exceeded.append((i, stats.used_bytes // PAGE, stats.premapped_bytes // PAGE))
        assert exceeded == []  # (change, pages in use, premapped pages) where mapped rose above the bound
        assert down_while_busy  # came down to the limit while requests still ran, not only once all finished
        assert kv.memory_stats().mapped_bytes <= limit
    finally:
        kv.shutdown()


def test_a_limit_lowered_after_the_padding_slots_page_emptied_is_reached_while_requests_keep_coming():
    """The H100 case (scripts/gpu/check_sglang.py): the first requests, on the padding slot's page, finished first, and
    requests kept coming as others finished. That page can never drain, so the pages that can must."""
    geometry = KVGeometry(4, (1, 2, 64), torch.bfloat16)
    kv = KVCacheManager(geometry, "cpu", virtual_bytes=32 * PAGE, background=False,
                        config=quiet_config(page_size_mb=0.25))
    try:
        slots = TokenSlots(kv, 1, "cpu")
        first = slots.alloc(TOKENS_PER_PAGE - 1)  # page 0, beside the padding slot
        running = deque(slots.alloc(256) for _ in range(12))  # pages 1-3, four requests each
        kv.resize(3 * PAGE)
        slots.free(first)
        pages, waiting = [], 0
        for _ in range(12):  # the oldest request finishes; a new one of 256 tokens comes, admitted when it fits
            slots.free(running.popleft())
            waiting += 1
            while waiting and slots.available_size() >= 256:
                running.append(slots.alloc(256))
                waiting -= 1
            pages.append(kv.memory_stats().mapped_bytes // PAGE)
        # new requests fill the padding slot's page first; page 1 drains as its four requests finish
        assert pages == [4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 3, 3]
        assert (len(running), waiting) == (11, 1)  # 3 pages hold 3 * 1024 - 1 tokens: 11 requests, one waits
    finally:
        kv.shutdown()


class RadixScheduler:
    """SGLang 0.5.15.post1's scheduling as far as memory goes, closer than `Scheduler`: finished requests' tokens stay in
    the radix cache (least recently finished evicted first, down to the prefix-cache bound, and whenever tokens are
    short); decode retracts the requests with the fewest output tokens while one token each does not fit
    (ScheduleBatch.retract_decode); a waiting request is admitted while its prompt, and its remaining output times a
    new-token ratio that retraction raises and every step lowers, fit beside the running ones' (PrefillAdder), at most
    `chunk` prompt tokens a step."""

    def __init__(self, slots: TokenSlots, requests: list[Request], max_running: int = 256, chunk: int = 8192) -> None:
        self.slots, self.waiting, self.running = slots, deque(requests), []
        self.max_running, self.chunk, self.ratio = max_running, chunk, 0.7
        self.cache: deque[torch.Tensor] = deque()  # finished requests' slots, least recent first
        self.cached = 0

    def step(self) -> None:
        with self.slots.kv.limit_lock:
            if self.running:
                self._make_room(len(self.running))
                if self.slots.available_size() < len(self.running):
                    self._retract()
                for request, slot in zip(self.running, self.slots.alloc(len(self.running)).split(1)):
                    request.slots.append(slot)
                    request.decoded += 1
            self._admit()
        self.ratio = max(0.1, self.ratio - 0.001)
        done = [r for r in self.running if r.decoded == r.output]
        self.running = [r for r in self.running if r.decoded < r.output]
        for request in done:  # into the radix cache, then bounded (autopatch.py's cache_finished_req)
            self.cache.append(torch.cat(request.slots))
            self.cached += self.cache[-1].numel()
        self._evict(self.cached - self.slots.max_cached_tokens)

    def _retract(self) -> None:
        self.running.sort(key=lambda r: (r.decoded, -r.prompt), reverse=True)
        while len(self.running) > 1 and self.slots.available_size() < len(self.running):
            request = self.running.pop()
            self.slots.free(torch.cat(request.slots))
            request.slots = []
            self.waiting.appendleft(request)  # re-prefilled later with what it decoded so far
            self._make_room(len(self.running))
        self.ratio = min(1.0, 0.5 + sum(r.decoded for r in self.running) / sum(r.output for r in self.running))

    def _admit(self) -> None:
        budget = self.chunk
        reserved = sum(int((r.output - r.decoded) * self.ratio) for r in self.running)
        while self.waiting and len(self.running) < self.max_running:
            request = self.waiting[0]
            need, later = request.prompt + request.decoded, int((request.output - request.decoded) * self.ratio)
            if need > budget or need + later > self.slots.available_size() + self.cached - reserved:
                return
            self._make_room(need)
            request.slots.append(self.slots.alloc(need))
            self.running.append(self.waiting.popleft())
            budget, reserved = budget - need, reserved + later

    def _make_room(self, tokens: int) -> None:
        self._evict(tokens - self.slots.available_size())

    def _evict(self, tokens: int) -> None:
        while tokens > 0 and self.cache:
            evicted = self.cache.popleft()
            self.slots.free(evicted)
            self.cached -= evicted.numel()
            tokens -= evicted.numel()


def test_the_h100_limited_burst_comes_down_to_the_limit_within_about_one_requests_life_and_stays():
    """check_sglang.py's limited burst at the H100's sizes: 18 MiB pages of 6144 tokens (4 layers, 3 KV heads of 64),
    256 requests of 256 + 512 tokens, the limit (7 pages) set once 14 pages are mapped. Before the null block's page
    was kept from draining, memory stayed at 8 pages to the end, as on the H100; deterministic (no mapper thread)."""
    geometry = KVGeometry(4, (1, 3, 64), torch.bfloat16)
    kv = KVCacheManager(geometry, "cpu", virtual_bytes=64 * (18 << 20), background=False,
                        config=quiet_config(page_size_mb=2.25))
    try:
        slots = TokenSlots(kv, 1, "cpu")
        page = kv.memory_stats().page_bytes
        assert (page, slots.tokens_per_page) == (18 << 20, 6144)
        scheduler = RadixScheduler(slots, [Request(prompt=256, output=512) for _ in range(256)])
        mapped, applied = [], None
        while scheduler.waiting or scheduler.running:
            scheduler.step()
            mapped.append(kv.memory_stats().mapped_bytes // page)
            if applied is None and mapped[-1] > 14:
                kv.resize(7 * page)
                applied = len(mapped) - 1
        down = next((step for step in range(applied, len(mapped)) if mapped[step] <= 7), None)
        assert (applied, down, len(mapped)) == (84, 660, 1707)  # 576 steps: one request's 512 and the cache's LRU
        assert max(mapped[down:]) == 7
    finally:
        kv.shutdown()
