"""The bound on SGLang's prefix cache under kvcached: cached prefixes keep at most KVCACHED_MAX_CACHED_TOKENS tokens,
and an idle engine keeps at most the pages those fill.

Note: SGLang's radix cache keeps every finished request's tokens until the pool runs short, and with an elastic pool
it never does: idle memory would stay at the burst's peak. After each finished request, the cache's evictable tokens
are evicted down to the bound (LRU, SGLang's own eviction). Cached tokens are scattered over pages, so a bound on
tokens is not one on memory: when the scheduler is idle (no request holds a token), cached prefixes are evicted (LRU,
one leaf at a time) until the pages in use are at most the padding slot's page plus the pages the bound fills, and the
reserve of premapped pages is given back. That runs from the scheduler's idle hook, not after each request: SGLang
frees the slots of a step's finished requests together at the step's end (a free group), so page counts are only
final between steps.
Duck-typed over the tree (evictable_size, protected_size) and an `evict(num_tokens)` callable: no SGLang import.
"""

from __future__ import annotations

from typing import Callable, Protocol

from ...units import ceil_div
from .token_slots import TokenSlots


class PrefixCache(Protocol):
    def evictable_size(self) -> int: ...

    def protected_size(self) -> int: ...


def bound_cached_tokens(tree: PrefixCache, evict: Callable[[int], None], max_tokens: int) -> None:
    """After a request finished: evict the least recent cached tokens beyond the bound."""
    excess = tree.evictable_size() - max_tokens
    if excess > 0:
        evict(excess)


def shrink_when_idle(tree: PrefixCache, evict: Callable[[int], None], slots: TokenSlots, max_tokens: int) -> None:
    """With no token in use by a request: evict cached prefixes until the pages in use are within the bound, and give
    the reserve back."""
    if tree.protected_size() or slots.allocated_tokens() != tree.evictable_size():
        return  # requests hold tokens: their pages are needed anyway
    allowed = 1 + ceil_div(max_tokens, slots.tokens_per_page)
    while _pages_in_use(slots) > allowed and tree.evictable_size() > 0:
        before = tree.evictable_size()
        evict(1)  # the least recent leaf: at least one token, as little as possible
        if tree.evictable_size() == before:  # nothing left that SGLang may evict
            break
    if slots.kv.memory_stats().premapped_bytes:
        slots.kv.trim()


def _pages_in_use(slots: TokenSlots) -> int:
    stats = slots.kv.memory_stats()
    return stats.used_bytes // stats.page_bytes
