"""Experiment 4, more models than fit at once behind kvcached-router: served on demand, warm vs cold TTFT.

Note (what it shows): `python -m kvcached.router` serves MODELS names of the demo's model, each an engine (kvcached
on) that the router starts on demand. Every model's `memory` is sized from the device's free memory so that FIT
engines fit and one more does not: before a third starts, the router's memory-aware waking puts the least recently
used idle engine away (CPU: stopped, as vLLM's CPU build ignores sleep; GPU: put to sleep, sleep_after_s set). The idle
timers are longer than the run, so memory alone decides. Traffic: round-robin bursts over the models, ROUNDS times,
each followed by a repeat to the same model; a burst is labelled cold or warm from the model's state in the router's
/metrics just before it is sent (running: warm). Each engine (the router's child with --served-model-name NAME, and its
tree) is sampled like any demo server, so experiment 2's memory-over-time plot draws this run too.
Limits: kvcached mode only. On a loaded machine free memory moves while the run sizes and runs; the sizing margin is
half an engine (--e4-engine-memory), and the check on resident engines says whether it held.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Callable

import aiohttp
import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kvcached.router.config import RouterConfigError, load_config
from kvcached.router.memory import device_free_bytes

from benchmarks.analysis import fmt_bytes, fmt_s
from benchmarks.demo.harness import Harness, log
from benchmarks.demo.report import warm_cold_ttft
from benchmarks.servers import KVCACHED_ON_ENV, Server, ServerError, ServerSpec, tree_pids

MODELS, FIT, ROUNDS = 4, 2, 2
PORT_OFFSET = 8  # the router on port_base+8, its engines on +9..+12 (the other experiments use +0..+7)
SIZE_MARGIN = 1.5  # memory = free - 1.5 engines: a second engine still fits, a third does not
IDLE_TIMEOUT_S = 3600.0  # sleep_after_s / stop_after_s: longer than the run
ROUTER_FLAGS = ("--host", "--port", "--served-model-name")  # the router sets these itself
PAUSE_S = 2.0


@dataclass
class RouterSpec(ServerSpec):
    """The router as a demo server (its own process group, /health, cleaned up at exit); `model` is only checked."""

    config_path: str = ""

    def argv(self) -> list[str]:
        return [self.python, "-m", "kvcached.router", "--config", self.config_path]


def model_names() -> list[str]:
    return [f"m{i + 1}" for i in range(MODELS)]


def _engine(spec: ServerSpec, memory: int, device: str, gpu: bool) -> dict:
    """One model of the router's config, from the demo's own server spec (same flags as experiments 1-3)."""
    argv, command = spec.argv(), []
    skip = False
    for arg in argv:
        if skip or arg in ROUTER_FLAGS:
            skip = not skip
            continue
        command.append(arg)
    decided = set(KVCACHED_ON_ENV) | {"KVCACHED_IPC_NAME", "PYTHONUNBUFFERED"}  # the router sets these
    env = {k: v for k, v in spec.env().items() if os.environ.get(k) != v and k not in decided}
    model = {"command": command, "port": spec.port, "env": env, "memory": memory, "device": device}
    model["sleep_after_s" if gpu else "stop_after_s"] = IDLE_TIMEOUT_S
    return model


def write_config(h: Harness, free: int) -> tuple[str, int]:
    """The router's YAML in the results folder, checked by the router's own loader; returns (path, memory)."""
    cfg = h.cfg
    memory = free - int(SIZE_MARGIN * cfg.e4_engine_memory)
    if memory < cfg.e4_engine_memory:
        raise ServerError(f"experiment 4: {fmt_bytes(free)} free on {cfg.device} is too little for {FIT} engines of "
                          f"~{fmt_bytes(cfg.e4_engine_memory)} (--e4-engine-memory)")
    models = {name: _engine(h.engine_spec(name, cfg.port_base + PORT_OFFSET + 1 + i, True, cfg.static_pool),
                            memory, cfg.device, cfg.gpu)
              for i, name in enumerate(model_names())}
    doc = {"router": {"host": "127.0.0.1", "port": cfg.port_base + PORT_OFFSET, "health_interval_s": 1.0,
                      "queue_timeout_s": cfg.startup_timeout, "log_dir": os.path.join(cfg.out, "logs")},
           "models": models}
    path = os.path.join(cfg.out, "router.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    try:
        load_config(path)
    except RouterConfigError as exc:
        raise ServerError(f"experiment 4: {exc}") from None
    return path, memory


def engine_pids(router: Server, name: str) -> Callable[[], dict[int, str]]:
    """The process tree of the router's engine for `name` ({} while it is stopped)."""
    def pids() -> dict[int, str]:
        if not router.alive():
            return {}
        try:
            children = psutil.Process(router.pid).children()
        except psutil.NoSuchProcess:
            return {}
        for child in children:
            try:
                argv = child.cmdline()
            except psutil.Error:
                continue
            if "--served-model-name" in argv[:-1] and argv[argv.index("--served-model-name") + 1] == name:
                return tree_pids(child.pid)
        return {}
    return pids


