"""kvcached on vLLM 0.26.0 with a real GPU (issue 9): outputs, memory per process, and two engines racing for memory.

Run on the GPU machine from the project's root, after the vLLM bundle is installed (see /work/notes/vllm026.md) and
kvcached is installed into the machine's Python (its start-up hook is a .pth, which PYTHONPATH does not read):

    source /tmp/vc/vllm-gpu-install.sh && pip install -q --no-deps --no-build-isolation . \\
        && python scripts/gpu/check_vllm.py tokens     # ~5 min: offline LLM, eager and CUDA graphs
    python scripts/gpu/check_vllm.py server            # ~6 min: OpenAI server, tokens + NVML memory per process
    python scripts/gpu/check_vllm.py race              # ~7 min: two servers whose bursts exceed the GPU
    python scripts/gpu/check_vllm.py pair              # ~7 min: two servers, alternating bursts, `kvctl limit` on one

Each part stays under 10 minutes (requests time out after 300 s, a server start after 300 s), writes
$OUT/check_vllm_<part>.json (and the servers' logs under $OUT/logs/), prints progress, and exits 1 if
a check failed. vLLM runs with its GPU defaults (CUDA graphs, async scheduling, prefix caching); kvcached is turned on
by ENABLE_KVCACHED=true KVCACHED_AUTOPATCH=1 alone. Models: random-weight Llamas made by /tmp/vc/vllm_gpu_model.py
(greedy outputs are deterministic): 4 layers for `tokens` and `server`, Llama-3.1-8B-shaped for `race` and `pair`.
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


def env(kvcached: bool, tag: str, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """An engine's environment: `base` (default this process's) without kvcached's settings, then kvcached on or off."""
    base = os.environ if base is None else base
    out = {k: v for k, v in base.items() if not k.startswith("KVCACHED_") and k != "ENABLE_KVCACHED"}
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


def sampled(gpu: Gpu, work, period_s: float = 0.1, extra=dict):
    """Run work() while NVML (and `extra()`, merged in) is read every `period_s`; returns its result and the snapshots."""
    samples, stop = [], threading.Event()

    def sample() -> None:
        while not stop.wait(period_s):
            samples.append({"t": round(time.monotonic() - START, 2), **gpu.snapshot(), **extra()})

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
    runners = {run: model_runner(path) for run, path in logs.items()}
    for mode in ("eager", "graphs"):
        checks[f"identical_{mode}"] = bool(tokens[f"offline_vanilla_{mode}"]) and (
            tokens[f"offline_vanilla_{mode}"] == tokens[f"offline_kvcached_{mode}"])
        checks[f"same_model_runner_{mode}"] = runners[f"offline_vanilla_{mode}"] == runners[f"offline_kvcached_{mode}"]
    return {"checks": checks, "tokens": tokens, "model_runner": runners,
            "errors_in_logs": {run: errors(path) for run, path in logs.items()}}


def model_runner(log_path: str) -> str:
    """Which vLLM model runner an engine used, from its log (vLLM 0.26 says "Using V2 Model Runner" once)."""
    return "V2" if "Using V2 Model Runner" in open(log_path).read() else "V1"


def wait_for_memory(gpu: Gpu, baseline: int, timeout_s: float = 120) -> None:
    """Until the device's used memory is back near `baseline` (a stopped engine's memory is freed as it exits)."""
    deadline = time.monotonic() + timeout_s
    while gpu.snapshot()["used"] > baseline + (1 << 30) and time.monotonic() < deadline:
        time.sleep(1)


# ---- servers ----------------------------------------------------------------------------------------------------------

class Server:
    """A vLLM OpenAI server (registered as `name` when kvcached is on); start() serves other engines' servers too."""

    def __init__(self, name: str, model_dir: str, port: int, kvcached: bool, args: tuple[str, ...] = (),
                 **extra_env: str) -> None:
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--port", str(port),
                "--served-model-name", name, "--max-model-len", "4096", "--seed", "0", "--generation-config", "vllm",
                "--disable-uvicorn-access-log", *args]
        self.start(name, port, argv, env(kvcached, name, KVCACHED_IPC_NAME=name, **extra_env))

    def start(self, name: str, port: int, argv: list[str], environ: dict[str, str]) -> None:
        """Start `argv` (a server answering GET /health on `port`) in its own session, logging to OUT/logs/NAME.log."""
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.log_path = os.path.join(OUT, "logs", f"{name}.log")
        self.proc = subprocess.Popen(argv, env=environ, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

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


def burst(server: Server, count: int, words: int, max_tokens: int, timeout: float = 300) -> list:
    def one(i: int):
        try:
            return server.complete(long_prompt(i, words), max_tokens, timeout)["usage"]["completion_tokens"]
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


PAIR_LIMIT = 4 << 30  # what `kvctl limit` gives server B in the middle of its second burst
PAIR_SLACK = 64 << 20  # B's memory besides KV may move this much while it serves (PyTorch's caching allocator)


def kv_mapped(name: str) -> int:
    """An instance's KV bytes mapped on the GPU, as its registry record says (what `kvctl list` shows)."""
    from kvcached import registry

    return registry.read_instance(name).mapped_bytes


def kvctl(*args: str) -> dict:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "kvcached.cli.kvctl", *args], capture_output=True, text=True)
    return {"argv": ["kvctl", *args], "rc": done.returncode, "output": (done.stdout + done.stderr).strip()[-400:],
            "t": round(started - START, 2)}


