"""The virtual-memory layer itself: reserve/map/unmap on each backend, errors, and the no-driver case."""

from __future__ import annotations

import pytest

from kvcached import DriverError, NoCudaDriverError
from kvcached.vmm import open_vmm
from conftest import device_used_bytes

MIB = 1 << 20


@pytest.fixture
def vmm(device):
    backend = open_vmm(device)
    yield backend
    backend.close()


def test_map_backs_memory_that_tensors_share_and_unmap_returns_it(vmm, device):
    size = 32 * MIB
    base = vmm.reserve(4 * size)
    try:
        before = device_used_bytes(device)
        vmm.map(base + size, size)
        assert device_used_bytes(device) - before >= size
        tensor = vmm.tensor(base + size, size)
        tensor.fill_(7)
        again = vmm.tensor(base + size, size)  # a second view sees the same bytes: no copy
        assert int(again[::MIB].sum()) == 7 * 32
        vmm.unmap(base + size, size)
        assert device_used_bytes(device) - before < 4 * MIB  # the 32 MiB came back (torch itself may grow a little)
    finally:
        vmm.unreserve(base, 4 * size)


def test_granularity_is_a_power_of_two(vmm):
    assert vmm.granularity >= 4096 and vmm.granularity & (vmm.granularity - 1) == 0


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


def test_total_and_free_memory_are_plausible(vmm):
    total, free = vmm.total_memory(), vmm.free_memory()
    assert 0 < free <= total


@pytest.mark.parametrize("device_name", ["gpu", "cuda:x", "cpu:0", "tpu"])
def test_unknown_device_names_are_refused(device_name):
    with pytest.raises(ValueError, match="is not one of|has no index"):
        open_vmm(device_name)


def test_a_missing_gpu_is_named():
    try:
        open_vmm("cuda:99")
    except NoCudaDriverError as exc:  # this machine has no CUDA driver
        assert str(exc).startswith("no CUDA driver")
    except ValueError as exc:  # a GPU machine: the index is checked
        assert "CUDA device index 99 does not exist" in str(exc)
    else:
        pytest.fail("cuda:99 opened")


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
