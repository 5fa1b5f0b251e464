"""SGLang 0.5.15.post1 with and without kvcached on one GPU: outputs, memory, limits, release/resume, throughput.

On the GPU machine, from the project's root, after the SGLang bundle is unpacked in /tmp/sg (../shared/device/):

    source /tmp/sg/sglang-gpu-install.sh
    python3 -m pip install -q --no-deps --no-build-isolation .      # the start-up hook (.pth) into site-packages
    python3 scripts/gpu/check_sglang.py --model /tmp/sg/tok --out "$OUT"

Two engine starts, vanilla first, then kvcached (ENABLE_KVCACHED=1 KVCACHED_AUTOPATCH=1 set before SGLang spawns its
scheduler, whose start-up hook patches it), with the same settings: a random-weight Llama of --layers layers made from
--model's config.json and tokenizer (load_format="dummy": SGLang's dummy weights are seeded, so both engines hold the
same weights), triton attention, PyTorch sampling, no grammar backend, --enable-memory-saver, decode CUDA graphs, at
most --max-running requests at once. Each engine: 8 greedy prompts; GPU memory idle (NVML: the device, and each process
of this process tree); a warm-up burst (not counted), then --repeats bursts of --prompts random prompts of
--output-len tokens each (several seconds each; different prompts per burst, the same for both engines), sampled every
50 ms for the peak, each starting from an idle engine; the throughput compared is the median burst's; memory after the
burst; release and resume of the KV cache (memory, and the 8 prompts again). kvcached only: `kvctl list --json` shows
the instance, and a burst of --limit-prompts during which `kvctl limit NAME <--limit-mib>M` is set once the instance
maps twice that: the samples read the instance's record, so the first one showing the new limit marks when the engine
applied it; from then on, mapped memory must stay within max(limit, the least in use seen since), come down to the
limit while the burst still runs (down_after_applied_s: about one request's life, the time the requests holding the
page left to drain take to finish; the burst lasts several of those), and, once the burst is over and the engine idle,
stay within the limit. JSON goes to
--out/check_sglang.json after every phase, so a run cut short still reports what it did. With --server, a third
start: `python -m sglang.launch_server` with kvcached on --port (8600), whose greedy outputs over HTTP must equal the
offline ones, and whose /release_memory_occupation and /resume_memory_occupation must free and restore the memory.
`--only server` on the same machine compares with the offline outputs an earlier run left in /tmp (GREEDY_FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):", "The quick brown fox",
           "In 1969, the first", "Water boils at", "A haiku about GPUs:", "SELECT name FROM"]
GREEDY = {"temperature": 0, "max_new_tokens": 32}
MIB = 1 << 20
GREEDY_FILE = "/tmp/sgl-check-greedy.json"  # the offline greedy outputs, for a later `--only server` run


def log(message: str) -> None:
    print(f"[check_sglang {time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_model(source: str, layers: int) -> str:
    out = f"/tmp/sgl-check-llama-{layers}l"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] = layers
    for name in os.listdir(source):  # the tokenizer's files; no weights: load_format="dummy"
        if name != "config.json" and not name.endswith((".safetensors", ".bin", ".gguf")) \
                and os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return out


class Gpu:
    """NVML's view of GPU 0: device memory used, and per process of this process tree (no CUDA context here)."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)

    def device_mib(self) -> int:
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used // MIB

    def processes_mib(self) -> dict[int, int]:
        import psutil

        tree = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            running = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except self.nvml.NVMLError as exc:  # some containers hide processes: the device figure still counts
            return {"unavailable": str(exc)}
        return {p.pid: (p.usedGpuMemory or 0) // MIB for p in running if p.pid in tree}

    def snapshot(self) -> dict:
        procs = self.processes_mib()
        tree = sum(v for v in procs.values() if isinstance(v, int))
        return {"device_mib": self.device_mib(), "processes_mib": procs, "tree_mib": tree}

    def wait_below(self, mib: int, timeout_s: float = 60.0) -> int:
        deadline = time.monotonic() + timeout_s
        while self.device_mib() > mib and time.monotonic() < deadline:
            time.sleep(0.5)
        return self.device_mib()


class Sampler(threading.Thread):
    """Device memory (and the kvcached instance's mapped bytes) every 50 ms while a burst runs; `on_sample` may act."""

    def __init__(self, gpu: Gpu, ipc_name: str | None, on_sample=None) -> None:
        super().__init__(daemon=True)
        self.gpu, self.ipc_name, self.on_sample = gpu, ipc_name, on_sample
        self.samples: list[dict] = []
        self.t0, self.done = time.monotonic(), threading.Event()  # not `_stop`: threading.Thread has one

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.sample()

    def sample(self) -> None:
        sample = {"t": round(time.monotonic() - self.t0, 3), "device_mib": self.gpu.device_mib()}
        if self.ipc_name:
            sample.update(instance_mib(self.ipc_name))
        self.samples.append(sample)
        if self.on_sample:
            self.on_sample(sample)

    def stop(self) -> list[dict]:
        self.done.set()
        self.join()
        self.sample()  # the last one, after the burst
        return self.samples


def mapped_bytes(ipc_name: str) -> int:
    from kvcached import registry

    return registry.read_instance(ipc_name).mapped_bytes


def instance_mib(ipc_name: str) -> dict:
    """The instance's record as the engine last published it: mapped, in use, and the limit it applies."""
    from kvcached import registry

    record = registry.read_instance(ipc_name)
    return {"mapped_mib": record.mapped_bytes / MIB, "used_mib": record.used_bytes / MIB,
            "limit_mib": record.limit_bytes / MIB}


def kvctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvcached.cli.kvctl", *args], capture_output=True, text=True)


def burst_prompts(seed: int, count: int, length: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(count)]


def run_burst(engine, gpu: Gpu, prompts, output_len: int, ipc_name: str | None, on_sample=None) -> dict:
    sampler = Sampler(gpu, ipc_name, on_sample)
    sampler.start()
    t0 = time.monotonic()
    outs = engine.generate(input_ids=prompts,
                           sampling_params={"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True})
    wall = time.monotonic() - t0
    samples = sampler.stop()
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    finished = sum(1 for o in outs if (o["meta_info"].get("finish_reason") or {}).get("type") == "length")
    result = {"requests": len(outs), "finished_at_length": finished, "output_tokens": tokens, "wall_s": round(wall, 3),
              "tok_per_s": round(tokens / wall, 1), "peak_device_mib": max(s["device_mib"] for s in samples)}
    if ipc_name:
        result["peak_mapped_mib"] = round(max(s["mapped_mib"] for s in samples), 1)
    result["samples"] = samples
    return result


def texts(engine) -> list[str]:
    return [o["text"] for o in engine.generate(PROMPTS, GREEDY)]


def check_engine(label: str, engine_kwargs: dict, args, gpu: Gpu, vocab: int, ipc_name: str | None,
                 results: dict, save) -> None:
    import sglang as sgl

    part = results[label] = {}
    t0 = time.monotonic()
    engine = sgl.Engine(**engine_kwargs)
    part["start_s"] = round(time.monotonic() - t0, 1)
    log(f"{label}: engine up in {part['start_s']} s")
    try:
        if ipc_name:
            listed = kvctl("list", "--json", ipc_name)
            part["kvctl_list"] = json.loads(listed.stdout) if listed.returncode == 0 else listed.stderr.strip()
            log(f"{label}: kvctl list -> {listed.stdout.strip()[:300] or listed.stderr.strip()}")
        part["greedy"] = texts(engine)
        log(f"{label}: greedy {part['greedy'][:2]}")
        with open(GREEDY_FILE, "w") as f:
            json.dump(part["greedy"], f)
        time.sleep(2.5)  # past KVCACHED_TRIM_IDLE_S: an idle kvcached engine has given its reserve back
        part["idle"] = gpu.snapshot()
        if ipc_name:
            part["idle"]["mapped_mib"] = mapped_bytes(ipc_name) / MIB
        log(f"{label}: idle {part['idle']}")
        save()
        warmup = run_burst(engine, gpu, burst_prompts(1000, args.warmup_prompts, args.input_len, vocab),
                           args.output_len, ipc_name)
        part["warmup"] = {k: v for k, v in warmup.items() if k != "samples"}
        log(f"{label}: warm-up burst (not counted): {warmup['wall_s']} s, {warmup['tok_per_s']} tok/s")
        time.sleep(2.5)  # every burst starts from an idle engine (kvcached: its reserve given back)
        part["bursts"] = []
        for seed in range(args.repeats):
            prompts = burst_prompts(seed, args.prompts, args.input_len, vocab)
            burst = run_burst(engine, gpu, prompts, args.output_len, ipc_name)
            time.sleep(2.5)
            burst["after"] = gpu.snapshot()
            if ipc_name:
                burst["after"]["mapped_mib"] = mapped_bytes(ipc_name) / MIB
            part["bursts"].append(burst)
            log(f"{label}: burst {seed + 1}/{args.repeats}: {burst['wall_s']} s, {burst['tok_per_s']} tok/s, peak "
                f"{burst['peak_device_mib']} MiB on the device"
                f"{', mapped ' + str(burst.get('peak_mapped_mib')) + ' MiB' if ipc_name else ''}; after "
                f"{burst['after']['device_mib']} MiB")
            save()
        if part["bursts"]:  # --repeats 0: no throughput figure (a run for the limit alone)
            part["tok_per_s"] = [b["tok_per_s"] for b in part["bursts"]]
            part["median_tok_per_s"] = statistics.median(part["tok_per_s"])
            log(f"{label}: bursts {part['tok_per_s']} tok/s, median {part['median_tok_per_s']}")
        if ipc_name:
            part["limited_burst"] = limited_burst(engine, gpu, args, vocab, ipc_name)
            save()
        part["release_resume"] = release_resume(engine, gpu, part["greedy"], ipc_name)
        log(f"{label}: release/resume {part['release_resume']}")
        save()
    finally:
        engine.shutdown()
    log(f"{label}: engine shut down; device at {gpu.wait_below(results['device_before_mib'] + 1024)} MiB")


def limited_burst(engine, gpu: Gpu, args, vocab: int, ipc_name: str) -> dict:
    """A burst during which `kvctl limit` caps the instance, requested once it maps twice the limit."""
    limit_mib = float(args.limit_mib)
    requested: dict = {}

    def set_limit():
        t0 = time.monotonic()
        out = kvctl("limit", ipc_name, f"{args.limit_mib}M")
        requested.update(rc=out.returncode, kvctl_s=round(time.monotonic() - t0, 3),
                         output=(out.stdout + out.stderr).strip())

    def on_sample(sample):  # kvctl runs beside the sampler, which keeps sampling meanwhile
        if not requested and sample["mapped_mib"] > 2 * limit_mib:
            requested.update(t=sample["t"], mapped_mib=sample["mapped_mib"])
            threading.Thread(target=set_limit, daemon=True).start()

    prompts = burst_prompts(100, args.limit_prompts, args.input_len, vocab)
    burst = run_burst(engine, gpu, prompts, args.output_len, ipc_name, on_sample)
    time.sleep(2.5)  # idle: the engine's idle hook trims its prefix cache and reserve
    idle = instance_mib(ipc_name)
    lifted = kvctl("limit", ipc_name, "none")
    result = {"limit_mib": args.limit_mib, "requested": requested, **limit_held(burst["samples"], limit_mib),
              "idle_after": idle, "idle_within_limit": idle["mapped_mib"] <= limit_mib, "lifted_rc": lifted.returncode,
              **burst}
    log(f"limited burst: limit {args.limit_mib} MiB requested at {requested.get('t')} s "
        f"({requested.get('mapped_mib')} MiB mapped), applied by {result['applied_t']} s with "
        f"{result['used_at_applied_mib']} MiB in use; over the bound after: {result['over_bound']}; down to the limit "
        f"at {result['down_to_limit_t']} s ({result['down_after_applied_s']} s after applied; expected within the "
        f"burst); idle after: {idle['mapped_mib']} MiB mapped; {burst['finished_at_length']}"
        f"/{burst['requests']} finished, {burst['tok_per_s']} tok/s")
    return result


def limit_held(samples: list[dict], limit_mib: float) -> dict:
    """When the engine applied the limit (the first sample of its record showing it), the samples after that which
    mapped more than max(limit, the least in use seen since), and when mapped memory was down to the limit while the
    burst still ran (None: only after it, if at all), also as seconds after the limit was applied."""
    applied = next((i for i, s in enumerate(samples) if s["limit_mib"] == limit_mib), None)
    if applied is None:
        return {"applied_t": None, "used_at_applied_mib": None, "over_bound": None, "down_to_limit_t": None,
                "down_after_applied_s": None}
    lowest, over = samples[applied]["used_mib"], []
    for s in samples[applied:]:
        lowest = min(lowest, s["used_mib"])
        if s["mapped_mib"] > max(limit_mib, lowest):
            over.append({"t": s["t"], "mapped_mib": s["mapped_mib"], "bound_mib": max(limit_mib, lowest)})
    down = next((s["t"] for s in samples[applied:-1] if s["mapped_mib"] <= limit_mib), None)  # the last: after
    return {"applied_t": samples[applied]["t"], "used_at_applied_mib": samples[applied]["used_mib"],
            "over_bound": over, "down_to_limit_t": down,
            "down_after_applied_s": None if down is None else round(down - samples[applied]["t"], 3)}


def release_resume(engine, gpu: Gpu, greedy: list[str], ipc_name: str | None) -> dict:
    engine.generate(PROMPTS, GREEDY)  # KV in use before the release, as in a real sleep
    before = gpu.snapshot()
    mapped_before = mapped_bytes(ipc_name) / MIB if ipc_name else None
    engine.release_memory_occupation(tags=["kv_cache"])
    time.sleep(0.5)
    released = gpu.snapshot()
    mapped_released = mapped_bytes(ipc_name) / MIB if ipc_name else None
    engine.resume_memory_occupation(tags=["kv_cache"])
    resumed = gpu.snapshot()
    again = texts(engine)
    return {"before": before, "released": released, "mapped_mib_before": mapped_before,
            "mapped_mib_released": mapped_released, "resumed": resumed,
            "freed_mib": before["device_mib"] - released["device_mib"], "outputs_equal_after_resume": again == greedy}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder with config.json and the tokenizer (e.g. /tmp/sg/tok)")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for check_sglang.json (default $OUT)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, default=1024, help="requests per measured burst")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3,
                   help="measured bursts per engine (different prompts each; 0: none, e.g. for the limit alone)")
    p.add_argument("--warmup-prompts", type=int, default=256, help="requests of the warm-up burst (not counted)")
    p.add_argument("--limit-mib", type=int, default=128, help="the kvctl limit set during the limited burst")
    p.add_argument("--limit-prompts", type=int, default=512,
                   help="requests of the limited burst (512: about 9 s at the limit on the H100)")
    add_engine_arguments(p)
    p.add_argument("--only", choices=("vanilla", "kvcached", "server"), help="run one phase only")
    p.add_argument("--server", action="store_true", help="also start the HTTP server with kvcached (a third start)")
    p.add_argument("--port", type=int, default=8600, help="the HTTP server's port (--server)")
    args = p.parse_args()
    for name in ("ENABLE_KVCACHED", "KVCACHED_AUTOPATCH"):
        os.environ.pop(name, None)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "check_sglang.json")
    results: dict = {"args": vars(args)}

    def save() -> None:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    model = make_model(args.model, args.layers)
    with open(os.path.join(model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    gpu = Gpu()
    import sglang
    import torch

    results["versions"] = {"sglang": sglang.__version__, "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    results["engine_kwargs"] = engine_kwargs = engine_settings(model, args)
    results["device_before_mib"] = gpu.device_mib()
    phases = [args.only] if args.only else ["vanilla", "kvcached"] + (["server"] if args.server else [])
    if "vanilla" in phases:
        log("vanilla SGLang (static KV pool)")
        check_engine("vanilla", engine_kwargs, args, gpu, vocab, None, results, save)
    if "kvcached" in phases or "server" in phases:
        require_startup_hook()
        os.environ.update(ENABLE_KVCACHED="1", KVCACHED_AUTOPATCH="1")
        run_startup_hook()
    if "kvcached" in phases:
        ipc_name = f"sglang-check-{os.getpid()}"
        os.environ["KVCACHED_IPC_NAME"] = ipc_name
        log(f"SGLang with kvcached (registry name {ipc_name})")
        try:
            check_engine("kvcached", engine_kwargs, args, gpu, vocab, ipc_name, results, save)
        finally:
            time.sleep(1.0)
            results["kvctl_delete"] = kvctl("delete", ipc_name).returncode
    if "server" in phases:
        log("SGLang's HTTP server with kvcached")
        check_server(engine_kwargs, args, gpu, results, save)
    summarize(results)
    save()
    log(f"wrote {path}")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The settings engine_settings() reads from the command line."""
    p.add_argument("--max-running", type=int, default=256, help="SGLang's max_running_requests")
    p.add_argument("--mem-fraction", type=float, default=0.3, help="SGLang's mem_fraction_static (static pool)")
    p.add_argument("--cuda-graph-max-bs", type=int, default=256, help="the largest batch of SGLang's decode graphs")


def engine_settings(model: str, args) -> dict:
    """sgl.Engine's keyword arguments (the server's flags, see launch_command) for the random-weight `model`."""
    return dict(model_path=model, load_format="dummy", attention_backend="triton", sampling_backend="pytorch",
                grammar_backend="none", random_seed=0, mem_fraction_static=args.mem_fraction, enable_memory_saver=True,
                cuda_graph_max_bs_decode=args.cuda_graph_max_bs, max_running_requests=args.max_running,
                disable_prefill_cuda_graph=True, log_level="warning")


def launch_command(engine_kwargs: dict, port: int) -> list[str]:
    """`python -m sglang.launch_server` with the same settings as sgl.Engine(**engine_kwargs)."""
    flags = []
    for key, value in engine_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False:
            flags += [flag, str(value)]
    return [sys.executable, "-m", "sglang.launch_server", *flags, "--port", str(port)]


def post(port: int, path: str, body: dict, timeout: float = 300.0):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read().decode()
    return json.loads(text) if text.strip() else None


def check_server(engine_kwargs: dict, args, gpu: Gpu, results: dict, save) -> None:
    """`python -m sglang.launch_server` with kvcached: greedy outputs over HTTP, kvctl, release/resume over HTTP."""
    part = results["server"] = {}
    ipc_name = f"sglang-check-server-{os.getpid()}"
    part["command"] = command = launch_command(engine_kwargs, args.port)
    server = subprocess.Popen(command, env=dict(os.environ, KVCACHED_IPC_NAME=ipc_name), start_new_session=True)
    try:
        t0, deadline = time.monotonic(), time.monotonic() + 300
        while time.monotonic() < deadline and server.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{args.port}/health", timeout=5).read()
                break
            except OSError:
                time.sleep(1)
        part["start_s"] = round(time.monotonic() - t0, 1)
        if server.poll() is not None:
            part["error"] = f"the server exited with {server.returncode}"
            return
        log(f"server: up in {part['start_s']} s")
        listed = kvctl("list", "--json", ipc_name)
        part["kvctl_list"] = json.loads(listed.stdout) if listed.returncode == 0 else listed.stderr.strip()

        def greedy() -> list[str]:
            return [o["text"] for o in post(args.port, "/generate", {"text": PROMPTS, "sampling_params": GREEDY})]

        part["greedy"] = greedy()
        offline = results.get("vanilla", {}).get("greedy") or results.get("kvcached", {}).get("greedy")
        if offline is None and os.path.exists(GREEDY_FILE):
            with open(GREEDY_FILE) as f:
                offline = json.load(f)
        part["greedy_equal_to_offline"] = part["greedy"] == offline if offline else None
        before = gpu.snapshot()
        post(args.port, "/release_memory_occupation", {"tags": ["kv_cache"]})
        time.sleep(0.5)
        released = gpu.snapshot()
        post(args.port, "/resume_memory_occupation", {"tags": ["kv_cache"]})
        part["release_resume"] = {"before": before, "released": released, "resumed": gpu.snapshot(),
                                  "mapped_mib_released": mapped_bytes(ipc_name) / MIB,
                                  "outputs_equal_after_resume": greedy() == part["greedy"]}
        log(f"server: greedy equal to offline {part['greedy_equal_to_offline']}, release/resume "
            f"{part['release_resume']['released']['device_mib']} MiB released, outputs equal after resume "
            f"{part['release_resume']['outputs_equal_after_resume']}")
        save()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        time.sleep(1.0)
        part["kvctl_delete"] = kvctl("delete", ipc_name).returncode
        log(f"server: stopped; device at {gpu.wait_below(results['device_before_mib'] + 1024)} MiB")


def run_startup_hook() -> None:
    """This process started without ENABLE_KVCACHED: run the start-up hook now, as the .pth would have, so that
    kvcached's SGLang plugin check passes here too (the scheduler, spawned now, runs it from the .pth)."""
    from kvcached.integrations import startup

    startup.run()


def require_startup_hook() -> None:
    """SGLang's scheduler is a fresh (spawned) interpreter: kvcached patches it only through the site-packages .pth."""
    import site

    folders = site.getsitepackages() + [site.getusersitepackages()]
    if not any(os.path.exists(os.path.join(d, "kvcached_autopatch.pth")) for d in folders):
        raise SystemExit("kvcached_autopatch.pth is not in site-packages: run `python3 -m pip install --no-deps "
                         "--no-build-isolation .` from the project's root first")


def summarize(results: dict) -> None:
    vanilla, elastic = results.get("vanilla", {}), results.get("kvcached", {})
    summary = results["summary"] = {}
    if "greedy" in vanilla and "greedy" in elastic:
        summary["greedy_outputs_identical"] = vanilla["greedy"] == elastic["greedy"]
    if "median_tok_per_s" in vanilla and "median_tok_per_s" in elastic:
        summary["vanilla_tok_per_s"], summary["kvcached_tok_per_s"] = vanilla["tok_per_s"], elastic["tok_per_s"]
        summary["throughput_ratio_of_medians"] = round(elastic["median_tok_per_s"] / vanilla["median_tok_per_s"], 3)
    for label, part in (("vanilla", vanilla), ("kvcached", elastic)):
        if "idle" in part:
            summary[f"{label}_idle_tree_mib"] = part["idle"]["tree_mib"]
            summary[f"{label}_idle_device_mib"] = part["idle"]["device_mib"]
        if part.get("bursts"):
            summary[f"{label}_peak_device_mib"] = max(b["peak_device_mib"] for b in part["bursts"])
            summary[f"{label}_after_burst_device_mib"] = part["bursts"][-1]["after"]["device_mib"]
        if "release_resume" in part:
            rr = part["release_resume"]
            summary[f"{label}_release_freed_mib"] = rr["freed_mib"]
            summary[f"{label}_outputs_equal_after_resume"] = rr["outputs_equal_after_resume"]
    if "server" in results:
        server = results["server"]
        summary["server_greedy_equal_to_offline"] = server.get("greedy_equal_to_offline")
        resumed = server.get("release_resume", {})
        summary["server_outputs_equal_after_resume"] = resumed.get("outputs_equal_after_resume")
    if "limited_burst" in elastic:
        lb = elastic["limited_burst"]
        summary["limit_mib"] = lb["limit_mib"]
        summary["limit_used_at_applied_mib"] = lb["used_at_applied_mib"]
        summary["limit_over_bound_samples"] = None if lb["over_bound"] is None else len(lb["over_bound"])
        summary["limit_down_to_limit_t"] = lb["down_to_limit_t"]
        summary["limit_down_after_applied_s"] = lb["down_after_applied_s"]
        summary["limited_burst_wall_s"] = lb["wall_s"]
        summary["limit_idle_within_limit"] = lb["idle_within_limit"]
        summary["limited_burst_finished_at_length"] = f"{lb['finished_at_length']}/{lb['requests']}"
    log("summary " + json.dumps(summary))


if __name__ == "__main__":
    main()
