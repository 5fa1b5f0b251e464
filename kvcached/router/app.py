"""The `kvcached-router` service: one OpenAI endpoint in front of many engines; wiring, signals and the command line.

Note (order): the config is checked and the router's own port bound before any engine starts, so a bad file or a
busy port costs nothing. On SIGINT (Ctrl-C) or SIGTERM the router stops taking requests and stops every engine it
owns, each as a whole process group; an atexit hook SIGKILLs any group still alive if the event loop died first.
"""

from __future__ import annotations

import argparse
import dataclasses
import asyncio
import atexit
import logging
import signal
import sys
from typing import Optional

import aiohttp
from aiohttp import web

from .config import RouterConfig, RouterConfigError, load_config
from .lifecycle import ModelLifecycle
from .memory import MemoryArbiter
from .metrics import CONTENT_TYPE, RouterMetrics
from .proxy import ApiError, Proxy

logger = logging.getLogger("kvcached.router")


class Router:
    """Models, their engines and the HTTP application, for one config."""

    def __init__(self, config: RouterConfig, *, arbiter: Optional[MemoryArbiter] = None) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.models: dict[str, ModelLifecycle] = {}
        self.arbiter = arbiter or MemoryArbiter(lambda: self.models.values(), config.memory_reserve_bytes)
        self.proxy: Optional[Proxy] = None
        self.metrics.watch_models(lambda: self.models.values())

    def application(self) -> web.Application:
        """The aiohttp app: its startup creates the models (no engine starts yet), its cleanup stops every engine."""
        app = web.Application(middlewares=[_errors_as_json])
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_post("/v1/completions", self._forward)
        app.router.add_post("/v1/chat/completions", self._forward)
        return app

    def begin(self) -> None:
        """Start the watchers: health checks, idle timers, preloads. Called once the router's port is bound."""
        atexit.register(self.kill_all_now)
        for model in self.models.values():
            model.start_watching()

    async def _open(self, app: web.Application) -> None:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                        connector=aiohttp.TCPConnector(limit=0))
        for name, cfg in self.config.models.items():
            self.models[name] = ModelLifecycle(cfg, self.config, session, self.metrics, self.arbiter)
        self.proxy = Proxy(self.models, session, self.metrics, self.config.max_body_bytes)

    async def _close(self, app: web.Application) -> None:
        await asyncio.gather(*(m.close() for m in self.models.values()))
        if self.proxy is not None:
            await self.proxy.session.close()
        atexit.unregister(self.kill_all_now)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _list_models(self, request: web.Request) -> web.Response:
        return await self.proxy.list_models(request)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        return await self.proxy.forward(request)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    def kill_all_now(self) -> None:
        for model in self.models.values():
            model.kill_now()


@web.middleware
async def _errors_as_json(request: web.Request, handler) -> web.StreamResponse:
    """OpenAI-style JSON for unknown paths and methods, and for any failure inside a handler."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return ApiError(exc.status, f"{request.method} {request.path}: {exc.reason}").response()
    except ApiError as exc:
        return exc.response()
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        logger.exception("error while handling %s %s", request.method, request.path)
        return ApiError(500, f"internal router error: {type(exc).__name__}: {exc}", kind="server_error").response()


async def start(config: RouterConfig, *, arbiter: Optional[MemoryArbiter] = None) -> tuple[Router, web.AppRunner]:
    """Bind the router's port, then start watching the models. Stop with `await runner.cleanup()`."""
    router = Router(config, arbiter=arbiter)
    runner = web.AppRunner(router.application(), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.port).start()
    except OSError:
        await runner.cleanup()
        raise
    router.begin()
    return router, runner


async def serve(config: RouterConfig) -> None:
    """Run until SIGINT or SIGTERM, then stop every owned engine."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    router, runner = await start(config)
    logger.info("kvcached-router on http://%s:%d serving %s", config.host, config.port, ", ".join(config.models))
    try:
        await stop.wait()
        logger.info("stopping: every engine the router started is stopped")
    finally:
        await runner.cleanup()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvcached-router",
        description="One OpenAI endpoint for many models: routes by the request's model, starts engines on demand, "
        "puts idle ones to sleep or stops them, and serves Prometheus metrics at /metrics.")
    parser.add_argument("--config", required=True, help="models.yaml (or .toml): the models and how to run them")
    parser.add_argument("--host", help="address to listen on (overrides router.host; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (overrides router.port; default 8500)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        if overrides:
            config = _override(config, overrides)
    except RouterConfigError as exc:
        print(f"kvcached-router: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        print(f"kvcached-router: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _override(config: RouterConfig, values: dict) -> RouterConfig:
    if "port" in values and not 1 <= values["port"] <= 65535:
        raise RouterConfigError(f"--port: {values['port']} is not a port (1-65535)")
    if values.get("port") in {m.port for m in config.models.values()}:
        raise RouterConfigError(f"--port: {values['port']} is also a model's port")
    return dataclasses.replace(config, **values)
