"""The premapped reserve, the background mapper, idle trimming, the utilization cap, and concurrent callers."""

from __future__ import annotations

import random
import threading
import time

import pytest

from conftest import BLOCKS_PER_PAGE, PAGE, device_used_bytes, quiet_config


def wait_until(predicate, timeout: float = 2.0) -> float:
    """Seconds until predicate() held; fails the test after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not reached within {timeout} s")
        time.sleep(0.002)
    return time.monotonic() - start


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


def test_background_mapper_fills_the_reserve_without_being_asked(make_manager):
    manager = make_manager(background=True, config=quiet_config(min_reserved_pages=3, max_reserved_pages=4, trim_idle_s=30))
    wait_until(lambda: manager.memory_stats().premapped_bytes == 3 * PAGE)
    manager.alloc(2 * BLOCKS_PER_PAGE)  # served from the reserve
    wait_until(lambda: manager.memory_stats().premapped_bytes == 3 * PAGE)
    assert manager.memory_stats().used_bytes == 3 * PAGE


def test_idle_reserve_is_trimmed_to_the_floor(make_manager, device):
    manager = make_manager(background=True, config=quiet_config(min_reserved_pages=2, max_reserved_pages=4, trim_idle_s=0.3))
    ids = manager.alloc(4 * BLOCKS_PER_PAGE)
    manager.free(ids)
    assert manager.memory_stats().premapped_bytes >= 2 * PAGE
    waited = wait_until(lambda: manager.memory_stats().premapped_bytes == 0, timeout=2.0)
    assert waited < 1.0
    assert manager.memory_stats().used_bytes == PAGE  # the floor: the null block's page


def test_utilization_cap_stops_mapping_before_the_device_is_full(device):
    """The cap is machine-wide, so other processes' memory moves it: an attempt during which the device's used memory
    moved by more than the margin, beside our own pages, says nothing and is made again (at most 20 times, 0.25 s
    apart, so that one quiet moment suffices)."""
    from kvcached import KVCacheManager
    from kvcached.vmm import open_vmm
    from conftest import SMALL

    big_page = 8 * (16 << 20)  # 16 MiB per piece: half a page of margin (64 MiB) absorbs ordinary noise
    vmm = open_vmm(device)
    try:
        for attempt in range(20):
            time.sleep(0.25 if attempt else 0)
            total, used = vmm.total_memory(), vmm.total_memory() - vmm.free_memory()
            # Room for the null block's page and 2.5 more pages under the cap: exactly 2 more can be mapped.
            config = quiet_config(page_size_mb=16.0, gpu_utilization=(used + 3.5 * big_page) / total)
            manager = KVCacheManager(SMALL, device, virtual_bytes=16 * big_page, background=False, register=False,
                                     config=config)
            try:
                per_page = manager.layout.blocks_per_page
                results = (manager.alloc(2 * per_page) is not None, manager.alloc(per_page) is None,
                           manager.memory_stats().used_bytes)
                others = (vmm.total_memory() - vmm.free_memory()) - used - results[2]
                if abs(others) < big_page // 2:
                    assert results == (True, True, 3 * big_page)
                    assert manager.alloc(per_page, ignore_headroom=True) is not None  # the cap said no, not the limit
                    return
            finally:
                manager.shutdown()
        pytest.fail("other processes kept moving the device's memory; the cap could not be tested")
    finally:
        vmm.close()


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
    wait_until(lambda: manager.memory_stats().premapped_bytes <= 2 * PAGE)  # the mapper trims freed pages promptly


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
