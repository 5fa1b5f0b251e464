"""kvcached-router end to end on vLLM's CPU build: three served names of the same SmolLM2 weights behind one router.

Real everything: the router is the `python -m kvcached.router` command with a YAML config, its engines are vLLM
OpenAI servers with kvcached (enforce_eager, elastic KV), the client is the `openai` package. The tests run in file
order, as one story (module-scoped router): bad inputs (no engine needed), answers streamed and not from the right
model, scale to zero of an idle model (its process tree gone, its memory back), a cold start with 8 concurrent
requests, sleep and wake against what vLLM's CPU build answers, kill -9 of an engine, /metrics against the registry.

vLLM's CPU build (0.32.0) refuses --enable-sleep-mode at start-up ("Sleep mode is not supported on current
platform"), so the router does not pass it for device cpu; with VLLM_SERVER_DEV_MODE=1, POST /sleep?level=1 answers
200 and /is_sleeping true, the worker logs "sleep mode is not supported on CPU, ignore it", the engine's scheduler
pauses and no memory is given back; POST /wake_up resumes it. The sleep test checks that control flow (state,
the engine's own answer, wake on the next request, the same greedy text); memory given back by sleep is shown on a
GPU by scripts/gpu/check_router_sleep.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import psutil
import pytest
import yaml
from router_helpers import ROUTER_ENV, metrics, request, state_of, value, wait_until

from kvcached import registry
from kvcached.hostmem import host_memory

pytestmark = pytest.mark.vllm

MODEL = os.environ.get("KVCACHED_MODEL_DIR", os.path.expanduser("~/.cache/kvcached/models/SmolLM2-135M-Instruct"))
PORT = 8501
URL = f"http://127.0.0.1:{PORT}"
TAG = f"rt{os.getpid()}"
A, B, C = (f"{TAG}-{x}" for x in "abc")
PORTS = {A: 8502, B: 8503, C: 8504}
SLEEP_AFTER_S, STOP_AFTER_S = 6.0, 20.0
PROMPT = "The capital of France is"
FREED_FRACTION = 0.5  # of the stopped tree's summed PSS that must come back as available memory (MemAvailable,
# or the cgroup's room; other users of the machine move it too)


def engine_command() -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL, "--max-model-len", "512",
            "--enforce-eager", "--seed", "0", "--disable-uvicorn-access-log"]


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    """The router command over a YAML file; at the end SIGTERM, and every engine group must be gone."""
    folder = tmp_path_factory.mktemp("router")
    env = {"KVCACHED_TRIM_IDLE_S": "0.5",
           "VLLM_CACHE_ROOT": os.path.join(os.path.expanduser("~"), ".cache", "kvcached", "vllm-cache")}
    models = {A: {"sleep_after_s": SLEEP_AFTER_S}, B: {}, C: {"stop_after_s": STOP_AFTER_S}}
    doc = {"router": {"port": PORT, "health_interval_s": 1.0, "max_body_bytes": 65536, "log_dir": str(folder)},
           "models": {name: {"command": engine_command(), "port": PORTS[name], "env": env, **extra}
                      for name, extra in models.items()}}
    path = folder / "models.yaml"
    path.write_text(yaml.safe_dump(doc))
    log = open(folder / "router.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "kvcached.router", "--config", str(path)], env=ROUTER_ENV,
                            stdout=log, stderr=subprocess.STDOUT, cwd=str(folder))
    try:
        wait_until(lambda: _up(), 60, "the router answers /health")
        yield proc
        groups = [p.pid for p in psutil.Process(proc.pid).children() if p.pid == os.getpgid(p.pid)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
        assert not [pid for pid in groups if _group(pid)], "every engine group stopped with the router"
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        for name in (A, B, C):  # segments go with the engines; saved limits (none set here) would stay
            try:
                registry.delete(name)
            except registry.RegistryError:
                pass


@pytest.fixture(scope="module")
def client(router) -> openai.OpenAI:
    return openai.OpenAI(base_url=URL + "/v1", api_key="unused", max_retries=0, timeout=600)


def _up() -> bool:
    try:
        return request(URL + "/health", timeout=2)[0] == 200
    except OSError:
        return False


def _group(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def engine_leader(router: subprocess.Popen, name: str) -> psutil.Process:
    (leader,) = [p for p in psutil.Process(router.pid).children()
                 if f"--served-model-name {name}" in " ".join(p.cmdline())]
    return leader


def greedy(client: openai.OpenAI, name: str) -> str:
    answer = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
    assert answer.model == name
    return answer.choices[0].text


def test_bad_inputs_get_their_4xx_as_openai_errors_and_the_router_stays_up(client):
    cases = [
        (dict(raw=b"{not json"), 400, "invalid_json"),
        (dict(raw=b"[1, 2]"), 400, "invalid_json"),
        (dict(body={"prompt": "x"}), 400, "missing_model"),
        (dict(body={"model": 7, "prompt": "x"}), 400, "missing_model"),
        (dict(body={"model": "nope", "prompt": "x"}), 404, "model_not_found"),
        (dict(raw=b'{"model": "%s", "prompt": "%s"}' % (A.encode(), b"x" * 70000)), 413, "request_too_large"),
    ]
    for kwargs, status, code in cases:
        got, body, _ = request(URL + "/v1/completions", **kwargs)
        assert (got, body["error"]["code"]) == (status, code), body
        assert body["error"]["message"] and body["error"]["type"]
    got, body, _ = request(URL + "/v1/nothing", {"model": A})
    assert got == 404 and "Not Found" in body["error"]["message"]
    got, body, _ = request(URL + "/v1/completions", method="GET")
    assert got == 405 and body["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert sorted(m.id for m in client.models.list()) == sorted([A, B, C])
    samples = metrics(URL)
    assert value(samples, "kvcached_router_rejected_total", code="400") == 4.0
    assert value(samples, "kvcached_router_rejected_total", code="404") == 2.0
    assert value(samples, "kvcached_router_rejected_total", code="413") == 1.0
    assert all(state_of(samples, n) == "stopped" for n in (A, B, C))  # nothing started for a bad request


def test_answers_streamed_and_not_come_from_the_right_model(client, router, request_state):
    request_state["paris"] = greedy(client, A)
    assert request_state["paris"].startswith(" Paris")
    stream = client.chat.completions.create(model=B, messages=[{"role": "user", "content": "Name three colours."}],
                                            max_tokens=24, temperature=0, stream=True)
    chunks = [c for c in stream]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 5  # token by token
    assert {c.model for c in chunks} == {B}
    answer = client.chat.completions.create(model=C, messages=[{"role": "user", "content": "Say hello."}],
                                            max_tokens=8, temperature=0)
    assert answer.model == C and answer.choices[0].message.content
    # C is now idle: what its process tree holds, and the machine's available memory, before it is stopped
    leader = engine_leader(router, C)
    tree = _group(leader.pid)
    request_state["c_group"] = leader.pid
    request_state["c_pss"] = sum(p.memory_full_info().pss for p in tree)
    request_state["available_before"] = host_memory()[0]
    assert len(tree) >= 3  # API server, EngineCore, Worker
    samples = metrics(URL)
    assert [state_of(samples, n) for n in (B, C)] == ["running", "running"]
    assert value(samples, "kvcached_router_cold_start_seconds_count", model=C) == 1.0


def test_a_model_idle_past_stop_after_has_no_process_left_and_its_memory_is_back(router, request_state):
    wait_until(lambda: state_of(metrics(URL), C) == "stopped", STOP_AFTER_S + 30, "C stopped when idle")
    assert _group(request_state["c_group"]) == []
    freed = host_memory()[0] - request_state["available_before"]
    pss = request_state["c_pss"]
    print(f"stopped {C}: its tree's PSS {pss >> 20} MiB; available memory rose by {freed >> 20} MiB")
    assert freed >= FREED_FRACTION * pss, f"freed {freed >> 20} MiB of the tree's {pss >> 20} MiB PSS"
    assert registry.list_instances([C], missing_ok=True) == [] or not registry.read_instance(C).alive


def test_the_next_request_and_8_concurrent_ones_during_the_cold_start_all_succeed(client):
    with ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(lambda i: client.completions.create(model=C, prompt=f"Count to {i}:", max_tokens=4,
                                                                    temperature=0), range(9)))
    assert [a.model for a in answers] == [C] * 9 and all(a.choices[0].text for a in answers)
    samples = metrics(URL)
    assert value(samples, "kvcached_router_cold_start_seconds_count", model=C) == 2.0
    assert value(samples, "kvcached_router_cold_start_seconds_sum", model=C) > 1.0
    assert value(samples, "kvcached_router_errors_total", model=C, kind="unavailable") == 0.0
    print(f"cold start of {C}: {value(samples, 'kvcached_router_cold_start_seconds_sum', model=C) / 2:.1f} s mean")


def test_sleep_on_vllm_cpu_pauses_the_engine_and_the_next_request_wakes_it(client, request_state):
    wait_until(lambda: state_of(metrics(URL), A) == "sleeping", SLEEP_AFTER_S + 30, "A asleep")
    assert request(f"http://127.0.0.1:{PORTS[A]}/is_sleeping")[1] == {"is_sleeping": True}  # vLLM's own answer
    assert greedy(client, A) == request_state["paris"]  # woken by the request; the same greedy text
    samples = metrics(URL)
    assert state_of(samples, A) == "running"
    assert value(samples, "kvcached_router_wake_seconds_count", model=A) == 1.0
    assert value(samples, "kvcached_router_sleep_supported", model=A) == 1.0
    assert value(samples, "kvcached_router_cold_start_seconds_count", model=A) == 1.0  # woken, not restarted


def test_kill_9_of_an_engine_is_recovered_and_later_requests_succeed(client, router):
    leader = engine_leader(router, B)
    os.kill(leader.pid, signal.SIGKILL)
    answer = client.chat.completions.create(model=B, messages=[{"role": "user", "content": "Say hi."}],
                                            max_tokens=4, temperature=0)
    assert answer.model == B
    assert _group(leader.pid) == []  # the rest of the killed group (EngineCore, Worker) is gone too
    assert engine_leader(router, B).pid != leader.pid
    samples = metrics(URL)
    assert value(samples, "kvcached_router_restarts_total", model=B) == 1.0
    assert value(samples, "kvcached_router_cold_start_seconds_count", model=B) == 2.0
    assert state_of(samples, B) == "running"


def test_metrics_parse_and_the_kvcached_byte_gauges_equal_the_registry():
    """A and B run (no stop_after_s); C has been stopped again by now (idle past stop_after_s): no byte gauges."""
    fields = ("used_bytes", "premapped_bytes", "limit_bytes")

    def matches() -> bool:  # engines trim their reserve when idle: compare a scrape between two equal reads
        before = {r.name: r for r in registry.list_instances([A, B])}
        samples = metrics(URL)
        after = {r.name: r for r in registry.list_instances([A, B])}
        if any(getattr(before[n], f) != getattr(after[n], f) for n in before for f in fields):
            return False
        for name, record in after.items():
            assert record.alive and record.device == "cpu"
            for f in fields:
                if samples[(f"kvcached_instance_{f}", (("device", "cpu"), ("instance", name)))] != getattr(record, f):
                    return False
        assert not [k for k in samples if k[0].startswith("kvcached_instance_") and k[0].endswith("_bytes")
                    and ("instance", C) in k[1]]
        return True

    wait_until(lambda: state_of(metrics(URL), C) == "stopped", STOP_AFTER_S + 30, "C stopped again when idle")
    wait_until(matches, 30, "a scrape equal to the registry")
    assert all(r.used_bytes > 0 for r in registry.list_instances([A, B]))


@pytest.fixture(scope="module")
def request_state() -> dict:
    """What one test of the story measures for a later one."""
    return {}
