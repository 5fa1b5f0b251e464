"""The demo's settings: workload sizes per device and --quick, memory sizing, all resolved once from the command line.

Note (why): every number the demo runs with is in one DemoConfig, written whole into results.json, so a result says
how it was made. Workload sizes have a default for the full run and for --quick, on the CPU (SmolLM2 on 2 cores) and
on a GPU (an H100 runs the same bursts in well under a second, so its bursts are larger and its ramps faster).
Memory on a GPU: every server gets --gpu-memory-utilization GPU_SHARE (default 0.42), so two static pools of vLLM's
own sizing fit one GPU (experiment 2) and a kvcached server always passes vLLM's start-up check ("free memory >= its
share") with the others running; kvcached ignores the pool. On the CPU the static pool is --kv-cache-memory-bytes.
Experiment 3's budget is sized from the model so that one instance's ramp needs about all of it (--e3-peak requests).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from kvcached.units import parse_size

from benchmarks.modelinfo import read_model_kv
from benchmarks.servers import gpu_index

PROMPT_TOKENS_EST = 64  # chat template + task, rounded up (measured 38-41 with SmolLM2's template), plus the context
RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
MODES = ("kvcached", "static")
LETTERS = ("a", "b", "c")  # instances of experiments 2 and 3

# Workload sizes: (full run, --quick) on the CPU; GPU_SIZES replaces some on a GPU
SIZES = {
    "bursts": (3, 2), "concurrency": (6, 3), "max_tokens": (180, 64), "context_tokens": (200, 100),
    "pause": (6.0, 4.0), "idle": (5.0, 4.0), "e2_rounds": (1, 1),
    "e3_max_tokens": (96, 48), "e3_peak": (12, 9), "e3_ramp": (12.0, 10.0), "e3_rate": ("0.3,1.2", "0.3,1.5"),
    "e3_gap": (5.0, 4.0), "experiments": ("1,2,3", "1,2"),
}
# Experiment 4: one engine's memory, to size the router's `memory` so that two engines fit and a third does not.
# CPU: a SmolLM2 engine (float32, kvcached, after bursts) took 2.1-2.6 GiB of available memory in the demo (the
# router's log: free memory before each start); GPU: an estimate, to be measured
E4_ENGINE_MEMORY_CPU, E4_ENGINE_MEMORY_GPU = "2.4G", "2G"
GPU_SIZES = {
    "concurrency": (32, 16), "max_tokens": (256, 128), "context_tokens": (600, 300),
    "e3_max_tokens": (128, 64), "e3_peak": (48, 32), "e3_rate": ("4,40", "4,30"),
}


@dataclass
class DemoConfig:
    model: str
    device: str
    dtype: str
    out: str
    port_base: int
    quick: bool
    experiments: list[int]
    modes: list[str]
    bursts: int
    concurrency: int
    max_tokens: int
    context_tokens: int
    pause: float
    idle: float
    e2_rounds: int
    e3_max_tokens: int
    e3_peak: int
    e3_ramp: float
    e3_rate: tuple[float, float]
    e3_gap: float
    e3_budget: int
    e4_engine_memory: int  # experiment 4: what one engine is taken to hold, to size the router's `memory`
    static_pool: Optional[int]  # None on a GPU: vLLM sizes the pool within gpu_share
    gpu_share: Optional[float]  # --gpu-memory-utilization of every server on a GPU; None on the CPU
    enforce_eager: bool
    block_size: int
    max_model_len: int
    kvcached_env: dict[str, str]
    sample_hz: float
    startup_timeout: float
    python: str
    request_timeout: float
    kv_bytes_per_token: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def gpu_index(self) -> int:
        return gpu_index(self.device)


def detect_device() -> str:
    """cuda:0 when NVML sees a GPU, else cpu."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return "cuda:0" if pynvml.nvmlDeviceGetCount() > 0 else "cpu"
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001  (no pynvml, no driver: a CPU machine)
        return "cpu"


