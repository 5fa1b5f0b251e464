"""kvcached on vLLM 0.26.0 with a real GPU (issue 9): outputs, memory per process, and two engines racing for memory.

Run on the GPU machine from the project's root, after the vLLM bundle is installed (see /work/notes/vllm026.md) and
kvcached is installed into the machine's Python (its start-up hook is a .pth, which PYTHONPATH does not read):

    source /tmp/vc/vllm-gpu-install.sh && pip install -q --no-deps --no-build-isolation . \\
        && python scripts/gpu/check_vllm.py tokens     # ~5 min: offline LLM, eager and CUDA graphs
    python scripts/gpu/check_vllm.py server            # ~6 min: OpenAI server, tokens + NVML memory per process
    python scripts/gpu/check_vllm.py race              # ~7 min: two servers whose bursts exceed the GPU

Each part stays under 10 minutes (requests time out after 300 s, a server start after 300 s), writes
$OUT/check_vllm_<part>.json (and the servers' logs under $OUT/logs/), prints progress, and exits 1 if
a check failed. vLLM runs with its GPU defaults (CUDA graphs, async scheduling, prefix caching); kvcached is turned on
by ENABLE_KVCACHED=true KVCACHED_AUTOPATCH=1 alone. Models: random-weight Llamas made by /tmp/vc/vllm_gpu_model.py
(greedy outputs are deterministic): 4 layers for `tokens` and `server`, Llama-3.1-8B-shaped for `race`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

START = time.monotonic()
OUT = os.environ.get("OUT", "/tmp/check_vllm")
PROMPTS = [
    "The capital of France is", "1, 2, 3, 4,", "The opposite of hot is", "Water boils at a temperature of",
    "The largest planet in the solar system is", "def fibonacci(n):", "My favourite colour is", "Once upon a time,",
]
MAKE_MODEL = "/tmp/vc/vllm_gpu_model.py"
SMALL = ["--layers", "4"]
LARGE = ["--layers", "32", "--hidden", "4096", "--heads", "32", "--kv-heads", "8"]
ERRORS = ("OutOfMemoryError", "CUDA out of memory", "CUDA_ERROR_OUT_OF_MEMORY", "CUDA error", "Traceback (most recent call last)",
          "EngineDeadError")


def log(message: str) -> None:
    print(f"[check_vllm {time.monotonic() - START:6.0f}s] {message}", flush=True)


def model(shape: list[str]) -> str:
    done = subprocess.run([sys.executable, MAKE_MODEL, *shape], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def env(kvcached: bool, tag: str, **extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHED_") and k != "ENABLE_KVCACHED"}
    out.update(ENABLE_KVCACHED="true" if kvcached else "false", KVCACHED_AUTOPATCH="1" if kvcached else "0",
               VLLM_CACHE_ROOT=f"/tmp/vllm-cache-{tag}", PYTHONUNBUFFERED="1", **extra)
    return out


def check_hook() -> None:
    """The start-up hook must be in site-packages, from this checkout: else kvcached runs would stop at start-up."""
    import site

    here = open(os.path.join(os.path.dirname(__file__), "..", "..", "kvcached_autopatch.pth")).read()
    for folder in site.getsitepackages() + [site.getusersitepackages()]:
        path = os.path.join(folder, "kvcached_autopatch.pth")
        if os.path.exists(path) and open(path).read() == here:
            return
    sys.exit("kvcached's start-up hook is not installed from this checkout: run "
             "`pip install --no-deps --no-build-isolation .` from the project's root first")


# ---- NVML: memory per process, without a CUDA context -----------------------------------------------------------------

class Gpu:
    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self.total = int(pynvml.nvmlDeviceGetMemoryInfo(self.handle).total)

    def snapshot(self) -> dict:
        procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        return {"used": int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used),
                "processes": {str(p.pid): int(p.usedGpuMemory or 0) for p in procs}}


def sampled(gpu: Gpu, work, period_s: float = 0.1):
    """Run work() while NVML is read every `period_s`; returns its result and the snapshots."""
    samples, stop = [], threading.Event()

    def sample() -> None:
        while not stop.wait(period_s):
            samples.append({"t": round(time.monotonic() - START, 2), **gpu.snapshot()})

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        return work(), samples
    finally:
        stop.set()
        thread.join()


def peak(samples: list[dict]) -> dict:
    """The largest figure seen per process and for the device."""
    processes: dict[str, int] = {}
    for sample in samples:
        for pid, used in sample["processes"].items():
            processes[pid] = max(processes.get(pid, 0), used)
    return {"used": max((s["used"] for s in samples), default=0), "processes": processes}


# ---- offline LLM ------------------------------------------------------------------------------------------------------

def offline_child(args) -> None:
    """In its own process (kvcached on or off for the whole process): greedy ids of one engine, eager or CUDA graphs."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, enforce_eager=args.eager, max_model_len=2048, seed=0, generation_config="vllm")
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    with open(args.out, "w") as f:
        json.dump([list(o.outputs[0].token_ids) for o in outputs], f)
    llm.llm_engine.engine_core.shutdown()  # the engine core process holds the GPU memory


