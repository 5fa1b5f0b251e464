"""The engine's own HTTP control API, as the router uses it: health, and vLLM's sleep mode.

Note: vLLM serves `POST /sleep?level=N`, `POST /wake_up` and `GET /is_sleeping` only with VLLM_SERVER_DEV_MODE=1 and
honours them only with --enable-sleep-mode. An engine that does not honour sleep answers in one of three ways: 404
(no dev mode), an error status, or 200 while `/is_sleeping` stays false. All three mean "sleep unsupported": the
caller keeps the engine running and relies on stop_after_s instead. Every call has a timeout and never raises for a
network error: the router decides from the answer (or its absence), it never crashes on one.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Optional

import aiohttp


@dataclass(frozen=True)
class Answer:
    status: int  # 0 when nothing answered
    body: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class EngineAPI:
    """Control calls to one engine at `base_url`, over the router's shared client session."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session, self.base_url = session, base_url.rstrip("/")

    async def _call(self, method: str, path: str, timeout_s: float) -> Answer:
        try:
            async with self.session.request(method, self.base_url + path,
                                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                return Answer(response.status, (await response.text())[:500])
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return Answer(0)

    async def healthy(self, timeout_s: float = 5.0) -> bool:
        return (await self._call("GET", "/health", timeout_s)).ok

    async def sleep(self, level: int, timeout_s: float = 120.0) -> Answer:
        return await self._call("POST", f"/sleep?level={level}", timeout_s)

    async def wake_up(self, timeout_s: float = 300.0) -> Answer:
        return await self._call("POST", "/wake_up", timeout_s)

    async def is_sleeping(self, timeout_s: float = 10.0) -> Optional[bool]:
        """The engine's own answer, or None when it gives none (no dev mode, an error, not JSON)."""
        answer = await self._call("GET", "/is_sleeping", timeout_s)
        if not answer.ok:
            return None
        try:
            value = json.loads(answer.body).get("is_sleeping")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, bool) else None
