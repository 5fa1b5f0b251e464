"""kvtop: its screen as data (render.py), its device bars, and the real curses program under tmux."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import types

import pytest

from kvcached import registry
from kvcached.cli import devices
from kvcached.devices import Nvml
from kvcached.cli.render import bar, plain, render
from kvcached.registry import InstanceRecord
from waiting import wait_until
from registry_helpers import (  # noqa: F401 (fixtures)
    empty_ipc_dir, ipc_dir, PAGE, PREFIX, REPO, children, env, fakes, start_fake_child, unique,
)

MiB = 1 << 20


def _record(name: str, status: str = "alive", used: int = 0, premapped: int = 0, limit: int = 0,
            **kw) -> InstanceRecord:
    base = dict(pid=4242, device="cpu", backend="host", virtual_bytes=256 * MiB, device_total_bytes=1 << 34)
    base.update(kw)
    return InstanceRecord(name=name, status=status, uid=0, used_bytes=used, premapped_bytes=premapped,
                          limit_bytes=limit, **base)


def _text(line) -> str:
    return "".join(text for text, _ in line)


def test_bar_cells_are_proportional():
    assert _text(bar(12, 100, 50, 20)) == "[|||||::   ]"
    assert _text(bar(12, 100, 0, 0)) == "[          ]"
    assert _text(bar(12, 100, 100, 0)) == "[||||||||||]"
    assert _text(bar(12, 100, 150, 0)) == "[||||||||||]"  # a deficit fills the bar, in the "over" style
    assert [style for _, style in bar(12, 100, 150, 0)][1] == "over"
    assert _text(bar(12, 0, 0, 0)) == "[          ]"  # a zero limit does not divide by zero
    assert bar(2, 100, 50) == []


def test_screen_fits_80x24_with_exact_numbers():
    records = [
        _record("llama-8b", used=48 * MiB, premapped=32 * MiB, limit=128 * MiB),
        _record("qwen-over", used=160 * MiB, limit=128 * MiB),
        _record("crashed", status="dead", used=16 * MiB, limit=256 * MiB),
        InstanceRecord(name="someone-else", status="foreign", uid=1000, reason="owned by alice"),
    ]
    host = devices.DeviceMemory("HOST", total=16 << 30, used=4 << 30)
    gpu = devices.DeviceMemory("GPU1 NVIDIA H100", total=80 << 30, used=60 << 30)
    lines = render(records, [host, gpu], 80, 24, 0.5, "12:00:00")
    assert len(lines) <= 24 and all(len(_text(line)) <= 80 for line in lines)
    screen = plain(lines).splitlines()
    assert screen[0].startswith("kvtop  4 instance(s)  every 0.5s") and screen[0].endswith("12:00:00")
    assert screen[1].startswith("HOST ") and screen[1].endswith(" 4G/16G (25%)") and len(screen[1]) == 80
    assert screen[2].startswith("GPU1 NVIDIA H100 ") and screen[2].endswith(" 60G/80G (75%)")
    assert screen[4].startswith("llama-8b             alive      4242 cpu     [")
    assert screen[5] == "  Prealloc 32M | Used 48M / Limit 128M (38%) | Free 48M"
    assert screen[7] == "  Prealloc 0B | Used 160M / Limit 128M (125%) | Free 0B | over by 32M"
    assert screen[8].startswith("crashed              DEAD ")
    assert [s for t, s in lines[8] if "DEAD" in t] == ["dead"]
    assert screen[9] == "  Prealloc 0B | Used 16M / Limit 256M (6%) | Free 240M"
    assert screen[10].startswith("someone-else         foreign") and screen[11] == "  owned by alice"


def test_too_many_instances_are_counted_not_drawn_off_screen():
    records = [_record(f"inst-{i:02d}", used=MiB, limit=4 * MiB) for i in range(30)]
    lines = render(records, [devices.DeviceMemory("HOST", 1 << 30, 1 << 29)], 80, 24, 1.0)
    screen = plain(lines).splitlines()
    assert len(screen) == 24
    shown = sum(line.startswith("inst-") for line in screen)
    assert screen[-1] == f"... {30 - shown} more instance(s): enlarge the window" and shown == 10
    tiny = render(records, [], 20, 5, 1.0)
    assert len(tiny) <= 5 and all(len(_text(line)) <= 20 for line in tiny)


def test_device_bars_use_nvml_by_uuid_and_report_its_absence(monkeypatch):
    gpu = _record("g", backend="cuda", device="cuda:0", gpu_id="GPU-1234")
    host = _record("h")
    calls = []
    fake = types.SimpleNamespace(
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetHandleByUUID=lambda uuid: calls.append(uuid) or "handle",
        nvmlDeviceGetHandleByIndex=lambda i: pytest.fail("looked up by index"),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=80 << 30, used=20 << 30, free=60 << 30),
        nvmlDeviceGetName=lambda h: b"NVIDIA H100",
        nvmlDeviceGetIndex=lambda h: 3,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    nvml = Nvml()
    bars = devices.device_memory([gpu, host, gpu], nvml)
    nvml.close()
    assert bars[0].label == "HOST" and bars[0].total > 0
    assert bars[1] == devices.DeviceMemory("GPU3 NVIDIA H100", 80 << 30, 20 << 30)
    assert calls == ["init", "GPU-1234", "shutdown"]

    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: the bar says so, nothing raises
    (missing,) = devices.device_memory([gpu], Nvml())
    assert missing.error.startswith("reading GPU memory needs NVML: pip install nvidia-ml-py") and missing.total == 0


def test_tensor_parallel_instances_show_their_devices_and_count_once_per_rank_on_each_device_bar(monkeypatch):
    """kvtop's device bars carry the KV the live instances have mapped there, an instance once per rank on each:
    on cuda:0,1 on both GPUs' bars, on the host with two ranks twice on the host's."""
    tp_gpu = _record("tp-gpu", used=48 * MiB, premapped=16 * MiB, limit=128 * MiB, backend="cuda", device="cuda:0",
                     gpu_id="GPU-a", devices=("cuda:0", "cuda:1"), gpu_ids=("GPU-a", "GPU-b"))
    one_gpu = _record("one-gpu", used=32 * MiB, backend="cuda", device="cuda:1", gpu_id="GPU-b")
    dead_gpu = _record("dead-gpu", status="dead", used=16 * MiB, backend="cuda", device="cuda:2", gpu_id="GPU-c")
    tp_host = _record("tp-host", used=48 * MiB, premapped=16 * MiB, limit=128 * MiB, devices=("cpu", "cpu"))
    one_host = _record("one-host", used=8 * MiB, limit=64 * MiB)
    index = {"GPU-a": 0, "GPU-b": 1, "GPU-c": 2}
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetHandleByUUID=lambda uuid: uuid,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=80 << 30, used=10 << 30, free=70 << 30),
        nvmlDeviceGetName=lambda h: "H100", nvmlDeviceGetIndex=lambda h: index[h],
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    nvml = Nvml()
    bars = devices.device_memory([tp_gpu, one_gpu, dead_gpu, tp_host, one_host], nvml)
    nvml.close()
    assert [(b.label, b.kv) for b in bars] == [("HOST", 2 * 64 * MiB + 8 * MiB), ("GPU0 H100", 64 * MiB),
                                               ("GPU1 H100", 64 * MiB + 32 * MiB), ("GPU2 H100", 0)]

    lines = render([tp_host, tp_gpu, one_host], [devices.DeviceMemory("HOST", 16 << 30, 4 << 30, kv=136 * MiB)],
                   80, 24, 1.0)
    screen = plain(lines).splitlines()
    assert screen[1].startswith("HOST ") and screen[1].endswith(" 4G/16G (25%) KV 136M") and len(screen[1]) == 80
    assert screen[3].startswith("tp-host              alive      4242 cpu x2  [")
    assert screen[4] == "  Prealloc 16M | Used 48M / Limit 128M (38%) | Free 64M | x2 devices: Used 96M"
    assert screen[5].startswith("tp-gpu               alive      4242 cuda x2 [")  # cuda:0,1 is wider than 7
    assert screen[7].startswith("one-host             alive      4242 cpu     [")  # one device: as before
    assert screen[8] == "  Prealloc 0B | Used 8M / Limit 64M (12%) | Free 56M"


def test_once_and_errors(fakes):
    e = fakes(used=2 * PAGE, limit=8 * PAGE)
    run = lambda *a: subprocess.run([sys.executable, "-m", "kvcached.cli.kvtop", *a], capture_output=True, text=True,
                                    env=env(COLUMNS="80", LINES="24"), cwd=REPO, timeout=60)
    out = run("--once", e.name)
    assert out.returncode == 0 and "  Prealloc 0B | Used 32M / Limit 128M (25%) | Free 96M\n" in out.stdout
    assert out.stdout.splitlines()[1].endswith(" KV 32M")  # the host bar: one rank of this instance
    tp = fakes(used=2 * PAGE, limit=8 * PAGE, devices=("cpu", "cpu"))
    out = run("--once", tp.name, e.name)
    assert out.returncode == 0, out.stderr
    assert "  Prealloc 0B | Used 32M / Limit 128M (25%) | Free 96M | x2 devices: Used 64M\n" in out.stdout
    assert out.stdout.splitlines()[1].endswith(" KV 96M")  # two ranks of one, one of the other
    for argv, code, text in [((e.name,), 2, "needs a terminal"), (("--refresh", "0"), 2, "seconds > 0"),
                             (("nobody-here",), 1, "unknown instance"), (("../x", "--once"), 1, "invalid IPC name")]:
        out = run(*argv)
        assert out.returncode == code and out.stdout == "", out
        assert len(out.stderr.splitlines()) == 1 and text in out.stderr and out.stderr.startswith("kvtop: error: ")


class Tmux:
    """A private tmux server (its own socket) running one command in an 80x24 window."""

    def __init__(self, command: str) -> None:
        self.socket = f"kvtest-{os.getpid()}-{time.monotonic_ns()}"
        self("new-session", "-d", "-s", "top", "-x", "80", "-y", "24", command)

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=20)

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top").stdout

    def wait_for(self, *texts: str, timeout: float = 30.0) -> str:
        def shown() -> str:
            screen = self.screen()
            return screen if all(t in screen for t in texts) else ""

        found = wait_until(shown, timeout, 0.05)
        assert found, f"{texts} not on the screen:\n{self.screen()}"
        return found

    def alive(self) -> bool:
        return self("has-session", "-t", "top").returncode == 0

    def close(self) -> None:
        self("kill-server")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")
def test_kvtop_under_tmux_shows_instances_redraws_and_quits(fakes, children):
    a = fakes(used=3 * PAGE, premapped=2 * PAGE, limit=8 * PAGE)
    b = fakes(used=PAGE, limit=16 * PAGE)
    dead_name = unique("dead")
    victim = start_fake_child(dead_name, pages=2)
    children.append(victim)
    victim.kill()
    victim.wait(10)
    names = [a.name, b.name, dead_name]
    tmux = Tmux(f"cd {REPO} && PYTHONPATH={REPO} KVCACHED_IPC_DIR={registry.shm_dir()} exec {sys.executable} "
                f"-m kvcached.cli.kvtop {' '.join(names)} --refresh 0.2")
    try:
        screen = tmux.wait_for(a.name, b.name, dead_name, "Limit 128M")
        lines = screen.splitlines()
        assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
        assert lines[0].startswith("kvtop  3 instance(s)  every 0.2s") and lines[1].startswith("HOST ")
        row = {line.split()[0]: i for i, line in enumerate(lines) if line.startswith(PREFIX)}
        assert lines[row[a.name]].split()[1:3] == ["alive", str(os.getpid())]
        assert lines[row[a.name] + 1] == "  Prealloc 32M | Used 48M / Limit 128M (38%) | Free 48M"
        assert lines[row[b.name] + 1] == "  Prealloc 0B | Used 16M / Limit 256M (6%) | Free 240M"
        assert lines[row[dead_name]].split()[1] == "DEAD"
        assert lines[row[dead_name] + 1] == "  Prealloc 0B | Used 32M / Limit 256M (12%) | Free 224M"

        registry.request_limit(b.name, 4 * PAGE)  # the screen follows the record
        tmux.wait_for("  Prealloc 0B | Used 16M / Limit 64M (25%) | Free 48M")

        resized = tmux("resize-window", "-t", "top", "-x", "120", "-y", "30")  # KEY_RESIZE: redrawn at the new size
        assert resized.returncode == 0, resized.stderr
        screen = tmux.wait_for("Limit 64M")
        wide = wait_until(lambda: max(len(line) for line in tmux.screen().splitlines()) > 100, 10.0, 0.05)
        assert wide, tmux.screen()

        tmux("send-keys", "-t", "top", "q")
        assert wait_until(lambda: not tmux.alive(), 10.0, 0.05), "kvtop did not quit on q"
    finally:
        tmux.close()
