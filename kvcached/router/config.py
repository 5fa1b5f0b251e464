"""The router's configuration file (YAML or TOML): which models it serves and how each engine is run.

Note (why): a router that starts engines must refuse a bad file before it starts anything, naming the key
(`models.chat.port: ...`), or an operator finds out minutes later from a half-started fleet. Every key is checked
here, unknown ones included (a typo such as `sleep_afer_s` would otherwise silently mean "never sleep"). The result is
frozen dataclasses; nothing else in the router reads the file.

    router:                      # optional; every key has a default
      host: 127.0.0.1
      port: 8500
    models:
      chat:                      # the served name: what clients put in "model"
        command: python -m vllm.entrypoints.openai.api_server --model /models/smol --enforce-eager
        port: 8510               # the router adds --host 127.0.0.1 --port 8510 --served-model-name chat
        env: {VLLM_CPU_KVCACHE_SPACE: "1"}
        sleep_after_s: 300       # idle seconds before POST /sleep (null: never)
        stop_after_s: 1800       # idle seconds before the engine is stopped (null: never)
        memory: 6G               # what it needs to start or wake: enables memory-aware waking
      remote:
        url: http://10.0.0.7:8000  # an engine someone else runs: proxied only, never started or stopped
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Optional

from ..devices import parse_device
from ..errors import ConfigError
from ..units import parse_size

NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # also a valid KVCACHED_IPC_NAME, so the registry record has this name
KVCACHED_ENV = {"ENABLE_KVCACHED": "true", "KVCACHED_AUTOPATCH": "1"}
SLEEP_ENV = {"VLLM_SERVER_DEV_MODE": "1"}  # vLLM serves /sleep, /wake_up and /is_sleeping only in dev mode
ROUTER_MANAGED_FLAGS = ("--host", "--port")


class RouterConfigError(ConfigError):
    """The configuration file is unreadable or a key has a value the router cannot use."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    command: tuple[str, ...] = ()  # empty for an external engine (url)
    url: Optional[str] = None  # set for an external engine; owned engines get http://127.0.0.1:<port>
    port: Optional[int] = None
    env: dict[str, str] = field(default_factory=dict)
    kvcached: bool = True
    sleep_after_s: Optional[float] = None
    stop_after_s: Optional[float] = None
    sleep_level: int = 1
    memory_bytes: Optional[int] = None
    device: str = "cpu"
    preload: bool = False
    start_timeout_s: float = 600.0

    @property
    def owned(self) -> bool:
        """True when the router starts and stops this engine."""
        return self.url is None

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/") if self.url else f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        """The engine's command line with what the router decides appended (address, served name, sleep mode)."""
        args = list(self.command) + ["--host", "127.0.0.1", "--port", str(self.port)]
        if "--served-model-name" not in self.command:
            args += ["--served-model-name", self.name]
        if self.sleep_after_s is not None and self.device != "cpu" and "--enable-sleep-mode" not in self.command:
            args.append("--enable-sleep-mode")  # vLLM's CPU build refuses the flag at start-up
        return args

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        """`base` (the router's environment) with kvcached switched as configured, then the model's own env."""
        env = {k: v for k, v in base.items() if not (k.startswith("KVCACHED_") or k == "ENABLE_KVCACHED")}
        if self.kvcached:
            env.update(KVCACHED_ENV, KVCACHED_IPC_NAME=self.name)
        else:
            env["ENABLE_KVCACHED"] = "false"
        if self.sleep_after_s is not None:
            env.update(SLEEP_ENV)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        return env


@dataclass(frozen=True)
class RouterConfig:
    models: dict[str, ModelConfig]
    host: str = "127.0.0.1"
    port: int = 8500
    max_body_bytes: int = 1 << 20
    queue_size: int = 64  # requests held per model while it starts or wakes; more get 503 at once
    queue_timeout_s: float = 600.0  # how long a held request waits before 503 + Retry-After
    health_interval_s: float = 2.0
    health_failures: int = 3  # consecutive failed /health answers of a live process before it is restarted
    restart_backoff_s: float = 1.0  # first delay after a crash; doubled per consecutive failure
    restart_backoff_max_s: float = 60.0
    memory_reserve_bytes: int = 0  # free memory kept on a device beyond what a starting model needs
    log_dir: str = ""


