"""open_cache() reads the environment once and registers; KVCacheManager reads none and tells only its observer."""

from __future__ import annotations

import os

import pytest

from conftest import BLOCKS_PER_PAGE, PAGE, SMALL
from kvcached import Config, ConfigError, KVCacheManager, open_cache, registry
from kvcached.vmm import HostVirtualMemory
from registry_helpers import empty_ipc_dir, ipc_dir, unique  # noqa: F401 (fixtures: a private registry directory)


@pytest.fixture
def opened():
    made = []

    def make(device="cpu", **kwargs):
        kwargs.setdefault("virtual_bytes", 16 * PAGE)
        kwargs.setdefault("background", False)
        manager = open_cache(SMALL, device, **kwargs)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.shutdown()


def test_open_cache_reads_the_environment_and_registers_under_its_name(opened, monkeypatch):
    name = unique("env")
    env = {"KVCACHED_IPC_NAME": name, "KVCACHED_MEMORY_LIMIT": "48M", "KVCACHED_PAGE_SIZE_MB": "2",
           "KVCACHED_MIN_RESERVED_PAGES": "0", "KVCACHED_MAX_RESERVED_PAGES": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    manager = opened()
    assert manager.config == Config.from_env() and manager.ipc_name == name
    record = registry.read_instance(name)
    assert (record.alive, record.pid, record.limit_bytes, record.used_bytes, record.page_bytes) == (
        True, os.getpid(), 3 * PAGE, PAGE, PAGE)
    manager.alloc(BLOCKS_PER_PAGE)  # a second page: published at once
    assert registry.read_instance(name).used_bytes == 2 * PAGE
    manager.shutdown()
    assert not os.path.exists(registry.segment_path(name))


def test_the_name_argument_wins_and_register_false_registers_nothing(opened):
    config = Config(ipc_name=unique("from-config"), page_size_mb=2.0)
    named = opened(config=config, name=unique("argument"))
    assert named.ipc_name != config.ipc_name and registry.read_instance(named.ipc_name).alive
    assert not os.path.exists(registry.segment_path(config.ipc_name))
    alone = opened(config=config, register=False)
    assert alone.ipc_name is None and alone.observer is None
    assert [r.name for r in registry.list_instances()] == [named.ipc_name]


def test_bad_and_taken_names_are_refused_with_the_reason(opened):
    with pytest.raises(ConfigError, match=r"^invalid IPC name '\.\./x': use 1-64 characters"):
        opened(config=Config(page_size_mb=2.0), name="../x")
    first = opened(config=Config(page_size_mb=2.0), name=unique("taken"))
    with pytest.raises(ConfigError, match=rf"^IPC name '{first.ipc_name}' is in use by a live instance \(pid {os.getpid()}\)"):
        opened(config=Config(page_size_mb=2.0), name=first.ipc_name)
    assert registry.read_instance(first.ipc_name).alive  # the first one is untouched


class TwoRankHostMemory(HostVirtualMemory):
    """Host memory that, like the page table's memory under tensor parallel 2, names a device per rank."""

    @property
    def devices(self) -> tuple[str, ...]:
        return ("cpu", "cpu")


def test_the_record_lists_the_devices_of_the_managers_virtual_memory(opened):
    config = Config(page_size_mb=2.0, min_reserved_pages=0, max_reserved_pages=0)
    assert HostVirtualMemory().devices == ("cpu",)  # the base class: one device
    one = opened(config=config, name=unique("one-rank"))
    two = opened(TwoRankHostMemory(), config=config, name=unique("two-ranks"))
    for manager, devices in ((one, ("cpu",)), (two, ("cpu", "cpu"))):
        r = registry.read_instance(manager.ipc_name)
        assert (r.devices, r.num_devices, r.used_bytes, r.total_used_bytes) == (devices, len(devices), PAGE,
                                                                                 len(devices) * PAGE)
        assert r.device_total_bytes == manager.vmm.total_memory()


def test_the_manager_reads_no_environment_and_tells_only_its_observer(monkeypatch):
    monkeypatch.setenv("KVCACHED_MEMORY_LIMIT", "junk")  # open_cache would refuse this; the manager never reads it
    with pytest.raises(ConfigError, match=r"^KVCACHED_MEMORY_LIMIT='junk' is invalid"):
        open_cache(SMALL, "cpu", virtual_bytes=16 * PAGE)

    class Recorder:
        def __init__(self) -> None:
            self.published, self.closed = [], 0

        def publish(self, stats) -> None:
            self.published.append((stats.used_bytes, stats.premapped_bytes, stats.limit_bytes))

        def close(self) -> None:
            self.closed += 1

        def states(self) -> list:
            """What was published, each state once (a pass of the mapper may publish the same state again)."""
            p = self.published
            return [state for i, state in enumerate(p) if i == 0 or p[i - 1] != state]

    observer = Recorder()
    manager = KVCacheManager(SMALL, "cpu", virtual_bytes=16 * PAGE, background=False, observer=observer,
                             config=Config(page_size_mb=2.0, min_reserved_pages=0, max_reserved_pages=0))
    assert manager.config == Config(page_size_mb=2.0, min_reserved_pages=0, max_reserved_pages=0)
    assert manager.ipc_name is None and registry.list_instances() == []
    assert observer.states() == [(0, 0, 16 * PAGE), (PAGE, 0, 16 * PAGE)]  # then the null block's page
    ids = manager.alloc(BLOCKS_PER_PAGE)
    manager.free(ids)  # freed to the reserve, then unmapped (no reserve is kept)
    assert observer.states()[2:] == [(2 * PAGE, 0, 16 * PAGE), (PAGE, PAGE, 16 * PAGE), (PAGE, 0, 16 * PAGE)]
    manager.shutdown()
    manager.shutdown()
    assert observer.closed == 1
