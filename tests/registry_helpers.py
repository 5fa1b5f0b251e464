"""Helpers for the registry, kvctl and kvtop tests: unique names, child engines, kvctl runs, and cleanup.

Each test module gets its own directory in /dev/shm (KVCACHED_IPC_DIR, for this process and every child), so other
kvcached users of the machine, which clean dead segments when they start, never touch a test's segments, and the
tests never touch theirs. Whatever a test leaves there is removed after it, even when it fails; children are killed.
Names also start with a prefix made of this pytest process's pid.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Optional

import pytest

from kvcached import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(REPO, "tests", "registry_child.py")
PREFIX = f"kvt{os.getpid()}-"
PAGE = 16 << 20  # registry_child.py's page
_counter = itertools.count()


def env(**extra: str) -> dict:
    """The environment of a child: this process's (KVCACHED_IPC_DIR included), never a configured group."""
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("KVCACHED_IPC_GROUP", None)
    e.update(extra)
    return e


def unique(tag: str) -> str:
    return f"{PREFIX}{tag}-{next(_counter)}"


@pytest.fixture(scope="module", autouse=True)
def ipc_dir():
    """A private registry directory for the module's tests and their children."""
    path = os.path.join("/dev/shm", f"kvtest-{os.getpid()}-{time.monotonic_ns()}")
    os.mkdir(path, 0o700)
    patch = pytest.MonkeyPatch()
    patch.setenv("KVCACHED_IPC_DIR", path)
    yield path
    patch.undo()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def empty_ipc_dir(ipc_dir):
    """After each test (and after its other fixtures stopped their engines): remove what it left."""
    yield
    for entry in os.listdir(ipc_dir):
        try:
            os.unlink(os.path.join(ipc_dir, entry))
        except FileNotFoundError:
            pass


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# Child processes import torch and numpy; on a shared CI machine that alone can take minutes. Timeouts here only
# catch hangs, so they are generous: a test never passes or fails by how busy the machine is.
HANG_S = 300.0


class Engine:
    """registry_child.py in a subprocess."""

    def __init__(self, name: str, limit: Optional[int] = None) -> None:
        self.name = name
        argv = [sys.executable, CHILD, name] + ([] if limit is None else [str(limit)])
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env(),
                                     cwd=REPO)
        self.pid = self.proc.pid
        self._ready: Optional[dict] = None

    def wait_ready(self, timeout: float = HANG_S) -> dict:
        if self._ready is None:
            self._ready = self._read(timeout)
            assert self._ready.get("ready") == self.name, self._ready
        return self._ready

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"engine {self.name} did not answer (exit code {self.proc.poll()})")
        return json.loads(line)

    def cmd(self, text: str, timeout: float = HANG_S) -> dict:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def rss(self) -> int:
        return rss(self.pid)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.cmd("exit", timeout=HANG_S)
                self.proc.wait(10)
            except (AssertionError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


def kvctl(*args: str, input: Optional[str] = None, timeout: float = HANG_S, **extra_env: str):
    return subprocess.run([sys.executable, "-m", "kvcached.cli.kvctl", *args], input=input, capture_output=True,
                          text=True, env=env(**extra_env), cwd=REPO, timeout=timeout)


def kvctl_json(*names: str) -> dict:
    out = kvctl("list", "--json", *names)
    assert out.returncode == 0, out.stderr
    return {r["name"]: r for r in json.loads(out.stdout)}


@dataclass(frozen=True)
class FakeStats:
    """What MemoryStats carries (registry.py reads only these attributes); no torch needed."""

    limit_bytes: int
    used_bytes: int
    premapped_bytes: int = 0
    page_bytes: int = PAGE
    virtual_bytes: int = 16 * PAGE


class FakeEngine:
    """A Registration in this process over fixed figures; apply_limit records its calls, as KVCacheManager.resize."""

    def __init__(self, name: Optional[str], used: int = PAGE, premapped: int = 0, limit: Optional[int] = None,
                 total: int = 64 * PAGE, explicit_limit: Optional[int] = None, devices: tuple[str, ...] = ("cpu",),
                 fail: bool = False) -> None:
        self.stats = FakeStats(16 * PAGE if limit is None else limit, used, premapped)
        self.applied: list[tuple[float, Optional[int]]] = []
        self.fail = fail
        self.reg: Optional[registry.Registration] = None
        self.reg = registry.Registration.open(
            name, devices=devices, virtual_bytes=16 * PAGE, device_total_bytes=total, explicit_limit=explicit_limit,
            stats=lambda: self.stats, apply_limit=self.apply)
        self.name = self.reg.name

    def apply(self, limit: Optional[int]) -> None:
        self.applied.append((time.monotonic(), limit))
        if self.fail:
            raise RuntimeError("apply_limit failed on purpose")
        self.set(limit_bytes=16 * PAGE if limit is None else limit)

    def set(self, **fields: int) -> None:
        self.stats = replace(self.stats, **fields)
        if self.reg is not None:
            self.reg.publish(self.stats)

    def close(self) -> None:
        self.reg.close()


# A process holding a FakeEngine until killed: prints "ready" once registered.
FAKE_CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from registry_helpers import FakeEngine, PAGE
engine = FakeEngine(sys.argv[1], used=int(sys.argv[2]) * PAGE, devices=tuple(sys.argv[3].split(",")))
print("ready", flush=True)
time.sleep(600)
"""


def start_fake_child(name: str, pages: int = 1, devices: tuple[str, ...] = ("cpu",),
                     **extra_env: str) -> subprocess.Popen:
    code = FAKE_CHILD.format(tests=os.path.join(REPO, "tests"))
    proc = subprocess.Popen([sys.executable, "-c", code, name, str(pages), ",".join(devices)], stdout=subprocess.PIPE,
                            text=True, env=env(**extra_env), cwd=REPO)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    assert ready and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.fixture
def fakes():
    """make(name, **kw) -> a FakeEngine in this process; all are closed and leftovers removed afterwards."""
    made: list[FakeEngine] = []

    def make(name: Optional[str] = None, **kw) -> FakeEngine:
        engine = FakeEngine(unique("f") if name is None else name, **kw)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


@pytest.fixture
def engines():
    """start(*tags) -> engines with unique names, started in parallel; start(name=..., limit=...) -> one engine under
    that name. All are stopped and their segments removed at the end."""
    started: list[Engine] = []

    def start(*tags: str, name: Optional[str] = None, limit: Optional[int] = None) -> list[Engine]:
        batch = [Engine(name, limit)] if name else [Engine(unique(tag)) for tag in tags]
        started.extend(batch)
        for engine in batch:
            engine.wait_ready()
        return batch

    yield start
    for engine in started:
        engine.stop()


@pytest.fixture
def children():
    """A list to put subprocesses in: each is killed (if still running) and reaped afterwards."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
