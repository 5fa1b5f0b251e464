"""Every patch kvcached applies to vLLM, registered as post-import hooks by the start-up hook.

Note: each patch replaces one function or class that vLLM looks up by name at call time, in the process where it runs:
  engine core  vllm.v1.engine.core.get_kv_cache_configs    plan the elastic layout, create the page table
               vllm.v1.core.kv_cache_coordinator.BlockPool  the elastic block pool
               vllm.v1.core.sched.scheduler.Scheduler.schedule   hold the limit lock across a step
  worker       vllm.v1.worker.gpu_model_runner.allocate_kv_cache  KV tensors over the reservation
               GPUModelRunner.execute_model (CPUModelRunner inherits it)   map before, no unmap during a step
               CPUWorker.__init__, Worker.__init__          skip static sizing (a placeholder KV size)
A vLLM version other than those listed, the V2 model runner, async scheduling or several workers per engine stop the
engine at start-up with a message saying so: kvcached never lets vLLM run its static pool while enabled.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

from ..importhook import when_imported

SUPPORTED_VLLM = ("0.32.0",)
logger = logging.getLogger("vllm.kvcached")


def install() -> None:
    # The pre-step hook wraps the V1 model runner; vLLM picks V2 on GPUs with Triton unless told otherwise.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    when_imported("vllm", _check_vllm)
    when_imported("vllm.v1.engine.core", _patch_engine_core)
    when_imported("vllm.v1.core.kv_cache_coordinator", _patch_coordinator)
    when_imported("vllm.v1.core.sched.scheduler", _patch_scheduler)
    when_imported("vllm.v1.worker.gpu_model_runner", _patch_model_runner)
    when_imported("vllm.v1.worker.cpu_worker", _patch_worker_class("CPUWorker"))
    when_imported("vllm.v1.worker.gpu_worker", _patch_worker_class("Worker"))


def _check_vllm(vllm: ModuleType) -> None:
    version = str(getattr(vllm, "__version__", "unknown")).split("+")[0]
    if version not in SUPPORTED_VLLM:
        raise RuntimeError(
            f"kvcached is enabled (ENABLE_KVCACHED) but vLLM {version} is not supported: kvcached {SUPPORTED_VLLM[0]} "
            f"patches vLLM {', '.join(SUPPORTED_VLLM)}. Install a supported vLLM, or unset ENABLE_KVCACHED to run "
            f"vLLM with its static KV pool."
        )
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1":
        raise RuntimeError("kvcached supports vLLM's V1 model runner only: unset VLLM_USE_V2_MODEL_RUNNER")


def _patch_engine_core(module: ModuleType) -> None:
    from . import plan as planning
    from ...config import Config
    from ...pagetable import PageTable

    original = module.get_kv_cache_configs

    @functools.wraps(original)
    def get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory):
        if getattr(vllm_config.scheduler_config, "async_scheduling", False):
            raise RuntimeError("kvcached does not support async scheduling yet: start vLLM without --async-scheduling")
        config = Config.from_env()
        plan = planning.make_plan(vllm_config, kv_cache_specs, config)
        layout = plan.layout()
        planning.remove_stale_tables(config.ipc_dir)
        table = PageTable.create(plan.table_path, layout.num_pages, layout.page_bytes)
        planning.keep_table(table)
        table.set_wanted(0, True)  # the null block's page: mapped before the first step can point at it
        configs = original(vllm_config, kv_cache_specs, [planning.usable_bytes(plan)] * len(available_memory))
        planning.rewrite_configs(configs, plan)
        return configs

    module.get_kv_cache_configs = get_kv_cache_configs


def _patch_coordinator(module: ModuleType) -> None:
    from .block_pool import ElasticBlockPool

    module.BlockPool = ElasticBlockPool


def _patch_scheduler(module: ModuleType) -> None:
    original = module.Scheduler.schedule

    @functools.wraps(original)
    def schedule(self, *args, **kwargs):
        kv = getattr(getattr(self.kv_cache_manager, "block_pool", None), "kv", None)
        if kv is None:
            return original(self, *args, **kwargs)
        with kv.limit_lock:
            return original(self, *args, **kwargs)

    module.Scheduler.schedule = schedule


def _patch_model_runner(module: ModuleType) -> None:
    from . import worker

    module.allocate_kv_cache = worker.allocate_kv_cache
    original = module.GPUModelRunner.execute_model

    @functools.wraps(original)
    def execute_model(self, *args, **kwargs):
        return worker.run_step(original, self, *args, **kwargs)

    module.GPUModelRunner.execute_model = execute_model


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
