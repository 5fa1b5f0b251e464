"""Async OpenAI-compatible load for the benchmarks: streaming chat completions with per-request timings.

Note (why): the demo and the vLLM benchmark need the same client-side numbers for kvcached on and off: time to first
token (TTFT), inter-token latency (ITL), end-to-end latency, output tokens, success or the error. Approach: aiohttp,
one streaming /v1/chat/completions call per request with `max_tokens` and vLLM's `ignore_eos` so every request
produces the same number of tokens; prompts are varied (topic x task, optionally after a per-request context of
filler notes that makes KV per request larger without more decode steps) so no two requests share prefix blocks.
Two shapes: a burst (N requests at once, wait for all) and an open-loop ramp (arrivals at a rate rising linearly,
each request independent, so queueing shows in TTFT). Everything is bounded: request count is fixed up front and each
request has a total timeout.

Limits: ITL is measured between streamed chunks. A chunk normally carries one token, but when the API server lags it
carries several: with vLLM's continuous usage stats each chunk says how many tokens it brought, and its gap is shared
evenly among them (so ITL percentiles count tokens, not chunks). Token counts come from the server's usage records.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import aiohttp

TOPICS = [
    "the water cycle", "black holes", "the French revolution", "photosynthesis", "the history of the bicycle",
    "volcanoes", "how vaccines work", "the Roman empire", "machine learning", "coral reefs", "the printing press",
    "jazz music", "the moon landing", "honey bees", "plate tectonics", "the internet", "ancient Egypt", "rainbows",
    "electric cars", "the human heart", "chess openings", "the Great Wall of China", "climate change", "penguins",
    "quantum computers", "the Olympic games", "coffee", "the Amazon rainforest", "earthquakes", "the solar system",
]
TASKS = [
    "Write a short story about {t}.", "Explain {t} to a ten-year-old.", "Give me five surprising facts about {t}.",
    "Write a poem about {t}.", "Describe {t} in detail, step by step.", "What would a museum exhibit about {t} show?",
    "Write a news report about {t}.", "Summarise what scientists know about {t}.",
]


WORDS = (
    "river mountain city market winter summer garden library window engine signal harbor forest valley bridge "
    "teacher student doctor farmer sailor painter writer builder pilot miner baker tailor merchant soldier "
    "quickly slowly quietly brightly carefully gently loudly rarely often always never sometimes together apart "
    "ancient modern small large bright dark warm cold heavy light green blue golden silver narrow wide "
    "travels builds carries watches paints writes follows opens closes measures gathers remembers discovers "
    "stone paper glass water fire iron wood cloth salt sugar bread lamp clock map letter song story"
).split()


def make_context(i: int, tokens: int) -> str:
    """About `tokens` tokens of filler notes, different for every i from the first word on (no shared prefix blocks,
    so prefix caching cannot share KV between requests)."""
    if tokens <= 0:
        return ""
    rng = random.Random(i * 7919 + 17)
    words = [f"Record {i}:"]
    while len(words) < int(tokens / 1.2):  # ~1.2 tokens per word with this vocabulary (SmolLM2 tokenizer)
        words += rng.sample(WORDS, 9) + ["."]
    return " ".join(words)


def make_prompt(i: int, context_tokens: int = 0) -> str:
    """The i-th prompt: a (topic, task) pair that differs from its neighbours, after an optional context of notes."""
    topic = TOPICS[i % len(TOPICS)]
    task = TASKS[(i // len(TOPICS) + i) % len(TASKS)].format(t=topic)
    if context_tokens > 0:
        return f"{make_context(i, context_tokens)}\n\nThose were my notes. {task}"
    return task


@dataclass
class RequestResult:
    """One request as the client saw it. Times in seconds; `start` is relative to the run's epoch."""

    target: str  # server name
    index: int
    phase: str  # e.g. "burst 1"
    start: float
    ok: bool = False
    error: str = ""
    ttft: Optional[float] = None
    e2e: Optional[float] = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["itl"] = [round(x, 5) for x in self.itl]
        return d


