"""PNG plots of the demo's results: memory over time, a latency box plot, TTFT mean/p99 bars.

Note (why): the demo's point is visual (memory follows load with kvcached, a static pool holds its peak), so every
plot is made from the same JSON the demo writes. Conventions: kvcached solid lines, the static-pool baseline dashed,
burst windows shaded (blue for kvcached runs, orange for baseline runs; per instance colours in multi-model plots),
time on the x axis in seconds since the run's start. matplotlib with the Agg backend (no display needed).
Limits: runs whose data are missing (a mode not run, a static pair that does not fit) are left out or noted on the plot.
"""

from __future__ import annotations

from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from benchmarks.analysis import GIB, MIB, series  # noqa: E402
MODE_COLOR = {"kvcached": "#1f77b4", "static": "#ff7f0e"}
MODE_STYLE = {"kvcached": "-", "static": "--"}
MODE_LABEL = {"kvcached": "kvcached", "static": "static pool (vLLM)"}
INSTANCE_COLORS = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd"]
TEMP_COLOR = {"cold": "#4c72b0", "warm": "#dd8452"}


def _run_series(samples: list[dict], run: dict, names: list[str], key: str) -> list[tuple[float, float]]:
    """The run's own window of the summed series (servers may live longer than one run)."""
    t1 = run["t_end"] if run.get("t_end") is not None else float("inf")
    return [(t, v) for t, v in series(samples, names, key) if run["t_start"] <= t <= t1]


def _headroom(ax, factor: float = 1.15) -> None:
    lo, hi = ax.get_ylim()
    ax.set_ylim(0, max(hi, 1e-9) * factor)


def _shift(points: list[tuple[float, float]], t0: float, scale: float) -> tuple[list[float], list[float]]:
    return [t - t0 for t, _ in points], [v / scale for _, v in points]


def _shade(ax, phases: list[dict], t0: float, color: str, alpha: float = 0.13, band: Optional[tuple] = None,
           hatch: Optional[str] = None) -> None:
    """Shade burst windows: full height, or only a horizontal band (ymin, ymax as axes fractions)."""
    lo, hi = band or (0.0, 1.0)
    for p in phases:
        if p["name"].startswith("burst"):
            ax.axvspan(p["start"] - t0, p["end"] - t0, ymin=lo, ymax=hi, facecolor=color, alpha=alpha, hatch=hatch,
                       edgecolor=color if hatch else None, lw=0)


def _shade_modes(ax, runs: dict[str, dict]) -> list:
    """kvcached bursts: full-height blue; static-pool bursts: an orange hatched band along the top. Legend handles."""
    handles = []
    for mode, run in runs.items():
        if mode == "kvcached":
            _shade(ax, run["phases"], run["t_start"], MODE_COLOR[mode], alpha=0.14)
            handles.append(Patch(facecolor=MODE_COLOR[mode], alpha=0.25, label="bursts, kvcached run"))
        else:
            _shade(ax, run["phases"], run["t_start"], MODE_COLOR[mode], alpha=0.35, band=(0.93, 1.0), hatch="//")
            handles.append(Patch(facecolor=MODE_COLOR[mode], alpha=0.45, hatch="//",
                                 label="bursts, static-pool run (top band)"))
    return handles