def part_tokens(gpu: Gpu) -> dict:
    small = model(SMALL)
    log(f"model {small}; offline runs one after the other (4 engine starts)")
    baseline, tokens, logs = gpu.snapshot()["used"], {}, {}
    for name in ("vanilla", "kvcached"):
        for mode in ("eager", "graphs"):
            run = f"offline_{name}_{mode}"
            out, logs[run] = os.path.join(OUT, f"{run}.json"), os.path.join(OUT, "logs", f"{run}.log")
            argv = [sys.executable, __file__, "offline-child", "--model", small, "--out", out]
            argv += (["--kvcached"] if name == "kvcached" else []) + (["--eager"] if mode == "eager" else [])
            wait_for_memory(gpu, baseline)
            proc = subprocess.Popen(argv, env=env(name == "kvcached", run), stdout=open(logs[run], "w"),
                                    stderr=subprocess.STDOUT)
            while proc.poll() is None:
                time.sleep(15)
                log(f"{run} running: {tail(logs[run], 1)}")
            tokens[run] = json.load(open(out)) if os.path.exists(out) else None
            log(f"{run} exited {proc.returncode}, {'with' if tokens[run] else 'WITHOUT'} tokens")
    checks = {"all_ran": all(tokens.values()),
              "kvcached_active": all("kvcached is active" in open(logs[f"offline_kvcached_{m}"]).read()
                                     for m in ("eager", "graphs"))}
    for mode in ("eager", "graphs"):
        checks[f"identical_{mode}"] = bool(tokens[f"offline_vanilla_{mode}"]) and (
            tokens[f"offline_vanilla_{mode}"] == tokens[f"offline_kvcached_{mode}"])
    return {"checks": checks, "tokens": tokens, "errors_in_logs": {run: errors(path) for run, path in logs.items()}}


def wait_for_memory(gpu: Gpu, baseline: int, timeout_s: float = 120) -> None:
    """Until the device's used memory is back near `baseline` (a stopped engine's memory is freed as it exits)."""
    deadline = time.monotonic() + timeout_s
    while gpu.snapshot()["used"] > baseline + (1 << 30) and time.monotonic() < deadline:
        time.sleep(1)


# ---- servers ----------------------------------------------------------------------------------------------------------

