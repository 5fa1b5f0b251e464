"""The page table between a deciding process and a mapping process, with real processes and real memory."""

from __future__ import annotations

import os
import time

import pytest

from kvcached import KVCacheManager
from kvcached import pagetable
from kvcached.errors import DriverError, KVCachedError
from kvcached.hostmem import host_memory
from kvcached.pagetable import PageTable, TableVirtualMemory
from kvcached.vmm import open_vmm
from conftest import BLOCKS_PER_PAGE, PAGE, SMALL, quiet_config
from pagetable_child import Child, resident_bytes
from waiting import wait_until


def settle(child: Child, expected: int, timeout: float = 1.0) -> float:
    """Seconds until the child's follower holds `expected` bytes, and the OS agrees (host: exactly; GPU: the driver's
    used memory moved by that much since the child started, within 8 MiB)."""
    start = time.monotonic()
    while True:
        mapped, held = child.mapped()
        if mapped == expected and abs(held - child.base_held - expected) <= child.slack:
            return time.monotonic() - start
        assert time.monotonic() - start <= timeout, f"child holds {mapped} (OS: {held - child.base_held}), expected {expected}"
        time.sleep(0.005)


@pytest.fixture
def followed(tmp_path, device):
    """A page table of 16 pages, and a child process mapping real memory (of `device`) as it says."""
    path = f"/dev/shm/kvcached-test-pages.{os.getpid()}.{tmp_path.name}"
    table = PageTable.create(path, 16, PAGE)
    try:
        child = Child(path, device)
        child.base_held, child.slack = (0, 0) if device == "cpu" else (child.mapped()[1], 8 << 20)
    finally:
        table.unlink()  # both have it mapped (or the child failed): nothing stays in /dev/shm
    yield table, child
    child.close()
    table.close()
    assert not os.path.exists(path)


@pytest.fixture
def shared(followed, device):
    """A manager deciding through the page table, and the child mapping after it."""
    table, child = followed
    vmm = TableVirtualMemory(table, [device], open_vmm("cpu").granularity if device == "cpu" else 2 << 20)
    manager = KVCacheManager(SMALL, vmm, virtual_bytes=16 * PAGE, background=False, config=quiet_config())
    yield manager, child
    manager.shutdown()


def test_the_child_maps_what_the_manager_allocates_and_unmaps_what_it_frees(shared):
    manager, child = shared
    settle(child, PAGE)  # the null block's page
    ids = manager.alloc(3 * BLOCKS_PER_PAGE)
    assert settle(child, 4 * PAGE) < 0.5
    manager.free(ids)
    assert settle(child, PAGE) < 0.5


def test_no_page_is_unmapped_while_a_step_runs(shared):
    manager, child = shared
    ids = manager.alloc(BLOCKS_PER_PAGE)
    settle(child, 2 * PAGE)
    assert child.ask("hold") == "held"
    manager.free(ids)
    time.sleep(0.2)
    settle(child, 2 * PAGE, timeout=0)  # unwanted, but a step is running: still held
    assert child.ask("release") == "released"
    settle(child, PAGE)


def test_a_step_maps_what_it_needs_before_it_runs(shared):
    manager, child = shared
    settle(child, PAGE)
    manager.alloc(2 * BLOCKS_PER_PAGE)
    assert child.ask("hold") == "held"  # before_step maps synchronously, whatever the follower thread did
    settle(child, 3 * PAGE, timeout=0)
    child.ask("release")


def test_while_a_step_holds_a_released_page_the_page_wanted_in_its_place_waits(followed):
    table, child = followed
    table.set_wanted(1, True)
    settle(child, PAGE)
    assert child.ask("hold") == "held"
    table.set_wanted(1, False)  # the scheduler released page 1 and wants page 2 in its place
    table.set_wanted(2, True)
    assert child.ask("sync") == "False"  # the follower thread's pass: page 1 waits for the step, so page 2 waits too
    assert child.pages() == [1]
    settle(child, PAGE, timeout=0)  # one page held, as the table wants: never two
    assert child.ask("release") == "released"  # the follower thread now unmaps page 1, then maps page 2
    assert wait_until(lambda: child.pages() == [2])
    settle(child, PAGE, timeout=0)