def _log_mib_axis(ax, values: list[float]) -> None:
    """Log scale in MiB with readable tick labels: small kvcached numbers and a GiB pool on one axis."""
    ax.set_yscale("log")
    top = max(values + [1.0]) * 3
    ax.set_ylim(1.0, top)
    ticks = [t for t in (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536) if t <= top]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{t} MiB" if t < 1024 else f"{t // 1024} GiB" for t in ticks])
    ax.minorticks_off()


def plot_memory_single(runs: dict[str, dict], samples: list[dict], key: str, path: str, title: str,
                       static_pool: Optional[int] = None) -> None:
    """Experiment 1: one server per mode. Top: the engine's memory (key: rss or gpu_used) of both runs on one time
    axis; bottom (when kvcached's registry reported): KV memory, kvcached's mapped bytes against the static pool."""
    have_kv = any(s.get("kv_mapped") is not None for r in runs.values() for s in samples
                  if s["server"] in r["servers"])
    nrows = 2 if have_kv or static_pool else 1
    fig, axes = plt.subplots(nrows, 1, figsize=(11, 4.0 * nrows), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2] if nrows == 2 else [1]})
    ax = axes[0][0]
    for mode, run in runs.items():
        pts = _run_series(samples, run, run["servers"], key)
        x, y = _shift(pts, run["t_start"], GIB)
        ax.plot(x, y, MODE_STYLE[mode], color=MODE_COLOR[mode], lw=2, label=f"{MODE_LABEL[mode]}")
    handles, _ = ax.get_legend_handles_labels()
    handles += _shade_modes(ax, runs)
    ax.set_ylabel(_ylabel(key))
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    _headroom(ax, 1.35)
    ax.legend(handles=handles, loc="lower left", fontsize=9, framealpha=0.95, ncol=2)
    if nrows == 2:
        ax2 = axes[1][0]
        values = []
        if "kvcached" in runs and have_kv:
            run = runs["kvcached"]
            pts = _run_series(samples, run, run["servers"], "kv_mapped")
            x, y = _shift(pts, run["t_start"], MIB)
            values += y
            ax2.plot(x, y, "-", color=MODE_COLOR["kvcached"], lw=2,
                     label=f"kvcached, mapped (registry): idle {min(y):.0f} MiB, peak {max(y):.0f} MiB" if y else "")
        if static_pool:
            ax2.axhline(static_pool / MIB, ls="--", color=MODE_COLOR["static"], lw=2,
                        label=f"static pool: {static_pool / MIB:.0f} MiB, held the whole time")
            values.append(static_pool / MIB)
        _shade_modes(ax2, runs)
        ax2.set_ylabel("KV cache memory (log)")
        _log_mib_axis(ax2, values)
        ax2.legend(loc="center right", fontsize=9, framealpha=0.95)
        ax2.grid(alpha=0.3)
    axes[-1][0].set_xlabel("time since the run's start (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory_multi(runs: dict[str, dict], samples: list[dict], key: str, path: str, title: str,
                      notes: Optional[dict[str, str]] = None, pools: Optional[dict[str, int]] = None) -> None:
    """Experiments 2 and 3: several servers per mode. One panel per mode (same y scale) with each instance and the
    sum; then one panel of KV memory per instance: kvcached's mapped bytes (solid) against the static pools (dashed).
    `pools`: the static pool of each static server, by name."""
    modes = [m for m in ("kvcached", "static") if m in runs or (notes and m in notes)]
    have_kv = "kvcached" in runs and any(
        s.get("kv_mapped") is not None for s in samples if s["server"] in runs["kvcached"]["servers"])
    n = len(modes) + (1 if (have_kv or (pools and "static" in runs)) else 0)
    fig, axes = plt.subplots(n, 1, figsize=(11, 3.4 * n), sharex=True, squeeze=False)
    mem_axes = []
    for row, mode in enumerate(modes):
        ax = axes[row][0]
        run = runs.get(mode)
        if run is None:
            ax.text(0.5, 0.5, (notes or {}).get(mode, "not run"), ha="center", va="center", transform=ax.transAxes,
                    fontsize=11, wrap=True)
            ax.set_title(MODE_LABEL[mode], fontsize=10)
            ax.set_yticks([])
            continue
        mem_axes.append(ax)
        for i, name in enumerate(run["servers"]):
            color = INSTANCE_COLORS[i % len(INSTANCE_COLORS)]
            x, y = _shift(_run_series(samples, run, [name], key), run["t_start"], GIB)
            ax.plot(x, y, MODE_STYLE[mode], color=color, lw=1.8, label=name)
            _shade(ax, [p for p in run["phases"] if p.get("server") == name], run["t_start"], color, alpha=0.13)
        x, y = _shift(_run_series(samples, run, run["servers"], key), run["t_start"], GIB)
        ax.plot(x, y, MODE_STYLE[mode], color="black", lw=2.2, label="sum")
        note = (notes or {}).get(mode)
        ax.set_title(f"{MODE_LABEL[mode]}" + (f": {note}" if note else ""), fontsize=10)
        ax.set_ylabel(_ylabel(key), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8, ncol=4, framealpha=0.95)
    top = max([a.get_ylim()[1] for a in mem_axes] + [1e-9]) * 1.3
    for a in mem_axes:
        a.set_ylim(0, top)
    if n > len(modes):
        ax = axes[-1][0]
        values = []
        if have_kv:
            run = runs["kvcached"]
            for i, name in enumerate(run["servers"]):
                x, y = _shift(_run_series(samples, run, [name], "kv_mapped"), run["t_start"], MIB)
                values += y
                ax.plot(x, y, "-", color=INSTANCE_COLORS[i % len(INSTANCE_COLORS)], lw=1.8,
                        label=f"{name}: mapped" + (f", peak {max(y):.0f} MiB" if y else ""))
                _shade(ax, [p for p in run["phases"] if p.get("server") == name], run["t_start"],
                       INSTANCE_COLORS[i % len(INSTANCE_COLORS)], alpha=0.13)
        if pools and "static" in runs:
            for i, name in enumerate(runs["static"]["servers"]):
                if pools.get(name):
                    ax.axhline(pools[name] / MIB * (1 + 0.03 * i), ls="--", lw=1.8,
                               color=INSTANCE_COLORS[i % len(INSTANCE_COLORS)],
                               label=f"{name}: static pool {pools[name] / MIB:.0f} MiB")
                    values.append(pools[name] / MIB)
        ax.set_title("KV cache memory per instance: kvcached mapped (solid)"
                     + (" vs static pools (dashed)" if pools and "static" in runs else ""), fontsize=10)
        ax.set_ylabel("KV memory (log)", fontsize=9)
        _log_mib_axis(ax, values)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8, ncol=3, framealpha=0.95)
    axes[-1][0].set_xlabel("time since the run's start (s); shaded: bursts, in the colour of the instance they hit")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency_box(groups: list[tuple[str, str, list[float], list[float]]], path: str) -> None:
    """groups: (label, mode, ttft values, e2e values). Two box plots side by side: TTFT and end-to-end latency."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, idx, name in ((axes[0], 2, "TTFT (s)"), (axes[1], 3, "end-to-end latency (s)")):
        data = [g[idx] if g[idx] else [float("nan")] for g in groups]
        bp = ax.boxplot(data, patch_artist=True, widths=0.6, showfliers=True,
                        medianprops={"color": "black", "lw": 1.8})
        for patch, g in zip(bp["boxes"], groups):
            patch.set_facecolor(MODE_COLOR[g[1]])
            patch.set_alpha(0.55)
            patch.set_linestyle(MODE_STYLE[g[1]])
        ax.set_xticks(range(1, len(groups) + 1))
        ax.set_xticklabels([g[0] for g in groups], rotation=25, ha="right", fontsize=9)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, axis="y")
        _headroom(ax, 1.25)
    axes[0].legend(handles=[Patch(color=MODE_COLOR[m], alpha=0.55, label=MODE_LABEL[m]) for m in MODE_COLOR],
                   loc="upper left", fontsize=9, ncol=2)
    fig.suptitle("Request latency per experiment (box: p25-p75, whiskers: 1.5 IQR)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ttft_bars(rows: list[tuple[str, dict[str, dict]]], path: str, title: str) -> None:
    """rows: (label, {mode: {"ttft_mean", "ttft_p99"}}). Grouped bars: mean and p99 per mode, per label."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    modes = [m for m in ("kvcached", "static") if any(m in r[1] for r in rows)]
    width = 0.8 / max(1, len(modes))
    for ax, key, name in ((axes[0], "ttft_mean", "TTFT mean (s)"), (axes[1], "ttft_p99", "TTFT p99 (s)")):
        for j, mode in enumerate(modes):
            xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(rows))]
            vals = [(r[1].get(mode) or {}).get(key) or 0.0 for r in rows]
            bars = ax.bar(xs, vals, width, color=MODE_COLOR[mode], alpha=0.8, label=MODE_LABEL[mode],
                          hatch=None if mode == "kvcached" else "//", edgecolor="white")
            for b, v in zip(bars, vals):
                ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r[0] for r in rows], fontsize=9)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, axis="y")
        _headroom(ax, 1.25)
        ax.legend(fontsize=9, loc="upper left", ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_warm_cold(stats: dict[str, dict], path: str, title: str) -> None:
    """stats: {"cold"|"warm": {"requests", "mean", "p50", "max"}}. Grouped bars: mean, p50, max per label."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    keys = ("mean", "p50", "max")
    for j, temp in enumerate(("cold", "warm")):
        xs = [i + (j - 0.5) * 0.38 for i in range(len(keys))]
        vals = [stats[temp][k] or 0.0 for k in keys]
        bars = ax.bar(xs, vals, 0.38, color=TEMP_COLOR[temp], alpha=0.85,
                      label=f"{temp} ({stats[temp]['requests']} requests)")
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"TTFT {k}" for k in keys])
    ax.set_ylabel("seconds")
    ax.grid(alpha=0.3, axis="y")
    _headroom(ax, 1.2)
    ax.legend(fontsize=9, loc="upper left")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ylabel(key: str) -> str:
    return {"rss": "engine processes' RSS (GiB)", "pss": "engine processes' PSS (GiB)",
            "gpu_used": "GPU memory of the engine processes (GiB)",
            "gpu_device_used": "GPU memory used on the device (GiB)"}.get(key, key)
