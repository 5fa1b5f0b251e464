"""The router's config file: every bad key is named in a one-line error, before anything starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from router_helpers import ROUTER_ENV

from kvcached.router.config import RouterConfigError, load_config, parse_config

PY = sys.executable
GOOD = {"command": [PY, "-m", "engine"], "port": 8590}


def config(**model) -> dict:
    return {"models": {"m": {**GOOD, **model}}}


def test_a_full_config_is_read_with_its_values(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({
        "router": {"host": "0.0.0.0", "port": 8591, "max_body_bytes": "2M", "queue_size": 3, "queue_timeout_s": 7,
                   "memory_reserve": "1G"},
        "models": {"chat": {"command": f"{PY} -m vllm.entrypoints.openai.api_server --model /m --enforce-eager",
                            "port": 8592, "env": {"A": 1, "B": True}, "sleep_after_s": 10, "stop_after_s": 60,
                            "memory": "3G", "device": "cuda", "preload": True},
                   "remote": {"url": "http://10.0.0.7:8000/"}}}))
    cfg = load_config(str(path))
    assert (cfg.host, cfg.port, cfg.max_body_bytes, cfg.queue_size, cfg.queue_timeout_s) == (
        "0.0.0.0", 8591, 2 << 20, 3, 7.0)
    assert cfg.memory_reserve_bytes == 1 << 30
    chat, remote = cfg.models["chat"], cfg.models["remote"]
    assert chat.command == (PY, "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--enforce-eager")
    assert chat.argv()[6:] == ["--host", "127.0.0.1", "--port", "8592", "--served-model-name", "chat",
                               "--enable-sleep-mode"]
    assert (chat.sleep_after_s, chat.stop_after_s, chat.memory_bytes, chat.device, chat.preload) == (
        10.0, 60.0, 3 << 30, "cuda:0", True)
    env = chat.environment({"PATH": "/bin", "KVCACHED_MEMORY_LIMIT": "1G", "ENABLE_KVCACHED": "false"})
    assert (env["ENABLE_KVCACHED"], env["KVCACHED_AUTOPATCH"], env["KVCACHED_IPC_NAME"]) == ("true", "1", "chat")
    assert (env["VLLM_SERVER_DEV_MODE"], env["A"], env["B"], env["PATH"]) == ("1", "1", "true", "/bin")
    assert "KVCACHED_MEMORY_LIMIT" not in env  # the router's own shell does not configure its engines
    assert chat.base_url == "http://127.0.0.1:8592" and chat.owned
    assert remote.base_url == "http://10.0.0.7:8000" and not remote.owned


def test_cpu_engines_get_no_sleep_flag_and_kvcached_can_be_turned_off():
    """vLLM's CPU build refuses --enable-sleep-mode at start-up ("Sleep mode is not supported on current platform")."""
    m = parse_config(config(sleep_after_s=5, kvcached=False)).models["m"]
    assert "--enable-sleep-mode" not in m.argv()
    env = m.environment({})
    assert env["ENABLE_KVCACHED"] == "false" and "KVCACHED_AUTOPATCH" not in env and "KVCACHED_IPC_NAME" not in env
    assert env["VLLM_SERVER_DEV_MODE"] == "1"