_ROUTER_KEYS = {"host", "port", "max_body_bytes", "queue_size", "queue_timeout_s", "health_interval_s",
                "health_failures", "restart_backoff_s", "restart_backoff_max_s", "memory_reserve", "log_dir"}
_MODEL_KEYS = {"command", "url", "port", "env", "kvcached", "sleep_after_s", "stop_after_s", "sleep_level", "memory",
               "device", "preload", "start_timeout_s"}
_OWNED_ONLY = ("command", "port", "env", "kvcached", "sleep_after_s", "stop_after_s", "memory", "preload")


def load_config(path: str) -> RouterConfig:
    """Read and check `path` (.yaml, .yml or .toml); RouterConfigError names the file and the key."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise RouterConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
    try:
        data = _parse(path, raw)
    except RouterConfigError as exc:
        raise RouterConfigError(f"{path}: {exc}") from None
    try:
        return parse_config(data)
    except RouterConfigError as exc:
        raise RouterConfigError(f"{path}: {exc}") from None


def _parse(path: str, raw: bytes) -> Any:
    if path.endswith(".toml"):
        import tomllib

        try:
            return tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise RouterConfigError(f"not valid TOML: {exc}") from None
    if not path.endswith((".yaml", ".yml")):
        raise RouterConfigError("unknown file type: use .yaml, .yml or .toml")
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RouterConfigError(f"not valid YAML: {' '.join(str(exc).split())}") from None


def parse_config(data: Any) -> RouterConfig:
    """Check a loaded document (a dict); RouterConfigError names the first bad key."""
    _mapping("(top level)", data, {"router", "models"})
    router = data.get("router") or {}
    _mapping("router", router, _ROUTER_KEYS)
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise RouterConfigError("models: expected a mapping of served names to model settings, with at least one")
    parsed = {name: _model(name, spec) for name, spec in models.items()}
    ports = {}
    for m in (m for m in parsed.values() if m.port is not None):
        if m.port in ports:
            raise RouterConfigError(f"models.{m.name}.port: {m.port} is also the port of model {ports[m.port]!r}")
        ports[m.port] = m.name
    config = RouterConfig(models=parsed, **_router_settings(router))
    if config.port in ports:
        raise RouterConfigError(f"router.port: {config.port} is also the port of model {ports[config.port]!r}")
    return config


def _router_settings(raw: dict) -> dict:
    out: dict[str, Any] = {}
    if "host" in raw:
        out["host"] = _string("router.host", raw["host"])
    if "port" in raw:
        out["port"] = _port("router.port", raw["port"])
    for key in ("queue_size", "health_failures"):
        if key in raw:
            out[key] = _number(f"router.{key}", raw[key], integer=True, minimum=1)
    for key in ("queue_timeout_s", "health_interval_s", "restart_backoff_s", "restart_backoff_max_s"):
        if key in raw:
            out[key] = _number(f"router.{key}", raw[key], minimum=0.01)
    if "max_body_bytes" in raw:
        out["max_body_bytes"] = _size("router.max_body_bytes", raw["max_body_bytes"], minimum=1)
    if "memory_reserve" in raw:
        out["memory_reserve_bytes"] = _size("router.memory_reserve", raw["memory_reserve"], minimum=0)
    if "log_dir" in raw:
        out["log_dir"] = _string("router.log_dir", raw["log_dir"])
    return out


def _model(name: Any, spec: Any) -> ModelConfig:
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise RouterConfigError(f"models.{name}: a served name is 1-64 of A-Za-z0-9._- (it also names the kvcached "
                                f"instance)")
    key = f"models.{name}"
    _mapping(key, spec, _MODEL_KEYS)
    out: dict[str, Any] = {"name": name}
    if ("url" in spec) == ("command" in spec):
        raise RouterConfigError(f"{key}: give exactly one of 'command' (the router runs the engine) or 'url' (an "
                                f"engine someone else runs)")
    if "url" in spec:
        for k in _OWNED_ONLY:
            if k in spec:
                raise RouterConfigError(f"{key}.{k}: only for engines the router runs (this one has a url)")
        url = _string(f"{key}.url", spec["url"])
        if not re.match(r"^https?://[^/\s]+", url):
            raise RouterConfigError(f"{key}.url: {url!r} is not an http(s):// URL")
        out["url"] = url
    else:
        out["command"] = _command(f"{key}.command", spec["command"])
        if "port" not in spec:
            raise RouterConfigError(f"{key}.port: missing (the port the router starts this engine on)")
        out["port"] = _port(f"{key}.port", spec["port"])
    if "env" in spec:
        out["env"] = _env(f"{key}.env", spec["env"])
    for k in ("kvcached", "preload"):
        if k in spec:
            out[k] = _bool(f"{key}.{k}", spec[k])
    for k in ("sleep_after_s", "stop_after_s"):
        if spec.get(k) is not None:
            out[k] = _number(f"{key}.{k}", spec[k], minimum=0.0)
    if out.get("sleep_after_s") is not None and out.get("stop_after_s") is not None \
            and out["sleep_after_s"] >= out["stop_after_s"]:
        raise RouterConfigError(f"{key}.sleep_after_s: {out['sleep_after_s']} is not below stop_after_s "
                                f"({out['stop_after_s']}): the model would never sleep")
    if "sleep_level" in spec:
        out["sleep_level"] = _number(f"{key}.sleep_level", spec["sleep_level"], integer=True, minimum=1, maximum=2)
    if spec.get("memory") is not None:
        out["memory_bytes"] = _size(f"{key}.memory", spec["memory"], minimum=1)
    if "device" in spec:
        try:
            out["device"] = str(parse_device(_string(f"{key}.device", spec["device"])))
        except ValueError as exc:
            raise RouterConfigError(f"{key}.device: {exc}") from None
    if "start_timeout_s" in spec:
        out["start_timeout_s"] = _number(f"{key}.start_timeout_s", spec["start_timeout_s"], minimum=1.0)
    return ModelConfig(**out)


def _mapping(key: str, value: Any, allowed: set[str]) -> None:
    if not isinstance(value, dict):
        raise RouterConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    for k in value:
        if k not in allowed:
            where = k if key == "(top level)" else f"{key}.{k}"
            raise RouterConfigError(f"{where}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RouterConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value.strip()


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RouterConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _number(key: str, value: Any, *, integer: bool = False, minimum: float, maximum: Optional[float] = None):
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum \
            or (maximum is not None and value > maximum):
        bound = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise RouterConfigError(f"{key}: expected {'an integer' if integer else 'a number'} {bound}, got {value!r}")
    return value if integer else float(value)


def _port(key: str, value: Any) -> int:
    return _number(key, value, integer=True, minimum=1, maximum=65535)


def _size(key: str, value: Any, *, minimum: int) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a size")
        size = int(value) if isinstance(value, int) else parse_size(str(value))
    except ValueError as exc:
        raise RouterConfigError(f"{key}: {exc}") from None
    if size < minimum:
        raise RouterConfigError(f"{key}: expected a size >= {minimum} bytes, got {value!r}")
    return size


def _command(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise RouterConfigError(f"{key}: cannot split the command line ({exc})") from None
    elif isinstance(value, list) and all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in value):
        argv = [str(a) for a in value]
    else:
        raise RouterConfigError(f"{key}: expected a command line (a string or a list of strings)")
    if not argv:
        raise RouterConfigError(f"{key}: empty command")
    for flag in ROUTER_MANAGED_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise RouterConfigError(f"{key}: remove {flag}: the router sets it (use models.<name>.port)")
    program = os.path.expanduser(argv[0])
    if os.sep in program and not os.access(program, os.X_OK):
        raise RouterConfigError(f"{key}: {argv[0]!r} is not an executable file")
    return (program,) + tuple(argv[1:])


def _env(key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise RouterConfigError(f"{key}: expected a mapping of variable names to values")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
            raise RouterConfigError(f"{key}.{k}: not an environment variable name")
        if isinstance(v, bool):
            v = "true" if v else "false"
        if not isinstance(v, (str, int, float)):
            raise RouterConfigError(f"{key}.{k}: expected a string or number, got {type(v).__name__}")
        out[k] = str(v)
    return out
