"""The premapped reserve, the background mapper, idle trimming, the utilization cap, and concurrent callers."""

from __future__ import annotations

import random
import threading
import time

import pytest

from conftest import BLOCKS_PER_PAGE, PAGE, SMALL, device_used_bytes, quiet_config
from kvcached import KVCacheManager, PageAllocator
from kvcached.units import ceil_div
from kvcached.vmm import open_vmm
from waiting import wait_until


def test_inline_reserve_is_refilled_to_the_minimum_after_an_alloc(make_manager):
    manager = make_manager(config=quiet_config(min_reserved_pages=2, max_reserved_pages=3, trim_idle_s=60))
    stats = manager.memory_stats()
    assert (stats.used_bytes, stats.premapped_bytes) == (PAGE, 2 * PAGE)
    manager.alloc(BLOCKS_PER_PAGE)  # takes a premapped page, the reserve is topped up again
    stats = manager.memory_stats()
    assert (stats.used_bytes, stats.premapped_bytes) == (2 * PAGE, 2 * PAGE)


def test_freed_pages_beyond_the_maximum_reserve_are_unmapped(make_manager):
    manager = make_manager(config=quiet_config(min_reserved_pages=1, max_reserved_pages=2, trim_idle_s=60))
    ids = manager.alloc(5 * BLOCKS_PER_PAGE)
    manager.free(ids)
    stats = manager.memory_stats()
    assert (stats.used_bytes, stats.premapped_bytes) == (PAGE, 2 * PAGE)


def test_the_reserve_never_passes_the_limit(make_manager):
    manager = make_manager(limit_bytes=3 * PAGE, config=quiet_config(min_reserved_pages=4, max_reserved_pages=8, trim_idle_s=60))
    assert manager.memory_stats().mapped_bytes == 3 * PAGE
    assert manager.available_size() == 3 * BLOCKS_PER_PAGE - 1


def test_lowering_the_limit_unmaps_the_reserve_at_once(make_manager, device):
    manager = make_manager(config=quiet_config(min_reserved_pages=6, max_reserved_pages=6, trim_idle_s=60))
    held = manager.alloc(BLOCKS_PER_PAGE)
    assert manager.memory_stats().mapped_bytes == 8 * PAGE
    before = device_used_bytes(device)
    manager.resize(3 * PAGE)
    stats = manager.memory_stats()
    assert (stats.used_bytes, stats.premapped_bytes) == (2 * PAGE, PAGE)
    assert before - device_used_bytes(device) >= 5 * PAGE - (2 << 20)
    manager.free(held)


def test_a_page_freed_above_a_lowered_limit_is_unmapped_at_once_not_kept_for_the_next_alloc(make_manager, device):
    manager = make_manager(background=True, config=quiet_config(min_reserved_pages=1, max_reserved_pages=4, trim_idle_s=60))
    held = [manager.alloc(BLOCKS_PER_PAGE) for _ in range(4)]  # pages 1-4, the null block's page 0
    manager.resize(2 * PAGE)
    assert wait_until(lambda: manager.memory_stats().premapped_bytes == 0, timeout=30)
    before = device_used_bytes(device)
    manager.free(held.pop())
    stats = manager.memory_stats()  # no wait: the mapper has no part in it
    assert (stats.used_bytes, stats.premapped_bytes) == (4 * PAGE, 0)
    assert before - device_used_bytes(device) >= PAGE - (2 << 20)
    assert manager.alloc(1) is None  # nothing to hand out above the limit, not even the page just freed
    for ids in held:
        manager.free(ids)
    assert manager.memory_stats().mapped_bytes <= 2 * PAGE