@pytest.mark.parametrize("doc, key", [
    ({"modles": {}}, "modles: unknown key"),
    ({"models": {}}, "models: expected a mapping"),
    ({"models": {"m": GOOD}, "router": {"prot": 1}}, "router.prot: unknown key"),
    ({"models": {"m": GOOD}, "router": {"port": "x"}}, "router.port: expected an integer"),
    ({"models": {"m": GOOD}, "router": {"port": 8590}}, "router.port: 8590 is also the port of model 'm'"),
    ({"models": {"m": GOOD}, "router": {"queue_size": 0}}, "router.queue_size: expected an integer >= 1"),
    ({"models": {"m": GOOD}, "router": {"queue_timeout_s": -1}}, "router.queue_timeout_s: expected a number"),
    ({"models": {"m": GOOD}, "router": {"max_body_bytes": "lots"}}, "router.max_body_bytes: 'lots' is not a size"),
    ({"models": {"m": GOOD}, "router": {"memory_reserve": "1X"}}, "router.memory_reserve: '1X': unknown unit"),
    ({"models": {"bad name": GOOD}}, "models.bad name: a served name is 1-64 of"),
    ({"models": {"m": "x"}}, "models.m: expected a mapping"),
    (config(sleep_afer_s=3), "models.m.sleep_afer_s: unknown key"),
    ({"models": {"m": {"port": 8590}}}, "models.m: give exactly one of 'command'"),
    ({"models": {"m": {**GOOD, "url": "http://x"}}}, "models.m: give exactly one of 'command'"),
    ({"models": {"m": {"url": "http://x", "port": 1}}}, "models.m.port: only for engines the router runs"),
    ({"models": {"m": {"url": "ftp://x"}}}, "models.m.url: 'ftp://x' is not an http(s):// URL"),
    ({"models": {"m": {"command": [PY]}}}, "models.m.port: missing"),
    (config(port=70000), "models.m.port: expected an integer 1..65535"),
    (config(command=""), "models.m.command: empty command"),
    (config(command={"a": 1}), "models.m.command: expected a command line"),
    (config(command="python 'unclosed"), "models.m.command: cannot split the command line"),
    (config(command=f"{PY} -m x --port 9"), "models.m.command: remove --port"),
    (config(command=[PY, "--host=0.0.0.0"]), "models.m.command: remove --host"),
    (config(command=["/no/such/python", "-m", "x"]), "models.m.command: '/no/such/python' is not an executable"),
    (config(env=["A=1"]), "models.m.env: expected a mapping"),
    (config(env={"1A": "x"}), "models.m.env.1A: not an environment variable name"),
    (config(env={"A": [1]}), "models.m.env.A: expected a string or number"),
    (config(kvcached="yes"), "models.m.kvcached: expected true or false"),
    (config(preload=1), "models.m.preload: expected true or false"),
    (config(sleep_after_s=-1), "models.m.sleep_after_s: expected a number >= 0.0"),
    (config(stop_after_s="soon"), "models.m.stop_after_s: expected a number"),
    (config(sleep_after_s=10, stop_after_s=5), "models.m.sleep_after_s: 10.0 is not below stop_after_s"),
    (config(sleep_level=3), "models.m.sleep_level: expected an integer 1..2"),
    (config(memory="big"), "models.m.memory: 'big' is not a size"),
    (config(device="gpu0"), "models.m.device: device 'gpu0' is not one of 'cpu', 'cuda', 'cuda:N'"),
    (config(device="cpu:1"), "models.m.device: device 'cpu:1': the host backend has no index"),
    (config(start_timeout_s=0), "models.m.start_timeout_s: expected a number >= 1.0"),
    ({"models": {"a": GOOD, "b": GOOD}}, "models.b.port: 8590 is also the port of model 'a'"),
])
def test_every_bad_key_is_named(doc, key):
    with pytest.raises(RouterConfigError) as info:
        parse_config(doc)
    assert key in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, text, message", [
    ("models.yaml", "models: [unclosed", "models.yaml: not valid YAML"),
    ("models.toml", "models = {", "models.toml: not valid TOML"),
    ("models.json", "{}", "models.json: unknown file type"),
    ("missing.yaml", None, "missing.yaml: cannot read the config file (No such file or directory)"),
])
def test_unreadable_files_are_named(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(RouterConfigError) as info:
        load_config(str(path))
    assert str(info.value).endswith(message) or message in str(info.value)


def test_toml_works_like_yaml(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(f'[router]\nport = 8593\n[models.m]\ncommand = ["{PY}", "-m", "x"]\nport = 8594\n'
                    f'stop_after_s = 30\n')
    cfg = load_config(str(path))
    assert cfg.port == 8593 and cfg.models["m"].stop_after_s == 30.0 and cfg.models["m"].port == 8594


def test_command_line_refuses_a_bad_config_in_one_line_before_starting_anything(tmp_path):
    marker = tmp_path / "started"
    path = tmp_path / "models.yaml"
    # the engine would create `marker` if it ever ran; the typo must stop the router first
    path.write_text(yaml.safe_dump({"models": {
        "ok": {"command": [PY, "-c", f"open({str(marker)!r}, 'w')"], "port": 8595, "preload": True},
        "bad": {"command": [PY], "port": 8596, "stop_after": 5}}}))
    done = subprocess.run([PY, "-m", "kvcached.router", "--config", str(path), "--port", "8597"],
                          capture_output=True, text=True, timeout=60, env=ROUTER_ENV)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "models.bad.stop_after: unknown key" in done.stderr and done.stderr.startswith("kvcached-router: ")
    assert not marker.exists()


def test_command_line_help_names_the_options():
    done = subprocess.run([PY, "-m", "kvcached.router", "--help"], capture_output=True, text=True, timeout=60,
                          env=ROUTER_ENV)
    assert done.returncode == 0
    for option in ("--config", "--host", "--port"):
        assert option in done.stdout
