"""vLLM benchmark: the same workload with kvcached off and on, output tokens/s, TTFT/ITL, idle/peak KV memory.

Note (why): kvcached must cost (almost) nothing in throughput and give back (almost) all idle memory. Targets:
throughput >= 0.97x vanilla; KV memory at idle <= 5% of vanilla's static pool.
Approach: one `vllm serve` at a time (never both: on a 2-core machine they would share the cores), started with the
same arguments, kvcached on/off by environment only (benchmarks/servers.py). Per server: one warm-up request, an idle
phase, then --rounds bursts of --concurrency streaming chat completions of --max-tokens tokens (ignore_eos: fixed
length), back to back, then an idle phase again. Throughput is output tokens over the wall time of the bursts. Memory
is sampled at 5 Hz (RSS of the process tree on CPU, NVML per process on GPU; kvcached's registry for its KV bytes).
With --repeat N the off/on pair runs N times, alternating, and the median of each side is compared.
KV memory: the baseline's is its static pool (configured; resident from the start: vLLM zero-fills it); kvcached's is
what its registry reports mapped (used + premapped).

On a GPU both sides run vLLM's defaults (CUDA graphs, async scheduling where vLLM turns it on) unless --enforce-eager;
the baseline's pool is vLLM's own sizing within --gpu-memory-utilization (default 0.9, vLLM's) unless --static-pool
is given, and its size is then taken as the baseline's idle GPU memory minus kvcached's (the same engine without KV).

Limits: on 2 cores run-to-run throughput varies by a few percent; use --repeat for the 0.97x target.

    python -m benchmarks.bench_vllm                                   # both sides, CPU defaults
    python -m benchmarks.bench_vllm --kvcached off                    # baseline only
    python -m benchmarks.bench_vllm --device cuda:0 --model DIR       # on a GPU, CUDA graphs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from typing import Optional

from kvcached.units import parse_size

from benchmarks.analysis import add_kv_mapped, fmt_bytes, fmt_s, max_in, median_in, series
from benchmarks.loadgen import LoadClient, summarize
from benchmarks.memory import MemorySampler
from benchmarks.modelinfo import DEFAULT_MODEL
from benchmarks.servers import (Server, ServerError, ServerSpec, check_model_dir, check_port_free, gpu_index,
                                install_cleanup)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

T0 = time.monotonic()
THROUGHPUT_TARGET = 0.97
IDLE_TARGET = 0.05


def log(msg: str) -> None:
    print(f"[bench_vllm {time.monotonic() - T0:5.0f}s] {msg}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_vllm", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="local HF model folder (default: $KVCACHED_MODEL_DIR, or SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu); on a GPU memory is NVML's "
                                                   "per process")
    p.add_argument("--dtype", default="auto", help="vLLM --dtype (default: float32 on CPU, the model's on GPU)")
    p.add_argument("--kvcached", choices=("both", "on", "off"), default="both", help="which side(s) to run")
    p.add_argument("--static-pool", default=None,
                   help="--kv-cache-memory-bytes, the baseline's static pool (both sides get it; kvcached ignores "
                        "it); default 2G on CPU, vLLM's own sizing on a GPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="GPU only: vLLM's share of the GPU for both sides (default: vLLM's, 0.9)")
    p.add_argument("--enforce-eager", action="store_true", help="GPU only: no CUDA graphs (the CPU always runs eager)")
    p.add_argument("--concurrency", type=int, default=8, help="requests per burst (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="bursts, back to back (default 3)")
    p.add_argument("--max-tokens", type=int, default=180, help="output tokens per request (default 180)")
    p.add_argument("--idle", type=float, default=5.0, help="seconds of idle before and after the load (default 5)")
    p.add_argument("--repeat", type=int, default=1, help="off/on pairs, alternating (default 1)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--port", type=int, default=8200, help="port of the (one) server (default 8200)")
    p.add_argument("--kvcached-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the kvcached server (repeatable)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_vllm-<time>.json)")
    p.add_argument("--python", default=sys.executable, help="interpreter with vLLM for the server")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds for the server to become healthy")
    return p


async def workload(url: str, name: str, args: argparse.Namespace, epoch: float, phases: list[dict],
                   now) -> list:
    results = []
    async with LoadClient(epoch=epoch, max_tokens=8, request_timeout_s=120) as warm:
        r = await warm.chat(url, name, "warm-up", prompt_index=10_000)
        if not r.ok:
            raise ServerError(f"{name}: warm-up failed: {r.error}")
    t = now()
    await asyncio.sleep(args.idle)
    phases.append({"name": "idle", "start": t, "end": now()})
    async with LoadClient(epoch=epoch, max_tokens=args.max_tokens, request_timeout_s=600) as c:
        t = now()
        for i in range(args.rounds):
            results += await c.burst(url, name, args.concurrency, f"burst {i + 1}")
        phases.append({"name": "load", "start": t, "end": now()})
    t = now()
    await asyncio.sleep(args.idle)
    phases.append({"name": "idle after", "start": t, "end": now()})
    return results


def run_side(kvcached: bool, args: argparse.Namespace, sampler: MemorySampler, out_dir: str, pool: Optional[int],
             dtype: str, rep: int) -> dict:
    name = f"bench-{'kv' if kvcached else 'vanilla'}"
    extra = ["--dtype", dtype] if dtype != "auto" else []
    env = dict(kv.split("=", 1) for kv in args.kvcached_env) if kvcached else {}
    gpu = args.device.startswith("cuda")
    spec = ServerSpec(name=name, model=args.model, port=args.port, kvcached=kvcached, kv_cache_bytes=pool,
                      max_model_len=args.max_model_len, device=args.device, enforce_eager=args.enforce_eager or not gpu,
                      gpu_memory_utilization=args.gpu_memory_utilization if gpu else None, extra_args=extra,
                      extra_env=env, python=args.python)
    server = Server(spec, os.path.join(out_dir, "logs"))
    log(f"[{rep + 1}/{args.repeat}] starting {name} (kvcached {'on' if kvcached else 'off'}); log {server.log_path}")
    server.start()
    try:
        ready = server.wait_ready(args.startup_timeout, progress=log, every_s=15)
        sampler.watch(name, server.pids, registry_name=name if kvcached else None,
                      gpu_index=gpu_index(args.device) if gpu else None)
        log(f"{name} ready in {ready:.0f}s; workload: {args.rounds} x {args.concurrency} requests x "
            f"{args.max_tokens} tokens")
        phases: list[dict] = []
        t_start = sampler.now()
        results = asyncio.run(workload(server.url, name, args, sampler.epoch, phases, sampler.now))
        t_end = sampler.now()
    finally:
        sampler.unwatch(name)
        server.stop()
    load = next(p for p in phases if p["name"] == "load")
    lat = summarize(results, load["end"] - load["start"])
    with sampler._lock:  # noqa: SLF001
        samples = [dict(s) for s in sampler.samples if s["server"] == name and t_start <= s["t"] <= t_end]
    add_kv_mapped(samples)
    key = "gpu_used" if gpu else "rss"
    idle_p, after_p = phases[0], phases[-1]
    mem = {}
    for k in (key, "kv_mapped", "kv_used"):
        pts = series(samples, [name], k)
        if pts:
            mem[k] = {"idle": median_in(pts, idle_p["end"] - 2.0, idle_p["end"]),
                      "peak": max_in(pts, load["start"], after_p["start"] + 1.0),
                      "after": median_in(pts, after_p["end"] - 2.0, after_p["end"])}
    side = {"name": name, "kvcached": kvcached, "ready_s": ready, "phases": phases, "latency": lat, "memory": mem,
            "kv_idle": mem.get("kv_mapped", {}).get("idle") if kvcached else pool,
            "kv_peak": mem.get("kv_mapped", {}).get("peak") if kvcached else pool,
            "requests": [r.to_dict() for r in results], "samples": samples, "log": server.log_path}
    log(f"{name}: {lat['output_tok_per_s']:.1f} output tok/s, TTFT p50 {fmt_s(lat['ttft_p50'])}s, ITL p50 "
        f"{(lat['itl_p50'] or 0) * 1000:.0f}ms, ok {lat['ok']}/{lat['requests']}; {key} idle "
        f"{fmt_bytes(mem.get(key, {}).get('idle'))} peak {fmt_bytes(mem.get(key, {}).get('peak'))}; KV idle "
        f"{fmt_bytes(side['kv_idle'])} peak {fmt_bytes(side['kv_peak'])}")
    return side


def median_of(sides: list[dict], get) -> Optional[float]:
    xs = [v for v in (get(s) for s in sides) if v is not None]
    return statistics.median(xs) if xs else None


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.model = os.path.abspath(os.path.expanduser(args.model))
    try:
        check_model_dir(args.model)
        check_port_free(args.port)
    except ServerError as e:
        print(f"[bench_vllm] ERROR: {e}", file=sys.stderr)
        return 2
    for kv in args.kvcached_env:
        if "=" not in kv or not kv.startswith("KVCACHED_"):
            print(f"[bench_vllm] ERROR: --kvcached-env takes KVCACHED_NAME=VALUE, got {kv!r}", file=sys.stderr)
            return 2
    gpu = args.device.startswith("cuda")
    try:
        gpu_index(args.device)
        pool = parse_size(args.static_pool) if args.static_pool else (None if gpu else 2 << 30)
    except (ServerError, ValueError) as e:
        print(f"[bench_vllm] ERROR: {e}", file=sys.stderr)
        return 2
    if args.device != "cpu" and not gpu:
        print(f"[bench_vllm] ERROR: --device must be cpu, cuda or cuda:N, got {args.device!r}", file=sys.stderr)
        return 2
    install_cleanup()
    dtype = args.dtype if args.dtype != "auto" else ("auto" if gpu else "float32")
    out = args.out or os.path.join(RESULTS_DIR, "bench_vllm-" + time.strftime("%Y%m%d-%H%M%S") + ".json")
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    sides_to_run = {"both": [False, True], "off": [False], "on": [True]}[args.kvcached]
    try:
        sampler = MemorySampler(hz=5.0, gpu_index=gpu_index(args.device) if gpu else None).start()
    except RuntimeError as e:
        print(f"[bench_vllm] ERROR: --device {args.device}: {e}", file=sys.stderr)
        return 2
    runs: dict[str, list[dict]] = {"vanilla": [], "kvcached": []}
    code = 0
    try:
        for rep in range(args.repeat):
            order = sides_to_run if rep % 2 == 0 else list(reversed(sides_to_run))
            for kvcached in order:
                runs["kvcached" if kvcached else "vanilla"].append(
                    run_side(kvcached, args, sampler, out_dir, pool, dtype, rep))
    except ServerError as e:
        log(f"ERROR: {e}")
        code = 2
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    finally:
        sampler.stop()
    key = "gpu_used" if gpu else "rss"
    table = {}
    for side, rs in runs.items():
        if not rs:
            continue
        table[side] = {
            "tok_per_s": median_of(rs, lambda r: r["latency"]["output_tok_per_s"]),
            "ttft_p50": median_of(rs, lambda r: r["latency"]["ttft_p50"]),
            "ttft_p99": median_of(rs, lambda r: r["latency"]["ttft_p99"]),
            "itl_p50": median_of(rs, lambda r: r["latency"]["itl_p50"]),
            "itl_p99": median_of(rs, lambda r: r["latency"]["itl_p99"]),
            "kv_idle": median_of(rs, lambda r: r["kv_idle"]), "kv_peak": median_of(rs, lambda r: r["kv_peak"]),
            "mem_idle": median_of(rs, lambda r: r["memory"].get(key, {}).get("idle")),
            "mem_peak": median_of(rs, lambda r: r["memory"].get(key, {}).get("peak")),
            "mem_after": median_of(rs, lambda r: r["memory"].get(key, {}).get("after")),
            "ok": sum(r["latency"]["ok"] for r in rs), "requests": sum(r["latency"]["requests"] for r in rs)}
    pool_source = "configured (--kv-cache-memory-bytes)"
    if pool is None and "vanilla" in table and "kvcached" in table and None not in (
            table["vanilla"]["mem_idle"], table["kvcached"]["mem_idle"]):
        # vLLM sized the pool itself: it is what the baseline holds at idle beyond the same engine without KV
        pool = max(0.0, table["vanilla"]["mem_idle"] - table["kvcached"]["mem_idle"])
        pool_source = f"measured: vanilla's idle {key} minus kvcached's"
        table["vanilla"]["kv_idle"] = table["vanilla"]["kv_peak"] = pool
    targets = {}
    if "vanilla" in table and "kvcached" in table and table["vanilla"]["tok_per_s"]:
        ratio = table["kvcached"]["tok_per_s"] / table["vanilla"]["tok_per_s"]
        targets["throughput_ratio"] = ratio
        targets["throughput_ok"] = ratio >= THROUGHPUT_TARGET
    if pool and "kvcached" in table and table["kvcached"]["kv_idle"] is not None:
        frac = table["kvcached"]["kv_idle"] / pool
        targets["idle_kv_fraction_of_static_pool"] = frac
        targets["idle_ok"] = frac <= IDLE_TARGET
    print()
    print(f"bench_vllm: {os.path.basename(args.model)} on {args.device} ({dtype}), {args.rounds} x {args.concurrency} "
          f"requests x {args.max_tokens} tokens, static pool {fmt_bytes(pool)} ({pool_source}), repeat {args.repeat} "
          f"(medians)")
    print(f"  {'side':<9} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
          f"{'KV idle':>8} {'KV peak':>8} {key + ' idle':>9} {key + ' peak':>9} {'ok':>7}")
    for side, t in table.items():
        ms = lambda x: "-" if x is None else f"{x * 1000:.0f}ms"  # noqa: E731
        print(f"  {side:<9} {t['tok_per_s'] or 0:7.1f} {fmt_s(t['ttft_p50']) + 's':>9} {fmt_s(t['ttft_p99']) + 's':>9} "
              f"{ms(t['itl_p50']):>8} {ms(t['itl_p99']):>8} {fmt_bytes(t['kv_idle']):>8} {fmt_bytes(t['kv_peak']):>8} "
              f"{fmt_bytes(t['mem_idle']):>9} {fmt_bytes(t['mem_peak']):>9} {str(t['ok']) + '/' + str(t['requests']):>7}")
    if "throughput_ratio" in targets:
        print(f"  throughput kvcached/vanilla {targets['throughput_ratio']:.3f} (target >= {THROUGHPUT_TARGET}): "
              f"{'OK' if targets['throughput_ok'] else 'MISSED'}")
    if "idle_kv_fraction_of_static_pool" in targets:
        print(f"  kvcached idle KV = {100 * targets['idle_kv_fraction_of_static_pool']:.2f}% of the static pool "
              f"(target <= {100 * IDLE_TARGET:.0f}%): {'OK' if targets['idle_ok'] else 'MISSED'}")
    result = {"config": vars(args) | {"dtype_used": dtype, "pool_bytes": pool, "pool_source": pool_source},
              "machine": {"host": platform.node(), "cpus": os.cpu_count()}, "table": table, "targets": targets,
              "runs": runs, "wall_s": round(time.monotonic() - T0, 1)}
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    log(f"wrote {out} ({time.monotonic() - T0:.0f}s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
