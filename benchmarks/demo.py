#!/usr/bin/env python3
"""The main demo: kvcached's elastic KV cache against vLLM's static KV pool, on bursty and multi-model traffic.

Note (what): three experiments (issue 5), each run with kvcached (ENABLE_KVCACHED=true KVCACHED_AUTOPATCH=1) and
with vLLM's static pool; a results folder with every memory sample and request (JSON), a summary table, PNG plots.
  1. Bursty single model: bursts of concurrent chat completions with pauses; memory idle / peak / after release /
     flex and latency p50/p95.
  2. Two models on one machine, bursts alternating between them: with kvcached memory follows the active one; the
     static pair either does not fit the machine (then it is not started: the arithmetic is shown) or holds its peak
     the whole time.
  3. Three instances under intermittent peak load (idle, then a rising request rate on one model at a time): TTFT
     mean and p99 with kvcached against static partitioning of the same KV budget (each static instance gets
     budget/3; kvcached instances are capped at the whole budget through the registry, `kvctl limit`).

Note (approach): every server is a real `vllm serve` (benchmarks/servers.py); the kvcached and baseline servers get
the same arguments and differ only by the environment. Server start-up costs ~40 s of 2 CPU cores, so servers are
reused across experiments when their settings are equal: all kvcached runs first (instances a, b, c), then all
baseline runs (static pools of --static-pool for experiments 1-2, budget/3 for experiment 3). A server is warmed up
with one short request before its run. Memory is sampled at --sample-hz (benchmarks/memory.py) for the whole demo;
each run keeps its own time window and phases, so results are recomputable from the JSON (benchmarks/analysis.py).
On CPU the model runs in float32 by default: on AVX2 machines without bf16 units it decodes 2-3x faster than bf16.

Limits: on 2 cores the servers compete for CPU, so absolute latencies are those of a small machine; compare modes, not
machines. Experiment 3's budget is sized from the model so that one instance's ramp needs about the whole budget
(--e3-peak requests at once): a static instance can hold only a third of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from analysis import add_kv_mapped, memory_summary, series  # noqa: E402
from loadgen import LoadClient, summarize  # noqa: E402
from memory import MemorySampler, machine_memory  # noqa: E402
from modelinfo import read_model_kv  # noqa: E402
from report import LETTERS, MODES, compute_checks, fmt_bytes, fmt_s, make_plots, summary_table  # noqa: E402
from servers import Server, ServerError, ServerSpec, check_model_dir, check_port_free, install_cleanup  # noqa: E402

DEFAULT_MODEL = os.environ.get("KVCACHED_MODEL_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "kvcached", "models", "SmolLM2-135M-Instruct")
PROMPT_TOKENS_EST = 64  # chat template + task, rounded up (measured 38-41 with SmolLM2's template), plus the context

# Workload sizes: (default, --quick)
SIZES = {
    "bursts": (3, 2), "concurrency": (6, 3), "max_tokens": (180, 64), "context_tokens": (200, 100),
    "pause": (6.0, 4.0), "idle": (5.0, 4.0), "e2_rounds": (1, 1),
    "e3_max_tokens": (96, 48), "e3_peak": (12, 9), "e3_ramp": (12.0, 10.0), "e3_rate": ("0.3,1.2", "0.3,1.5"),
    "e3_gap": (5.0, 4.0), "experiments": ("1,2,3", "1,2"),
}


def log(msg: str) -> None:
    print(f"[demo {time.monotonic() - T0:6.0f}s] {msg}", flush=True)


T0 = time.monotonic()


def parse_size(text: str) -> int:
    """512M, 2G, 1.5GiB, 1000000 (binary K/M/G/T; KB/MB/GB decimal), as kvcached's own parser."""
    try:
        from kvcached.units import parse_size as kv_parse
        return kv_parse(text)
    except ImportError:
        units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
        t = text.strip().upper().removesuffix("IB").removesuffix("B")
        num = t.rstrip("KMGT")
        return int(float(num) * units[t[len(num):]])


def detect_device() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return "cuda:0" if pynvml.nvmlDeviceGetCount() > 0 else "cpu"
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001  (no pynvml, no driver: a CPU machine)
        return "cpu"


