"""kvcached: an elastic KV cache for LLM serving engines, mapped on demand over virtual memory."""

from .config import Config
from .errors import BlockError, ConfigError, DriverError, KVCachedError, NoCudaDriverError, ShutdownError
from .layout import KVGeometry, KVLayout
from .manager import BlockStats, KVCacheManager
from .page_allocator import MemoryStats, PageAllocator

__version__ = "0.1.0"

__all__ = [
    "BlockError", "BlockStats", "Config", "ConfigError", "DriverError", "KVCacheManager", "KVCachedError",
    "KVGeometry", "KVLayout", "MemoryStats", "NoCudaDriverError", "PageAllocator", "ShutdownError",
]
