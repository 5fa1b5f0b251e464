"""Configuration from environment variables, validated once.

Note: every variable is read here and nowhere else, so that a typo or a bad value stops the engine at start-up
with one message naming the variable, the value and what is allowed, instead of surfacing later as odd behaviour.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from typing import Callable, Mapping, Optional

from .errors import ConfigError
from .units import parse_size

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected one of true/false, 1/0, yes/no, on/off")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("expected a number > 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("expected a number >= 0")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text.strip())
    if value < 0:
        raise ValueError("expected an integer >= 0")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError("expected a fraction in (0, 1]")
    return value


def _size(text: str) -> int:
    value = parse_size(text)
    if value <= 0:
        raise ValueError("expected a size > 0")
    return value


def _log_level(text: str) -> str:
    value = text.strip().upper()
    if value not in _LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)}")
    return value


def _text(text: str) -> str:
    return text


@dataclass(frozen=True)
class Config:
    enabled: bool = False
    autopatch: bool = False
    page_size_mb: float = 2.0            # physical memory per layer piece in one page
    min_reserved_pages: int = 1          # premapped pages kept ready while the engine is busy
    max_reserved_pages: int = 4          # premapped pages kept at most; freed pages beyond are unmapped
    gpu_utilization: float = 0.95        # never map past this fraction of the device's total memory
    trim_idle_s: float = 1.0             # after this long without an alloc the reserve is unmapped
    memory_limit: Optional[int] = None   # bytes this instance may map; None = no limit of its own
    virtual_size: Optional[int] = None   # bytes of address space; None = the device's total memory
    ipc_name: Optional[str] = None       # registry name; None = a unique default
    max_cached_tokens: Optional[int] = None  # prefix-cache bound (tokens in cached but unused blocks)
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Config":
        env = os.environ if environ is None else environ
        values = {}
        for name, (field_name, parse) in _VARIABLES.items():
            raw = env.get(name)
            if raw is None:
                continue
            try:
                values[field_name] = parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{name}={raw!r} is invalid: {exc}") from None
        config = cls(**values)
        if config.max_reserved_pages < config.min_reserved_pages:
            raise ConfigError(
                f"KVCACHED_MAX_RESERVED_PAGES={config.max_reserved_pages} is below "
                f"KVCACHED_MIN_RESERVED_PAGES={config.min_reserved_pages}: the maximum must be >= the minimum"
            )
        return config

    @property
    def page_size_bytes(self) -> int:
        return int(round(self.page_size_mb * (1 << 20)))


_VARIABLES: dict[str, tuple[str, Callable[[str], object]]] = {
    "ENABLE_KVCACHED": ("enabled", _bool),
    "KVCACHED_AUTOPATCH": ("autopatch", _bool),
    "KVCACHED_PAGE_SIZE_MB": ("page_size_mb", _positive_float),
    "KVCACHED_MIN_RESERVED_PAGES": ("min_reserved_pages", _non_negative_int),
    "KVCACHED_MAX_RESERVED_PAGES": ("max_reserved_pages", _non_negative_int),
    "KVCACHED_GPU_UTILIZATION": ("gpu_utilization", _fraction),
    "KVCACHED_TRIM_IDLE_S": ("trim_idle_s", _non_negative_float),
    "KVCACHED_MEMORY_LIMIT": ("memory_limit", _size),
    "KVCACHED_VIRTUAL_SIZE": ("virtual_size", _size),
    "KVCACHED_IPC_NAME": ("ipc_name", _text),
    "KVCACHED_MAX_CACHED_TOKENS": ("max_cached_tokens", _non_negative_int),
    "KVCACHED_LOG_LEVEL": ("log_level", _log_level),
}
assert {f for f, _ in _VARIABLES.values()} == {f.name for f in fields(Config)}


def get_logger(config: Optional[Config] = None) -> logging.Logger:
    """The package logger, at KVCACHED_LOG_LEVEL, printing with a `kvcached` prefix."""
    logger = logging.getLogger("kvcached")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[kvcached] %(levelname)s %(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel((config or Config.from_env()).log_level)
    return logger
