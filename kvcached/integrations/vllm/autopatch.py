"""Every patch kvcached applies to vLLM, registered as post-import hooks by the start-up hook.

Note: each patch replaces one function or class that vLLM looks up by name at call time, in the process where it runs:
  engine core  vllm.v1.engine.core.EngineCore.__init__     refuse parallel setups kvcached cannot serve, before
                                                            any worker starts (plan.check_parallel)
               vllm.v1.engine.core.get_kv_cache_configs    plan the elastic layout, create the page table (one
                                                            for all tensor-parallel ranks)
               vllm.v1.core.kv_cache_coordinator.BlockPool  the elastic block pool
               KVCacheCoordinator.get_num_blocks_to_allocate  tells the pool what vLLM is about to ask for
               vllm.v1.core.sched.scheduler.Scheduler       __init__: blocks come back only after the last step that may
                                                            use them (async scheduling); schedule: one step holds the
                                                            limit lock and promises only mapped blocks (block_pool.py)
  worker (V1)  the KV allocation (versions.py: vllm.v1.worker.gpu_model_runner.allocate_kv_cache or
               GPUModelRunner._allocate_kv_cache_tensors)   KV tensors over the reservation
               GPUModelRunner.initialize_kv_cache_tensors   check the views: blocks first, one block contiguous
               GPUModelRunner.execute_model (CPUModelRunner inherits it)   map before, no unmap during a step (each
                                                            rank on its own device; a rank >= 1 that cannot ends its
                                                            process, so the engine stops instead of hanging)
               CPUWorker.__init__, Worker.__init__          skip static sizing (a placeholder KV size)
               vllm.v1.worker.gpu_worker.request_memory     start beside another engine that holds memory
  worker (V2)  vllm.v1.worker.gpu.attn_utils._allocate_kv_cache, _reshape_kv_cache, and
               vllm.v1.worker.gpu.model_runner.GPUModelRunner.execute_model: the same three, for the V2 model runner
               vllm.v1.worker.gpu_worker.warmup_kernels     map the pages of the made-up blocks its warm-up writes
vLLM's GPU defaults work unchanged: CUDA graphs (the KV tensors' addresses never change), async scheduling (the
deferred frees above), and whichever model runner vLLM picks where versions.py says kvcached supports V2 (elsewhere
VLLM_USE_V2_MODEL_RUNNER=0 chooses V1, said once in the log). A vLLM version without a row in versions.py, V2 where
it is not supported, or pipeline, context or data parallel stop the engine at start-up with a message saying so:
kvcached never lets vLLM run its static pool while enabled.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

from ..importhook import when_imported
from . import versions

logger = logging.getLogger("vllm.kvcached")


def install() -> None:
    when_imported("vllm", _check_vllm)
    when_imported("vllm.v1.engine.core", _patch_engine_core)
    when_imported("vllm.v1.core.kv_cache_coordinator", _patch_coordinator)
    when_imported("vllm.v1.core.sched.scheduler", _patch_scheduler)
    when_imported("vllm.v1.worker.gpu_model_runner", _patch_model_runner)
    when_imported("vllm.v1.worker.gpu.attn_utils", _patch_attn_utils_v2)
    when_imported("vllm.v1.worker.gpu.model_runner", _patch_model_runner_v2)
    when_imported("vllm.v1.worker.cpu_worker", _patch_worker_class("CPUWorker"))
    when_imported("vllm.v1.worker.gpu_worker", _patch_gpu_worker)


def _check_vllm(vllm: ModuleType) -> None:
    row = versions.select(str(getattr(vllm, "__version__", "unknown")))
    if row.model_runner_v2:
        return
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1":
        raise RuntimeError(
            f"kvcached supports vLLM {row.version}'s V1 model runner only: unset VLLM_USE_V2_MODEL_RUNNER")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # read by vLLM later, in this process and its children


def _patch_engine_core(module: ModuleType) -> None:
    from . import plan as planning
    from ...config import Config
    from ...pagetable import PageTable

    original, engine_init = module.get_kv_cache_configs, module.EngineCore.__init__

    @functools.wraps(engine_init)
    def __init__(self, vllm_config, *args, **kwargs):
        planning.check_parallel(vllm_config)
        engine_init(self, vllm_config, *args, **kwargs)

    @functools.wraps(original)
    def get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory):
        v2 = bool(getattr(vllm_config, "use_v2_model_runner", False))
        if v2 and not versions.running().model_runner_v2:
            raise RuntimeError(f"kvcached supports vLLM {versions.running().version}'s V1 model runner only; this "
                               "configuration makes vLLM use V2 (unset ENABLE_KVCACHED to run it without kvcached)")
        config = Config.from_env()
        plan = planning.make_plan(vllm_config, kv_cache_specs, config)
        layout = plan.layout()
        planning.remove_stale_tables(config.ipc_dir)
        table = PageTable.create(plan.table_path, layout.num_pages, layout.page_bytes, ranks=plan.world_size)
        planning.keep_table(table)
        table.set_wanted(0, True)  # the null block's page: mapped before the first step can point at it
        configs = original(vllm_config, kv_cache_specs, [planning.usable_bytes(plan)] * len(available_memory))
        planning.rewrite_configs(configs, plan)
        logger.info("kvcached: vLLM %s with its %s model runner, async scheduling %s", versions.running().version,
                    "V2" if v2 else "V1",
                    "on" if getattr(vllm_config.scheduler_config, "async_scheduling", False) else "off")
        return configs

    module.get_kv_cache_configs = get_kv_cache_configs
    module.EngineCore.__init__ = __init__


def _patch_coordinator(module: ModuleType) -> None:
    from .block_pool import ElasticBlockPool

    module.BlockPool = ElasticBlockPool
    original = module.KVCacheCoordinator.get_num_blocks_to_allocate

    @functools.wraps(original)
    def get_num_blocks_to_allocate(self, *args, **kwargs):
        count = original(self, *args, **kwargs)
        if count and isinstance(self.block_pool, ElasticBlockPool):  # none needed (most decode steps): nothing to hold
            self.block_pool.expect(count, admission=bool(kwargs.get("apply_admission_cap")))
        return count

    module.KVCacheCoordinator.get_num_blocks_to_allocate = get_num_blocks_to_allocate


def _patch_scheduler(module: ModuleType) -> None:
    from .block_pool import ElasticBlockPool

    init, schedule = module.Scheduler.__init__, module.Scheduler.schedule

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if isinstance(getattr(self.kv_cache_manager, "block_pool", None), ElasticBlockPool):
            # With async scheduling a step may still use a finished request's blocks; vLLM returns them to the pool
            # (and kvcached may unmap their pages) only once that step's output is back. Without it: at once.
            self.defer_block_free = True

    @functools.wraps(schedule)
    def wrapped_schedule(self, *args, **kwargs):
        pool = getattr(self.kv_cache_manager, "block_pool", None)
        if not isinstance(pool, ElasticBlockPool):
            return schedule(self, *args, **kwargs)
        with pool.kv.limit_lock, pool.step():
            return schedule(self, *args, **kwargs)

    module.Scheduler.__init__ = __init__
    module.Scheduler.schedule = wrapped_schedule


def _patch_model_runner(module: ModuleType) -> None:
    from . import worker

    if versions.running().per_layer_kv_tensors:
        module.GPUModelRunner._allocate_kv_cache_tensors = worker.allocate_kv_cache_per_layer
    else:
        module.allocate_kv_cache = worker.allocate_kv_cache
    _hook_step(module.GPUModelRunner)
    runner = module.GPUModelRunner
    runner.initialize_kv_cache_tensors = _checking_views(runner.initialize_kv_cache_tensors)


def _hook_step(runner_class: type) -> None:
    """The model runner's step maps what the scheduler wants before it runs, and nothing is unmapped during it."""
    from . import worker

    original = runner_class.execute_model

    @functools.wraps(original)
    def execute_model(self, *args, **kwargs):
        return worker.run_step(original, self, *args, **kwargs)

    runner_class.execute_model = execute_model


