"""The bound on SGLang's prefix cache under kvcached: cached prefixes keep at most KVCACHED_MAX_CACHED_TOKENS tokens,
and an idle engine keeps at most the pages those fill.

Note: SGLang's radix cache keeps every finished request's tokens until the pool runs short, and with an elastic pool
it never does: idle memory would stay at the burst's peak. After each finished request, the cache's evictable tokens
are evicted down to the bound (LRU, SGLang's own eviction). Cached tokens are scattered over pages, so a bound on
tokens is not one on memory: when no request holds a token any more, cached prefixes are evicted (LRU, one leaf at a
time) until the pages in use are at most the null block's page plus the pages the bound fills.
Duck-typed over the tree (evictable_size, protected_size) and an `evict(num_tokens)` callable: no SGLang import.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

from .token_slots import TokenSlots


class PrefixCache(Protocol):
    def evictable_size(self) -> int: ...

    def protected_size(self) -> int: ...


def max_cached_tokens(slots: TokenSlots, configured: Optional[int]) -> int:
    """KVCACHED_MAX_CACHED_TOKENS, default one page of tokens."""
    return slots.tokens_per_page if configured is None else configured


def bound_prefix_cache(tree: PrefixCache, evict: Callable[[int], None], slots: TokenSlots, max_tokens: int) -> None:
    excess = tree.evictable_size() - max_tokens
    if excess > 0:
        evict(excess)
    if tree.protected_size() or slots.allocated_tokens() != tree.evictable_size():
        return  # requests hold tokens: their pages are needed anyway
    allowed = 1 + -(-max_tokens // slots.tokens_per_page)
    while _pages_in_use(slots) > allowed and tree.evictable_size() > 0:
        before = tree.evictable_size()
        evict(1)  # the least recent leaf: at least one token, as little as possible
        if tree.evictable_size() == before:  # nothing left that SGLang may evict
            break
    slots.kv.trim()  # idle: the reserve of premapped pages goes back now


def _pages_in_use(slots: TokenSlots) -> int:
    stats = slots.kv.memory_stats()
    return stats.used_bytes // stats.page_bytes
