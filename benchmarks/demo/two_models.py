"""Experiment 2, two models on one machine: bursts alternate between them.

Note (what it shows): with kvcached the memory of the pair follows the instance being hit; two static pools either do
not fit the machine (then they are not started, and the arithmetic is shown) or hold their peak the whole time.
Both modes get the same server arguments (kvcached ignores the pool size).
"""

from __future__ import annotations

import asyncio

from benchmarks.analysis import fmt_bytes
from benchmarks.demo.harness import Harness, log
from benchmarks.servers import Server


async def _traffic(h: Harness, run: dict, a: Server, b: Server) -> None:
    cfg = h.cfg
    async with h.client(cfg.max_tokens, first_index=1000) as c:
        await h.hold(run, "idle", cfg.idle)
        for r in range(cfg.e2_rounds):
            for server, tag in ((a, "A"), (b, "B")):
                label = f"{tag}{r + 1}"
                await h.load(run, server.spec.name, label, f"{cfg.concurrency} at once",
                             c.burst(server.url, server.spec.name, cfg.concurrency, f"burst {label}"))
                await h.hold(run, f"pause {label}", cfg.pause)


def static_pair_fit(h: Harness) -> dict:
    """Would two static-pool instances fit this machine? On the CPU: need = 2 x (pool + the engine without KV, from
    experiment 1); on a GPU each instance takes its --gpu-memory-utilization share of the device."""
    cfg, runs = h.cfg, h.results["runs"]
    floor, source = 0.0, "unknown (counted as 0)"
    if "exp1/kvcached" in runs:
        kv_run = runs["exp1/kvcached"]
        floor = kv_run["summary"]["memory"][kv_run["servers"][0]]["idle"] or 0.0
        source = "idle memory of the kvcached instance (experiment 1)"
    elif "exp1/static" in runs and cfg.static_pool:
        st_run = runs["exp1/static"]
        idle = st_run["summary"]["memory"][st_run["servers"][0]]["idle"]
        if idle is not None:
            floor, source = max(0.0, idle - cfg.static_pool), "idle memory of the static instance minus its pool"
    if cfg.gpu:
        have = float((h.machine_at_start.get("gpu") or {}).get("total") or 0)
        each = cfg.gpu_share * have  # vLLM keeps its whole share: weights, activations and the pool
        need, pool = 2 * each, max(0.0, each - floor)
        have_what = f"GPU {cfg.device} total"
    else:
        have = float(h.machine_at_start["available"])
        pool = float(cfg.static_pool or 0)
        need = 2 * (pool + floor)
        have_what = "machine memory available before the demo started"
    return {"fits": need <= have, "need": need, "have": have, "have_what": have_what, "pool_each": pool,
            "engine_without_kv_each": floor, "engine_without_kv_source": source}


def run(h: Harness, mode: str) -> None:
    cfg = h.cfg
    log(f"experiment 2 ({mode}): two models, {cfg.e2_rounds} round(s) of alternating bursts of {cfg.concurrency}")
    if mode == "static":
        fit = static_pair_fit(h)
        h.results["experiment2_static_fit"] = fit
        log(f"experiment 2 (static): two static pools need ~{fmt_bytes(fit['need'])} of {fmt_bytes(fit['have'])} "
            f"({fit['have_what']}): {'fits' if fit['fits'] else 'does NOT fit'}")
        if not fit["fits"]:
            log("experiment 2 (static): not started (it would not fit); the arithmetic is in results.json")
            h.save()
            return
    a = h.server(mode, "a", cfg.static_pool)
    b = h.server(mode, "b", cfg.static_pool)
    record = h.new_run(2, mode, [a.spec.name, b.spec.name])
    asyncio.run(_traffic(h, record, a, b))
    h.finish(record)
    memory = record["summary"]["memory"]
    log(f"experiment 2 ({mode}) done: " + "; ".join(
        f"{k}: idle {fmt_bytes(v['idle'])} peak {fmt_bytes(v['peak'])}" for k, v in memory.items()))