# ---- configuration -------------------------------------------------------------------------------------------------


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
    static_pool: Optional[int]  # None on GPU: vLLM's own sizing (gpu_memory_utilization 0.9)
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
    def mem_key(self) -> str:
        return "gpu_used" if self.gpu else "rss"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="kvcached demo: elastic KV cache vs vLLM's static KV pool on bursty and multi-model traffic. "
                    "Writes JSON of every sample and request, a summary table and PNG plots to --out.",
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--model", default=DEFAULT_MODEL, help="local Hugging Face model folder (default: SmolLM2-135M-Instruct from scripts/prepare_model.py, or $KVCACHED_MODEL_DIR)")
    g.add_argument("--device", default="auto", help="engine device: cpu, cuda:N, or auto (default: cuda:0 if NVML sees a GPU, else cpu)")
    g.add_argument("--dtype", default="auto",
                   help="model dtype passed to vLLM; auto: float32 on CPU (faster there without bf16 units), "
                        "the model's own on GPU")
    g.add_argument("--experiments", default=None, help="comma list of 1,2,3 (default 1,2,3; with --quick 1,2)")
    g.add_argument("--kvcached", choices=("both", "on", "off"), default="both",
                   help="run kvcached (on), the static-pool baseline (off), or both (default)")
    g.add_argument("--quick", action="store_true",
                   help="the shortened CI version: smaller bursts, experiments 1 and 2 (under ~6 min on 2 cores)")
    g.add_argument("--out", default=None, help="results folder (default benchmarks/results/demo-<time>)")
    g.add_argument("--port-base", type=int, default=8100, help="servers listen on 127.0.0.1:port-base+0..7 (default 8100)")
    w = p.add_argument_group("workload (defaults: full run / --quick)")
    w.add_argument("--bursts", type=int, help="experiment 1: bursts (3 / 2)")
    w.add_argument("--concurrency", type=int, help="requests per burst, experiments 1-2 (6 / 3)")
    w.add_argument("--max-tokens", type=int, help="output tokens per request, fixed with ignore_eos (180 / 64)")
    w.add_argument("--context-tokens", type=int,
                   help="tokens of per-request context before each prompt: more KV per request at little decode "
                        "cost (400 / 200)")
    w.add_argument("--pause", type=float, help="seconds between bursts (6 / 4)")
    w.add_argument("--idle", type=float, help="seconds of idle before the first burst (5 / 4)")
    w.add_argument("--e2-rounds", type=int, help="experiment 2: rounds of (burst on A, burst on B) (1 / 1)")
    w.add_argument("--e3-max-tokens", type=int, help="experiment 3: output tokens per request (96 / 48)")
    w.add_argument("--e3-peak", type=int, help="experiment 3: requests one instance's ramp may hold at once; "
                                               "sizes the budget (12 / 9)")
    w.add_argument("--e3-ramp", type=float, help="experiment 3: seconds of each instance's ramp (12 / 10)")
    w.add_argument("--e3-rate", help="experiment 3: arrival rate from,to in requests/s (0.3,1.2 / 0.3,1.5)")
    w.add_argument("--e3-gap", type=float, help="experiment 3: seconds between ramps (5 / 4)")
    m = p.add_argument_group("memory")
    m.add_argument("--static-pool", default=None,
                   help="the baseline's static KV pool for experiments 1-2 (--kv-cache-memory-bytes); default 2G on "
                        "CPU, vLLM's own sizing on GPU (gpu_memory_utilization 0.9)")
    m.add_argument("--e3-budget", default=None,
                   help="experiment 3's total KV budget (default: --e3-peak requests of this model); each static "
                        "instance gets a third")
    m.add_argument("--max-model-len", type=int, default=1024, help="vLLM --max-model-len (default 1024)")
    m.add_argument("--block-size", type=int, default=None, help="vLLM block size (default: vLLM's: 128 CPU, 16 GPU)")
    m.add_argument("--kvcached-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the kvcached servers, e.g. KVCACHED_PAGE_SIZE_MB=0.375 (repeatable)")
    o = p.add_argument_group("other")
    o.add_argument("--sample-hz", type=float, default=5.0, help="memory samples per second (default 5)")
    o.add_argument("--startup-timeout", type=float, default=600.0,
                   help="seconds for a server to become healthy (default 600: a busy 2-core machine needs minutes)")
    o.add_argument("--request-timeout", type=float, default=600.0, help="seconds for one request (default 600)")
    o.add_argument("--python", default=sys.executable, help="interpreter with vLLM for the servers")
    o.add_argument("--replot", metavar="DIR", help="only redo checks, plots and table from DIR's JSON")
    return p


