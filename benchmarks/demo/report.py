"""The demo's outputs from its JSON: the checks, the PNG plots and the summary table.

Note (why): everything the demo reports is derived from results.json and samples.json, so a finished (or
interrupted) run can be re-plotted and re-checked without running anything: `python -m benchmarks.demo --replot DIR`.
Approach: plain functions over the results dict (config, runs with phases/requests/summaries) and the sample list.
Each check has a name (its key in results.json) and a sentence saying what it checks; True is what the demo expects
to show. Their thresholds are here.
"""

from __future__ import annotations

import os
from typing import Optional

from benchmarks.analysis import add_kv_mapped, fmt_bytes, fmt_s, returns_to_floor
from benchmarks.demo.config import LETTERS, MODES
from benchmarks.loadgen import percentile

FLOOR_TOLERANCE = 0.10  # "falls back to within 10% of its idle floor"
KV_KEPT = 0.25  # kvcached's KV bytes after a burst: at most idle + 25% of the burst's growth
HOLDS_PEAK = 0.90  # a static pool "holds its peak" when memory after each burst stays >= 90% of the peak


def mem_key(results: dict) -> str:
    """The samples' field the memory figures are of (harness.Harness.memory_key)."""
    return results.get("memory_key") or ("gpu_used" if str(results["config"]["device"]).startswith("cuda") else "rss")


def _check(name: str, what: str, passed: Optional[bool]) -> dict:
    return {"name": name, "what": what, "passed": passed}


def compute_checks(results: dict) -> list[dict]:
    """The demo's claims on experiment 1 (the floor being kvcached's idle memory: the same engine holding no KV),
    and that every request of every run succeeded. `passed` is None where a run needed for it is missing."""
    runs = results["runs"]
    checks = []
    k, s = runs.get("exp1/kvcached"), runs.get("exp1/static")
    floor = None
    if k:
        mk = k["summary"]["memory"][k["servers"][0]]
        floor = mk["idle"]
        checks.append(_check(
            "kvcached_memory_back_to_idle_after_each_burst",
            f"with kvcached, the engine's memory after each burst is within {FLOOR_TOLERANCE:.0%} of its idle level",
            returns_to_floor(mk["after"], floor, FLOOR_TOLERANCE)))
        kv = k["summary"]["kv"].get(k["servers"][0])
        if kv:
            checks.append(_check(
                "kvcached_kv_grows_during_bursts", "kvcached's KV bytes (registry) grow during the bursts",
                bool(kv["peak"] and kv["idle"] is not None and kv["peak"] > kv["idle"])))
            # KV bytes start near 0: judged by the share of each burst's growth given back (prefix caching may keep
            # a bounded remainder, KVCACHED_MAX_CACHED_TOKENS)
            checks.append(_check(
                "kvcached_kv_given_back_after_each_burst",
                f"after each burst kvcached holds at most {KV_KEPT:.0%} of the KV bytes the burst added",
                all(a is not None and a <= kv["idle"] + KV_KEPT * kv["flex"] for a in kv["after"])
                if kv["idle"] is not None and kv["flex"] else None))
    if s:
        ms = s["summary"]["memory"][s["servers"][0]]
        checks.append(_check(
            "static_pool_holds_its_peak",
            f"the static pool's engine keeps >= {HOLDS_PEAK:.0%} of its peak memory after each burst",
            all(a is not None and a >= HOLDS_PEAK * ms["peak"] for a in ms["after"]) if ms["peak"] else None))
        if floor is not None:
            back = returns_to_floor(ms["after"], floor, FLOOR_TOLERANCE)
            checks.append(_check(
                "static_pool_stays_above_kvcached_idle",
                f"the static pool's engine stays more than {FLOOR_TOLERANCE:.0%} above kvcached's idle memory "
                f"after each burst", None if back is None else not back))
    if "exp4/kvcached" in runs:
        checks += _router_checks(runs["exp4/kvcached"], results.get("experiment4") or {})
    reqs = [r for run in runs.values() for r in run["requests"]]
    checks.append(_check("every_request_succeeded", f"every request of every run succeeded ({len(reqs)} requests)",
                         bool(reqs) and all(r["ok"] for r in reqs)))
    return checks


