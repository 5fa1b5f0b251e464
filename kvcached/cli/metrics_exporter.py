"""Prometheus gauges of the kvcached registry: memory of every instance on this machine, for operators and the router.

Note (why): `kvctl list` shows the registry to a person; Prometheus needs the same numbers scraped. The collector reads
the shared-memory records at each scrape (no polling thread, no state of its own) and exports, per live instance of
this user: used, premapped (mapped but not yet holding blocks) and limit bytes, labelled with the instance name and
device. The bytes are one device's: a tensor-parallel instance has them on each of its devices (its device label
reads "cuda:0,1" or "cpu x2"), and `kvcached_instance_devices` gives their number, so that the instance's total is
used x devices. A dead instance's last figures are not memory anyone holds, so only `kvcached_instance_alive` 0 is
exported for it. The router serves these from its own /metrics; without a router, `kvctl metrics --port 9400` serves
them alone.
"""

from __future__ import annotations

import signal
import threading
from typing import Iterator, Optional

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from kvcached.devices import devices_label
from kvcached.registry import list_instances

GAUGES = (
    ("kvcached_instance_used_bytes", "KV cache bytes holding blocks in use, on each of the instance's devices",
     "used_bytes"),
    ("kvcached_instance_premapped_bytes", "bytes mapped ahead of demand (the reserve), not yet in use, on each device",
     "premapped_bytes"),
    ("kvcached_instance_limit_bytes", "the instance's memory limit in bytes, per device", "limit_bytes"),
    ("kvcached_instance_devices", "devices the instance spans (tensor-parallel ranks), each holding the bytes above",
     "num_devices"),
)


class RegistryCollector:
    """Collects the registry's records at scrape time."""

    def __init__(self, names: Optional[list[str]] = None) -> None:
        self.names = names

    def collect(self) -> Iterator[Metric]:
        records = [r for r in list_instances(self.names, missing_ok=True) if r.status in ("alive", "dead")]
        alive = GaugeMetricFamily("kvcached_instance_alive", "1 while the instance's process lives", labels=["instance"])
        families = [GaugeMetricFamily(name, doc, labels=["instance", "device"]) for name, doc, _ in GAUGES]
        for record in records:
            alive.add_metric([record.name], 1.0 if record.alive else 0.0)
            if record.alive:
                for family, (_, _, field) in zip(families, GAUGES):
                    family.add_metric([record.name, devices_label(record.devices)], float(getattr(record, field)))
        yield alive
        yield from families


def serve(port: int, host: str = "0.0.0.0") -> None:
    """Serve the registry's gauges at http://host:port/metrics until SIGINT or SIGTERM (handlers restored after)."""
    registry = CollectorRegistry()
    registry.register(RegistryCollector())
    server, thread = start_http_server(port, addr=host, registry=registry)
    print(f"kvcached metrics at http://{host}:{port}/metrics (Ctrl-C stops)", flush=True)
    done = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: done.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        done.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.shutdown()
        thread.join(timeout=5)

