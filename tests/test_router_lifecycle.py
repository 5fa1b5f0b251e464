"""The router's state machine, queue, supervisor and memory-aware waking, against tests/router_fake_engine.py.

Why a fake engine here: these are the cases a real vLLM cannot show on this CPU machine, or not in seconds: an engine
that honours sleep (vLLM's CPU build refuses --enable-sleep-mode), one that answers /sleep but never sleeps, a
start-up that takes exactly long enough to overflow a queue, a start-up that fails, free memory that depends only on
which engines are awake. The fake is a real process started, killed and restarted by the router as a process group;
the real end-to-end test with vLLM is tests/test_router_e2e.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import yaml
from router_helpers import ROUTER_ENV, RouterThread, complete, fake_model, metrics, request, state_of, value, wait_until

PORT = 8520  # router; engines on 8521..


@pytest.fixture(autouse=True)
def _engine_logs_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # engine logs go to the router's working directory


def doc(models: dict, **router) -> dict:
    return {"router": {"port": PORT, "health_interval_s": 0.2, "restart_backoff_s": 0.5, **router}, "models": models}


def group_alive(pgid: int) -> bool:
    return any(p.status() != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid
               for p in psutil.process_iter() if _safe_pgid(p) == pgid)


def _safe_pgid(p: psutil.Process) -> int:
    try:
        return os.getpgid(p.pid)
    except (ProcessLookupError, PermissionError):
        return -1


def test_requests_during_a_cold_start_are_held_then_all_served():
    with RouterThread(doc({"m": fake_model(8521, env={"FAKE_START_S": "2"})})) as r:
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: complete(r.url, "m"), range(8)))
        assert [a[0] for a in answers] == [200] * 8
        assert all(a[1]["model"] == "m" for a in answers)
        assert time.monotonic() - started >= 2.0  # they really waited for the start
        samples = metrics(r.url)
        assert value(samples, "kvcached_router_cold_start_seconds_count", model="m") == 1.0
        assert value(samples, "kvcached_router_cold_start_seconds_sum", model="m") >= 2.0
        assert value(samples, "kvcached_router_requests_total", model="m") == 8.0
        assert value(samples, "kvcached_router_ttft_seconds_count", model="m") == 8.0
        assert state_of(samples, "m") == "running"
        with open(r.model("m").engine.log_path) as f:
            assert f.read().count("\n==== ") == 1  # one engine process for all eight


def test_a_stream_is_relayed_chunk_by_chunk():
    with RouterThread(doc({"m": fake_model(8522, env={"FAKE_CHUNKS": "5", "FAKE_CHUNK_S": "0.4"})})) as r:
        import http.client
        import json

        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"model": "m", "prompt": "x", "stream": True}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
        events = []
        for line in response:
            if line.startswith(b"data: {"):
                events.append((time.monotonic(), json.loads(line[6:])))
        assert [e["choices"][0]["text"] for _, e in events] == [f" m-{i}" for i in range(5)]
        # the engine sleeps 0.4 s between chunks: had the router buffered, all would arrive at once
        assert events[-1][0] - events[0][0] >= 4 * 0.4 * 0.9


def test_a_full_queue_and_a_timeout_answer_503_with_retry_after():
    with RouterThread(doc({"m": fake_model(8523, env={"FAKE_START_S": "6"})}, queue_size=2,
                          queue_timeout_s=1.5)) as r:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(complete, r.url, "m")]
            wait_until(lambda: r.model("m").queue.depth == 1, 10, "first request queued")
            futures.append(pool.submit(complete, r.url, "m"))
            wait_until(lambda: r.model("m").queue.depth == 2, 10, "second request queued")
            full = complete(r.url, "m")
            timed_out = [f.result() for f in futures]
        assert full[0] == 503 and "queue_size 2" in full[1]["error"]["message"]
        assert int(full[2]["Retry-After"]) >= 1
        for status, body, headers in timed_out:
            assert status == 503 and "queue_timeout_s=1.5" in body["error"]["message"]
            assert body["error"]["code"] == "model_not_ready" and int(headers["Retry-After"]) >= 1
        assert value(metrics(r.url), "kvcached_router_errors_total", model="m", kind="unavailable") == 3.0
        wait_until(lambda: r.model("m").state.value == "running", 30, "the start goes on without waiters")
        assert complete(r.url, "m")[0] == 200


def test_a_failed_start_answers_503_naming_the_exit_code_and_backs_off():
    with RouterThread(doc({"m": fake_model(8524, env={"FAKE_EXIT_AT_START": "3"})}, restart_backoff_s=5)) as r:
        status, body, headers = complete(r.url, "m")
        assert status == 503 and "exited with code 3 while starting" in body["error"]["message"]
        assert int(headers["Retry-After"]) == 5
        assert value(metrics(r.url), "kvcached_router_errors_total", model="m", kind="start_failed") == 1.0
        assert r.model("m").state.value == "stopped" and r.model("m").engine is None


def test_an_idle_engine_sleeps_and_the_next_request_wakes_it():
    with RouterThread(doc({"m": fake_model(8525, sleep_after_s=1)})) as r:
        assert complete(r.url, "m")[0] == 200
        wait_until(lambda: state_of(metrics(r.url), "m") == "sleeping", 10, "asleep after sleep_after_s")
        pid = r.model("m").engine.pid
        assert value(metrics(r.url), "kvcached_router_sleep_supported", model="m") == 1.0
        status, body, _ = complete(r.url, "m")
        assert status == 200 and body["model"] == "m"
        samples = metrics(r.url)
        assert state_of(samples, "m") == "running" and r.model("m").engine.pid == pid  # woken, not restarted
        assert value(samples, "kvcached_router_wake_seconds_count", model="m") == 1.0
        assert value(samples, "kvcached_router_cold_start_seconds_count", model="m") == 1.0


@pytest.mark.parametrize("answer", ["ignore", "missing"])
def test_an_engine_that_does_not_sleep_keeps_running_until_stop_after(answer):
    """"ignore": /sleep answers 200 but /is_sleeping stays false; "missing": 404, as vLLM without dev mode."""
    with RouterThread(doc({"m": fake_model(8526, sleep_after_s=0.5, stop_after_s=3, env={"FAKE_SLEEP": answer})})) as r:
        assert complete(r.url, "m")[0] == 200
        pgid = r.model("m").engine.pid
        wait_until(lambda: r.model("m").sleep_supported is False, 10, "sleep found unsupported")
        samples = metrics(r.url)
        assert state_of(samples, "m") == "running"
        assert value(samples, "kvcached_router_sleep_supported", model="m") == 0.0
        wait_until(lambda: r.model("m").state.value == "stopped", 10, "stopped after stop_after_s")
        assert not group_alive(pgid)
        assert complete(r.url, "m")[0] == 200  # started again on demand
        assert value(metrics(r.url), "kvcached_router_cold_start_seconds_count", model="m") == 2.0


def test_a_killed_engine_is_restarted_and_requests_keep_succeeding():
    with RouterThread(doc({"m": fake_model(8527)})) as r:
        assert complete(r.url, "m")[0] == 200
        first = r.model("m").engine.pid
        os.kill(first, signal.SIGKILL)
        status, body, _ = complete(r.url, "m")  # sent at once: held while the router recovers the engine
        assert status == 200 and body["model"] == "m"
        assert r.model("m").engine.pid != first
        samples = metrics(r.url)
        assert value(samples, "kvcached_router_restarts_total", model="m") == 1.0
        assert value(samples, "kvcached_router_errors_total", model="m", kind="crash") == 1.0


def test_memory_aware_waking_puts_the_least_recently_used_idle_model_away_first(tmp_path):
    """Free memory = 10 GiB minus 4 GiB for each fake engine that is alive and awake (as its state file says)."""
    capacity, need = 10 << 30, 4 << 30
    files = {n: str(tmp_path / f"{n}.state") for n in "abc"}

    def free(device: str) -> int:
        assert device == "cpu"
        used = 0
        for name, m in r.router.models.items():
            if m.engine is not None and m.engine.running() and os.path.exists(files[name]):
                with open(files[name]) as f:
                    used += need if f.read() == "awake" else 0
        return capacity - used

    models = {n: fake_model(8530 + i, sleep_after_s=600, memory="4G",
                            env={"FAKE_MEMORY_FILE": files[n], "FAKE_SLEEP": "ignore" if n == "c" else "honour"})
              for i, n in enumerate("abc")}
    r = RouterThread(doc(models), free_bytes=free)
    with r:
        states = lambda: {n: m.state.value for n, m in r.router.models.items()}  # noqa: E731
        assert complete(r.url, "a")[0] == 200 and complete(r.url, "b")[0] == 200
        assert complete(r.url, "c")[0] == 200  # 2 GiB free: a, the least recently used, is put to sleep
        assert states() == {"a": "sleeping", "b": "running", "c": "running"}
        assert complete(r.url, "a")[0] == 200  # waking a needs 4 GiB: b (used before c) sleeps
        assert states() == {"a": "running", "b": "sleeping", "c": "running"}
        assert complete(r.url, "b")[0] == 200  # c is LRU but ignores sleep: it is stopped
        assert states() == {"a": "running", "b": "running", "c": "stopped"}
        assert r.model("c").sleep_supported is False and free("cpu") == capacity - 2 * need


def test_an_external_engine_is_proxied_and_never_started_or_stopped():
    engine = subprocess.Popen(fake_model(8540)["command"] + ["--port", "8540", "--served-model-name", "ext"],
                              start_new_session=True)
    try:
        with RouterThread(doc({"ext": {"url": "http://127.0.0.1:8540"}})) as r:
            wait_until(lambda: complete(r.url, "ext")[0] == 200, 30, "the external engine answers")
            assert r.model("ext").engine is None and state_of(metrics(r.url), "ext") == "running"
        assert engine.poll() is None  # the router stopped; the engine it does not own still runs
    finally:
        os.killpg(engine.pid, signal.SIGKILL)
        engine.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_router_stops_every_engine_group_on_sigterm_and_ctrl_c(tmp_path, sig):
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(doc({"a": fake_model(8541, preload=True), "b": fake_model(8542, preload=True)})))
    router = subprocess.Popen([sys.executable, "-m", "kvcached.router", "--config", str(path)], cwd=str(tmp_path),
                              env=ROUTER_ENV, stderr=subprocess.PIPE, text=True)
    try:
        def engines() -> list[psutil.Process]:
            return [p for p in psutil.Process(router.pid).children() if "router_fake_engine" in " ".join(p.cmdline())]

        wait_until(lambda: len(engines()) == 2, 60, "both engines preloaded, before any request")
        wait_until(lambda: _listening() and all(complete(f"http://127.0.0.1:{PORT}", n)[0] == 200 for n in "ab"),
                   60, "both engines answer")
        started = engines()
        router.send_signal(sig)
        assert router.wait(30) == 0
        assert not any(group_alive(p.pid) for p in started)
        assert "stopping: every engine the router started is stopped" in router.stderr.read()
    finally:
        if router.poll() is None:
            router.kill()


def _listening() -> bool:
    try:
        return request(f"http://127.0.0.1:{PORT}/health", timeout=2)[0] == 200
    except OSError:
        return False
