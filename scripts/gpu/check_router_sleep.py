"""Sleep and wake through kvcached-router on a GPU: memory given back (NVML) and the same greedy tokens after waking.

    source /tmp/vc/vllm-gpu-install.sh        # vLLM 0.26.0 on PYTHONPATH; kvcached installed into this python
    python3 scripts/gpu/check_router_sleep.py --python python3 --model /tmp/llama-4l [--out $OUT]

One model behind the router: a vLLM OpenAI server with kvcached enabled (the router's default), on cuda:0, with
sleep_after_s set, so the router adds --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1. The script sends 4 prompts
(greedy), then a burst of long prompts so that kvcached maps KV pages (KVCACHED_TRIM_IDLE_S is raised so they stay
mapped while idle: the KV that sleep must give back), reads NVML's per-process memory of the engine's process group
and the registry's mapped bytes, waits until the router has put the engine to sleep (level 1), reads them again,
then sends the 4 prompts again through the router (which wakes the engine) and compares the texts and token ids.
Writes check_router_sleep.json into --out (default $OUT, else the current folder) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pynvml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAME = "sleepy"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
           "The three primary colours are"]


def post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def greedy(base: str) -> list[dict]:
    out = []
    for prompt in PROMPTS:
        answer = post(base + "/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 32, "temperature": 0,
                                                 "logprobs": 1})
        choice = answer["choices"][0]
        out.append({"text": choice["text"], "tokens": (choice.get("logprobs") or {}).get("tokens")})
    return out


def metric(base: str, name: str, **labels) -> float | None:
    for line in get(base + "/metrics").splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def state(base: str) -> str:
    for s in ("running", "sleeping", "stopped", "starting", "waking"):
        if metric(base, "kvcached_router_model_state", model=NAME, state=s) == 1.0:
            return s
    return "?"


def engine_pids(router: subprocess.Popen) -> list[int]:
    leaders = [p for p in psutil.Process(router.pid).children() if f"--served-model-name {NAME}" in " ".join(p.cmdline())]
    pids = []
    for leader in leaders:
        pids += [leader.pid] + [c.pid for c in leader.children(recursive=True)]
    return pids


def gpu_memory(handle, pids: list[int]) -> dict:
    procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    info = pynvml.nvmlDeviceGetMemoryInfo(handle)
    mine = sum(p.usedGpuMemory or 0 for p in procs if p.pid in pids)
    return {"engine_process_bytes": int(mine), "device_used_bytes": int(info.used),
            "processes": {str(p.pid): int(p.usedGpuMemory or 0) for p in procs}}


def registry_bytes() -> dict:
    from kvcached.registry import read_instance

    r = read_instance(NAME)
    return {"used_bytes": r.used_bytes, "premapped_bytes": r.premapped_bytes, "mapped_bytes": r.mapped_bytes}


def wait(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"check_router_sleep: not within {timeout:.0f}s: {what}")
        time.sleep(0.5)
    return time.monotonic() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python", required=True, help="the python that has vLLM 0.26.0 (and kvcached) installed")
    p.add_argument("--model", required=True, help="model folder (e.g. a random-weight Llama)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--port", type=int, default=8500)
    p.add_argument("--sleep-after-s", type=float, default=20.0)
    a = p.parse_args()
    work = os.path.join(a.out, "router-sleep")
    os.makedirs(work, exist_ok=True)
    base = f"http://127.0.0.1:{a.port}"
    config = {"router": {"port": a.port, "log_dir": work, "health_interval_s": 1.0},
              "models": {NAME: {"command": [a.python, "-m", "vllm.entrypoints.openai.api_server", "--model", a.model,
                                            "--max-model-len", "2048", "--enforce-eager", "--seed", "0"],
                                "port": a.port + 1, "device": "cuda:0", "sleep_after_s": a.sleep_after_s,
                                "env": {"KVCACHED_TRIM_IDLE_S": "3600", "VLLM_USE_FLASHINFER_SAMPLER": "0"}}}}
    import yaml

    path = os.path.join(work, "models.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(os.path.join(work, "router.log"), "w")
    router = subprocess.Popen([sys.executable, "-m", "kvcached.router", "--config", path], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    result: dict = {"model": a.model, "device": pynvml.nvmlDeviceGetName(handle)}
    try:
        wait(lambda: _up(base), 60, "router up")
        result["idle_device_used_before_start_bytes"] = gpu_memory(handle, [])["device_used_bytes"]
        before = greedy(base)  # cold start, then 4 greedy answers
        result["cold_start_s"] = metric(base, "kvcached_router_cold_start_seconds_sum", model=NAME)
        # long prompts at once: KV pages mapped, kept mapped while idle (KVCACHED_TRIM_IDLE_S=3600)
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: post(base + "/v1/completions", {"model": NAME, "prompt": f"{i} " + "word " * 1500,
                                                                     "max_tokens": 8, "temperature": 0}), range(16)))
        time.sleep(2)
        pids = engine_pids(router)
        result["awake"] = {**gpu_memory(handle, pids), "registry": registry_bytes(), "pids": pids}
        result["seconds_to_sleep"] = wait(lambda: state(base) == "sleeping", a.sleep_after_s + 120, "asleep")
        time.sleep(3)
        result["engine_is_sleeping"] = json.loads(get(f"http://127.0.0.1:{a.port + 1}/is_sleeping"))
        result["asleep"] = {**gpu_memory(handle, pids), "registry": registry_bytes()}
        after = greedy(base)  # the first request wakes the engine
        result["wake_s"] = metric(base, "kvcached_router_wake_seconds_sum", model=NAME)
        result["woken"] = {**gpu_memory(handle, pids), "registry": registry_bytes()}
        result["state_after"] = state(base)
        result["same_greedy_texts"] = [x["text"] for x in before] == [x["text"] for x in after]
        result["same_greedy_tokens"] = [x["tokens"] for x in before] == [x["tokens"] for x in after]
        result["texts"] = {"before": [x["text"] for x in before], "after": [x["text"] for x in after]}
        result["given_back_bytes"] = result["awake"]["engine_process_bytes"] - result["asleep"]["engine_process_bytes"]
        result["weights_bytes_logged"] = _weights_bytes(work)
        result["kv_mapped_awake_bytes"] = result["awake"]["registry"]["mapped_bytes"]
        result["kv_mapped_asleep_bytes"] = result["asleep"]["registry"]["mapped_bytes"]
    finally:
        router.send_signal(signal.SIGTERM)
        try:
            result["router_exit_code"] = router.wait(120)
        except subprocess.TimeoutExpired:
            router.kill()
        log.close()
        with open(os.path.join(work, "router.log")) as f:
            result["router_log_tail"] = f.read().splitlines()[-30:]
        out = os.path.join(a.out, "check_router_sleep.json")
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps({k: v for k, v in result.items() if k != "router_log_tail"}, indent=1))
        print("written:", out)


def _up(base: str) -> bool:
    try:
        return json.loads(get(base + "/health", 2)).get("status") == "ok"
    except OSError:
        return False


def _weights_bytes(work: str) -> int | None:
    """vLLM logs 'Model loading took X GiB memory'."""
    try:
        with open(os.path.join(work, f"engine-{NAME}.log")) as f:
            found = re.findall(r"Model loading took ([\d.]+) GiB", f.read())
    except OSError:
        return None
    return int(float(found[-1]) * (1 << 30)) if found else None


if __name__ == "__main__":
    main()
