"""Experiment 3, three instances under intermittent peak load: a rising request rate on one instance at a time.

Note (what it shows): TTFT (mean, p99) when three instances share one KV budget through kvcached (each capped at the
whole budget through the registry, as `kvctl limit` does) against static partitioning of the same budget (a third
each): a static instance queues its ramp in a third of the memory while two thirds sit idle.
"""

from __future__ import annotations

import asyncio

from benchmarks.analysis import fmt_bytes, fmt_s
from benchmarks.demo.config import LETTERS, PROMPT_TOKENS_EST
from benchmarks.demo.harness import Harness, log
from benchmarks.registry_view import set_limit
from benchmarks.servers import Server



async def _traffic(h: Harness, run: dict, servers: list[Server]) -> None:
    cfg = h.cfg
    lo, hi = cfg.e3_rate
    async with h.client(cfg.e3_max_tokens, first_index=2000) as c:
        await h.hold(run, "idle", cfg.idle)
        for s in servers:
            label = f"ramp {s.spec.name}"
            await h.load(run, s.spec.name, label, f"{lo:g}->{hi:g}/s over {cfg.e3_ramp:g}s",
                         c.ramp(s.url, s.spec.name, lo, hi, cfg.e3_ramp, label))
            await h.hold(run, f"gap {s.spec.name}", cfg.e3_gap)


def run(h: Harness, mode: str) -> None:
    cfg, x = h.cfg, h.cfg.extra
    part = cfg.e3_budget // 3
    log(f"experiment 3 ({mode}): three instances, a ramp on one at a time; KV budget {fmt_bytes(cfg.e3_budget)} "
        f"(~{x['e3_requests_in_budget']} requests of ~{cfg.context_tokens + PROMPT_TOKENS_EST}+{cfg.e3_max_tokens} "
        f"tokens); static partition {fmt_bytes(part)} each (~{x['e3_requests_per_static']} requests)")
    if mode == "kvcached":
        servers = [h.server(mode, letter, cfg.static_pool) for letter in LETTERS]
        limits = h.results["experiment3_limits"]
        for s in servers:
            limits[s.spec.name] = set_limit(s.spec.name, cfg.e3_budget)
        log("experiment 3 (kvcached): limits " + ", ".join(f"{k}: {v}" for k, v in limits.items()))
    else:
        h.stop([n for n in list(h.servers) if n.startswith("static-") and cfg.static_pool != part])  # free their pools
        servers = [h.server(mode, letter, part) for letter in LETTERS]
    record = h.new_run(3, mode, [s.spec.name for s in servers])
    try:
        asyncio.run(_traffic(h, record, servers))
    finally:
        if mode == "kvcached":
            for s in servers:
                set_limit(s.spec.name, None)
    h.finish(record)
    lat = record["summary"]["latency"]
    log(f"experiment 3 ({mode}) done: TTFT mean {fmt_s(lat['ttft_mean'])}s, p99 {fmt_s(lat['ttft_p99'])}s, "
        f"{lat['ok']}/{lat['requests']} ok")
