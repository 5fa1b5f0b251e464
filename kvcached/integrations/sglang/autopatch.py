"""Every patch kvcached applies to SGLang, registered as post-import hooks by the start-up hook.

Note: SGLang runs its scheduler and model runner in one process per rank (the scheduler owns the TpModelWorker), so
the pool's manager maps pages itself, in that process. Each patch replaces one name SGLang looks up at call time:
  sglang.srt.model_executor.model_runner_kv_cache_mixin
      MHATokenToKVPool, TokenToKVPoolAllocator     the elastic pool and allocator (pool.py)
      ModelRunnerKVCacheMixin.init_memory_pool     refuse what kvcached cannot serve (support.py), name the instance
      ._profile_available_bytes                    no static sizing: the budget is the address space, not free memory
      ._init_pools                                 check that the elastic pool and allocator were built
  sglang.srt.model_executor.model_runner  ModelRunner.init_cuda_graphs   trim the reserve before capture, so that
                                                                         no driver call runs while CUDA captures
  sglang.srt.mem_cache.kv_cache_builder.build_kv_cache    refuse prefix caches other than the radix and chunk caches
  sglang.srt.mem_cache.radix_cache.RadixCache.cache_finished_req   bound the cached tokens (cache_bound.py)
  sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run    hold the limit lock across a step
                                         Scheduler.on_idle        idle: cached pages to the bound, reserve back
  sglang.srt.managers.scheduler_components.invariant_checker
      SchedulerInvariantChecker._check_full_pool   the idle leak check counts slots, not what may be mapped now
An SGLang version other than those listed, or a setting support.py refuses, stops SGLang at start-up with a message
saying why: kvcached never lets SGLang run its static pool while enabled.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from types import ModuleType

from ..importhook import when_imported

SUPPORTED_SGLANG = ("0.5.15.post1",)
logger = logging.getLogger("sglang.kvcached")


def install() -> None:
    when_imported("sglang", _check_sglang)
    when_imported("sglang.srt.model_executor.model_runner_kv_cache_mixin", _patch_pools)
    when_imported("sglang.srt.model_executor.model_runner", _patch_model_runner)
    when_imported("sglang.srt.mem_cache.kv_cache_builder", _patch_cache_builder)
    when_imported("sglang.srt.mem_cache.radix_cache", _patch_radix_cache)
    when_imported("sglang.srt.managers.scheduler", _patch_scheduler)
    when_imported("sglang.srt.managers.scheduler_components.invariant_checker", _patch_invariant_checker)


def check_version(version: str) -> None:
    if version not in SUPPORTED_SGLANG:
        raise RuntimeError(
            f"kvcached is enabled (ENABLE_KVCACHED) but SGLang {version} is not supported: kvcached patches SGLang "
            f"{', '.join(SUPPORTED_SGLANG)}. Install a supported SGLang, or unset ENABLE_KVCACHED to run SGLang with "
            f"its static KV pool."
        )


def _check_sglang(sglang: ModuleType) -> None:
    check_version(str(getattr(sglang, "__version__", "unknown")))


def _elastic(allocator) -> bool:
    from .pool import ElasticTokenToKVPoolAllocator

    return isinstance(allocator, ElasticTokenToKVPoolAllocator)


def _patch_pools(module: ModuleType) -> None:
    from . import pool
    from .support import unsupported_reason

    module.MHATokenToKVPool = pool.ElasticMHATokenToKVPool
    module.TokenToKVPoolAllocator = pool.ElasticTokenToKVPoolAllocator
    mixin = module.ModelRunnerKVCacheMixin
    init_memory_pool, init_pools = mixin.init_memory_pool, mixin._init_pools

    @functools.wraps(init_memory_pool)
    def checked_init_memory_pool(self, pre_model_load_memory):
        reason = unsupported_reason(self.server_args, self)
        if reason:
            raise RuntimeError(f"kvcached is enabled (ENABLE_KVCACHED) but cannot serve this SGLang engine: {reason}. "
                               f"Unset ENABLE_KVCACHED to run it with SGLang's static KV pool.")
        pool.pending_ipc_name = pool.default_ipc_name(self.server_args)
        return init_memory_pool(self, pre_model_load_memory)

    def elastic_available_bytes(self, pre_model_load_memory):
        from ...config import Config

        return pool.elastic_virtual_bytes(Config.from_env(), pool.elastic_device(self.device))

    @functools.wraps(init_pools)
    def checked_init_pools(self):
        init_pools(self)
        if not isinstance(self.token_to_kv_pool, pool.ElasticMHATokenToKVPool) or not _elastic(
                self.token_to_kv_pool_allocator):
            raise RuntimeError(
                f"kvcached is enabled but SGLang built {type(self.token_to_kv_pool).__name__} and "
                f"{type(self.token_to_kv_pool_allocator).__name__}: kvcached serves MHATokenToKVPool with page size 1 "
                f"only. Unset ENABLE_KVCACHED to run this model with SGLang's static KV pool."
            )
        self.max_total_num_tokens = self.token_to_kv_pool_allocator.size  # the elastic capacity, in tokens

    mixin.init_memory_pool = checked_init_memory_pool
    mixin._profile_available_bytes = elastic_available_bytes
    mixin._init_pools = checked_init_pools


def _patch_model_runner(module: ModuleType) -> None:
    original = module.ModelRunner.init_cuda_graphs

    @functools.wraps(original)
    def init_cuda_graphs(self, *args, **kwargs):
        if _elastic(getattr(self, "token_to_kv_pool_allocator", None)):
            self.token_to_kv_pool_allocator.slots.kv.trim()  # the mapper stays quiet until the next alloc
        return original(self, *args, **kwargs)

    module.ModelRunner.init_cuda_graphs = init_cuda_graphs


def _patch_cache_builder(module: ModuleType) -> None:
    original = module.build_kv_cache

    @functools.wraps(original)
    def build_kv_cache(*args, **kwargs):
        from sglang.srt.mem_cache.chunk_cache import ChunkCache
        from sglang.srt.mem_cache.radix_cache import RadixCache

        result = original(*args, **kwargs)
        if _elastic(result.token_to_kv_pool_allocator) and not isinstance(result.tree_cache, (RadixCache, ChunkCache)):
            raise RuntimeError(f"kvcached supports SGLang's radix cache (or none), not "
                               f"{type(result.tree_cache).__name__}")
        return result

    module.build_kv_cache = build_kv_cache


def _patch_radix_cache(module: ModuleType) -> None:
    from .cache_bound import bound_cached_tokens

    original = module.RadixCache.cache_finished_req

    @functools.wraps(original)
    def cache_finished_req(self, req, *args, **kwargs):
        result = original(self, req, *args, **kwargs)
        if _elastic(self.token_to_kv_pool_allocator) and not self.disable:
            bound_cached_tokens(self, _evictor(self), self.token_to_kv_pool_allocator.slots.max_cached_tokens)
        return result

    module.RadixCache.cache_finished_req = cache_finished_req


def _evictor(tree):
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    return lambda num_tokens: tree.evict(EvictParams(num_tokens=num_tokens))


def _patch_scheduler(module: ModuleType) -> None:
    from sglang.srt.mem_cache.radix_cache import RadixCache

    from .cache_bound import shrink_when_idle

    scheduler = module.Scheduler
    next_batch, on_idle = scheduler.get_next_batch_to_run, scheduler.on_idle

    @functools.wraps(next_batch)
    def get_next_batch_to_run(self, *args, **kwargs):
        allocator = self.token_to_kv_pool_allocator
        if not _elastic(allocator):
            return next_batch(self, *args, **kwargs)
        with allocator.slots.kv.limit_lock:  # the limit cannot fall between available_size() and alloc()
            return next_batch(self, *args, **kwargs)

    @functools.wraps(on_idle)
    def idle(self, *args, **kwargs):
        allocator, tree = self.token_to_kv_pool_allocator, self.tree_cache
        if _elastic(allocator) and isinstance(tree, RadixCache) and not tree.disable and self.is_fully_idle():
            shrink_when_idle(tree, _evictor(tree), allocator.slots, allocator.slots.max_cached_tokens)
        return on_idle(self, *args, **kwargs)  # after: SGLang's leak check sees the cache as it stays

    scheduler.get_next_batch_to_run = get_next_batch_to_run
    scheduler.on_idle = idle


def _patch_invariant_checker(module: ModuleType) -> None:
    checker = module.SchedulerInvariantChecker
    original = checker._check_full_pool

    @functools.wraps(original)
    def _check_full_pool(self, ps, uncached: int = 0):
        if _elastic(self.token_to_kv_pool_allocator):
            # available_size() is what may be mapped now (limit, device memory); SGLang's invariant counts slots.
            held = self.token_to_kv_pool_allocator.slots.allocated_tokens()
            ps = dataclasses.replace(ps, full_available_size=self.max_total_num_tokens - held)
        return original(self, ps, uncached=uncached)

    checker._check_full_pool = _check_full_pool
