"""Helpers for the router's tests: run a router in a thread of this process, talk HTTP to it, read its /metrics."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import urllib.error
import urllib.request
from typing import Callable, Optional

from prometheus_client.parser import text_string_to_metric_families

from kvcached.router.app import start
from kvcached.router.config import RouterConfig, parse_config
from kvcached.router.memory import MemoryArbiter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ROUTER_ENV = dict(os.environ, PYTHONPATH=ROOT)  # this checkout's kvcached in a router started as a command
FAKE_ENGINE = [sys.executable, os.path.join(HERE, "router_fake_engine.py")]


def fake_model(port: int, **fields) -> dict:
    """A model entry whose engine is tests/router_fake_engine.py (env FAKE_* from `fields['env']`)."""
    return {"command": FAKE_ENGINE, "port": port, "kvcached": False, "start_timeout_s": 60, **fields}


class RouterThread:
    """A router (app.start) on its own event loop in a thread; `router` is the live Router for assertions."""

    def __init__(self, doc: dict, free_bytes: Optional[Callable[[str], int]] = None) -> None:
        self.config: RouterConfig = parse_config(doc)
        self.free_bytes = free_bytes
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "RouterThread":
        self.thread.start()
        arbiter = None
        if self.free_bytes is not None:
            arbiter = MemoryArbiter(lambda: self.router.models.values(), self.config.memory_reserve_bytes,
                                    self.free_bytes)
        self.router, self.runner = self.run(start(self.config, arbiter=arbiter))
        return self

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc) -> None:
        try:
            self.run(self.runner.cleanup())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config.port}"

    def model(self, name: str):
        return self.router.models[name]


def request(url: str, body=None, *, raw: Optional[bytes] = None, method: Optional[str] = None,
            timeout: float = 120.0) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one HTTP request; HTTP errors are answers too."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null"), dict(r.headers)
    except urllib.error.HTTPError as e:
        text = e.read()
        return e.code, json.loads(text) if text else None, dict(e.headers)


def complete(base: str, model: str, **extra) -> tuple[int, dict, dict]:
    return request(base + "/v1/completions", {"model": model, "prompt": "Hello", "max_tokens": 4, **extra})


def metrics(base: str) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus-client's own parser: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def state_of(samples: dict, model: str) -> str:
    (state,) = [dict(k[1])["state"] for k, v in samples.items() if k[0] == "kvcached_router_model_state"
                and dict(k[1])["model"] == model and v == 1.0]
    return state


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(0.1)