def warm_cold_ttft(run: dict) -> dict[str, dict]:
    """Experiment 4: TTFT (requests, mean, p50, max) of the successful requests labelled cold and warm (the label
    starts the request's phase: the model's state in the router before the burst)."""
    out = {}
    for temp in ("cold", "warm"):
        xs = [r["ttft"] for r in run["requests"] if r["ok"] and r["phase"].startswith(temp + " ")]
        out[temp] = {"requests": len(xs), "mean": sum(xs) / len(xs) if xs else None, "p50": percentile(xs, 50),
                     "max": max(xs, default=None)}
    return out


def _router_checks(run: dict, info: dict) -> list[dict]:
    reqs = run["requests"]
    tt = warm_cold_ttft(run)
    cold, warm = tt["cold"]["mean"], tt["warm"]["mean"]
    resident = info.get("max_resident")
    return [
        _check("router_no_5xx", f"no request through the router was answered 5xx ({len(reqs)} requests)",
               bool(reqs) and not any(r["error"].startswith("HTTP 5") for r in reqs)),
        _check(f"router_at_most_{info.get('fit')}_engines_resident",
               f"at most {info.get('fit')} of the {info.get('models')} router's engines held memory at once "
               f"(memory samples; most seen: {resident})", None if resident is None else resident <= info["fit"]),
        _check("router_cold_ttft_above_warm", "through the router, cold requests' mean TTFT is above warm ones'",
               None if cold is None or warm is None else cold > warm),
    ]


def failed_requests(results: dict, most: int = 10) -> list[str]:
    reqs = [r for run in results["runs"].values() for r in run["requests"]]
    return [f"{r['target']} {r['phase']}: {r['error']}" for r in reqs if not r["ok"]][:most]


