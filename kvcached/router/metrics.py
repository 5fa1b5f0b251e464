"""The router's /metrics: per model state, requests, errors, queue depth, TTFT, wake and cold-start seconds; plus
the kvcached registry's per-instance memory (used, premapped, limit bytes).

Note: counters and histograms are updated where things happen; state, queue depth and in-flight requests are read
from the models at scrape time (a collector), so /metrics can never disagree with the router's own state. Requests
refused before a model is known (400, 404, 413) are counted by status code only: a label per unknown model name
would let any client grow the metric without bound.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from ..cli.metrics_exporter import RegistryCollector
from .lifecycle import ModelLifecycle, State

SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
START_SECONDS = (1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RouterMetrics:
    """The router's Prometheus registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvcached_router_requests", "requests routed to a model", ["model"], registry=r)
        self.errors = Counter("kvcached_router_errors", "failed requests and engine failures, by kind: unavailable "
                              "(503 from the router), engine (the engine answered 5xx), broken (the connection to "
                              "the engine broke), crash, start_failed", ["model", "kind"], registry=r)
        self.rejected = Counter("kvcached_router_rejected", "requests refused before routing (bad JSON, unknown "
                                "model, body too large), by status code", ["code"], registry=r)
        self.restarts = Counter("kvcached_router_restarts", "engine restarts after a crash or a hang", ["model"],
                                registry=r)
        self.ttft = Histogram("kvcached_router_ttft_seconds", "from the request's arrival at the router to the first "
                              "byte of the engine's answer (waiting for a start or wake included)", ["model"],
                              buckets=SECONDS, registry=r)
        self.wake = Histogram("kvcached_router_wake_seconds", "seconds for a sleeping engine to wake", ["model"],
                              buckets=SECONDS, registry=r)
        self.cold_start = Histogram("kvcached_router_cold_start_seconds", "seconds from starting an engine process "
                                    "to its first healthy answer", ["model"], buckets=START_SECONDS, registry=r)
        r.register(RegistryCollector())

    def watch_models(self, models: Callable[[], Iterable[ModelLifecycle]]) -> None:
        self.registry.register(_ModelCollector(models))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ModelCollector:
    def __init__(self, models: Callable[[], Iterable[ModelLifecycle]]) -> None:
        self.models = models

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily("kvcached_router_model_state", "1 for the model's current state, 0 for the others",
                                  labels=["model", "state"])
        queue = GaugeMetricFamily("kvcached_router_queue_depth", "requests waiting for the model to start or wake",
                                  labels=["model"])
        in_flight = GaugeMetricFamily("kvcached_router_in_flight", "requests being served", labels=["model"])
        sleep = GaugeMetricFamily("kvcached_router_sleep_supported", "1 when the engine honoured sleep, 0 when it "
                                  "did not (absent until the first sleep)", labels=["model"])
        for m in self.models():
            for s in State:
                state.add_metric([m.cfg.name, s.value], 1.0 if m.state is s else 0.0)
            queue.add_metric([m.cfg.name], m.queue.depth)
            in_flight.add_metric([m.cfg.name], m.in_flight)
            if m.sleep_supported is not None:
                sleep.add_metric([m.cfg.name], 1.0 if m.sleep_supported else 0.0)
        yield from (state, queue, in_flight, sleep)
