"""The page table between a deciding process and a mapping process, with real processes and real memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from kvcached import KVCacheManager
from kvcached.pagetable import PageTable, TableVirtualMemory
from kvcached.vmm import open_vmm
from conftest import BLOCKS_PER_PAGE, PAGE, SMALL, quiet_config

HERE = os.path.dirname(os.path.abspath(__file__))


class Child:
    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "pagetable_child.py"), path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.ask(None) == "ready"

    def ask(self, command):
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def mapped(self) -> tuple[int, int]:
        mapped, resident = self.ask("mapped").split()
        return int(mapped), int(resident)

    def close(self) -> None:
        self.ask("quit")
        self.proc.wait(timeout=10)


def settle(child: Child, expected: int, timeout: float = 1.0) -> float:
    start = time.monotonic()
    while child.mapped() != (expected, expected):
        assert time.monotonic() - start < timeout, f"child holds {child.mapped()}, expected {expected}"
        time.sleep(0.005)
    return time.monotonic() - start


@pytest.fixture
def shared(tmp_path):
    """A manager deciding through a page table, and a child process mapping real memory after it."""
    path = f"/dev/shm/kvcached-test-pages.{os.getpid()}.{tmp_path.name}"
    table = PageTable.create(path, 16, PAGE, meta={"test": True})
    vmm = TableVirtualMemory(table, "cpu", open_vmm("cpu").granularity)
    try:
        child = Child(path)
    finally:
        table.unlink()  # both have it mapped (or the child failed): nothing stays in /dev/shm
    manager = KVCacheManager(SMALL, vmm, virtual_bytes=16 * PAGE, background=False, register=False, config=quiet_config())
    yield manager, child
    manager.shutdown()
    child.close()
    table.close()
    assert not os.path.exists(path)


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
    assert child.mapped() == (2 * PAGE, 2 * PAGE)  # unwanted, but a step is running
    assert child.ask("release") == "released"
    settle(child, PAGE)


def test_a_step_maps_what_it_needs_before_it_runs(shared):
    manager, child = shared
    settle(child, PAGE)
    manager.alloc(2 * BLOCKS_PER_PAGE)
    assert child.ask("hold") == "held"  # before_step maps synchronously, whatever the follower thread did
    assert child.mapped() == (3 * PAGE, 3 * PAGE)
    child.ask("release")


def test_the_deciding_side_has_no_tensors(shared):
    manager, _ = shared
    with pytest.raises(Exception, match="no KV tensors"):
        manager.kv_tensors


def test_a_table_of_another_user_or_format_is_refused(tmp_path):
    path = tmp_path / "not-a-table"
    path.write_bytes(b"x" * 8192)
    with pytest.raises(Exception, match="not a kvcached page table"):
        PageTable.attach(str(path))
