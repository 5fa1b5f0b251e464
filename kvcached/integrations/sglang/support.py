"""What kvcached can serve in SGLang, decided at start-up from SGLang's settings: a refusal names the setting and why.

Note: kvcached replaces one pool class (MHATokenToKVPool, one K and one V buffer per layer, NHD rows) and the plain
token allocator (page size 1), in one process per engine. Everything that builds another pool (MLA, hybrid SWA or
Mamba/linear attention, FP4 KV, the page-major layout, the unified pool), splits the KV cache over several processes
(tensor, pipeline, data or decode-context parallel), reads the pool in ways not checked here (speculative decoding, PD
disaggregation, the hierarchical cache, HiSparse) or sizes buffers by the token budget (returning routed experts)
stops SGLang at start-up: kvcached never lets SGLang run its static pool silently while enabled. The checks read
attributes of SGLang's ServerArgs and ModelRunner (0.5.15.post1) but import nothing of SGLang, so they are tested
without it.
"""

from __future__ import annotations

import os
from typing import Any, Optional

_FLAGS = (  # (ServerArgs attribute, what it is): each must be off
    ("enable_dp_attention", "DP attention"),
    ("enable_hierarchical_cache", "the hierarchical cache"),
    ("enable_unified_memory", "the unified memory pool"),
    ("enable_page_major_kv_layout", "the page-major KV layout"),
    ("enable_hisparse", "HiSparse"),
    ("prefill_only_disable_kv_cache", "--prefill-only-disable-kv-cache"),
    ("enable_lmcache", "LMCache"),
    # sized by SGLang's token budget, which with kvcached is the whole address space:
    ("enable_return_routed_experts", "returning routed experts"),
    ("enable_return_indexer_topk", "returning the indexer's top-k"),
)
_SIZES = ("tp_size", "pp_size", "dp_size", "dcp_size", "attn_cp_size")


def unsupported_reason(server_args: Any, runner: Any) -> Optional[str]:
    """Why kvcached cannot serve this SGLang engine, or None when it can."""
    for name in _SIZES:
        if getattr(server_args, name) not in (None, 1):
            return f"{name}={getattr(server_args, name)}: kvcached supports one GPU per SGLang engine (size 1)"
    for name, what in _FLAGS:
        if getattr(server_args, name):
            return f"{what} ({name}) is not supported by kvcached"
    if server_args.speculative_algorithm is not None:
        return f"speculative decoding ({server_args.speculative_algorithm}) is not supported by kvcached"
    if str(server_args.disaggregation_mode) != "null":
        return f"PD disaggregation (disaggregation_mode={server_args.disaggregation_mode}) is not supported by kvcached"
    if server_args.page_size not in (None, 1):
        return f"page_size={server_args.page_size}: kvcached supports SGLang's token pool with page size 1"
    if os.environ.get("SGLANG_USE_HND_KVCACHE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "SGLANG_USE_HND_KVCACHE: kvcached supports the NHD KV layout only"
    if runner.device != "cuda":
        return f"device {runner.device!r}: kvcached supports SGLang on CUDA GPUs"
    if runner.use_mla_backend:
        return "MLA models (a latent KV pool) are not supported by kvcached"
    if runner.is_hybrid_swa:
        return "hybrid sliding-window models (two KV pools) are not supported by kvcached"
    if runner.mambaish_config is not None:
        return "hybrid Mamba/linear-attention models are not supported by kvcached"
    if runner.is_draft_worker:
        return "draft workers (speculative decoding) are not supported by kvcached"
    return None
