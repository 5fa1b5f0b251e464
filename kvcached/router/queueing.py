"""The bounded wait for a model that is starting or waking: requests are held, then served or refused with 503.

Note (why): the reference router answered 500 while a model woke. Here a request that finds its model not ready
waits (at most `queue_size` per model, at most `queue_timeout_s` each) for the one transition that is under way,
then is served. Only when it cannot be served in time (queue full, timeout, the engine failed to start) does it get
503 with Retry-After: the client learns when to come back, and never sees a 5xx that only meant "not ready yet".
"""

from __future__ import annotations

import asyncio
import math
from typing import Awaitable, Callable


class NotReady(Exception):
    """The model cannot serve this request in time: answered 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, math.ceil(retry_after_s))


class WaitQueue:
    """Counts and bounds the requests waiting for one model; `depth` is what /metrics shows."""

    def __init__(self, size: int, timeout_s: float) -> None:
        self.size, self.timeout_s, self.depth = size, timeout_s, 0

    async def wait(self, until_ready: Callable[[], Awaitable[None]], retry_after_s: Callable[[], float]) -> None:
        """Await until_ready() (which must survive cancellation of this waiter: shield shared work)."""
        if self.depth >= self.size:
            raise NotReady(f"{self.depth} requests already wait for this model (queue_size {self.size})",
                           retry_after_s())
        self.depth += 1
        try:
            await asyncio.wait_for(until_ready(), self.timeout_s)
        except asyncio.TimeoutError:
            raise NotReady(f"the model was not ready within queue_timeout_s={self.timeout_s:g}",
                           retry_after_s()) from None
        finally:
            self.depth -= 1
