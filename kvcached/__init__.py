"""kvcached: an elastic KV cache for LLM serving engines, mapped on demand over virtual memory.

Names are imported on first use: the start-up hook (kvcached_autopatch.pth) runs in every Python process of an
environment, and must not pull in torch there.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "config",
    "BlockError": "errors", "ConfigError": "errors", "DriverError": "errors", "KVCachedError": "errors",
    "NoCudaDriverError": "errors", "RegistryError": "errors", "ShutdownError": "errors",
    "KVGeometry": "layout", "KVLayout": "layout",
    "BlockStats": "manager", "KVCacheManager": "manager", "MemoryObserver": "manager",
    "open_cache": "opener",
    "MemoryStats": "page_allocator", "PageAllocator": "page_allocator",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvcached' has no attribute {name!r}")
    return getattr(import_module(f".{module}", __name__), name)