def _checking_views(make_views):
    """`make_views` (whatever returns vLLM's per-layer KV views), then a check that their blocks come first."""
    from . import worker

    @functools.wraps(make_views)
    def checked(*args, **kwargs):
        kv_caches = make_views(*args, **kwargs)
        worker.check_blocks_first(kv_caches)
        return kv_caches

    return checked


def _patch_attn_utils_v2(module: ModuleType) -> None:
    from . import worker

    if not versions.running().model_runner_v2:
        return
    module._allocate_kv_cache = worker.allocate_kv_cache_v2
    module._reshape_kv_cache = _checking_views(module._reshape_kv_cache)


def _patch_model_runner_v2(module: ModuleType) -> None:
    if versions.running().model_runner_v2:
        _hook_step(module.GPUModelRunner)


def _patch_gpu_worker(module: ModuleType) -> None:
    from . import worker

    _patch_worker_class("Worker")(module)
    module.request_memory = worker.requested_memory
    if versions.running().model_runner_v2:
        module.warmup_kernels = functools.partial(worker.warm_up, module.warmup_kernels)


def _patch_worker_class(name: str):
    def patch(module: ModuleType) -> None:
        from .worker import use_placeholder_kv_size

        cls = getattr(module, name)
        original = cls.__init__

        @functools.wraps(original)
        def __init__(self, vllm_config, *args, **kwargs):
            use_placeholder_kv_size(vllm_config)
            original(self, vllm_config, *args, **kwargs)

        cls.__init__ = __init__

    return patch
