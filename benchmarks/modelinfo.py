"""KV bytes per token and per block of a local Hugging Face model folder, to size pools and budgets.

Note (why): the demo's budgets (a static pool per instance, the shared budget of experiment 3) are stated in requests
that fit, so they must be computed from the model, not hard-coded for SmolLM2. Approach: read config.json (layers,
KV heads, head size) and the dtype the engine will run; KV bytes per token = 2 (K, V) x layers x KV heads x head size x
element size. Limits: plain decoder attention only (MLA, sliding windows, hybrid models are not modelled); the
result is what vLLM allocates per token, not counting its block rounding (use blocks_for()).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

# the benchmarks' default model: $KVCACHED_MODEL_DIR, else the folder scripts/prepare_model.py makes
DEFAULT_MODEL = os.environ.get("KVCACHED_MODEL_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "kvcached", "models", "SmolLM2-135M-Instruct")
DTYPE_BYTES = {"float32": 4, "float": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "half": 2, "fp16": 2}


@dataclass(frozen=True)
class ModelKV:
    layers: int
    kv_heads: int
    head_size: int
    dtype_bytes: int

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_size * self.dtype_bytes

    def block_bytes(self, block_size: int) -> int:
        return self.bytes_per_token * block_size

    def blocks_for(self, tokens: int, block_size: int) -> int:
        return max(1, math.ceil(tokens / block_size))


def read_model_kv(model_dir: str, dtype: str = "auto") -> ModelKV:
    """KV geometry of `model_dir` when run in `dtype` ("auto": the config's torch dtype, bf16 if absent)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg = cfg.get("text_config", cfg)
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_size = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    if dtype == "auto":
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(DTYPE_BYTES)}")
    return ModelKV(layers, kv_heads, head_size, DTYPE_BYTES[dtype])