@pytest.mark.parametrize("device", ["cpu"])  # the OS's out-of-memory error: RLIMIT_DATA bounds host mappings only
def test_pages_the_worker_cannot_map_are_answered_failed_and_it_goes_on(followed):
    table, child = followed
    vmm = TableVirtualMemory(table, ["cpu"], 4096)
    vmm.map(1 * PAGE, PAGE)
    assert vmm.settle() == [] and child.pages() == [1]
    assert child.ask("oom on") == "oom on"
    vmm.map(2 * PAGE, PAGE)
    vmm.map(3 * PAGE, PAGE)
    assert vmm.settle() == [2, 3]  # answered: the scheduler's side never waits for, nor promises, these
    assert vmm.settle() == [2, 3]  # asked again with nothing new: still failed (a failure is never taken as settled)
    assert child.pages() == [1]
    vmm.unmap(2 * PAGE, PAGE)
    vmm.unmap(3 * PAGE, PAGE)
    assert child.ask("oom off") == "oom off"
    vmm.map(2 * PAGE, PAGE)
    assert vmm.settle() == [] and child.pages() == [1, 2]
    settle(child, 2 * PAGE, timeout=0)


def test_the_deciding_side_has_no_tensors(shared):
    manager, _ = shared
    with pytest.raises(KVCachedError, match="^the scheduler's side of a page table has no KV tensors: they live in "
                                            "the worker$"):
        manager.kv_tensors


def test_a_page_marked_after_a_settle_is_waited_for_not_answered_from_the_last_settle(tmp_path):
    table = PageTable.create(str(tmp_path / "pages"), 4, PAGE)
    try:
        vmm = TableVirtualMemory(table, ["cpu"], 4096)
        vmm.map(0, PAGE)
        table.answer(0, 0, 1, pagetable.MAPPED)
        assert vmm.settle(timeout_s=0.05) == []
        assert vmm.settle(timeout_s=0.05) == []  # nothing new: answered at once
        vmm.map(PAGE, PAGE)  # page 1, never answered: settle must wait for it, then give up loudly
        with pytest.raises(DriverError, match="did not map the KV pages the scheduler wants"):
            vmm.settle(timeout_s=0.05)
    finally:
        table.close()


def test_settling_some_pages_waits_for_those_only_and_names_those_that_failed(tmp_path):
    """The block pool waits for the pages of the blocks it is about to promise, not for the reserve being premapped."""
    table = PageTable.create(str(tmp_path / "pages"), 4, PAGE)
    try:
        vmm = TableVirtualMemory(table, ["cpu"], 4096)
        for page in (0, 1, 2):
            vmm.map(page * PAGE, PAGE)
        table.answer(0, 0, 1, pagetable.MAPPED)
        table.answer(0, 2, 1, pagetable.FAILED)
        assert vmm.settle([0], timeout_s=0.05) == []  # page 1 (never answered) is no reason to wait
        assert vmm.settle([0, 2], timeout_s=0.05) == [2]
        with pytest.raises(DriverError, match=r"^the worker \(rank 0\) did not map the KV pages the scheduler wants"):
            vmm.settle([0, 1], timeout_s=0.05)
        table.answer(0, 1, 1, pagetable.MAPPED)
        assert vmm.settle([1, 0], timeout_s=0.05) == [] and vmm.settle(timeout_s=0.05) == [2]
    finally:
        table.close()


def test_a_step_follows_every_change_even_after_steps_with_nothing_new(tmp_path):
    """before_step() skips its pass when nothing changed since the last complete one, and only then: with the
    follower thread stopped, every mapping below is made by a step's own pass."""
    table = PageTable.create(str(tmp_path / "pages"), 4, PAGE)
    vmm = open_vmm("cpu")
    base = vmm.reserve(4 * PAGE)
    follower = pagetable.PageFollower(table, vmm, base)
    follower._stop.set()  # noqa: SLF001 - no background pass may hide a step that skipped its own
    table.wake()
    follower._thread.join()  # noqa: SLF001
    try:
        for wanted in ([1], [1], [1], [2], [2], [0, 3], []):
            for page in range(4):
                if table.wanted[page] != (page in wanted):
                    table.set_wanted(page, page in wanted)
            follower.before_step()
            assert follower.mapped.nonzero()[0].tolist() == wanted
            follower.after_step()
    finally:
        follower.close()
        vmm.unreserve(base, 4 * PAGE)
        table.close()


