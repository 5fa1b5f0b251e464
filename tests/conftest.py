"""Shared fixtures: every core test runs on the host backend, and on CUDA under the `gpu` marker.

`device_used_bytes(device)` is the memory the test can see move: this process's RSS for the host backend (from
/proc/self/statm), the driver's used memory (total - free) for a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from kvcached import Config, KVCacheManager, KVGeometry

DEVICES = ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)]

# 4 layers x (K, V), blocks of 16 tokens x 2 heads x 64 dims in bf16 = 4 KiB; a page is 8 pieces x 2 MiB = 16 MiB.
SMALL = KVGeometry(num_layers=4, block_shape=(16, 2, 64), dtype=torch.bfloat16)
PAGE = 16 << 20
BLOCKS_PER_PAGE = 512
IDS_PER_PAGE = 4096


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def quiet_config(**overrides) -> Config:
    """A config with no premapped reserve unless a test asks for one, so that byte counts are exact."""
    values = dict(page_size_mb=2.0, min_reserved_pages=0, max_reserved_pages=0, trim_idle_s=0.0)
    values.update(overrides)
    return Config(**values)


@pytest.fixture
def make_manager(device):
    """Build managers on the test's device; all are shut down at the end of the test."""
    made = []

    def make(geometry: KVGeometry = SMALL, *, virtual_bytes: int = 64 * PAGE, background: bool = False, **kwargs):
        kwargs.setdefault("config", quiet_config())
        manager = KVCacheManager(geometry, device, virtual_bytes=virtual_bytes, background=background, **kwargs)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.shutdown()


def device_used_bytes(device: str) -> int:
    if device == "cpu":
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    from kvcached.vmm import open_vmm

    vmm = open_vmm(device)
    try:
        return vmm.total_memory() - vmm.free_memory()
    finally:
        vmm.close()
