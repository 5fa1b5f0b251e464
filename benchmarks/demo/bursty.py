"""Experiment 1, bursty single model: bursts of concurrent chat completions with pauses between them.

Note (what it shows): with kvcached the engine's memory rises with a burst and falls back to its idle level in the
pause that follows; vLLM's static pool holds its memory from start-up on, busy or not. Reported: memory idle, peak,
after each burst and flex (peak - idle), kvcached's KV bytes from its registry, latency p50/p95.
"""

from __future__ import annotations

import asyncio

from benchmarks.analysis import fmt_bytes
from benchmarks.demo.harness import Harness, log
from benchmarks.servers import Server


async def _traffic(h: Harness, run: dict, server: Server) -> None:
    cfg = h.cfg
    async with h.client(cfg.max_tokens, first_index=0) as c:
        await h.hold(run, "idle", cfg.idle)
        for i in range(cfg.bursts):
            await h.load(run, server.spec.name, f"{i + 1}", f"{cfg.concurrency} at once",
                         c.burst(server.url, server.spec.name, cfg.concurrency, f"burst {i + 1}"))
            await h.hold(run, f"pause {i + 1}", cfg.pause)


def run(h: Harness, mode: str) -> None:
    cfg = h.cfg
    log(f"experiment 1 ({mode}): bursty single model: {cfg.bursts} bursts x {cfg.concurrency} requests x "
        f"~{cfg.context_tokens + 40} prompt tokens x {cfg.max_tokens} tokens, {cfg.pause:g}s pauses")
    server = h.server(mode, "a", cfg.static_pool)
    record = h.new_run(1, mode, [server.spec.name])
    asyncio.run(_traffic(h, record, server))
    h.finish(record)
    m = record["summary"]["memory"][server.spec.name]
    log(f"experiment 1 ({mode}) done: idle {fmt_bytes(m['idle'])}, peak {fmt_bytes(m['peak'])}, after release "
        f"{', '.join(fmt_bytes(a) for a in m['after'])}")