class Server:
    def __init__(self, name: str, model_dir: str, port: int, kvcached: bool, args: tuple[str, ...] = (),
                 **extra_env: str) -> None:
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.log_path = os.path.join(OUT, "logs", f"{name}.log")
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--port", str(port),
                "--served-model-name", name, "--max-model-len", "4096", "--seed", "0", "--generation-config", "vllm",
                "--disable-uvicorn-access-log", *args]
        self.proc = subprocess.Popen(argv, env=env(kvcached, name, KVCACHED_IPC_NAME=name, **extra_env),
                                     stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 300) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {tail(self.log_path, 5)}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(5)
            if int(time.monotonic() - started) % 30 < 5:
                log(f"{self.name} starting ({time.monotonic() - started:.0f} s): {tail(self.log_path, 1)}")
        raise RuntimeError(f"{self.name} not ready in {timeout_s} s: {tail(self.log_path, 5)}")

    def complete(self, prompt: str, max_tokens: int, timeout: float = 300) -> dict:
        body = json.dumps({"model": self.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True, "return_token_ids": True}).encode()
        request = urllib.request.Request(self.url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read())

    def pids(self) -> list[str]:
        import psutil

        root = psutil.Process(self.proc.pid)
        return [str(p.pid) for p in [root] + root.children(recursive=True)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)


def long_prompt(i: int, words: int) -> str:
    vocab = "the cat sat on a mat and the dog ran in the park while birds sang over green trees".split()
    return f"Request {i}: " + " ".join(vocab[(i + 7 * k) % len(vocab)] for k in range(words))


def burst(server: Server, count: int, words: int, max_tokens: int) -> list:
    def one(i: int):
        try:
            return server.complete(long_prompt(i, words), max_tokens)["usage"]["completion_tokens"]
        except Exception as exc:  # noqa: BLE001 - a failed request is a result
            return f"error: {exc}"

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def of(snapshot: dict, pids: list[str], baseline: int) -> int:
    """A server's GPU memory: its processes' in NVML, or (where NVML lists other pids, as in some containers) the
    device's used memory above what it was before the server started."""
    mine = [used for pid, used in snapshot["processes"].items() if pid in pids]
    return sum(mine) if mine else snapshot["used"] - baseline


def part_server(gpu: Gpu) -> dict:
    small, result = model(SMALL), {}
    baseline = gpu.snapshot()["used"]
    for name, kvcached in (("vanilla", False), ("kvcached", True)):
        log(f"{name} server: starting with vLLM's GPU defaults")
        wait_for_memory(gpu, baseline)
        server = Server(f"server-{name}", small, 8410 if kvcached else 8411, kvcached)
        try:
            ready_s = server.wait_ready()
            time.sleep(3)
            pids, idle = server.pids(), gpu.snapshot()
            tokens = [server.complete(p, 32)["choices"][0]["token_ids"] for p in PROMPTS]
            log(f"{name}: ready in {ready_s:.0f} s, idle {of(idle, pids, baseline) >> 20} MiB; burst of 64 requests")
            done, samples = sampled(gpu, lambda: burst(server, 64, 1500, 128))
            time.sleep(3)  # kvcached gives the reserve back after KVCACHED_TRIM_IDLE_S (1 s) without allocations
            after = gpu.snapshot()
            result[name] = {"ready_s": ready_s, "tokens": tokens, "burst_completion_tokens": done,
                            "memory": {"idle": of(idle, pids, baseline), "peak": of(peak(samples), pids, baseline),
                                       "after": of(after, pids, baseline), "device_idle": idle["used"],
                                       "device_peak": peak(samples)["used"], "device_after": after["used"]},
                            "errors_in_log": errors(server.log_path)}
            log(f"{name}: memory MiB idle/peak/after {[v >> 20 for v in list(result[name]['memory'].values())[:3]]}")
        finally:
            server.stop()
    both = result.get("vanilla") and result.get("kvcached")
    checks = {
        "identical_tokens": bool(both) and result["vanilla"]["tokens"] == result["kvcached"]["tokens"],
        "bursts_complete": bool(both) and all(t == 128 for r in result.values() for t in r["burst_completion_tokens"]),
        "kvcached_active": "kvcached is active" in open(os.path.join(OUT, "logs", "server-kvcached.log")).read(),
        "kvcached_idle_below_vanilla": bool(both) and result["kvcached"]["memory"]["idle"] < result["vanilla"]["memory"]["idle"],
        "no_errors_in_logs": bool(both) and not any(r["errors_in_log"] for r in result.values()),
    }
    return {"checks": checks, "servers": result}