def test_pages_the_mapper_was_mapping_when_the_limit_fell_are_unmapped_before_anyone_can_take_them(device):
    vmm = open_vmm(device)
    base = vmm.reserve(8 * CAP_PAGE)
    gate, mapping = threading.Event(), threading.Event()
    real_map = vmm.map

    def map_held_in_the_mapper(address: int, size: int) -> None:
        if threading.current_thread().name == "kvcached-mapper":
            mapping.set()
            gate.wait(300)
        real_map(address, size)

    vmm.map = map_held_in_the_mapper
    seen: list = []
    pages = PageAllocator(vmm, base, CAP_PAGE, 8, min_reserved=2, max_reserved=2, utilization=1.0, trim_idle_s=60,
                          background=True, on_change=seen.append)
    try:
        assert pages.alloc() == 0  # mapped in this thread; the mapper starts premapping 2 pages, and is held there
        assert mapping.wait(300)
        pages.set_limit(CAP_PAGE)  # one page, in use: the 2 pages being mapped are above it
        published = len(seen)
        gate.set()
        assert wait_until(lambda: len(seen) >= published + 2, timeout=300)  # the mapper's pass, and its unmapping
        assert pages.alloc() is None
        assert [(s.used_bytes, s.premapped_bytes) for s in seen[published:]] == [(CAP_PAGE, 0)] * 2
    finally:
        gate.set()
        pages.close()
        vmm.unreserve(base, 8 * CAP_PAGE)
        vmm.close()


def test_background_mapper_fills_the_reserve_without_being_asked(make_manager):
    manager = make_manager(background=True, config=quiet_config(min_reserved_pages=3, max_reserved_pages=4, trim_idle_s=30))
    assert wait_until(lambda: manager.memory_stats().premapped_bytes == 3 * PAGE, timeout=30)
    manager.alloc(2 * BLOCKS_PER_PAGE)  # served from the reserve
    assert wait_until(lambda: manager.memory_stats().premapped_bytes == 3 * PAGE, timeout=30)
    assert manager.memory_stats().used_bytes == 3 * PAGE


def test_idle_reserve_is_trimmed_to_the_floor(make_manager, device):
    manager = make_manager(background=True, config=quiet_config(min_reserved_pages=2, max_reserved_pages=4, trim_idle_s=0.3))
    ids = manager.alloc(4 * BLOCKS_PER_PAGE)
    manager.free(ids)
    assert manager.memory_stats().premapped_bytes >= 2 * PAGE
    assert wait_until(lambda: manager.memory_stats().premapped_bytes == 0, timeout=30)  # no alloc came: trimmed
    assert manager.memory_stats().used_bytes == PAGE  # the floor: the null block's page


CAP_PAGE = 2 << 20  # a multiple of every backend's granularity


@pytest.fixture
def capped_pages(device):
    """A PageAllocator over a real reservation on `device`, capped at half the device's total memory, reading the
    device's free memory from a figure the test sets (`free`, a one-element list)."""
    vmm = open_vmm(device)
    base = vmm.reserve(8 * CAP_PAGE)
    free = [0]
    pages = PageAllocator(vmm, base, CAP_PAGE, 8, min_reserved=0, max_reserved=0, utilization=0.5, trim_idle_s=0.0,
                          background=False, free_memory=lambda: free[0])
    yield pages, free, vmm.total_memory()
    pages.close()
    vmm.unreserve(base, 8 * CAP_PAGE)
    vmm.close()


