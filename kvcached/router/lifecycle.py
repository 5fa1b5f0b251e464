"""One served model's life: stopped, starting, running, sleeping, waking; driven by requests, idleness and crashes.

Note (how): every change of state runs as one task at a time (`_task`): a start, a wake, a sleep, a stop or a
recovery. A request that finds the model not running waits in the model's bounded queue for that task (shielded, so
a waiter's timeout never cancels a start other requests need) and starts the next one if none runs. A watcher task
per owned model checks, every `health_interval_s`: the process (exited -> crash), `/health` (`health_failures` misses
in a row -> hung), and idleness: `sleep_after_s` without requests -> sleep, `stop_after_s` -> stop. A crash is
recovered by stopping the rest of the process group and starting again after a backoff that doubles per consecutive
failure (reset after `restart_backoff_max_s` of healthy running). An engine that does not honour sleep (vLLM's CPU
build; see engine_api) is marked so and keeps running until stop_after_s. External engines (`url`) are only proxied.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator, Coroutine, Optional

from .config import ModelConfig, RouterConfig
from .engine import EngineProcess
from .engine_api import EngineAPI
from .queueing import NotReady, WaitQueue

if TYPE_CHECKING:
    import aiohttp

    from .memory import MemoryArbiter
    from .metrics import RouterMetrics

logger = logging.getLogger("kvcached.router")


class State(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    SLEEPING = "sleeping"
    WAKING = "waking"


class ModelLifecycle:
    """The state machine of one served model and, for an owned engine, its process."""

    def __init__(self, cfg: ModelConfig, router: RouterConfig, session: "aiohttp.ClientSession",
                 metrics: "RouterMetrics", arbiter: "MemoryArbiter") -> None:
        self.cfg, self.router, self.metrics, self.arbiter = cfg, router, metrics, arbiter
        self.api = EngineAPI(session, cfg.base_url)
        self.queue = WaitQueue(router.queue_size, router.queue_timeout_s)
        self.state = State.STOPPED if cfg.owned else State.RUNNING
        self.engine: Optional[EngineProcess] = None
        self.in_flight = 0
        self.last_used = time.monotonic()
        self.sleep_supported: Optional[bool] = None  # learnt at the first sleep
        self.failures = 0  # consecutive crashes or failed starts
        self.not_before = 0.0  # no (re)start before this monotonic time: the backoff
        self.should_run = cfg.preload  # start (again) without waiting for a request: preload, or after a crash
        self.running_since = 0.0
        self.last_start_s = 0.0
        self._task: Optional[asyncio.Task] = None
        self._watcher: Optional[asyncio.Task] = None
        self._health_misses = 0
        self._closing = False

    # ---- requests

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        """Hold the model running for one request; yields the engine's base URL. Raises NotReady (-> 503)."""
        if self.state is not State.RUNNING or self.busy:
            await self.queue.wait(self._until_running, self.retry_after_s)
        self.in_flight += 1
        self.last_used = time.monotonic()
        try:
            yield self.cfg.base_url
        finally:
            self.in_flight -= 1
            self.last_used = time.monotonic()

    async def _until_running(self) -> None:
        while self.state is not State.RUNNING or self.busy:
            if self._closing:
                raise NotReady("the router is stopping", 5)
            if not self.busy:
                self._begin(self._bring_up())
            await asyncio.shield(self._task)

    def retry_after_s(self) -> float:
        return max(self.not_before - time.monotonic(), self.last_start_s, 1.0)

    async def engine_unreachable(self) -> None:
        """A request could not reach the engine: a refused or reset connection usually means the process is dying,
        so watch it for a moment and start the recovery at once rather than at the next health check."""
        if not self.cfg.owned:
            raise NotReady(f"the engine at {self.cfg.base_url} does not answer", self.router.health_interval_s)
        deadline = time.monotonic() + 2.0
        while not self.busy and self.state is State.RUNNING and time.monotonic() < deadline:
            if self.engine is None or self.engine.exit_code() is not None:
                await self._check_process()
                return
            await asyncio.sleep(0.1)

    # ---- what the memory arbiter asks

    @property
    def busy(self) -> bool:
        """A transition is under way."""
        return self._task is not None and not self._task.done()

    @property
    def evictable(self) -> bool:
        return (self.cfg.owned and not self.busy and self.in_flight == 0 and self.queue.depth == 0
                and self.state in (State.RUNNING, State.SLEEPING))

    async def give_memory_back(self) -> None:
        """Sleep if running and sleep is honoured, else stop. Runs as this model's transition."""
        if self.state is State.RUNNING and self.sleep_supported is not False and self.cfg.sleep_after_s is not None:
            self._begin(self._sleep())
        else:
            self._begin(self._stop("memory is needed by another model"))
        await asyncio.shield(self._task)

    # ---- transitions (each runs as self._task)

    def _begin(self, coro: Coroutine) -> None:
        assert not self.busy, "one transition at a time"
        self._task = asyncio.get_running_loop().create_task(coro)
        self._task.add_done_callback(_retrieve)

    async def _bring_up(self) -> None:
        if self.state is State.SLEEPING:
            await self._wake()
        else:
            await self._start()

    async def _start(self) -> None:
        delay = self.not_before - time.monotonic()
        if delay > 0:
            logger.info("%s: restart in %.1fs (backoff after %d failure(s))", self.cfg.name, delay, self.failures)
            await asyncio.sleep(delay)
        self.state = State.STARTING
        try:
            await self.arbiter.make_room(self)
            began = time.monotonic()
            log = os.path.join(self.router.log_dir or ".", f"engine-{self.cfg.name}.log")
            self.engine = EngineProcess(self.cfg.name, self.cfg.argv(), self.cfg.environment(dict(os.environ)), log)
            self.engine.start()
            logger.info("%s: starting engine (pid %d, log %s)", self.cfg.name, self.engine.pid, log)
            error = await self._wait_healthy(began)
        finally:
            self.arbiter.done(self)
        if error:
            await self._fail_start(error)
        took = time.monotonic() - began
        self.last_start_s, self.running_since, self.should_run = took, time.monotonic(), False
        self._health_misses = 0
        self.state = State.RUNNING
        self.last_used = time.monotonic()
        self.metrics.cold_start.labels(self.cfg.name).observe(took)
        logger.info("%s: running after a cold start of %.1fs", self.cfg.name, took)

    async def _wait_healthy(self, began: float) -> str:
        """'' once /health answers 200; else why not (the process exited, or start_timeout_s passed)."""
        while True:
            code = self.engine.exit_code()
            if code is not None:
                return f"the engine exited with code {code} while starting"
            if await self.api.healthy(timeout_s=2.0):
                return ""
            if time.monotonic() - began > self.cfg.start_timeout_s:
                return f"the engine was not healthy within start_timeout_s={self.cfg.start_timeout_s:g}"
            await asyncio.sleep(0.5)

    async def _fail_start(self, error: str) -> None:
        tail = self.engine.log_tail(5) if self.engine else ""
        await self._stop_engine()
        self.failures += 1
        backoff = self._backoff()
        self.not_before = time.monotonic() + backoff
        self.state = State.STOPPED
        self.metrics.errors.labels(self.cfg.name, "start_failed").inc()
        logger.error("%s: %s; next try in %.0fs; engine log ends with:\n%s", self.cfg.name, error, backoff, tail)
        raise NotReady(f"model {self.cfg.name!r} could not start: {error}", backoff)

    def _backoff(self) -> float:
        return min(self.router.restart_backoff_s * 2 ** max(self.failures - 1, 0), self.router.restart_backoff_max_s)

    async def _wake(self) -> None:
        self.state = State.WAKING
        began = time.monotonic()
        try:
            await self.arbiter.make_room(self)
            answer = await self.api.wake_up()
        finally:
            self.arbiter.done(self)
        if not answer.ok:
            logger.error("%s: wake_up answered %s %s: restarting the engine", self.cfg.name, answer.status,
                         answer.body[:200])
            await self._recover(f"wake_up failed ({answer.status})")
            return
        self.state, self.last_used = State.RUNNING, time.monotonic()
        took = time.monotonic() - began
        self.metrics.wake.labels(self.cfg.name).observe(took)
        logger.info("%s: awake after %.2fs", self.cfg.name, took)

    async def _sleep(self) -> None:
        self.state = State.SLEEPING
        answer = await self.api.sleep(self.cfg.sleep_level)
        sleeping = await self.api.is_sleeping() if answer.ok else None
        if sleeping is True:
            self.sleep_supported = True
            logger.info("%s: asleep (level %d) after %.0fs idle", self.cfg.name, self.cfg.sleep_level,
                        time.monotonic() - self.last_used)
            return
        self.sleep_supported, self.state = False, State.RUNNING
        logger.warning("%s: the engine does not honour sleep (POST /sleep answered %s %r, /is_sleeping %s): it keeps "
                       "running until stop_after_s", self.cfg.name, answer.status or "nothing", answer.body[:200],
                       sleeping)

    async def _stop(self, reason: str) -> None:
        """The state says stopped once no process of the group is left (requests meanwhile wait: busy)."""
        self.should_run = False
        logger.info("%s: stopping the engine (%s)", self.cfg.name, reason)
        await self._stop_engine()
        self.state = State.STOPPED

    async def _stop_engine(self) -> None:
        if self.engine is not None:
            await self.engine.stop()
            self.engine = None

    async def _recover(self, reason: str) -> None:
        self.failures += 1
        self.metrics.errors.labels(self.cfg.name, "crash").inc()
        self.metrics.restarts.labels(self.cfg.name).inc()
        logger.error("%s: %s: stopping what is left of its process group and starting again", self.cfg.name, reason)
        self.state, self.should_run = State.STOPPED, True
        await self._stop_engine()
        self.not_before = time.monotonic() + self._backoff()
        await self._start()

    # ---- the watcher

    def start_watching(self) -> None:
        if self.cfg.owned:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.router.health_interval_s)
            if self.busy or self._closing:
                continue
            try:
                await self._watch_once()
            except Exception:  # the watcher must outlive any one bad check
                logger.exception("%s: watcher error", self.cfg.name)

    async def _watch_once(self) -> None:
        now = time.monotonic()
        if self.state is State.STOPPED:
            if self.should_run and now >= self.not_before:
                self._begin(self._start())
            return
        if await self._check_process() or self.busy:
            return
        if self.failures and now - self.running_since > self.router.restart_backoff_max_s:
            self.failures = 0
        if self.in_flight or self.queue.depth:
            return
        idle = now - self.last_used
        if self.cfg.stop_after_s is not None and idle >= self.cfg.stop_after_s:
            self._begin(self._stop(f"idle for {idle:.0f}s, stop_after_s={self.cfg.stop_after_s:g}"))
        elif (self.state is State.RUNNING and self.cfg.sleep_after_s is not None and idle >= self.cfg.sleep_after_s
              and self.sleep_supported is not False):
            self._begin(self._sleep())

    async def _check_process(self) -> bool:
        """Start a recovery when the engine died or stopped answering /health; True when one was started."""
        code = self.engine.exit_code() if self.engine else None
        if code is not None:
            self._begin(self._recover(f"the engine exited with code {code}"))
            return True
        if self.state is not State.RUNNING:
            return False
        if await self.api.healthy():
            self._health_misses = 0
            return False
        self._health_misses += 1
        if self._health_misses >= self.router.health_failures and not self.busy:
            self._begin(self._recover(f"/health failed {self._health_misses} times in a row"))
            return True
        return False

    # ---- shutdown

    async def close(self) -> None:
        """Stop watching, end any transition, stop the engine (the whole process group)."""
        self._closing = True
        for task in (self._watcher, self._task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        await self._stop_engine()
        self.state = State.STOPPED if self.cfg.owned else self.state

    def kill_now(self) -> None:
        if self.engine is not None:
            self.engine.kill_now()


def _retrieve(task: asyncio.Task) -> None:
    """Transition errors reach the requests that wait on them; nobody else needs them logged twice."""
    if not task.cancelled():
        task.exception()