def part_race(gpu: Gpu) -> dict:
    large = model(LARGE)
    per_token = 32 * 2 * 8 * 128 * 2  # layers x (K, V) x KV heads x head size x bf16
    requests, words, max_tokens = 128, 1900, 256
    log(f"model {large}; two kvcached servers, bursts of {requests} x ~{words + max_tokens} tokens each "
        f"({2 * requests * (words + max_tokens) * per_token / 2**30:.0f} GiB of KV, the GPU has {gpu.total / 2**30:.0f})")
    extra = {"KVCACHED_GPU_UTILIZATION": "0.98"}  # close to the edge: a race can meet the device's real limit
    baseline = gpu.snapshot()["used"]
    servers = [Server(f"race-{x}", large, port, True, **extra) for x, port in (("a", 8420), ("b", 8421))]
    try:
        ready = [s.wait_ready() for s in servers]
        pids = [s.pids() for s in servers]
        idle = gpu.snapshot()
        demand = 2 * requests * (words + max_tokens) * per_token
        log(f"ready in {ready}; bursts on both at once")
        with ThreadPoolExecutor(2) as pool:
            done, samples = sampled(gpu, lambda: list(pool.map(lambda s: burst(s, requests, words, max_tokens), servers)),
                                    0.2)
        time.sleep(3)
        after = gpu.snapshot()
        alive = [s.proc.poll() is None for s in servers]
        logs = [open(s.log_path).read() for s in servers]
        errs = [errors(s.log_path) for s in servers]  # before stopping: shutdown may print tracebacks
    finally:
        for s in servers:
            s.stop()
    top = peak(samples)
    checks = {
        "both_bursts_complete": all(t == max_tokens for d in done for t in d),
        "both_servers_alive": all(alive),
        "no_errors_in_logs": not any(errs),
        "demand_exceeds_free_memory": demand > gpu.total - idle["used"],
    }
    return {"checks": checks, "ready_s": ready, "completion_tokens": done, "device_total": gpu.total,
            "kv_demand_bytes": demand, "device_idle": idle["used"], "device_baseline": baseline,
            "memory": {s.name: {"idle": of(idle, p, baseline), "peak": of(top, p, baseline),
                                "after": of(after, p, baseline)} for s, p in zip(servers, pids)},
            "device_peak": top["used"],
            "pages_not_mapped_warnings": [log_text.count("could not be mapped") for log_text in logs], "errors": errs,
            "samples": samples[::5]}


def tail(path: str, lines: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-lines:])[-400:]
    except OSError:
        return ""


def errors(path: str) -> list[str]:
    """Lines of a log that show an error (kvcached's own note that a page could not be mapped is not one)."""
    with open(path, errors="replace") as f:
        return [line.strip()[:300] for line in f if any(e in line for e in ERRORS) and "kvcached:" not in line][:20]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["tokens", "server", "race", "offline-child"])
    parser.add_argument("--model")
    parser.add_argument("--out")
    parser.add_argument("--kvcached", action="store_true")
    parser.add_argument("--eager", action="store_true")
    args = parser.parse_args()
    if args.part == "offline-child":
        return offline_child(args)
    os.makedirs(os.path.join(OUT, "logs"), exist_ok=True)
    check_hook()
    gpu = Gpu()
    result = {"tokens": part_tokens, "server": part_server, "race": part_race}[args.part](gpu)
    import vllm

    result["vllm"], result["seconds"] = vllm.__version__, round(time.monotonic() - START)
    with open(os.path.join(OUT, f"check_vllm_{args.part}.json"), "w") as f:
        json.dump(result, f, indent=1)
    failed = [name for name, ok in result["checks"].items() if not ok]
    log(f"{args.part}: {'FAILED ' + ', '.join(failed) if failed else 'all checks passed'}: {result['checks']}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