def test_extra_pages_are_mapped_for_the_worker_until_unmapped_and_a_page_the_table_wants_becomes_its(tmp_path):
    """vLLM's V2 warm-up writes KV to blocks no scheduler handed out: the worker maps their pages itself."""
    table = PageTable.create(str(tmp_path / "pages"), 4, PAGE)
    vmm = open_vmm("cpu")
    base = vmm.reserve(4 * PAGE)
    follower = pagetable.PageFollower(table, vmm, base)
    try:
        follower.map_extra([1, 2])
        memory = vmm.tensor(base, 4 * PAGE)
        memory[PAGE : 3 * PAGE].fill_(7)  # the warm-up's writes: a crash if the pages were not mapped
        assert resident_bytes(base, 4 * PAGE) == 2 * PAGE
        assert follower.mapped.nonzero()[0].tolist() == []  # not the table's: the table wants none
        table.set_wanted(2, True)
        follower.before_step()
        follower.after_step()
        assert follower.mapped.nonzero()[0].tolist() == [2] and table.answered[0, 2] == table.request[2]
        follower.unmap_extra()
        assert resident_bytes(base, 4 * PAGE) == PAGE  # page 1 went back; page 2, now the table's, stays
        assert memory[2 * PAGE : 3 * PAGE].eq(7).all()
        follower.unmap_extra()  # nothing left to unmap
    finally:
        follower.close()
        vmm.unreserve(base, 4 * PAGE)
        table.close()
    assert resident_bytes(base, 4 * PAGE) == 0


@pytest.fixture
def two_ranks(tmp_path):
    """A page table of 16 pages followed by two child processes, ranks 0 and 1, each mapping real host memory."""
    path = f"/dev/shm/kvcached-test-pages.{os.getpid()}.{tmp_path.name}"
    table = PageTable.create(path, 16, PAGE, ranks=2)
    try:
        children = [Child(path, "cpu", rank) for rank in (0, 1)]
        for child in children:
            child.base_held, child.slack = 0, 0
    finally:
        table.unlink()
    yield table, TableVirtualMemory(table, ["cpu", "cpu"], 4096), children
    for child in children:
        child.close()
    table.close()


def test_every_rank_maps_the_wanted_pages_and_unmaps_to_the_same_floor(two_ranks):
    table, vmm, children = two_ranks
    for page in (0, 1, 2):
        vmm.map(page * PAGE, PAGE)
    assert vmm.settle() == []  # every rank answered: each holds its shard of the 3 pages
    assert [child.pages() for child in children] == [[0, 1, 2]] * 2
    for child in children:
        settle(child, 3 * PAGE, timeout=0)
    vmm.unmap(1 * PAGE, PAGE)
    vmm.unmap(2 * PAGE, PAGE)
    for child in children:
        settle(child, PAGE)
    assert [child.pages() for child in children] == [[0], [0]]


def test_a_page_released_while_rank_1_runs_a_step_stays_on_rank_1_until_its_step_ends(two_ranks):
    table, vmm, (rank0, rank1) = two_ranks
    vmm.map(0, PAGE)
    vmm.map(PAGE, PAGE)
    assert vmm.settle() == []
    assert rank1.ask("hold") == "held"  # rank 1 is still inside step N; rank 0 has finished it
    vmm.unmap(PAGE, PAGE)
    settle(rank0, PAGE)
    assert rank0.pages() == [0]
    time.sleep(0.2)
    assert rank1.pages() == [0, 1]  # the running step may still read page 1 on rank 1
    assert rank1.ask("release") == "released"
    settle(rank1, PAGE)
    assert rank1.pages() == [0]