def resolve(args: argparse.Namespace) -> DemoConfig:
    q = 1 if args.quick else 0

    def pick(name: str):
        v = getattr(args, name)
        return SIZES[name][q] if v is None else v

    device = detect_device() if args.device == "auto" else args.device
    if device != "cpu" and not device.startswith("cuda"):
        raise SystemExit(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    dtype = args.dtype if args.dtype != "auto" else ("float32" if device == "cpu" else "auto")
    experiments = sorted({int(x) for x in str(pick("experiments")).split(",") if x.strip()})
    if not experiments or any(e not in (1, 2, 3) for e in experiments):
        raise SystemExit(f"--experiments must name 1, 2 and/or 3, got {pick('experiments')!r}")
    modes = {"both": list(MODES), "on": ["kvcached"], "off": ["static"]}[args.kvcached]
    rate = tuple(float(x) for x in str(pick("e3_rate")).split(","))
    if len(rate) != 2:
        raise SystemExit("--e3-rate must be FROM,TO (requests/s)")
    block_size = args.block_size or (16 if device.startswith("cuda") else 128)
    if args.static_pool is not None:
        static_pool = parse_size(args.static_pool)
    else:
        static_pool = None if device.startswith("cuda") else 2 << 30
    env = {}
    for kv in args.kvcached_env:
        key, sep, value = kv.partition("=")
        if not sep or not key.startswith("KVCACHED_"):
            raise SystemExit(f"--kvcached-env takes KVCACHED_NAME=VALUE, got {kv!r}")
        env[key] = value
    out = args.out or os.path.join(HERE, "results", "demo-" + time.strftime("%Y%m%d-%H%M%S"))
    cfg = DemoConfig(
        model=os.path.abspath(os.path.expanduser(args.model)), device=device, dtype=dtype, out=os.path.abspath(out),
        port_base=args.port_base, quick=args.quick, experiments=experiments, modes=modes, bursts=pick("bursts"),
        concurrency=pick("concurrency"), max_tokens=pick("max_tokens"), context_tokens=pick("context_tokens"),
        pause=pick("pause"), idle=pick("idle"),
        e2_rounds=pick("e2_rounds"), e3_max_tokens=pick("e3_max_tokens"), e3_peak=pick("e3_peak"),
        e3_ramp=pick("e3_ramp"), e3_rate=rate,
        e3_gap=pick("e3_gap"), e3_budget=0, static_pool=static_pool, block_size=block_size,
        max_model_len=args.max_model_len, kvcached_env=env, sample_hz=args.sample_hz,
        startup_timeout=args.startup_timeout, python=args.python, request_timeout=args.request_timeout)
    return cfg


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


def preflight(cfg: DemoConfig) -> None:
    """Everything that can be checked before any server starts: model, ports, plotting, registry."""
    check_model_dir(cfg.model)
    for i in range(8):
        check_port_free(cfg.port_base + i, hint="choose another --port-base (the demo uses 8 ports from it)")
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ServerError(f"matplotlib is missing in {sys.executable}: pip install matplotlib (scripts/demo.sh "
                          f"installs it)") from e
    if "kvcached" in cfg.modes:
        try:
            from kvcached.registry import list_instances  # noqa: F401
        except ImportError:
            log("WARNING: kvcached.registry is not importable: KV bytes will not be sampled and experiment 3's "
                "kvcached instances will not be capped")
    os.makedirs(cfg.out, exist_ok=True)


# ---- the demo ------------------------------------------------------------------------------------------------------


class Demo:
    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.epoch = time.monotonic()
        self.sampler = MemorySampler(hz=cfg.sample_hz, epoch=self.epoch, use_gpu=cfg.gpu)
        self.servers: dict[str, Server] = {}
        self.machine_at_start = machine_memory()
        if cfg.gpu:
            try:
                self.machine_at_start["gpu"] = self.sampler.gpu_device_memory(self.gpu_index)
            except Exception as e:  # noqa: BLE001
                log(f"WARNING: NVML device memory unreadable: {e}")
        self.results: dict = {
            "config": asdict(cfg), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                        "memory_at_start": self.machine_at_start},
            "runs": {}, "servers": {}, "experiment2_static_fit": None, "experiment3_limits": {}, "checks": {},
            "plots": [], "wall_s": None}

    @property
    def gpu_index(self) -> int:
        return int(self.cfg.device.split(":", 1)[1]) if ":" in self.cfg.device else 0

    def now(self) -> float:
        return time.monotonic() - self.epoch

    # -- servers --

    def server_name(self, mode: str, letter: str, pool: Optional[int]) -> str:
        if mode == "kvcached":
            return f"kv-{letter}"
        return f"static-{letter}" if pool == self.cfg.static_pool else f"part-{letter}"

    def port_of(self, name: str) -> int:
        order = ["kv-a", "kv-b", "kv-c", "static-a", "static-b", "part-a", "part-b", "part-c"]
        return self.cfg.port_base + order.index(name)

    def server(self, mode: str, letter: str, pool: Optional[int], n_instances: int = 1) -> Server:
        """The running server for (mode, letter, pool), started (and warmed up) if needed."""
        name = self.server_name(mode, letter, pool)
        if name in self.servers and self.servers[name].alive():
            return self.servers[name]
        cfg = self.cfg
        extra = ["--dtype", cfg.dtype] if cfg.dtype != "auto" else []
        if cfg.block_size:
            extra += ["--block-size", str(cfg.block_size)]
        if cfg.gpu and mode == "static" and n_instances > 1:
            extra += ["--gpu-memory-utilization", f"{0.9 / n_instances:.2f}"]  # unverified here (no GPU vLLM)
        spec = ServerSpec(name=name, model=cfg.model, port=self.port_of(name), kvcached=(mode == "kvcached"),
                          kv_cache_bytes=pool, max_model_len=cfg.max_model_len, device=cfg.device, extra_args=extra,
                          extra_env=dict(cfg.kvcached_env) if mode == "kvcached" else {}, python=cfg.python)
        if spec.kvcached:
            clear_persisted_limit(name)
        server = Server(spec, os.path.join(cfg.out, "logs"))
        what = "elastic KV" if spec.kvcached else (f"static pool {fmt_bytes(pool)}" if pool else "vLLM-sized pool")
        log(f"starting {name} (kvcached {'on' if spec.kvcached else 'off'}, {what}) on port {spec.port}; "
            f"log {server.log_path}")
        server.start()
        self.servers[name] = server
        took = server.wait_ready(cfg.startup_timeout, progress=log, every_s=15.0)
        self.sampler.watch(name, server.pids, registry_name=name if spec.kvcached else None,
                           gpu_index=self.gpu_index if cfg.gpu else None)
        asyncio.run(self._warm_up(server))
        info = {"name": name, "mode": mode, "port": spec.port, "pool_bytes": pool, "ready_s": round(took, 1),
                "argv": spec.argv(), "env": {k: v for k, v in spec.env().items()
                                             if k.startswith(("KVCACHED", "ENABLE_KVCACHED", "VLLM_"))},
                "log": server.log_path, "pids": {str(k): v for k, v in server.pids().items()}}
        if spec.kvcached:
            info["registered"] = wait_registered(name)
            if info["registered"] is False:
                raise ServerError(
                    f"{name} runs with ENABLE_KVCACHED=true KVCACHED_AUTOPATCH=1 but never appeared in kvcached's "
                    f"registry: kvcached is not active in it (is the integration installed? 'pip install -e .' puts "
                    f"its start-up hook in site-packages). Log: {server.log_path}")
        self.results["servers"][name] = info
        log(f"{name} ready in {took:.0f}s (pids {info['pids']})")
        return server

    async def _warm_up(self, server: Server) -> None:
        async with LoadClient(max_tokens=8, request_timeout_s=120) as c:
            r = await c.chat(server.url, server.spec.name, "warm-up", prompt_index=10_000)
        if not r.ok:
            raise ServerError(f"{server.spec.name}: warm-up request failed: {r.error}; log {server.log_path}")

    def stop(self, names: Optional[list[str]] = None) -> None:
        for name in list(self.servers) if names is None else names:
            server = self.servers.pop(name, None)
            if server is not None:
                self.sampler.unwatch(name)
                server.stop()
                log(f"stopped {name}")

    # -- runs --

    def new_run(self, exp: int, mode: str, servers: list[str]) -> dict:
        run = {"experiment": exp, "mode": mode, "servers": servers, "t_start": self.now(), "t_end": None,
               "phases": [], "requests": [], "summary": {}}
        self.results["runs"][f"exp{exp}/{mode}"] = run
        return run

    async def hold(self, run: dict, name: str, seconds: float) -> None:
        start = self.now()
        await asyncio.sleep(seconds)
        run["phases"].append({"name": name, "start": start, "end": self.now(), "server": None})

    async def burst(self, run: dict, client: LoadClient, server: Server, n: int, label: str) -> None:
        start = self.now()
        results = await client.burst(server.url, server.spec.name, n, label)
        end = self.now()
        run["phases"].append({"name": f"burst {label}", "start": start, "end": end, "server": server.spec.name})
        run["requests"] += [r.to_dict() for r in results]
        s = summarize(results, end - start)
        log(f"  {label} on {server.spec.name}: {n} requests in {end - start:.1f}s, ok {s['ok']}/{n}, "
            f"TTFT p50 {fmt_s(s['ttft_p50'])}s, ITL p50 {fmt_s((s['itl_p50'] or 0) * 1000)}ms, "
            f"{s['output_tok_per_s'] or 0:.0f} tok/s" + (f", errors {s['errors']}" if s["failed"] else ""))

    async def ramp(self, run: dict, client: LoadClient, server: Server, label: str) -> None:
        cfg = self.cfg
        start = self.now()
        results = await client.ramp(server.url, server.spec.name, cfg.e3_rate[0], cfg.e3_rate[1], cfg.e3_ramp, label)
        end = self.now()
        run["phases"].append({"name": f"burst {label}", "start": start, "end": end, "server": server.spec.name})
        run["requests"] += [r.to_dict() for r in results]
        s = summarize(results, end - start)
        log(f"  {label} on {server.spec.name}: {len(results)} requests ({cfg.e3_rate[0]:g}->{cfg.e3_rate[1]:g}/s over "
            f"{cfg.e3_ramp:g}s) done in {end - start:.1f}s, ok {s['ok']}/{len(results)}, TTFT mean "
            f"{fmt_s(s['ttft_mean'])}s p99 {fmt_s(s['ttft_p99'])}s")

    def finish(self, run: dict) -> None:
        run["t_end"] = self.now()
        self.summarize_run(run)
        self.save()

    def summarize_run(self, run: dict) -> None:
        samples = self.run_samples(run)
        key = self.cfg.mem_key
        summ: dict = {"latency": summarize_dicts(run["requests"]), "memory": {}, "kv": {}}
        groups = {name: [name] for name in run["servers"]}
        if len(run["servers"]) > 1:
            groups["sum"] = list(run["servers"])
        for label, names in groups.items():
            pts = series(samples, names, key)
            # one server: the idle phase and its own bursts ("after release" = just before its next burst)
            phases = [p for p in run["phases"]
                      if len(names) > 1 or len(run["servers"]) == 1 or p["name"] == "idle" or p["server"] in names]
            summ["memory"][label] = memory_summary(pts, phases, run["t_end"])
            kv_pts = series(samples, names, "kv_mapped")
            if kv_pts:
                summ["kv"][label] = memory_summary(kv_pts, phases, run["t_end"])
        if len(run["servers"]) > 1:
            summ["per_server_latency"] = {
                name: summarize_dicts([r for r in run["requests"] if r["target"] == name]) for name in run["servers"]}
            summ["min_over_run"] = {name: min((v for _, v in series(samples, [name], key)), default=None)
                                    for name in run["servers"]}
        ticks = sorted({s["t"] for s in samples if "rss" in s})
        summ["samples"] = len(ticks)
        summ["max_sample_gap_s"] = round(max((b - a for a, b in zip(ticks, ticks[1:])), default=0.0), 2)
        run["summary"] = summ

    def run_samples(self, run: dict) -> list[dict]:
        t1 = run["t_end"] if run["t_end"] is not None else float("inf")
        with self.sampler._lock:  # noqa: SLF001
            out = [s for s in self.sampler.samples if run["t_start"] <= s["t"] <= t1 and s["server"] in run["servers"]]
        add_kv_mapped(out)
        return out

    # -- experiments --

    async def _exp1(self, run: dict, server: Server) -> None:
        cfg = self.cfg
        async with LoadClient(epoch=self.epoch, max_tokens=cfg.max_tokens, request_timeout_s=cfg.request_timeout,
                              context_tokens=cfg.context_tokens, first_index=0) as c:
            await self.hold(run, "idle", cfg.idle)
            for i in range(cfg.bursts):
                await self.burst(run, c, server, cfg.concurrency, f"{i + 1}")
                await self.hold(run, f"pause {i + 1}", cfg.pause)

    def experiment1(self, mode: str) -> None:
        cfg = self.cfg
        log(f"experiment 1 ({mode}): bursty single model: {cfg.bursts} bursts x {cfg.concurrency} requests x ~"
            f"{cfg.context_tokens + 40} prompt tokens x "
            f"{cfg.max_tokens} tokens, {cfg.pause:g}s pauses")
        server = self.server(mode, "a", cfg.static_pool)
        run = self.new_run(1, mode, [server.spec.name])
        asyncio.run(self._exp1(run, server))
        self.finish(run)
        m = run["summary"]["memory"][server.spec.name]
        log(f"experiment 1 ({mode}) done: idle {fmt_bytes(m['idle'])}, peak {fmt_bytes(m['peak'])}, after release "
            f"{', '.join(fmt_bytes(a) for a in m['after'])}")

    async def _exp2(self, run: dict, a: Server, b: Server) -> None:
        cfg = self.cfg
        async with LoadClient(epoch=self.epoch, max_tokens=cfg.max_tokens, request_timeout_s=cfg.request_timeout,
                              context_tokens=cfg.context_tokens, first_index=1000) as c:
            await self.hold(run, "idle", cfg.idle)
            for r in range(cfg.e2_rounds):
                for s, tag in ((a, "A"), (b, "B")):
                    await self.burst(run, c, s, cfg.concurrency, f"{tag}{r + 1}")
                    await self.hold(run, f"pause {tag}{r + 1}", cfg.pause)

    def experiment2(self, mode: str) -> None:
        cfg = self.cfg
        log(f"experiment 2 ({mode}): two models, {cfg.e2_rounds} round(s) of alternating bursts of {cfg.concurrency}")
        pool = cfg.static_pool  # the same arguments for both modes: kvcached ignores the pool size
        if mode == "static":
            fit = self.static_pair_fit()
            self.results["experiment2_static_fit"] = fit
            log(f"experiment 2 (static): two static pools need ~{fmt_bytes(fit['need'])} of "
                f"{fmt_bytes(fit['have'])} ({fit['have_what']}): {'fits' if fit['fits'] else 'does NOT fit'}")
            if not fit["fits"]:
                log("experiment 2 (static): not started (it would not fit); the arithmetic is in results.json")
                self.save()
                return
        a = self.server(mode, "a", pool, n_instances=2)
        b = self.server(mode, "b", pool, n_instances=2)
        run = self.new_run(2, mode, [a.spec.name, b.spec.name])
        asyncio.run(self._exp2(run, a, b))
        self.finish(run)
        mem = run["summary"]["memory"]
        log(f"experiment 2 ({mode}) done: " + "; ".join(
            f"{k}: idle {fmt_bytes(v['idle'])} peak {fmt_bytes(v['peak'])}" for k, v in mem.items()))

    def static_pair_fit(self) -> dict:
        """Would two static-pool instances fit this machine? Need = 2 x (pool + the engine's footprint without KV)."""
        cfg = self.cfg
        floor = None
        kv_run = self.results["runs"].get("exp1/kvcached")
        if kv_run:
            floor = kv_run["summary"]["memory"][kv_run["servers"][0]]["idle"]
            source = "idle memory of the kvcached instance (experiment 1)"
        st_run = self.results["runs"].get("exp1/static")
        if floor is None and st_run and cfg.static_pool:
            idle = st_run["summary"]["memory"][st_run["servers"][0]]["idle"]
            floor = max(0.0, idle - cfg.static_pool) if idle is not None else None
            source = "idle memory of the static instance minus its pool (experiment 1)"
        if floor is None:
            floor, source = 0.0, "unknown (counted as 0)"
        if cfg.gpu:
            dev = self.machine_at_start.get("gpu") or {}
            have = float(dev.get("total") or 0)
            pool = cfg.static_pool if cfg.static_pool else 0.9 * have
            have_what = f"GPU {cfg.device} total"
        else:
            have = float(self.machine_at_start["available"])
            pool = cfg.static_pool or 0
            have_what = "machine memory available before the demo started"
        need = 2 * (pool + floor)
        return {"fits": need <= have, "need": need, "have": have, "have_what": have_what, "pool_each": pool,
                "engine_without_kv_each": floor, "engine_without_kv_source": source}

    async def _exp3(self, run: dict, servers: list[Server]) -> None:
        cfg = self.cfg
        async with LoadClient(epoch=self.epoch, max_tokens=cfg.e3_max_tokens, request_timeout_s=cfg.request_timeout,
                              context_tokens=cfg.context_tokens, first_index=2000) as c:
            await self.hold(run, "idle", cfg.idle)
            for s in servers:
                await self.ramp(run, c, s, f"ramp {s.spec.name}")
                await self.hold(run, f"gap {s.spec.name}", cfg.e3_gap)

    def experiment3(self, mode: str) -> None:
        cfg = self.cfg
        x = cfg.extra
        log(f"experiment 3 ({mode}): three instances, a ramp on one at a time; KV budget {fmt_bytes(cfg.e3_budget)} "
            f"(~{x['e3_requests_in_budget']} requests of ~{cfg.context_tokens + PROMPT_TOKENS_EST}+{cfg.e3_max_tokens} "
            f"tokens); static "
            f"partition {fmt_bytes(cfg.e3_budget // 3)} each (~{x['e3_requests_per_static']} requests)")
        if mode == "kvcached":
            servers = [self.server(mode, letter, cfg.static_pool, 3) for letter in LETTERS]
            for s in servers:
                self.results["experiment3_limits"][s.spec.name] = set_limit(s.spec.name, cfg.e3_budget)
            log("experiment 3 (kvcached): limits " + ", ".join(
                f"{k}: {v}" for k, v in self.results["experiment3_limits"].items()))
        else:
            stale = [n for n in list(self.servers) if n.startswith("static-") and cfg.static_pool != cfg.e3_budget // 3]
            self.stop(stale)  # free their pools before the partition starts
            servers = [self.server(mode, letter, cfg.e3_budget // 3, 3) for letter in LETTERS]
        run = self.new_run(3, mode, [s.spec.name for s in servers])
        try:
            asyncio.run(self._exp3(run, servers))
        finally:
            if mode == "kvcached":
                for s in servers:
                    set_limit(s.spec.name, None)
        self.finish(run)
        lat = run["summary"]["latency"]
        log(f"experiment 3 ({mode}) done: TTFT mean {fmt_s(lat['ttft_mean'])}s, p99 {fmt_s(lat['ttft_p99'])}s, "
            f"{lat['ok']}/{lat['requests']} ok")

    def run_all(self) -> None:
        for mode in self.cfg.modes:
            for exp in self.cfg.experiments:
                getattr(self, f"experiment{exp}")(mode)
            self.stop()

    # -- output --

    def all_samples(self) -> list[dict]:
        with self.sampler._lock:  # noqa: SLF001
            samples = list(self.sampler.samples)
        add_kv_mapped(samples)
        return samples

    def save(self) -> None:
        os.makedirs(self.cfg.out, exist_ok=True)
        self.results["wall_s"] = round(time.monotonic() - T0, 1)
        write_json(os.path.join(self.cfg.out, "samples.json"), {"hz": self.cfg.sample_hz, "samples": self.all_samples()})
        write_json(os.path.join(self.cfg.out, "results.json"), self.results)

# ---- helpers -------------------------------------------------------------------------------------------------------


def summarize_dicts(requests: list[dict]) -> dict:
    from loadgen import RequestResult

    rs = [RequestResult(**{k: v for k, v in r.items()}) for r in requests]
    if not rs:
        return summarize([], 1.0)
    return summarize(rs)


def write_json(path: str, obj: object) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def wait_registered(name: str, timeout_s: float = 10.0) -> Optional[bool]:
    """True once `name` is alive in kvcached's registry; False after timeout_s; None if the registry is unavailable."""
    try:
        from kvcached.registry import list_instances
    except ImportError:
        return None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if any(r.alive for r in list_instances([name], missing_ok=True)):
                return True
        except Exception:  # noqa: BLE001
            return None
        time.sleep(0.25)
    return False


def set_limit(name: str, limit: Optional[int]) -> str:
    """Cap instance `name` at `limit` bytes (None: remove the cap) through the registry, as `kvctl limit` does."""
    try:
        from kvcached.registry import request_limit
    except ImportError:
        return "not set (kvcached.registry unavailable)"
    try:
        r = request_limit(name, limit, wait_s=2.0)
    except Exception as e:  # noqa: BLE001
        return f"not set ({type(e).__name__}: {e})"
    what = "removed" if limit is None else fmt_bytes(limit)
    return f"{what} (applied)" if getattr(r, "applied", None) else f"{what} (requested; not confirmed)"


def clear_persisted_limit(name: str) -> None:
    """A limit left by an earlier demo run (`kvctl limit` persists them per name) must not cap this run."""
    try:
        from kvcached.registry import delete, read_persisted_limit
    except ImportError:
        return
    try:
        if read_persisted_limit(name) is not None:
            delete(name)
            log(f"removed a persisted kvcached limit left for {name} by an earlier run")
    except Exception as e:  # noqa: BLE001
        log(f"WARNING: could not clear the persisted limit of {name}: {e} (kvctl delete {name})")


def finish_outputs(results: dict, samples: list[dict], out: str) -> int:
    """Checks, plots and the summary table (printed); returns 3 if plotting failed, else 0."""
    code = 0
    results["checks"] = compute_checks(results)
    try:
        written = make_plots(results, samples, out)
        results["plots"] = written
        log("plots: " + ", ".join(os.path.basename(p) for p in written))
    except Exception as e:  # noqa: BLE001
        log(f"ERROR while plotting: {type(e).__name__}: {e}")
        code = 3
    results["checks"]["plots_written"] = [os.path.basename(p) for p in results.get("plots", [])]
    print()
    print(summary_table(results))
    print()
    return code


def replot(folder: str) -> int:
    """Checks, plots and table again from a results folder's JSON; nothing is run."""
    with open(os.path.join(folder, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(folder, "samples.json")) as f:
        samples = json.load(f)["samples"]
    code = finish_outputs(results, samples, folder)
    write_json(os.path.join(folder, "results.json"), results)
    return code


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replot:
        return replot(args.replot)
    cfg = resolve(args)
    try:
        preflight(cfg)
        size_budget(cfg, args.e3_budget)
    except (ServerError, ValueError, KeyError) as e:
        print(f"[demo] ERROR: {e}", file=sys.stderr)
        return 2
    install_cleanup()
    log(f"results in {cfg.out}")
    log(f"model {cfg.model} ({cfg.dtype}, {cfg.kv_bytes_per_token} KV bytes/token), device {cfg.device}, "
        f"experiments {cfg.experiments}, modes {cfg.modes}" + (" (quick)" if cfg.quick else ""))
    demo = Demo(cfg)
    demo.sampler.start()
    code = 0
    try:
        demo.run_all()
    except ServerError as e:
        log(f"ERROR: {e}")
        code = 2
    except KeyboardInterrupt:
        log("interrupted: stopping servers, writing what was measured")
        code = 130
    finally:
        demo.stop()
        demo.sampler.stop()
    demo.results["wall_s"] = round(time.monotonic() - T0, 1)
    output_code = finish_outputs(demo.results, demo.all_samples(), cfg.out)
    code = code or output_code
    demo.save()
    log(f"done in {time.monotonic() - T0:.0f}s; results: {cfg.out}/results.json, samples: {cfg.out}/samples.json")
    return code


if __name__ == "__main__":
    sys.exit(main())
