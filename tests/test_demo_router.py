"""The demo's experiment 4 (benchmarks/demo/router.py) without servers: the router config it writes, as the router's
own loader reads it, and the figures it reports (engines resident at once, warm vs cold TTFT) on known samples."""

from __future__ import annotations

import pytest

from kvcached.router.config import load_config

from benchmarks.demo import router
from benchmarks.demo.__main__ import build_parser
from benchmarks.demo.config import resolve
from benchmarks.demo.harness import Harness
from benchmarks.demo.report import warm_cold_ttft
from benchmarks.servers import ServerError

GIB = 1 << 30


def harness(tmp_path, *extra: str) -> Harness:
    args = build_parser().parse_args(["--experiments", "4", "--quick", "--device", "cpu", "--port-base", "8500",
                                      "--model", str(tmp_path), "--out", str(tmp_path), *extra])
    return Harness(resolve(args))


def test_config_sizes_memory_so_two_engines_fit_and_leaves_the_address_to_the_router(tmp_path):
    h = harness(tmp_path, "--e4-engine-memory", "2G")
    path, memory = router.write_config(h, free=20 * GIB)
    assert memory == 20 * GIB - 3 * GIB  # free - 1.5 engines: free after one engine fits it, after two does not
    config = load_config(path)
    assert config.port == 8508
    assert list(config.models) == ["m1", "m2", "m3", "m4"]
    for i, (name, m) in enumerate(config.models.items()):
        assert (m.port, m.memory_bytes, m.device, m.kvcached) == (8509 + i, memory, "cpu", True)
        assert (m.stop_after_s, m.sleep_after_s) == (router.IDLE_TIMEOUT_S, None)  # CPU engines are stopped
        demo_argv = h.engine_spec(name, m.port, True, h.cfg.static_pool).argv()
        argv = m.argv()
        assert argv.count("--port") == 1 and argv[argv.index("--port") + 1] == str(m.port)
        assert argv[argv.index("--served-model-name") + 1] == name
        assert list(m.command) == [a for j, a in enumerate(demo_argv) if not _router_flag_or_value(demo_argv, j)]


def _router_flag_or_value(argv: list[str], j: int) -> bool:
    return argv[j] in router.ROUTER_FLAGS or (j > 0 and argv[j - 1] in router.ROUTER_FLAGS)


def test_config_refuses_a_device_too_small_for_two_engines(tmp_path):
    h = harness(tmp_path, "--e4-engine-memory", "2G")
    with pytest.raises(ServerError, match=r"too little for 2 engines of ~2.00G \(--e4-engine-memory\)"):
        router.write_config(h, free=4 * GIB)


def test_max_resident_counts_engines_holding_memory_at_one_tick():
    samples = [{"t": 0.0, "server": "m1", "rss": 5}, {"t": 0.0, "server": "m2", "rss": 0},
               {"t": 0.2, "server": "m1", "rss": 5}, {"t": 0.2, "server": "m2", "rss": 7},
               {"t": 0.2, "server": "m3", "rss": 9}, {"t": 0.2, "server": "x", "rss": 9},
               {"t": 0.4, "server": "m3", "pss": 9}]  # a PSS record is not a tick
    assert router.max_resident(samples, ["m1", "m2", "m3"]) == 3
    assert router.max_resident(samples, ["m1", "m2"]) == 2
    assert router.max_resident([], ["m1"]) == 0
    sleeping_and_running = [{"t": 0.0, "server": "m1", "rss": 9, "gpu_used": 600},  # a sleeping engine's context
                            {"t": 0.0, "server": "m2", "rss": 9, "gpu_used": 3000}]
    assert router.max_resident(sleeping_and_running, ["m1", "m2"], "gpu_used", above=1000) == 1


def test_warm_cold_ttft_by_label_of_successful_requests():
    def req(phase: str, ttft: float, ok: bool = True) -> dict:
        return {"phase": phase, "ttft": ttft, "ok": ok}

    run = {"requests": [req("cold m1 r1", 30.0), req("cold m2 r1", 20.0), req("cold m2 r1", 99.0, ok=False),
                        req("warm m1 r1", 1.0), req("warm m1 r1", 2.0), req("warm m2 r1", 4.0)]}
    tt = warm_cold_ttft(run)
    assert tt["cold"] == {"requests": 2, "mean": 25.0, "p50": 25.0, "max": 30.0}
    assert tt["warm"] == {"requests": 3, "mean": 7.0 / 3, "p50": 2.0, "max": 4.0}
