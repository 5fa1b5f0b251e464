"""Turn memory samples and phase marks into the numbers the demo reports: idle, peak, after-release, flex.

Note (why): the demo and bench_vllm compare kvcached with the static pool by the same definitions, computed from
the same raw samples that are written to JSON, so anyone can recompute them. Definitions (times in seconds since the
run's epoch; a "phase" is {"name", "start", "end", "server"}):
  idle           median over the last `window_s` of the idle phase before the first burst;
  peak           maximum over the whole run;
  after release  for each burst, the median over the last `window_s` of the pause that follows it (up to the next
                 burst's start, or the end of the run);
  flex           peak - idle.
A series can be one server's or the sum over several servers (samples of one tick share their time stamp).
Limits: medians need a few samples: `window_s` should cover >= 5 samples at the sampling rate.
Numbers are printed with fmt_bytes and fmt_s, so every table of the benchmarks reads alike.
"""

from __future__ import annotations

import statistics
from typing import Iterable, Optional


GIB, MIB = float(1 << 30), float(1 << 20)


def fmt_bytes(n: Optional[float]) -> str:
    """2.59G, 152M, or "-" when unknown (binary units)."""
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n >= GIB:
        return f"{sign}{n / GIB:.2f}G"
    return f"{sign}{n / MIB:.0f}M"


def fmt_s(x: Optional[float]) -> str:
    """Seconds: 0.97, 13.7, or "-" when unknown."""
    return "-" if x is None else (f"{x:.2f}" if x < 10 else f"{x:.1f}")


def series(samples: list[dict], servers: Iterable[str], key: str) -> list[tuple[float, float]]:
    """[(t, value)] summed over `servers` at each tick that has `key` for all of them."""
    wanted = set(servers)
    by_t: dict[float, dict[str, float]] = {}
    for s in samples:
        if s["server"] in wanted and s.get(key) is not None:
            by_t.setdefault(s["t"], {})[s["server"]] = s[key]
    return [(t, sum(v.values())) for t, v in sorted(by_t.items()) if len(v) == len(wanted)]


def kv_mapped(sample: dict) -> Optional[int]:
    """kvcached's mapped KV bytes (used + premapped) of a sample, None without registry data."""
    if sample.get("kv_used") is None:
        return None
    return int(sample["kv_used"]) + int(sample.get("kv_premapped") or 0)


def add_kv_mapped(samples: list[dict]) -> None:
    for s in samples:
        v = kv_mapped(s)
        if v is not None:
            s["kv_mapped"] = v


def window(points: list[tuple[float, float]], t0: float, t1: float) -> list[float]:
    return [v for t, v in points if t0 <= t <= t1]


def median_in(points: list[tuple[float, float]], t0: float, t1: float) -> Optional[float]:
    xs = window(points, t0, t1)
    return statistics.median(xs) if xs else None


def max_in(points: list[tuple[float, float]], t0: float, t1: float) -> Optional[float]:
    xs = window(points, t0, t1)
    return max(xs) if xs else None


def memory_summary(points: list[tuple[float, float]], phases: list[dict], run_end: float,
                   window_s: float = 1.5) -> dict:
    """idle / peak / after-release per burst / flex of one series, from the phases of one run.

    `phases` must hold one phase named "idle" (before the bursts) and the bursts (names starting with "burst").
    """
    idle_phase = next((p for p in phases if p["name"] == "idle"), None)
    bursts = sorted((p for p in phases if p["name"].startswith("burst")), key=lambda p: p["start"])
    out: dict = {"idle": None, "peak": None, "flex": None, "after": [], "burst_peak": []}
    if not points:
        return out
    if idle_phase is not None:
        out["idle"] = median_in(points, idle_phase["end"] - window_s, idle_phase["end"])
    t_first = min(t for t, _ in points)
    out["peak"] = max_in(points, t_first, run_end)
    for i, b in enumerate(bursts):
        nxt = bursts[i + 1]["start"] if i + 1 < len(bursts) else run_end
        out["after"].append(median_in(points, nxt - window_s, nxt))
        out["burst_peak"].append(max_in(points, b["start"], nxt))
    if out["idle"] is not None and out["peak"] is not None:
        out["flex"] = out["peak"] - out["idle"]
    return out


def returns_to_floor(after: list[Optional[float]], floor: Optional[float], tolerance: float = 0.10) -> Optional[bool]:
    """True when every after-release value is within `tolerance` (fraction) of `floor`; None when unknown."""
    if floor is None or not after or any(a is None for a in after):
        return None
    return all(a <= floor * (1.0 + tolerance) for a in after)
