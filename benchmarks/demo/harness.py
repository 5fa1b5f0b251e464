"""What every experiment of the demo shares: its servers, the memory sampler, runs with their phases, the JSON.

Note (why): the experiments differ only in the traffic they send; how a server is started and watched, how a phase is
recorded and how a run is summarized must be the same for all, and for kvcached and the static pool alike.
Approach: servers are real `vllm serve` processes (benchmarks/servers.py) started with the same arguments in both
modes, differing only by the environment; one is reused across experiments while its settings are equal (start-up
costs ~40 s of 2 CPU cores) and warmed up with one short request. Memory is sampled for the whole demo; a run keeps
its time window and its phases ({name, start, end, server}: "idle", "burst ...", pauses), so every figure can be
recomputed from results.json and samples.json (benchmarks/analysis.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from typing import Awaitable, Optional

from benchmarks.analysis import add_kv_mapped, fmt_bytes, fmt_s, memory_summary, series
from benchmarks.demo.config import DemoConfig
from benchmarks.loadgen import LoadClient, RequestResult, summarize
from benchmarks.memory import MemorySampler, machine_memory
from benchmarks.registry_view import clear_persisted_limit, wait_registered
from benchmarks.servers import Server, ServerError, ServerSpec

T0 = time.monotonic()
PORT_ORDER = ["kv-a", "kv-b", "kv-c", "static-a", "static-b", "part-a", "part-b", "part-c"]


def log(msg: str) -> None:
    print(f"[demo {time.monotonic() - T0:6.0f}s] {msg}", flush=True)


def write_json(path: str, obj: object) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def summarize_dicts(requests: list[dict]) -> dict:
    """loadgen.summarize over requests as stored in results.json."""
    return summarize([RequestResult(**r) for r in requests])


class Harness:
    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.epoch = time.monotonic()
        self.sampler = MemorySampler(hz=cfg.sample_hz, epoch=self.epoch, gpu_index=cfg.gpu_index if cfg.gpu else None)
        self.servers: dict[str, Server] = {}
        self.machine_at_start = machine_memory()
        if cfg.gpu:
            self.machine_at_start["gpu"] = self.sampler.gpu_device_memory(cfg.gpu_index)
        self.results: dict = {
            "config": asdict(cfg), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                        "memory_at_start": self.machine_at_start},
            "runs": {}, "servers": {}, "experiment2_static_fit": None, "experiment3_limits": {}, "checks": [],
            "failed_requests": [], "plots": [], "wall_s": None}

    def now(self) -> float:
        return time.monotonic() - self.epoch

    # -- servers --

    def server(self, mode: str, letter: str, pool: Optional[int]) -> Server:
        """The running server for (mode, letter, pool), started and warmed up if needed. Static servers of another
        pool size are named part-* (experiment 3's partitions)."""
        cfg = self.cfg
        if mode == "kvcached":
            name = f"kv-{letter}"
        else:
            name = f"static-{letter}" if pool == cfg.static_pool else f"part-{letter}"
        if name in self.servers and self.servers[name].alive():
            return self.servers[name]
        spec = self.engine_spec(name, cfg.port_base + PORT_ORDER.index(name), mode == "kvcached", pool)
        if spec.kvcached:
            note = clear_persisted_limit(name)
            if note:
                log(note)
        server = Server(spec, os.path.join(cfg.out, "logs"))
        what = "elastic KV" if spec.kvcached else (f"static pool {fmt_bytes(pool)}" if pool else
                                                   f"vLLM-sized pool within {cfg.gpu_share:g} of the GPU")
        log(f"starting {name} (kvcached {'on' if spec.kvcached else 'off'}, {what}) on port {spec.port}; "
            f"log {server.log_path}")
        server.start()
        self.servers[name] = server
        took = server.wait_ready(cfg.startup_timeout, progress=log, every_s=15.0)
        self.sampler.watch(name, server.pids, registry_name=name if spec.kvcached else None,
                           gpu_index=cfg.gpu_index if cfg.gpu else None)
        asyncio.run(self._warm_up(server))
        info = {"name": name, "mode": mode, "port": spec.port, "pool_bytes": pool, "ready_s": round(took, 1),
                "argv": spec.argv(), "env": {k: v for k, v in spec.env().items()
                                             if k.startswith(("KVCACHED", "ENABLE_KVCACHED", "VLLM_"))},
                "log": server.log_path, "pids": {str(k): v for k, v in server.pids().items()}}
        if spec.kvcached:
            info["registered"] = wait_registered(name)
            if not info["registered"]:
                raise ServerError(
                    f"{name} runs with ENABLE_KVCACHED=true KVCACHED_AUTOPATCH=1 but never appeared in kvcached's "
                    f"registry: kvcached is not active in it (is the integration installed? 'pip install -e .' puts "
                    f"its start-up hook in site-packages). Log: {server.log_path}")
        self.results["servers"][name] = info
        log(f"{name} ready in {took:.0f}s (pids {info['pids']})")
        return server

    def engine_spec(self, name: str, port: int, kvcached: bool, pool: Optional[int]) -> ServerSpec:
        """The demo's vLLM server: the same arguments for every experiment and both modes."""
        cfg = self.cfg
        extra = ["--dtype", cfg.dtype] if cfg.dtype != "auto" else []
        extra += ["--block-size", str(cfg.block_size)]
        return ServerSpec(name=name, model=cfg.model, port=port, kvcached=kvcached, kv_cache_bytes=pool,
                          max_model_len=cfg.max_model_len, device=cfg.device, enforce_eager=cfg.enforce_eager,
                          gpu_memory_utilization=cfg.gpu_share, extra_args=extra,
                          extra_env=dict(cfg.kvcached_env) if kvcached else {}, python=cfg.python)

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

    # -- runs and phases --

    def new_run(self, exp: int, mode: str, servers: list[str]) -> dict:
        run = {"experiment": exp, "mode": mode, "servers": servers, "t_start": self.now(), "t_end": None,
               "phases": [], "requests": [], "summary": {}}
        self.results["runs"][f"exp{exp}/{mode}"] = run
        return run

    def client(self, max_tokens: int, first_index: int) -> LoadClient:
        """A load client on the demo's clock; runs that must not share prompts start `first_index` apart."""
        return LoadClient(epoch=self.epoch, max_tokens=max_tokens, request_timeout_s=self.cfg.request_timeout,
                          context_tokens=self.cfg.context_tokens, first_index=first_index)

    async def hold(self, run: dict, name: str, seconds: float) -> None:
        """A phase without requests (idle, pause, gap)."""
        start = self.now()
        await asyncio.sleep(seconds)
        run["phases"].append({"name": name, "start": start, "end": self.now(), "server": None})

    async def load(self, run: dict, target: str, label: str, what: str,
                   requests: Awaitable[list[RequestResult]]) -> None:
        """A phase of requests (a burst or a ramp) on one server or served model `target`: recorded as phase
        "burst <label>" with its requests, and logged."""
        start = self.now()
        results = await requests
        end = self.now()
        run["phases"].append({"name": f"burst {label}", "start": start, "end": end, "server": target})
        run["requests"] += [r.to_dict() for r in results]
        s = summarize(results, end - start)
        log(f"  {label} on {target}: {len(results)} requests ({what}) in {end - start:.1f}s, "
            f"ok {s['ok']}/{len(results)}, TTFT p50 {fmt_s(s['ttft_p50'])}s mean {fmt_s(s['ttft_mean'])}s "
            f"p99 {fmt_s(s['ttft_p99'])}s, ITL p50 {(s['itl_p50'] or 0) * 1000:.0f}ms, "
            f"{s['output_tok_per_s'] or 0:.0f} tok/s" + (f", errors {s['errors']}" if s["failed"] else ""))

    def finish(self, run: dict) -> None:
        run["t_end"] = self.now()
        self.summarize_run(run)
        self.save()

    def summarize_run(self, run: dict) -> None:
        """Latency of the run (and per server), and idle/peak/after-release/flex of memory and of kvcached's KV bytes
        per server and, with several servers, of their sum."""
        samples = self.run_samples(run)
        key = self.memory_key(samples)
        summ: dict = {"latency": summarize_dicts(run["requests"]), "memory": {}, "kv": {}}
        groups = {name: [name] for name in run["servers"]}
        if len(run["servers"]) > 1 and key != "gpu_device_used":  # each server's figure is then the whole device
            groups["sum"] = list(run["servers"])
        for label, names in groups.items():
            # one server's figures: the idle phase and its own bursts ("after release" = just before its next burst)
            phases = [p for p in run["phases"]
                      if len(names) > 1 or len(run["servers"]) == 1 or p["name"] == "idle" or p["server"] in names]
            summ["memory"][label] = memory_summary(series(samples, names, key), phases, run["t_end"])
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

    def memory_key(self, samples: list[dict]) -> str:
        """The sample field that is "memory" in this demo's figures (also results["memory_key"]): RSS on the CPU;
        on a GPU the servers' per-process NVML memory, or, where NVML shows none of their pids (a container's own
        pid namespace), the whole device's used memory, with a warning."""
        key = "rss"
        if self.cfg.gpu:
            key = "gpu_used" if any(s.get("gpu_used") for s in samples) else "gpu_device_used"
            if key != self.results.get("memory_key") and key == "gpu_device_used":
                log("WARNING: NVML reports no GPU memory for the servers' processes (another pid namespace?): "
                    "memory figures are the whole device's used memory")
        self.results["memory_key"] = key
        return key

    def run_samples(self, run: dict) -> list[dict]:
        t1 = run["t_end"] if run["t_end"] is not None else float("inf")
        return [s for s in self.all_samples() if run["t_start"] <= s["t"] <= t1 and s["server"] in run["servers"]]

    # -- output --

    def all_samples(self) -> list[dict]:
        with self.sampler._lock:  # noqa: SLF001
            samples = [dict(s) for s in self.sampler.samples]
        add_kv_mapped(samples)
        return samples

    def save(self) -> None:
        os.makedirs(self.cfg.out, exist_ok=True)
        self.results["wall_s"] = round(time.monotonic() - T0, 1)
        samples = {"hz": self.cfg.sample_hz, "samples": self.all_samples()}
        write_json(os.path.join(self.cfg.out, "samples.json"), samples)
        write_json(os.path.join(self.cfg.out, "results.json"), self.results)