def make_plots(results: dict, samples: list[dict], out_dir: str) -> list[str]:
    """Write the PNGs that the data allow; returns their paths."""
    from benchmarks.demo import plots  # matplotlib only when plotting

    cfg = results["config"]
    add_kv_mapped(samples)
    runs = results["runs"]
    key = mem_key(results)
    model = os.path.basename(cfg["model"].rstrip("/"))
    written = []

    def out(name: str) -> str:
        path = os.path.join(out_dir, name)
        written.append(path)
        return path

    e1 = {m: runs[f"exp1/{m}"] for m in MODES if f"exp1/{m}" in runs}
    if e1:
        plots.plot_memory_single(
            e1, samples, key, out("memory_exp1.png"),
            f"Experiment 1: bursty single model ({cfg['bursts']} bursts x {cfg['concurrency']} requests, "
            f"~{cfg.get('context_tokens', 0) + 40} prompt + {cfg['max_tokens']} output tokens), "
            f"{model} on {cfg['device']}",
            static_pool=cfg["static_pool"] if "static" in e1 else None)
    e2 = {m: runs[f"exp2/{m}"] for m in MODES if f"exp2/{m}" in runs}
    fit = results.get("experiment2_static_fit")
    if e2 or fit:
        notes = {}
        if fit:
            notes["static"] = (f"pools {fmt_bytes(fit['pool_each'])} each; the pair needs ~{fmt_bytes(fit['need'])} "
                               f"of {fmt_bytes(fit['have'])}: "
                               + ("fits, and holds its peak the whole time" if fit["fits"] else "does NOT fit"))
        if "exp2/kvcached" in runs:
            notes["kvcached"] = "memory follows the instance being hit"
        pools = {name: cfg["static_pool"] for name in e2["static"]["servers"]} if "static" in e2 else None
        plots.plot_memory_multi(e2, samples, key, out("memory_exp2.png"),
                                f"Experiment 2: two models on one machine, bursts alternate (A, B), {model}", notes,
                                pools)
    e3 = {m: runs[f"exp3/{m}"] for m in MODES if f"exp3/{m}" in runs}
    if e3:
        notes = {"kvcached": f"each may take the whole KV budget {fmt_bytes(cfg['e3_budget'])} (registry limit)",
                 "static": f"static partition of the same budget: {fmt_bytes(cfg['e3_budget'] // 3)} each"}
        pools = {name: cfg["e3_budget"] // 3 for name in e3["static"]["servers"]} if "static" in e3 else None
        plots.plot_memory_multi(e3, samples, key, out("memory_exp3.png"),
                                f"Experiment 3: three instances, a request ramp on one at a time, {model}", notes,
                                pools)
    e4 = runs.get("exp4/kvcached")
    if e4:
        info = results.get("experiment4") or {}
        note = (f"{info.get('models')} models on demand, each needs {fmt_bytes(info.get('memory_each'))} of "
                f"{fmt_bytes(info.get('free_at_start'))} free: {info.get('fit')} fit at once")
        plots.plot_memory_multi({"kvcached": e4}, samples, key, out("memory_exp4.png"),
                                f"Experiment 4: kvcached-router, more models than fit, {model}", {"kvcached": note})
        plots.plot_warm_cold(warm_cold_ttft(e4), out("ttft_warm_cold.png"),
                             f"Experiment 4: TTFT through kvcached-router, model running (warm) or not (cold), "
                             f"{cfg['concurrency']} requests per burst")
    groups = []
    for exp in (1, 2, 3):
        for m in MODES:
            run = runs.get(f"exp{exp}/{m}")
            if run:
                ok = [r for r in run["requests"] if r["ok"]]
                groups.append((f"exp{exp} {m}", m, [r["ttft"] for r in ok], [r["e2e"] for r in ok]))
    if groups:
        plots.plot_latency_box(groups, out("latency_box.png"))
    rows = []
    for exp in (1, 2, 3):
        per_mode = {m: runs[f"exp{exp}/{m}"]["summary"]["latency"] for m in MODES if f"exp{exp}/{m}" in runs}
        if per_mode:
            rows.append((f"exp{exp}" + (" (all)" if exp == 3 and e3 else ""), per_mode))
    if e3:
        for i, letter in enumerate(LETTERS):
            per_mode = {m: run["summary"]["per_server_latency"][run["servers"][i]] for m, run in e3.items()}
            rows.append((f"exp3 inst. {letter}", per_mode))
    if rows:
        plots.plot_ttft_bars(rows, out("ttft_bars.png"), "Time to first token: mean and p99, kvcached vs static pool")
    return written


def _router_lines(run: dict, info: dict) -> list[str]:
    tt = warm_cold_ttft(run)
    lines = [f"  {info.get('models')} models, each needs {fmt_bytes(info.get('memory_each'))} of "
             f"{fmt_bytes(info.get('free_at_start'))} free (an engine ~{fmt_bytes(info.get('engine_memory'))}): "
             f"{info.get('fit')} fit; most engines resident at once: {info.get('max_resident')}"]
    for temp in ("cold", "warm"):
        t = tt[temp]
        lines.append(f"  {temp:<5} TTFT mean {fmt_s(t['mean'])}s, p50 {fmt_s(t['p50'])}s, max {fmt_s(t['max'])}s "
                     f"over {t['requests']} requests")
    starts = [m.get("cold_start_seconds_count", 0) for m in (info.get("router_metrics") or {}).values()]
    seconds = sum(m.get("cold_start_seconds_sum", 0) for m in (info.get("router_metrics") or {}).values())
    if sum(starts):
        lines.append(f"  router: {sum(starts):.0f} cold starts, mean {fmt_s(seconds / sum(starts))}s "
                     f"(kvcached_router_cold_start_seconds)")
    return lines


def summary_table(results: dict) -> str:
    cfg = results["config"]
    runs = results["runs"]
    key = mem_key(results)
    lines = []
    mem_name = {"rss": "RSS of the engine processes", "gpu_used": "GPU memory of the engine processes (NVML)",
                "gpu_device_used": "GPU memory used on the whole device (NVML)"}[key]
    lines.append(f"kvcached demo: {os.path.basename(cfg['model'].rstrip('/'))} on {cfg['device']} ({cfg['dtype']}); "
                 f"memory = {mem_name}; wall time {results.get('wall_s')}s")
    hdr = (f"  {'mode':<9} {'server':<9} {'idle':>7} {'peak':>7} {'after release (each burst)':<28} {'flex':>7} "
           f"{'TTFT p50/p95 s':>15} {'e2e p50/p95 s':>14} {'ok':>7}")
    titles = {1: "Experiment 1: bursty single model", 2: "Experiment 2: two models, alternating bursts",
              3: "Experiment 3: three instances, intermittent peak (ramp) load",
              4: "Experiment 4: kvcached-router, more models than fit at once, served on demand"}
    for exp in cfg["experiments"]:
        lines += ["", titles[exp], hdr]
        for m in MODES:
            run = runs.get(f"exp{exp}/{m}")
            if run is None:
                fit = results.get("experiment2_static_fit")
                if exp == 2 and m == "static" and fit and not fit["fits"]:
                    lines.append(f"  {m:<9} does not fit: needs ~{fmt_bytes(fit['need'])} of {fmt_bytes(fit['have'])} "
                                 f"({fit['have_what']}); not started")
                continue
            summ = run["summary"]
            single = len(run["servers"]) == 1
            for label, mem in summ["memory"].items():
                lat = summ["latency"] if (label == "sum" or single) else summ["per_server_latency"][label]
                after = ", ".join(fmt_bytes(a) for a in mem["after"])
                if len(after) > 28:
                    after = "max " + fmt_bytes(max((a for a in mem["after"] if a is not None), default=None))
                lines.append(
                    f"  {m:<9} {label:<9} {fmt_bytes(mem['idle']):>7} {fmt_bytes(mem['peak']):>7} {after:<28} "
                    f"{fmt_bytes(mem['flex']):>7} {fmt_s(lat['ttft_p50']) + '/' + fmt_s(lat['ttft_p95']):>15} "
                    f"{fmt_s(lat['e2e_p50']) + '/' + fmt_s(lat['e2e_p95']):>14} "
                    f"{str(lat['ok']) + '/' + str(lat['requests']):>7}")
            for label, kv in summ["kv"].items():
                if label == "sum" or single:
                    after = ", ".join(fmt_bytes(a) for a in kv["after"])
                    if len(after) > 28:
                        after = "max " + fmt_bytes(max((a for a in kv["after"] if a is not None), default=None))
                    lines.append(f"  {'':<9} {'KV mapped':<9} {fmt_bytes(kv['idle']):>7} {fmt_bytes(kv['peak']):>7} "
                                 f"{after:<28} {fmt_bytes(kv['flex']):>7}   (kvcached registry: used + premapped)")
            if m == "static" and exp in (1, 2):
                pool = (fmt_bytes(cfg["static_pool"]) if cfg["static_pool"]
                        else f"vLLM-sized within {cfg.get('gpu_share')} of the GPU")
                lines.append(f"  {'':<9} {'KV pool':<9} static, {pool} per instance, held the whole time")
            if exp == 3:
                lat = summ["latency"]
                lines.append(f"  {'':<9} TTFT mean {fmt_s(lat['ttft_mean'])}s, p99 {fmt_s(lat['ttft_p99'])}s over "
                             f"{lat['requests']} requests ({m})")
        if exp == 2 and "exp2/static" in runs:
            summ = runs["exp2/static"]["summary"]
            mins, peaks = summ.get("min_over_run", {}), {k: v["peak"] for k, v in summ["memory"].items()}
            held = [f"{k} min/peak {mins[k] / peaks[k]:.2f}" for k in mins if mins[k] and peaks.get(k)]
            lines.append("  static pair fits; it holds its peak the whole time: " + ", ".join(held))
        if exp == 4 and "exp4/kvcached" in runs:
            lines += _router_lines(runs["exp4/kvcached"], results.get("experiment4") or {})
        if exp == 3:
            if "exp3/kvcached" in runs:
                lines.append(f"  kvcached limits: {results.get('experiment3_limits')}")
            if "exp3/kvcached" in runs and "exp3/static" in runs:
                k = runs["exp3/kvcached"]["summary"]["latency"]
                s = runs["exp3/static"]["summary"]["latency"]
                if k["ttft_mean"] and s["ttft_mean"] and k["ttft_p99"] and s["ttft_p99"]:
                    lines.append(f"  static / kvcached TTFT: mean {s['ttft_mean'] / k['ttft_mean']:.1f}x, "
                                 f"p99 {s['ttft_p99'] / k['ttft_p99']:.1f}x")
    checks = results.get("checks") or []
    if checks:
        lines += ["", "Checks"]
        mark = {True: "PASS", False: "FAIL", None: "n/a "}
        lines += [f"  {mark[c['passed']]}  {c['what']}" for c in checks]
    if results.get("failed_requests"):
        lines.append("  failed: " + "; ".join(results["failed_requests"]))
    return "\n".join(lines)
