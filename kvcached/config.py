"""Configuration from environment variables, validated once.

Note: every variable is read here and nowhere else, so that a typo or a bad value stops the engine at start-up
with one message naming the variable, the value and what is allowed, instead of surfacing later as odd behaviour.
"""

from __future__ import annotations

import grp
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


def _directory(text: str) -> str:
    if not os.path.isabs(text) or not os.path.isdir(text):
        raise ValueError("expected the absolute path of an existing directory")
    return text


def _group(text: str) -> int:
    value = text.strip()
    if value.isdigit():
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ValueError("expected the name or numeric id of an existing group") from None


@dataclass(frozen=True)
class Config:
    enabled: bool = False
    autopatch: bool = False
    page_size_mb: Optional[float] = None  # memory per layer piece in one page; None: 2 MiB on GPUs, 256 KiB on host
    min_reserved_pages: int = 1          # premapped pages kept ready while the engine is busy
    max_reserved_pages: int = 4          # premapped pages kept at most; freed pages beyond are unmapped
    gpu_utilization: float = 0.95        # never map past this fraction of the device's total memory
    trim_idle_s: float = 1.0             # after this long without an alloc the reserve is unmapped
    memory_limit: Optional[int] = None   # bytes this instance may map; None = no limit of its own
    virtual_size: Optional[int] = None   # bytes of address space; None = the device's total memory
    ipc_name: Optional[str] = None       # registry name; None = a unique default
    ipc_dir: str = "/dev/shm"            # where registry segments live; kvctl and kvtop must be given the same
    ipc_group: Optional[int] = None      # group that may also use registry segments (0660); None = owner only (0600)
    max_cached_tokens: Optional[int] = None  # prefix-cache bound (tokens in cached but unused blocks)
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Config":
        config = cls(**{field_name: read_variable(name, environ) for name, (field_name, _) in _VARIABLES.items()})
        if config.max_reserved_pages < config.min_reserved_pages:
            raise ConfigError(
                f"KVCACHED_MAX_RESERVED_PAGES={config.max_reserved_pages} is below "
                f"KVCACHED_MIN_RESERVED_PAGES={config.min_reserved_pages}: the maximum must be >= the minimum"
            )
        return config

    @property
    def page_size_bytes(self) -> Optional[int]:
        return None if self.page_size_mb is None else int(round(self.page_size_mb * (1 << 20)))


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
    "KVCACHED_IPC_DIR": ("ipc_dir", _directory),
    "KVCACHED_IPC_GROUP": ("ipc_group", _group),
    "KVCACHED_MAX_CACHED_TOKENS": ("max_cached_tokens", _non_negative_int),
    "KVCACHED_LOG_LEVEL": ("log_level", _log_level),
}
assert {f for f, _ in _VARIABLES.values()} == {f.name for f in fields(Config)}


def read_variable(name: str, environ: Optional[Mapping[str, str]] = None) -> object:
    """One variable of the table, parsed (its default when unset), without validating the others."""
    field_name, parse = _VARIABLES[name]
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None:
        return getattr(Config, field_name)
    try:
        return parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is invalid: {exc}") from None


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
