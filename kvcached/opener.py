"""open_cache(): the edge where an engine or a script gets a KV cache manager, configured and registered.

Note: the manager itself reads no environment and knows no registry (a library can build one in isolation, tests
too). This edge reads Config.from_env() once, builds the manager, and registers it in the shared-memory registry,
where kvctl and kvtop see it and operators set its limit; the registration is the manager's observer, closed by
shutdown() and, if shutdown() is never called, at interpreter exit. The record lists the devices of the manager's
virtual memory (`vmm.devices`: several when tensor-parallel ranks follow one page table), so the manager itself stays
unaware of them: its figures are one device's. The module is not named open_cache: a submodule
of that name would replace the function `kvcached.open_cache` as an attribute of the package once imported.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from .config import Config
from .layout import KVGeometry
from .manager import KVCacheManager
from .vmm import VirtualMemory


def open_cache(
    geometry: KVGeometry,
    device: Union[str, VirtualMemory] = "cpu",
    *,
    config: Optional[Config] = None,
    name: Optional[str] = None,
    register: bool = True,
    **manager_kwargs: Any,
) -> KVCacheManager:
    """A KVCacheManager for `geometry` on `device`, configured from the environment (KVCACHED_*) unless `config` is
    given, and registered under `name` (else config.ipc_name, else a unique default) unless `register` is False.

    `manager_kwargs` go to KVCacheManager (limit_bytes, virtual_bytes, reserve_null_block, background). A bad or
    taken name raises ConfigError before any memory is mapped for good: what was reserved is given back.
    """
    from . import registry  # the registry is the edge's business: the manager never imports it

    config = config if config is not None else Config.from_env()
    name = name if name is not None else config.ipc_name
    if register and name is not None:
        registry.validate_name(name)  # before reserving anything
    manager = KVCacheManager(geometry, device, config=config, **manager_kwargs)
    if not register:
        return manager
    try:
        manager.observer = registry.Registration.open(
            name,
            devices=manager.vmm.devices,
            virtual_bytes=manager.layout.num_pages * manager.layout.page_bytes,
            device_total_bytes=manager.vmm.total_memory(),
            explicit_limit=manager.explicit_limit,
            stats=manager.memory_stats,
            apply_limit=manager.resize,
        )
    except BaseException:
        manager.shutdown()
        raise
    return manager