def test_utilization_cap_maps_exactly_the_pages_under_the_cap(capped_pages):
    pages, free, total = capped_pages
    cap = total // 2  # total is a multiple of the page size: exact
    free[0] = total - (cap - 3 * CAP_PAGE - CAP_PAGE // 2)  # 3.5 pages of room under the cap: exactly 3 pages
    assert pages.available_pages() == 3
    taken = [pages.alloc() for _ in range(3)]
    assert None not in taken and pages.stats().used_bytes == 3 * CAP_PAGE
    assert pages.available_pages() == 0 and pages.alloc() is None  # our own pages count at once, between readings
    extra = pages.alloc(ignore_headroom=True)  # the cap said no, not the limit (8 pages)
    assert extra is not None and pages.stats().used_bytes == 4 * CAP_PAGE
    pages.free(extra)
    pages.free(taken.pop())  # 2 pages mapped now: 1.5 pages of room
    assert pages.stats().mapped_bytes == 2 * CAP_PAGE and pages.available_pages() == 1


def test_utilization_cap_follows_a_neighbour_that_takes_memory(capped_pages):
    pages, free, total = capped_pages
    free[0] = total - (total // 2 - 5 * CAP_PAGE)  # room for 5 pages
    assert pages.available_pages() == 5
    free[0] -= 3 * CAP_PAGE  # another process maps 3 pages
    time.sleep(0.06)  # past the 50 ms the free figure is kept (a longer wait changes nothing)
    assert pages.available_pages() == 2
    assert pages.alloc() is not None and pages.alloc() is not None and pages.alloc() is None


def test_utilization_cap_refuses_more_than_the_real_device_could_ever_have_free(device):
    """On the real backend's free memory, whatever neighbours do: the limit (twice the device's memory) allows the
    request, only the device's free memory, read from the backend, can refuse it."""
    vmm = open_vmm(device)
    total = vmm.total_memory()
    vmm.close()
    page = 8 * (2 << 20)  # quiet_config's page for SMALL: 8 pieces of 2 MiB
    manager = KVCacheManager(SMALL, device, virtual_bytes=2 * ceil_div(total, page) * page, background=False,
                             config=quiet_config(gpu_utilization=1.0))
    try:
        per_page = manager.layout.blocks_per_page
        assert manager.layout.num_pages > ceil_div(total, page)  # the limit is not what refuses
        assert manager.alloc((ceil_div(total, page) + 1) * per_page) is None
        assert manager.memory_stats().mapped_bytes == page  # nothing was mapped for the refused request
        assert manager.available_size() <= (total // page) * per_page + per_page - 1
    finally:
        manager.shutdown()


@pytest.mark.parametrize("background", [False, True])
def test_concurrent_callers_never_share_a_block_and_accounting_stays_exact(make_manager, background):
    manager = make_manager(background=background, config=quiet_config(min_reserved_pages=1, max_reserved_pages=2, trim_idle_s=60))
    owners: dict[int, int] = {}
    owners_lock = threading.Lock()
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        held: list[list[int]] = []
        for _ in range(400):
            if held and (rng.random() < 0.45 or len(held) > 20):
                ids = held.pop(rng.randrange(len(held)))
                with owners_lock:
                    for i in ids:
                        del owners[i]
                manager.free(ids)
            else:
                ids = manager.alloc(rng.randint(1, 200))
                if ids is None:
                    continue
                with owners_lock:
                    clash = [i for i in ids if i in owners]
                    if clash:
                        errors.append(f"blocks {clash[:4]} handed out twice")
                    owners.update((i, seed) for i in ids)
                held.append(ids)
        for ids in held:
            with owners_lock:
                for i in ids:
                    del owners[i]
            manager.free(ids)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert manager.num_allocated() == 1
    assert manager.memory_stats().used_bytes == PAGE
    assert wait_until(lambda: manager.memory_stats().premapped_bytes <= 2 * PAGE, timeout=30)  # beyond the maximum


def test_trim_gives_the_reserve_back_at_once_and_it_is_rebuilt_on_the_next_page(make_manager, device):
    manager = make_manager(config=quiet_config(min_reserved_pages=2, max_reserved_pages=4, trim_idle_s=60))
    manager.free(manager.alloc(3 * BLOCKS_PER_PAGE))
    assert manager.memory_stats().premapped_bytes == 4 * PAGE
    before = device_used_bytes(device)
    manager.trim()
    stats = manager.memory_stats()
    assert (stats.used_bytes, stats.premapped_bytes) == (PAGE, 0)
    assert before - device_used_bytes(device) >= 4 * PAGE - (2 << 20)
    manager.alloc(1)  # fits in the null block's page: no page allocated, no reserve
    assert manager.memory_stats().premapped_bytes == 0
    manager.alloc(BLOCKS_PER_PAGE)  # a new page: the reserve is built again
    assert manager.memory_stats().premapped_bytes == 2 * PAGE
