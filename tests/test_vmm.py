"""The virtual-memory layer itself: reserve/map/unmap on each backend, errors, and the no-driver case."""

from __future__ import annotations

import os

import pytest

from kvcached import DriverError, NoCudaDriverError
from kvcached.vmm import open_vmm
from conftest import device_used_bytes
from waiting import wait_until

MIB = 1 << 20


@pytest.fixture
def vmm(device):
    backend = open_vmm(device)
    yield backend
    backend.close()


def _resident_in(start: int, end: int) -> int:
    """Resident bytes of this process inside [start, end), from /proc/self/smaps (exact, whatever torch does)."""
    resident, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo >= start and hi <= end
            elif inside and head == "Rss:":
                resident += int(line.split()[1]) * 1024
    return resident


def _mapped_bytes(device: str, base: int, size: int) -> int:
    """What the device holds for [base, base+size): resident bytes there on the host; the driver's used memory on a
    GPU (that machine runs one test at a time)."""
    return _resident_in(base, base + size) if device == "cpu" else device_used_bytes(device)


def test_map_backs_memory_that_tensors_share_and_unmap_returns_it(vmm, device):
    size = 32 * MIB
    base = vmm.reserve(4 * size)
    try:
        before = _mapped_bytes(device, base, 4 * size)
        vmm.map(base + size, size)
        grown = _mapped_bytes(device, base, 4 * size) - before
        assert grown == size if device == "cpu" else grown >= size  # populated at once (a GPU adds page tables)
        tensor = vmm.tensor(base + size, size)
        tensor.fill_(7)
        again = vmm.tensor(base + size, size)  # a second view sees the same bytes: no copy
        assert again.data_ptr() == base + size and int(again[::MIB].sum()) == 7 * 32
        vmm.unmap(base + size, size)
        left = _mapped_bytes(device, base, 4 * size) - before
        assert left == 0 if device == "cpu" else left < 4 * MIB  # all 32 MiB came back
    finally:
        vmm.unreserve(base, 4 * size)


def test_granularity_is_the_page_size_on_the_host_and_2_mib_on_cuda(vmm, device):
    expected = os.sysconf("SC_PAGE_SIZE") if device == "cpu" else 2 << 20  # the minimum for pinned device memory
    assert vmm.granularity == expected


def test_misaligned_or_empty_ranges_are_refused(vmm):
    g = vmm.granularity
    base = vmm.reserve(4 * g)
    try:
        with pytest.raises(ValueError, match="multiples of the granularity"):
            vmm.map(base + 1, g)
        with pytest.raises(ValueError, match="multiples of the granularity"):
            vmm.map(base, g + 1)
        with pytest.raises(ValueError, match="size must be > 0"):
            vmm.map(base, 0)
        with pytest.raises(ValueError, match="size must be > 0"):
            vmm.reserve(-g)
    finally:
        vmm.unreserve(base, 4 * g)


def _cgroup_limit():
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            text = f.read().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def _independent_memory(device: str):
    """(free, total) from a reader kvcached does not use: os.sysconf and /proc/meminfo, or torch's cudaMemGetInfo."""
    if device != "cpu":
        import torch

        return torch.cuda.mem_get_info(int(device.partition(":")[2]))
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return available, total


def test_total_memory_is_the_devices_and_free_memory_is_read_now(vmm, device):
    limit = _cgroup_limit() if device == "cpu" else None
    _, total = _independent_memory(device)
    if limit is not None and limit < total:
        assert vmm.total_memory() == limit  # a cgroup's limit is this process's total
        assert 0 <= vmm.free_memory() <= limit
        return
    assert vmm.total_memory() == total
    # Free memory moves with every process: the figure must lie between two independent readings taken around it.
    # A neighbour that allocates and frees within the microseconds between them can break one attempt; the timeout
    # only catches a figure that is never right.
    def bracketed() -> bool:
        before = _independent_memory(device)[0]
        free = vmm.free_memory()
        after = _independent_memory(device)[0]
        return min(before, after) <= free <= max(before, after)

    assert wait_until(bracketed, timeout=30, interval=0.05)


@pytest.mark.parametrize("device_name", ["gpu", "cuda:x", "cpu:0", "tpu"])
def test_unknown_device_names_are_refused(device_name):
    with pytest.raises(ValueError, match=f"^device {device_name!r}(: the host backend has no index, use 'cpu'| is not one of 'cpu', 'cuda', 'cuda:N')$"):
        open_vmm(device_name)


def _cuda_driver_present() -> bool:
    try:
        from kvcached.vmm.cuda import init_driver

        init_driver()
        return True
    except NoCudaDriverError:
        return False


@pytest.mark.skipif(_cuda_driver_present(), reason="this machine has a CUDA driver (see the gpu test below)")
def test_cuda_without_a_driver_names_the_device_and_the_cause():
    with pytest.raises(NoCudaDriverError, match=r"^device 'cuda:99': no CUDA driver: "):
        open_vmm("cuda:99")


@pytest.mark.gpu
def test_a_missing_gpu_index_is_named():
    with pytest.raises(ValueError, match=r"^CUDA device index 99 does not exist \(this machine has \d+\)$"):
        open_vmm("cuda:99")


@pytest.mark.gpu
def test_cuda_errors_name_the_call():
    vmm = open_vmm("cuda:0")
    try:
        base = vmm.reserve(4 * vmm.granularity)
        vmm.map(base, vmm.granularity)
        with pytest.raises(ValueError, match="already mapped"):
            vmm.map(base, vmm.granularity)
        with pytest.raises(ValueError, match="was not mapped by map"):
            vmm.unmap(base + vmm.granularity, vmm.granularity)
        vmm.unmap(base, vmm.granularity)
        vmm.unreserve(base, 4 * vmm.granularity)
        with pytest.raises(DriverError, match="cuMemAddressFree failed: CUDA_ERROR"):
            vmm.unreserve(base, 4 * vmm.granularity)  # freed twice
    finally:
        vmm.close()


def test_host_errors_name_the_call():
    vmm = open_vmm("cpu")
    with pytest.raises(DriverError, match=r"mmap for reserve.*failed: Cannot allocate memory"):
        vmm.reserve(1 << 62)
