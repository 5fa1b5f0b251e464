"""The OpenAI front door: /v1/models, /v1/completions, /v1/chat/completions, routed by the request's "model".

Note (errors): every refusal is OpenAI-style JSON ({"error": {"message", "type", "param", "code"}}), so clients such
as the `openai` package raise their usual exceptions: 413 for a body over `max_body_bytes`, 400 for a body that is not
a JSON object or lacks a string "model", 404 for a model the router does not serve, 503 with Retry-After when the
model cannot be ready in time. A request whose engine cannot be reached before any byte was relayed (the engine
crashed since the last health check) is held again while the model recovers, and sent once more: the client does not
see the crash. Streams are relayed chunk by chunk as the engine writes them. A failure inside a handler becomes a 500
JSON answer for that one request (middleware in app.py); the router itself never goes down on a request.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Optional

import aiohttp
from aiohttp import web

from .lifecycle import ModelLifecycle
from .metrics import RouterMetrics
from .queueing import NotReady

logger = logging.getLogger("kvcached.router")
FORWARDED_HEADERS = ("Authorization", "Accept", "X-Request-Id")
RELAYED_HEADERS = ("Content-Type", "Cache-Control", "X-Request-Id")


class ApiError(Exception):
    """A request the router refuses: becomes OpenAI-style error JSON with this status."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers or {}

    def response(self) -> web.Response:
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status, headers=self.headers)


class _Unreachable(Exception):
    """The engine could not be reached, and nothing was relayed to the client yet."""


class Proxy:
    def __init__(self, models: dict[str, ModelLifecycle], session: aiohttp.ClientSession, metrics: RouterMetrics,
                 max_body_bytes: int) -> None:
        self.models, self.session, self.metrics, self.max_body_bytes = models, session, metrics, max_body_bytes
        self.created = int(time.time())

    async def list_models(self, request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "kvcached-router"}
                for name in self.models]
        return web.json_response({"object": "list", "data": data})

    async def forward(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        try:
            body = await self._read_body(request)
            model = self._route(body)
        except ApiError as exc:
            self.metrics.rejected.labels(str(exc.status)).inc()
            return exc.response()
        name = model.cfg.name
        self.metrics.requests.labels(name).inc()
        for attempt in range(3):
            try:
                async with model.serving() as base_url:
                    return await self._relay(request, model, base_url + request.path, body, arrived)
            except NotReady as exc:
                self.metrics.errors.labels(name, "unavailable").inc()
                return ApiError(503, f"model {name!r} is not available: {exc}", kind="service_unavailable",
                                code="model_not_ready", headers={"Retry-After": str(exc.retry_after_s)}).response()
            except _Unreachable as exc:
                logger.warning("%s: engine unreachable (%s)%s", name, exc, ", trying again" if attempt < 2 else "")
                try:
                    await model.engine_unreachable()
                except NotReady:
                    pass
        self.metrics.errors.labels(name, "unavailable").inc()
        return ApiError(503, f"model {name!r} is not reachable", kind="service_unavailable", code="model_not_ready",
                        headers={"Retry-After": str(int(max(1, model.retry_after_s())))}).response()

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.max_body_bytes
        too_large = ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        data = bytearray()
        async for chunk in request.content.iter_chunked(1 << 16):
            data += chunk
            if len(data) > limit:
                raise too_large
        return bytes(data)

    def _route(self, body: bytes) -> ModelLifecycle:
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        name = payload.get("model")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "the request has no \"model\" (a string naming a served model, see /v1/models)",
                           param="model", code="missing_model")
        model = self.models.get(name)
        if model is None:
            raise ApiError(404, f"the model {name!r} does not exist (served: {', '.join(self.models)})",
                           param="model", code="model_not_found")
        return model

    async def _relay(self, request: web.Request, model: ModelLifecycle, url: str, body: bytes,
                     arrived: float) -> web.StreamResponse:
        headers = {"Content-Type": "application/json"}
        headers.update({h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers})
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        name = model.cfg.name
        try:
            upstream = await self.session.post(url, data=body, headers=headers, timeout=timeout)
        except (aiohttp.ClientConnectionError, ConnectionError) as exc:
            raise _Unreachable(f"{type(exc).__name__}: {exc}") from None
        ttft = self.metrics.ttft.labels(name)
        async with upstream:
            if upstream.status >= 500:
                self.metrics.errors.labels(name, "engine").inc()
            relayed = {h: upstream.headers[h] for h in RELAYED_HEADERS if h in upstream.headers}
            if not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                try:
                    data = await upstream.read()
                except aiohttp.ClientError as exc:
                    raise _Unreachable(f"the answer broke off: {exc}") from None
                ttft.observe(time.monotonic() - arrived)  # not streamed: the first byte comes with the whole answer
                return web.Response(body=data, status=upstream.status, headers=relayed)
            response = web.StreamResponse(status=upstream.status, headers=relayed)
            await response.prepare(request)
            first = True
            try:
                async for chunk in upstream.content.iter_any():
                    if first:
                        ttft.observe(time.monotonic() - arrived)
                        first = False
                    await response.write(chunk)
            except aiohttp.ClientError as exc:  # the engine went away mid-stream: nothing more can be sent
                self.metrics.errors.labels(name, "broken").inc()
                logger.warning("%s: stream broke off: %s", name, exc)
            except ConnectionResetError:  # the client left; leaving the block closes the engine's stream too
                pass
            return response
