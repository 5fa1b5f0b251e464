"""The GPU checks' verdicts, computed offline from recorded samples (scripts/gpu/check_sglang.py, check_mixed.py).

The GPU runs are few and short, so what they conclude from their samples must be right the first time: these tests
feed the pure summarizing functions samples whose answers are known exactly.
"""

from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts", "gpu"))

import check_mixed  # noqa: E402
import check_sglang  # noqa: E402

MIB = 1 << 20


def limit_sample(t: float, mapped: float, used: float, limit: float) -> dict:
    return {"t": t, "device_mib": 0, "mapped_mib": mapped, "used_mib": used, "limit_mib": limit}


def test_limit_held_times_the_descent_to_the_limit_from_when_the_engine_applied_it():
    samples = [limit_sample(0.1, 288, 270, 81558), limit_sample(0.2, 288, 288, 128), limit_sample(0.3, 252, 252, 128),
               limit_sample(1.4, 126, 126, 128), limit_sample(1.5, 144, 144, 128),  # rose above the limit again
               limit_sample(4.0, 18, 18, 128)]  # the last: after the burst
    held = check_sglang.limit_held(samples, 128.0)
    assert (held["applied_t"], held["used_at_applied_mib"]) == (0.2, 288)
    assert (held["down_to_limit_t"], held["down_after_applied_s"]) == (1.4, 1.2)
    assert held["over_bound"] == [{"t": 1.5, "mapped_mib": 144, "bound_mib": 128.0}]


def test_limit_held_reports_no_descent_when_memory_reached_the_limit_only_after_the_burst():
    samples = [limit_sample(0.2, 288, 288, 128), limit_sample(2.4, 144, 144, 128), limit_sample(4.3, 144, 144, 128),
               limit_sample(6.8, 18, 18, 128)]  # the H100 run before the null block's page was kept from draining
    held = check_sglang.limit_held(samples, 128.0)
    assert (held["down_to_limit_t"], held["down_after_applied_s"], held["over_bound"]) == (None, None, [])


PAGE = {"vllm": 16 * MIB, "sglang": 18 * MIB}


def mixed_sample(vllm_pages: int, sglang_pages: int, vllm_nvml: int = 1800, sglang_nvml: int = 2400) -> dict:
    return {"t": 0.0, "used": 0, "mapped": {"vllm": vllm_pages * PAGE["vllm"], "sglang": sglang_pages * PAGE["sglang"]},
            "nvml": {"vllm": vllm_nvml * MIB, "sglang": sglang_nvml * MIB}}


def mixed_burst(engine: str, peak_pages: int) -> dict:
    vllm = engine == "vllm"
    samples = [mixed_sample(k if vllm else 1, 1 if vllm else k, 1800 + 40 * k * vllm, 2400 + 40 * k * (not vllm))
               for k in range(1, peak_pages + 1)]
    return {"engine": engine, "wall_s": 5.0, "settle_s": 1.2, "completed": [128] * 64 if vllm else [256] * 256,
            "expected_tokens": 128 if vllm else 256, "before": mixed_sample(1, 1), "after": mixed_sample(1, 1),
            "samples": samples}


def mixed_run() -> dict:
    return {"servers": {"vllm": {"ready_s": 80.0, "errors": []}, "sglang": {"ready_s": 95.0, "errors": []}},
            "registered": {"ok": True}, "page_bytes": PAGE, "floor_pages": 1, "idle": mixed_sample(1, 1),
            "bursts": [mixed_burst("vllm", 20), mixed_burst("sglang", 30), mixed_burst("vllm", 20),
                       mixed_burst("sglang", 30)]}


def test_mixed_run_where_memory_follows_load_passes_every_check_with_the_figures_per_burst():
    result = check_mixed.summarize(mixed_run())
    assert all(result["checks"].values()), result["checks"]
    first, second = result["summary"]["bursts"][:2]
    assert first == {"engine": "vllm", "wall_s": 5.0, "settle_s": 1.2, "vllm_mapped_mib": [16.0, 320.0, 16.0],
                     "vllm_nvml_mib": [1800.0, 2600.0, 1800.0], "sglang_mapped_mib": [18.0, 18.0, 18.0],
                     "sglang_nvml_mib": [2400.0, 2400.0, 2400.0]}
    assert second["sglang_mapped_mib"] == [18.0, 540.0, 18.0] and second["vllm_mapped_mib"] == [16.0, 16.0, 16.0]
    assert result["summary"]["idle_mapped_mib"] == {"vllm": 16.0, "sglang": 18.0}


def test_mixed_run_fails_the_checks_its_samples_break_and_only_those():
    run = mixed_run()
    run["bursts"][1]["samples"][3]["mapped"]["vllm"] = 2 * PAGE["vllm"]  # the idle server mapped during the other's
    run["bursts"][2]["after"]["mapped"]["sglang"] = 2 * PAGE["sglang"]  # not back at the floor
    run["bursts"][3]["completed"][5] = "error: timed out"
    checks = check_mixed.summarize(run)["checks"]
    assert [name for name, ok in checks.items() if not ok] == ["bursts_complete", "active_maps_more_other_not",
                                                               "idle_at_floor"]


def test_mixed_run_cut_short_or_without_an_exact_floor_does_not_pass():
    short = copy.deepcopy(mixed_run())
    short["bursts"] = short["bursts"][:2]
    short["servers"]["sglang"]["errors"] = ["Traceback (most recent call last):"]
    checks = check_mixed.summarize(short)["checks"]
    assert [name for name, ok in checks.items() if ok] == ["servers_ready", "both_registered"]
    unbounded = dict(mixed_run(), floor_pages=None)
    assert check_mixed.summarize(unbounded)["checks"]["idle_at_floor"] is None  # not checked, reported
