"""One engine process the router owns: started in its own process group, watched, and stopped with all it spawned.

Note (why process groups): a vLLM server is a tree (API server, EngineCore, Worker). Killing the top process leaves
the others holding memory and the port; after a kill -9 of the API server its children even outlive it. The engine
therefore starts in a new session (setsid) and is stopped by signalling the whole group: SIGTERM, then SIGKILL after
a grace period, then waiting until no live member is left, so that the memory is really back when stop() returns and
a restart finds its port free. `kill_now()` is the synchronous last resort for interpreter exit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from typing import Optional

import psutil


class EngineProcess:
    """A command run as its own process group, its output appended to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: str) -> None:
        self.name, self.argv, self.env, self.log_path = name, argv, env, log_path
        self.proc: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        """Spawn the command (returns at once; readiness is the caller's /health poll)."""
        os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def exit_code(self) -> Optional[int]:
        """The leader's exit code once it has exited, else None (also None before start)."""
        return self.proc.poll() if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def group_pids(self) -> list[int]:
        """Live (non-zombie) members of the engine's process group, the leader first when it lives."""
        if self.proc is None:
            return []
        return _group_members(self.proc.pid)

    def tree_rss_bytes(self) -> int:
        """Resident bytes of the group's processes (shared pages counted once per process)."""
        total = 0
        for pid in self.group_pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        return total

    async def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the group, SIGKILL what is left after grace_s, and wait until no member lives. Idempotent."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.group_pids() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if self.group_pids():
            _signal_group(pgid, signal.SIGKILL)
            while self.group_pids():
                await asyncio.sleep(0.1)
        self.proc.poll()

    def kill_now(self) -> None:
        """SIGKILL the whole group at once (interpreter exit: no event loop to wait in)."""
        if self.proc is not None:
            _signal_group(self.proc.pid, signal.SIGKILL)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_members(pgid: int) -> list[int]:
    try:
        os.killpg(pgid, 0)  # cheap: no member at all (not even a zombie) -> ProcessLookupError
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error, PermissionError):
            continue
    members.sort(key=lambda pid: pid != pgid)
    return members