def resolve(args: argparse.Namespace) -> DemoConfig:
    """The DemoConfig of parsed arguments; raises ValueError naming a bad value."""
    device = detect_device() if args.device == "auto" else args.device
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    gpu = device.startswith("cuda")
    q = 1 if args.quick else 0

    def pick(name: str):
        value = getattr(args, name)
        if value is not None:
            return value
        return (GPU_SIZES if gpu and name in GPU_SIZES else SIZES)[name][q]

    experiments = sorted({int(x) for x in str(pick("experiments")).split(",") if x.strip().isdigit()})
    if not experiments or any(e not in (1, 2, 3, 4) for e in experiments):
        raise ValueError(f"--experiments must name 1, 2, 3 and/or 4, got {pick('experiments')!r}")
    rate = tuple(float(x) for x in str(pick("e3_rate")).split(","))
    if len(rate) != 2:
        raise ValueError(f"--e3-rate must be FROM,TO (requests/s), got {pick('e3_rate')!r}")
    if args.static_pool is not None:
        static_pool: Optional[int] = parse_size(args.static_pool)
    else:
        static_pool = None if gpu else 2 << 30
    if not 0 < args.gpu_share <= 0.95:
        raise ValueError(f"--gpu-share must be in (0, 0.95], got {args.gpu_share}")
    env = {}
    for kv in args.kvcached_env:
        key, sep, value = kv.partition("=")
        if not sep or not key.startswith("KVCACHED_"):
            raise ValueError(f"--kvcached-env takes KVCACHED_NAME=VALUE, got {kv!r}")
        env[key] = value
    out = args.out or os.path.join(RESULTS_DIR, "demo-" + time.strftime("%Y%m%d-%H%M%S"))
    return DemoConfig(
        model=os.path.abspath(os.path.expanduser(args.model)), device=device,
        dtype=args.dtype if args.dtype != "auto" else ("auto" if gpu else "float32"), out=os.path.abspath(out),
        port_base=args.port_base, quick=args.quick, experiments=experiments,
        modes={"both": list(MODES), "on": ["kvcached"], "off": ["static"]}[args.kvcached],
        bursts=pick("bursts"), concurrency=pick("concurrency"), max_tokens=pick("max_tokens"),
        context_tokens=pick("context_tokens"), pause=pick("pause"), idle=pick("idle"), e2_rounds=pick("e2_rounds"),
        e3_max_tokens=pick("e3_max_tokens"), e3_peak=pick("e3_peak"), e3_ramp=pick("e3_ramp"), e3_rate=rate,
        e3_gap=pick("e3_gap"), e3_budget=0,
        e4_engine_memory=parse_size(args.e4_engine_memory or (E4_ENGINE_MEMORY_GPU if gpu else E4_ENGINE_MEMORY_CPU)),
        static_pool=static_pool, gpu_share=args.gpu_share if gpu else None,
        enforce_eager=args.enforce_eager or not gpu, block_size=args.block_size or (16 if gpu else 128),
        max_model_len=args.max_model_len, kvcached_env=env, sample_hz=args.sample_hz,
        startup_timeout=args.startup_timeout, python=args.python, request_timeout=args.request_timeout)


def size_budget(cfg: DemoConfig, e3_budget: Optional[str]) -> None:
    """Experiment 3's budget: --e3-peak requests of (prompt + max_tokens) tokens, whole blocks; at least three pools
    that each hold one max-model-len request (vLLM refuses a smaller pool)."""
    kv = read_model_kv(cfg.model, cfg.dtype)
    cfg.kv_bytes_per_token = kv.bytes_per_token
    block = kv.block_bytes(cfg.block_size)
    per_request = kv.blocks_for(cfg.context_tokens + PROMPT_TOKENS_EST + cfg.e3_max_tokens, cfg.block_size)
    min_pool = kv.blocks_for(cfg.max_model_len, cfg.block_size)
    if e3_budget:
        blocks_per_instance = max(min_pool, parse_size(e3_budget) // 3 // block)
    else:
        blocks_per_instance = max(min_pool, -(-cfg.e3_peak * per_request // 3))
    cfg.e3_budget = 3 * blocks_per_instance * block
    cfg.extra.update(block_bytes=block, blocks_per_request=per_request, e3_blocks_per_static=blocks_per_instance,
                     e3_requests_per_static=blocks_per_instance // per_request,
                     e3_requests_in_budget=3 * blocks_per_instance // per_request)
