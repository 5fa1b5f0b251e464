"""The one way tests wait for something another thread or process does."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.01) -> T:
    """predicate()'s first truthy value, or its last (falsy) value after `timeout` seconds. The timeout only catches
    a hang: callers assert the value, never how long it took."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
