"""`kvctl metrics`: the registry's Prometheus exporter (kvcached/cli/metrics_exporter.py) in its own process, against
real engines (tests/registry_child.py: a KVCacheManager on the host backend registered in a private registry directory)."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from registry_helpers import (  # noqa: F401 (fixtures)
    PAGE, REPO, Engine, empty_ipc_dir, env, fakes, ipc_dir, unique,
)

from kvcached import registry

PORT = 8560
KVCTL_METRICS = [sys.executable, "-m", "kvcached.cli.kvctl", "metrics", "--port", str(PORT), "--host", "127.0.0.1"]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def exporter():
    proc = subprocess.Popen(KVCTL_METRICS, env=env(), cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith(f"kvcached metrics at http://127.0.0.1:{PORT}/metrics")
    yield proc
    proc.terminate()
    assert proc.wait(10) == 0  # SIGTERM is a clean stop


def test_byte_gauges_equal_the_registry_and_dead_instances_export_only_alive_0(exporter):
    busy, idle, dead = (Engine(unique(tag)) for tag in ("busy", "idle", "dead"))
    engines = [busy, idle, dead]
    try:
        for e in engines:
            e.wait_ready()
        assert busy.cmd("alloc 40")["ok"]  # 40 blocks of 32 per page: 2 pages in use
        dead.kill9()
        samples = scrape(PORT)
        for e in (busy, idle):
            record = registry.read_instance(e.name)
            for field in ("used_bytes", "premapped_bytes", "limit_bytes"):
                assert samples[(f"kvcached_instance_{field}", (("device", "cpu"), ("instance", e.name)))] == \
                    getattr(record, field)
            assert samples[("kvcached_instance_alive", (("instance", e.name),))] == 1.0
        assert samples[("kvcached_instance_used_bytes", (("device", "cpu"), ("instance", busy.name)))] == 2 * PAGE
        assert samples[("kvcached_instance_alive", (("instance", dead.name),))] == 0.0
        assert not [k for k in samples if k[0].endswith("_bytes") and ("instance", dead.name) in k[1]]
    finally:
        for e in engines:
            e.stop()


def test_a_tensor_parallel_instance_exports_per_device_bytes_and_its_number_of_devices(exporter, fakes):
    tp = fakes(used=3 * PAGE, premapped=PAGE, limit=8 * PAGE, devices=("cpu", "cpu"))
    gpus = fakes(used=2 * PAGE, devices=("cuda:0", "cuda:1", "cuda:2", "cuda:3"))
    one = fakes(used=PAGE)
    samples = scrape(PORT)
    for record, label, figures in ((tp, "cpu x2", (3 * PAGE, PAGE, 8 * PAGE, 2)),
                                   (gpus, "cuda:0,1,2,3", (2 * PAGE, 0, 16 * PAGE, 4)),
                                   (one, "cpu", (PAGE, 0, 16 * PAGE, 1))):
        labels = (("device", label), ("instance", record.name))
        assert tuple(samples[(f"kvcached_instance_{f}", labels)] for f in ("used_bytes", "premapped_bytes",
                                                                           "limit_bytes", "devices")) == figures


def test_a_busy_port_is_one_line_on_stderr(exporter):
    done = subprocess.run(KVCTL_METRICS, env=env(), cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.startswith(f"kvctl: error: cannot listen on 127.0.0.1:{PORT}: ")
    assert done.stderr.count("\n") == 1