def test_a_page_that_one_rank_cannot_map_is_failed_for_all(two_ranks):
    table, vmm, (rank0, rank1) = two_ranks
    vmm.map(0, PAGE)
    assert vmm.settle() == []
    assert rank1.ask("oom on") == "oom on"
    vmm.map(PAGE, PAGE)
    assert vmm.settle() == [1]  # rank 0 mapped it, rank 1 could not: not promised
    assert rank0.pages() == [0, 1] and rank1.pages() == [0]
    vmm.unmap(PAGE, PAGE)  # the pool gives it back, as after any failed page
    settle(rank0, PAGE)
    assert rank1.ask("oom off") == "oom off"
    vmm.map(PAGE, PAGE)
    assert vmm.settle() == [] and rank0.pages() == rank1.pages() == [0, 1]


def test_a_rank_that_answers_nothing_is_named(tmp_path):
    path = str(tmp_path / "pages")
    table = PageTable.create(path, 4, PAGE, ranks=2)
    try:
        vmm = TableVirtualMemory(table, ["cpu", "cpu"], 4096)
        vmm.map(0, PAGE)
        table.answer(0, 0, 1, 1)  # rank 0 answers (MAPPED); rank 1 never does
        with pytest.raises(DriverError, match=r"^the worker \(rank 1\) did not map the KV pages the scheduler wants "
                                              r"within 0 s$"):
            vmm.settle(timeout_s=0.05)
    finally:
        table.close()


def test_headroom_over_devices_is_the_tightest_device_per_rank_on_it(tmp_path, monkeypatch):
    table = PageTable.create(str(tmp_path / "pages"), 4, PAGE, ranks=3)
    try:
        figures = {"cuda:0": (9 << 30, 80 << 30), "cuda:1": (10 << 30, 70 << 30)}  # (free, total)
        monkeypatch.setattr(pagetable, "device_memory", figures.__getitem__)
        vmm = TableVirtualMemory(table, ["cuda:0", "cuda:1", "cuda:1"], 2 << 20)
        assert vmm.devices == ("cuda:0", "cuda:1", "cuda:1") and vmm.device == "cuda:0"
        assert vmm.free_memory() == 5 << 30  # cuda:1's 10 GiB for two ranks
        assert vmm.total_memory() == 35 << 30
    finally:
        table.close()


def test_two_ranks_on_the_host_each_get_half_of_its_memory(tmp_path):
    table = PageTable.create(str(tmp_path / "pages"), 4, PAGE, ranks=2)
    try:
        vmm = TableVirtualMemory(table, ["cpu", "cpu"], 4096)
        assert vmm.devices == ("cpu", "cpu")
        assert vmm.total_memory() == host_memory()[1] // 2
        with pytest.raises(ValueError, match=r"^the page table has 2 followers: give one device per rank, got "
                                             r"\['cpu'\]$"):
            TableVirtualMemory(table, ["cpu"], 4096)
    finally:
        table.close()


@pytest.mark.gpu
def test_gpu_memory_figures_come_from_nvml_without_a_context():
    import torch
    from kvcached.vmm.probe import device_memory, granularity_of

    free, total = device_memory("cuda:0")
    torch_free, torch_total = torch.cuda.mem_get_info(0)
    # NVML counts the memory the driver reserves for itself (~0.5 GB on an H100); CUDA's figures leave it out.
    assert torch_total <= total < torch_total * 1.01
    assert abs((total - free) - (torch_total - torch_free)) < 0.01 * total
    assert granularity_of("cuda:0") == 2 << 20


def test_a_file_that_is_not_a_page_table_is_refused(tmp_path):
    for content in (b"", b"x" * 8192):
        path = tmp_path / f"not-a-table-{len(content)}"
        path.write_bytes(content)
        with pytest.raises(KVCachedError, match=f"^{path} is not a kvcached page table \\(version 4\\)$"):
            PageTable.attach(str(path))


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root (os.chown)")
def test_a_table_of_another_user_is_refused(tmp_path):
    path = str(tmp_path / "pages")
    table = PageTable.create(path, 4, PAGE)
    try:
        os.chown(path, 65534, 65534)  # nobody
        with pytest.raises(KVCachedError, match=f"^{path} belongs to another user; refusing to use it$"):
            PageTable.attach(path)
    finally:
        table.close()