def part_pair(gpu: Gpu) -> dict:
    """Two kvcached servers, bursts taking turns (A, B, then B again with `kvctl limit B 4G` issued 3 s into it):
    each one's memory follows its own load, the limit caps B within the burst, A is untouched by B's bursts."""
    large = model(LARGE)
    requests, words, max_tokens = 64, 1900, 256
    baseline = gpu.snapshot()["used"]
    servers = {x: Server(f"pair-{x}", large, port, True) for x, port in (("a", 8430), ("b", 8431))}
    names = {x: s.name for x, s in servers.items()}
    phases, actions = {}, []
    try:
        ready = {x: s.wait_ready() for x, s in servers.items()}
        pids = {x: s.pids() for x, s in servers.items()}

        def figures() -> dict:
            snap = gpu.snapshot()
            out = {f"{x}_gpu": of(snap, pids[x], baseline) for x in servers}
            out.update({f"{x}_kv": kv_mapped(names[x]) for x in servers})
            return out

        idle = figures()
        log(f"ready in {ready}; idle {idle}")

        def limited_burst() -> list:
            timer = threading.Timer(3.0, lambda: actions.append(kvctl("limit", names["b"], str(PAIR_LIMIT))))
            timer.start()
            try:
                return burst(servers["b"], requests, words, 2 * max_tokens)
            finally:
                timer.join()

        plan = [("A", lambda: burst(servers["a"], requests, words, max_tokens)),
                ("B", lambda: burst(servers["b"], requests, words, max_tokens)),
                ("B limited", limited_burst)]
        for label, work in plan:
            log(f"burst {label}")
            done, samples = sampled(gpu, work, 0.2, figures)
            phases[label] = {"completion_tokens": done, "samples": samples}
            time.sleep(4)  # the reserve goes back after KVCACHED_TRIM_IDLE_S without allocations
            phases[label]["after"] = figures()
            log(f"after {label}: {phases[label]['after']}")
        actions.append(kvctl("limit", names["b"], "none"))
        actions.append(kvctl("list"))
        alive = {x: s.proc.poll() is None for x, s in servers.items()}
        errs = {x: errors(s.log_path) for x, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()
    return {**pair_checks(idle, phases, actions, max_tokens), "ready_s": ready, "idle": idle, "alive": alive,
            "errors": errs, "actions": actions, "limit_bytes": PAIR_LIMIT, "max_tokens": max_tokens,
            "phases": phases}


def pair_checks(idle: dict, phases: dict, actions: list, max_tokens: int) -> dict:
    """What the pair run must show, from its samples: `x_gpu` (NVML, per server) and `x_kv` (registry)."""
    def top(label: str, key: str, since: float = 0.0) -> int:
        return max((s[key] for s in phases[label]["samples"] if s["t"] >= since), default=0)

    def span(label: str, key: str) -> int:  # how far a figure moved during a phase
        values = [s[key] for s in phases[label]["samples"]]
        return max(values) - min(values) if values else 0

    limit_at = next((a["t"] for a in actions if a["argv"][1] == "limit" and a["argv"][3] != "none"), None)
    limited = phases["B limited"]["samples"]
    under = [s["t"] for s in limited if limit_at is not None and s["t"] >= limit_at and s["b_kv"] <= PAIR_LIMIT]
    settled = under[0] if under else None
    over_after = [s for s in limited if settled is not None and s["t"] >= settled and s["b_kv"] > PAIR_LIMIT]
    # B's NVML figure may hold what it holds besides KV (weights, CUDA graphs, and the activation buffers its first
    # burst grew: measured after that burst, not at idle), the limit, and a little slack for PyTorch's allocator
    other = phases["B"]["after"]["b_gpu"] - phases["B"]["after"]["b_kv"]
    gpu_cap = other + PAIR_LIMIT + PAIR_SLACK
    figures = {
        "a_peak_gpu_in_A": top("A", "a_gpu"), "b_peak_gpu_in_B": top("B", "b_gpu"),
        "a_after_A": phases["A"]["after"]["a_gpu"], "b_after_B": phases["B"]["after"]["b_gpu"],
        "a_moved_during_B_bursts": max(span("B", "a_gpu"), span("B limited", "a_gpu")),
        "b_moved_during_A_burst": span("A", "b_gpu"),
        "limit_requested_t": limit_at, "b_kv_within_limit_t": settled,
        "b_kv_within_limit_s": None if settled is None else round(settled - limit_at, 2),
        "b_samples_over_limit_after_within": len(over_after),
        "b_peak_gpu_after_within": top("B limited", "b_gpu", settled) if settled is not None else None,
        "b_gpu_besides_kv": other, "b_gpu_cap": gpu_cap,
    }
    grew = 2 << 30
    checks = {
        "all_bursts_complete": all(t in (max_tokens, 2 * max_tokens) for p in phases.values()
                                   for t in p["completion_tokens"]),
        "memory_follows_load": figures["a_peak_gpu_in_A"] > idle["a_gpu"] + grew
        and figures["b_peak_gpu_in_B"] > idle["b_gpu"] + grew,
        "memory_returns_after_burst": figures["a_after_A"] <= idle["a_gpu"] + (1 << 30)
        and figures["b_after_B"] <= idle["b_gpu"] + (1 << 30),
        "other_server_untouched": figures["a_moved_during_B_bursts"] <= (256 << 20)
        and figures["b_moved_during_A_burst"] <= (256 << 20),
        "limit_applied": any(a["rc"] == 0 for a in actions if a["argv"][1] == "limit"),
        "limit_reached_within_burst": settled is not None and not over_after,
        "limit_caps_gpu_memory": settled is not None and figures["b_peak_gpu_after_within"] <= gpu_cap,
    }
    return {"checks": checks, "figures": figures}


def recheck_pair(path: str) -> None:
    """Judge a saved pair run again with this script's checks (written back into the file, with the old ones)."""
    with open(path) as f:
        result = json.load(f)
    old = {"checks": result["checks"], "figures": result["figures"]}
    result.update(pair_checks(result["idle"], result["phases"], result["actions"],
                              result.get("max_tokens", 256)))  # the first run (11-23) saved no max_tokens: 256
    result.setdefault("rechecked_from", old)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    plot_pair(result, os.path.splitext(path)[0] + ".png")
    failed = [name for name, ok in result["checks"].items() if not ok]
    log(f"pair (rechecked): {'FAILED ' + ', '.join(failed) if failed else 'all checks passed'}: {result['checks']}")
    sys.exit(1 if failed else 0)


def plot_pair(result: dict, png: str) -> None:
    """GPU memory of both servers (NVML) and B's KV (registry) over the three bursts, with B's limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    t0 = min(s["t"] for p in result["phases"].values() for s in p["samples"])
    for label, phase in result["phases"].items():
        t = [s["t"] - t0 for s in phase["samples"]]
        ax.axvspan(t[0], t[-1], color="tab:blue" if label == "A" else "tab:green", alpha=0.12)
        ax.text(t[0], 0.5, f"burst {label}", fontsize=8)
        for key, style in (("a_gpu", "tab:blue"), ("b_gpu", "tab:green")):
            ax.plot(t, [s[key] / 2**30 for s in phase["samples"]], color=style,
                    label=f"server {key[0].upper()}, NVML" if label == "A" else None)
        ax.plot(t, [s["b_kv"] / 2**30 for s in phase["samples"]], color="tab:green", linestyle=":",
                label="server B, KV mapped (registry)" if label == "A" else None)
    limit_t = result["figures"]["limit_requested_t"] - t0
    ax.axvline(limit_t, color="black", linewidth=0.8)
    end = max(s["t"] for s in result["phases"]["B limited"]["samples"]) - t0
    ax.hlines(result["limit_bytes"] / 2**30, limit_t, end, color="black", linestyle="--", linewidth=0.8,
              label=f"`kvctl limit` on B: {result['limit_bytes'] / 2**30:.0f} GiB of KV (from the vertical line)")
    ax.set_xlabel("seconds since burst A started (shaded: bursts)")
    ax.set_ylabel("GiB")
    ax.set_title("Two vLLM 0.26 servers with kvcached on one H100 (Llama-8B-shaped): memory follows each one's load")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    log(f"plot {png}")


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
    parser.add_argument("part", choices=["tokens", "server", "race", "pair", "offline-child"])
    parser.add_argument("--model")
    parser.add_argument("--out")
    parser.add_argument("--kvcached", action="store_true")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--recheck", metavar="JSON", help="pair: judge a saved run's samples again (no GPU needed)")
    args = parser.parse_args()
    if args.part == "offline-child":
        return offline_child(args)
    if args.recheck:
        return recheck_pair(args.recheck)
    os.makedirs(os.path.join(OUT, "logs"), exist_ok=True)
    check_hook()
    gpu = Gpu()
    result = {"tokens": part_tokens, "server": part_server, "race": part_race, "pair": part_pair}[args.part](gpu)
    import vllm

    result["vllm"], result["seconds"] = vllm.__version__, round(time.monotonic() - START)
    with open(os.path.join(OUT, f"check_vllm_{args.part}.json"), "w") as f:
        json.dump(result, f, indent=1)
    failed = [name for name, ok in result["checks"].items() if not ok]
    log(f"{args.part}: {'FAILED ' + ', '.join(failed) if failed else 'all checks passed'}: {result['checks']}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