async def scrape(session: aiohttp.ClientSession, url: str) -> list:
    async with session.get(url + "/metrics") as r:
        return list(text_string_to_metric_families(await r.text()))


async def model_state(session: aiohttp.ClientSession, url: str, name: str) -> str:
    """The model's state in the router's /metrics (kvcached_router_model_state == 1)."""
    for family in await scrape(session, url):
        if family.name == "kvcached_router_model_state":
            for s in family.samples:
                if s.labels.get("model") == name and s.value == 1:
                    return s.labels["state"]
    return "unknown"


async def router_figures(session: aiohttp.ClientSession, url: str) -> dict:
    """Cold starts and wakes (count, seconds) and errors per model, from the router's /metrics."""
    out: dict = {}
    for family in await scrape(session, url):
        for s in family.samples:
            model = s.labels.get("model")
            if model is None:
                continue
            if family.name in ("kvcached_router_cold_start_seconds", "kvcached_router_wake_seconds") \
                    and s.name.endswith(("_sum", "_count")):
                key = family.name.replace("kvcached_router_", "") + s.name[s.name.rfind("_"):]
                out.setdefault(model, {})[key] = s.value
            elif family.name == "kvcached_router_errors" and s.name.endswith("_total"):
                out.setdefault(model, {}).setdefault("errors", {})[s.labels["kind"]] = s.value
    return out


async def _traffic(h: Harness, run: dict, url: str) -> dict:
    cfg = h.cfg
    bursts = []
    async with h.client(cfg.max_tokens, first_index=3000) as c, aiohttp.ClientSession() as session:
        await h.hold(run, "idle", cfg.idle)
        for r in range(ROUNDS):
            for name in model_names():
                for _ in range(2):  # the first burst, then a repeat to the same model
                    state = await model_state(session, url, name)
                    label = f"{'warm' if state == 'running' else 'cold'} {name} r{r + 1}"
                    bursts.append({"label": label, "model": name, "state_before": state})
                    await h.load(run, name, label, f"{cfg.concurrency} at once, {state} before",
                                 c.burst(url, name, cfg.concurrency, label))
                    await h.hold(run, f"pause {label}", PAUSE_S)
        return {"bursts": bursts, "router_metrics": await router_figures(session, url)}


def max_resident(samples: list[dict], names: list[str], key: str = "rss", above: float = 0.0) -> int:
    """The most engines holding more than `above` bytes of `key` (the demo's memory figure) at one sampling tick."""
    per_tick: dict[float, int] = {}
    for s in samples:
        if s["server"] in names and s.get(key) is not None:
            per_tick[s["t"]] = per_tick.get(s["t"], 0) + (1 if s[key] > above else 0)
    return max(per_tick.values(), default=0)


def run(h: Harness, mode: str) -> None:
    cfg = h.cfg
    if mode != "kvcached":
        return  # the router's engines are kvcached engines: there is no static-pool version of this experiment
    free = device_free_bytes(cfg.device)
    path, memory = write_config(h, free)
    names = model_names()
    log(f"experiment 4 (router): {MODELS} models behind kvcached-router, each needs {fmt_bytes(memory)} of "
        f"{fmt_bytes(free)} free on {cfg.device} (an engine ~{fmt_bytes(cfg.e4_engine_memory)}): {FIT} fit at once; "
        f"{ROUNDS} rounds of bursts of {cfg.concurrency}, each repeated; config {path}")
    spec = RouterSpec(name="router", model=cfg.model, port=cfg.port_base + PORT_OFFSET, kvcached=False,
                      python=cfg.python, config_path=path)
    router = Server(spec, os.path.join(cfg.out, "logs"))
    router.start()
    try:
        router.wait_ready(60.0)
        for name in names:
            h.sampler.watch(name, engine_pids(router, name), registry_name=name,
                            gpu_index=cfg.gpu_index if cfg.gpu else None)
        record = h.new_run(4, mode, names)
        info = asyncio.run(_traffic(h, record, router.url))
    finally:
        router.stop(grace_s=60.0)  # the router stops its engines first (each within its own 15 s grace)
        for name in names:
            h.sampler.unwatch(name)
    h.finish(record)
    # a stopped CPU engine holds nothing; a sleeping GPU engine keeps its CUDA context, well under half an engine
    above = cfg.e4_engine_memory / 2 if cfg.gpu else 0.0
    resident = max_resident(h.run_samples(record), names, h.results["memory_key"], above)
    h.results["experiment4"] = {"models": MODELS, "fit": FIT, "memory_each": memory, "free_at_start": free,
                                "engine_memory": cfg.e4_engine_memory, "max_resident": resident, "resident_above": above,
                                "config": path, **info}
    h.save()
    tt = warm_cold_ttft(record)
    log(f"experiment 4 done: at most {resident} engines resident; TTFT cold mean {fmt_s(tt['cold']['mean'])}s "
        f"({tt['cold']['requests']} requests), warm mean {fmt_s(tt['warm']['mean'])}s ({tt['warm']['requests']})")