class LoadClient:
    """One aiohttp session for a run; `epoch` (monotonic) is time zero of every RequestResult.start."""

    def __init__(self, epoch: Optional[float] = None, request_timeout_s: float = 300.0, max_tokens: int = 180,
                 temperature: float = 0.0, context_tokens: int = 0, first_index: int = 0) -> None:
        self.epoch = time.monotonic() if epoch is None else epoch
        self.request_timeout_s = request_timeout_s
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.context_tokens = context_tokens
        self._session: Optional[aiohttp.ClientSession] = None
        self._counter = first_index  # prompt index of the next request: runs that must not share prompts start apart

    async def __aenter__(self) -> "LoadClient":
        connector = aiohttp.TCPConnector(limit=0)  # no client-side cap: the server must see the real concurrency
        self._session = aiohttp.ClientSession(connector=connector)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()

    def now(self) -> float:
        return time.monotonic() - self.epoch

    async def chat(self, url: str, target: str, phase: str, prompt_index: Optional[int] = None) -> RequestResult:
        """One streaming chat completion; never raises (failures are recorded)."""
        assert self._session is not None, "use 'async with LoadClient()'"
        index = self._counter if prompt_index is None else prompt_index
        self._counter += 1
        body = {
            "model": target,
            "messages": [{"role": "user", "content": make_prompt(index, self.context_tokens)}],
            "max_tokens": self.max_tokens,
            "min_tokens": self.max_tokens,
            "ignore_eos": True,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        res = RequestResult(target=target, index=index, phase=phase, start=self.now())
        t0 = time.monotonic()
        last = None
        chunks = 0
        tokens_seen = 0  # completion tokens the server had counted at the previous content chunk
        try:
            timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
            async with self._session.post(url + "/v1/chat/completions", json=body, timeout=timeout) as r:
                if r.status != 200:
                    res.error = f"HTTP {r.status}: {(await r.text())[:300]}"
                    return res
                async for raw in r.content:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    msg = json.loads(data)
                    if "error" in msg:
                        res.error = str(msg["error"])[:300]
                        return res
                    usage = msg.get("usage")
                    if usage:
                        res.output_tokens = int(usage.get("completion_tokens") or 0)
                        res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    for choice in msg.get("choices") or []:
                        delta = choice.get("delta") or {}
                        if delta.get("content"):
                            now = time.monotonic()
                            # a chunk may carry several tokens when the server lags: its gap is shared among them
                            count = max(1, res.output_tokens - tokens_seen) if usage else 1
                            tokens_seen = res.output_tokens if usage else tokens_seen + 1
                            if last is None:
                                res.ttft = now - t0
                            else:
                                res.itl.extend([(now - last) / count] * count)
                            last = now
                            chunks += 1
            res.e2e = time.monotonic() - t0
            if res.output_tokens == 0:
                res.output_tokens = chunks
            res.ok = res.ttft is not None and res.output_tokens >= self.max_tokens
            if not res.ok:
                res.error = f"short answer: {res.output_tokens} tokens, expected {self.max_tokens}"
        except asyncio.TimeoutError:
            res.error = f"timeout after {self.request_timeout_s:.0f}s"
        except (aiohttp.ClientError, json.JSONDecodeError, OSError) as e:
            res.error = f"{type(e).__name__}: {e}"[:300]
        return res

    async def burst(self, url: str, target: str, n: int, phase: str) -> list[RequestResult]:
        """n requests at once; returns when all are done."""
        return list(await asyncio.gather(*(self.chat(url, target, phase) for _ in range(n))))

    async def ramp(self, url: str, target: str, rate_from: float, rate_to: float, duration_s: float,
                   phase: str) -> list[RequestResult]:
        """Open-loop arrivals whose rate rises linearly from rate_from to rate_to (req/s) over duration_s.

        Arrival times are deterministic (the k-th request at the time the integrated rate reaches k), so both sides of
        a comparison see the same schedule. Returns when every request is done.
        """
        times = ramp_schedule(rate_from, rate_to, duration_s)
        start = time.monotonic()
        tasks = []
        for t in times:
            delay = start + t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.chat(url, target, phase)))
        return list(await asyncio.gather(*tasks))


def ramp_schedule(rate_from: float, rate_to: float, duration_s: float) -> list[float]:
    """Arrival times (s) of a linear rate ramp: the k-th arrival where integral of the rate reaches k (k = 0, 1, ...)."""
    if duration_s <= 0 or rate_from < 0 or rate_to < 0:
        raise ValueError("duration must be > 0 and rates >= 0")
    slope = (rate_to - rate_from) / duration_s
    total = rate_from * duration_s + slope * duration_s ** 2 / 2
    times = []
    k = 0
    while k < total:
        # solve rate_from*t + slope*t^2/2 = k
        if abs(slope) < 1e-12:
            t = k / rate_from
        else:
            disc = rate_from ** 2 + 2 * slope * k
            t = (-rate_from + disc ** 0.5) / slope
        times.append(t)
        k += 1
    return times


def percentile(values: list[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile (q in 0..100) of values; None when empty."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(results: list[RequestResult], wall_s: Optional[float] = None) -> dict:
    """Counts, TTFT/ITL/e2e mean/p50/p95/p99 and output tokens/s (over wall_s, or the span of the requests)."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    e2e = [r.e2e for r in ok]
    itl = [x for r in ok for x in r.itl]
    tokens = sum(r.output_tokens for r in ok)
    if wall_s is None and results:
        wall_s = max(r.start + (r.e2e or 0.0) for r in results) - min(r.start for r in results)
    out = {"requests": len(results), "ok": len(ok), "failed": len(results) - len(ok),
           "errors": sorted({r.error for r in results if not r.ok})[:5],
           "output_tokens": tokens, "output_tok_per_s": tokens / wall_s if wall_s else None}
    for name, xs in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
        out[f"{name}_mean"] = sum(xs) / len(xs) if xs else None
        for q in (50, 95, 99):
            out[f"{name}_p{q}"] = percentile(xs, q)
    return out
