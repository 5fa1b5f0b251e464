"""kvcached on vLLM 0.26.0 at tensor parallel 2 on two GPUs (issue 12): tokens, memory per GPU, limits, throughput.

NOT RUN YET: written on the CPU machine while no 2-GPU kind was lent; the first run on `nvidia-h200-x2` may need fixes.
Run from the project's root on a machine with 2 GPUs, after the vLLM bundle is installed (as for check_vllm.py) and
kvcached is installed into the machine's Python (its start-up hook is a .pth, which PYTHONPATH does not read):

    source /tmp/vc/vllm-gpu-install.sh && pip install -q --no-deps --no-build-isolation . \\
        && python scripts/gpu/check_vllm_tp.py tokens      # ~5 min: offline LLM, TP 2, with and without kvcached
    python scripts/gpu/check_vllm_tp.py server             # ~7 min: TP 2 server: NVML per GPU in a burst, kvctl limit
    python scripts/gpu/check_vllm_tp.py throughput         # ~9 min: 8B-shaped model, TP 2, kvcached vs vanilla

What each part should show (its checks; $OUT/check_vllm_tp_<part>.json holds the figures, $OUT/logs/ the logs):
  tokens      greedy ids of 8 prompts x 32 tokens identical with and without kvcached (CUDA graphs on, vLLM defaults);
              the kvcached log says "tensor parallel 2" and each rank logged its own reservation on its own GPU.
  server      with kvcached, on BOTH GPUs the used memory (NVML, per GPU) rises in a burst of 96 long requests (about
              650 MB of KV per GPU) by at least half of that and falls back to within 64 MiB of its idle figure after
              it; the two GPUs move together (the same pages on each, within 64 MiB); then `kvctl limit NAME 256M`
              (per device) during a second burst: the registry's mapped bytes never exceed 256M, neither GPU's used
              memory rises more than 256M + 64 MiB over its idle figure, and all requests complete.
  throughput  256 prompts x 128 tokens (prompts of ~1000 tokens) on an 8B-shaped random Llama (32/8 heads), TP 2:
              output tokens/s of kvcached / vanilla, both with vLLM's GPU defaults; the check is >= 0.95.
Models: random-weight Llamas from /tmp/vc/vllm_gpu_model.py with KV heads divisible by 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_vllm as base  # noqa: E402  the single-GPU check's server, burst, model and log helpers

OUT = base.OUT
SMALL = ["--layers", "4", "--hidden", "1024", "--heads", "16", "--kv-heads", "8"]
KV_PER_TOKEN = 4 * 2 * (8 // 2) * 64 * 2  # per GPU: layers x (K, V) x KV heads per rank x head size x bf16
TP = ["--tensor-parallel-size", "2"]
REQUESTS, WORDS, MAX_TOKENS = 96, 1500, 128
LIMIT, SLACK = 256 << 20, 64 << 20


class Gpus:
    """NVML's used memory of GPUs 0 and 1 (the two the engine's ranks use), read without a CUDA context."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() < 2:
            sys.exit("check_vllm_tp needs 2 GPUs")
        self.nvml, self.handles = pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in (0, 1)]

    def used(self) -> list[int]:
        return [int(self.nvml.nvmlDeviceGetMemoryInfo(h).used) for h in self.handles]

    def snapshot(self) -> dict:  # what check_vllm.sampled reads
        return {"used": self.used()}


def offline_child(args) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, max_model_len=2048, seed=0, generation_config="vllm", tensor_parallel_size=2)
    outputs = llm.generate(base.PROMPTS, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    with open(args.out, "w") as f:
        json.dump([list(o.outputs[0].token_ids) for o in outputs], f)
    llm.llm_engine.engine_core.shutdown()


def part_tokens(gpus: Gpus) -> dict:
    small, tokens, logs = base.model(SMALL), {}, {}
    for name in ("vanilla", "kvcached"):
        run = f"tp2_offline_{name}"
        out, logs[run] = os.path.join(OUT, f"{run}.json"), os.path.join(OUT, "logs", f"{run}.log")
        argv = [sys.executable, __file__, "offline-child", "--model", small, "--out", out]
        with open(logs[run], "w") as log_file:
            done = subprocess.run(argv, env=base.env(name == "kvcached", run), stdout=log_file,
                                  stderr=subprocess.STDOUT, timeout=400)
        tokens[run] = json.load(open(out)) if os.path.exists(out) else None
        base.log(f"{run} exited {done.returncode}; GPUs used {[u >> 20 for u in gpus.used()]} MiB")
    text = open(logs["tp2_offline_kvcached"]).read()
    checks = {"identical_tokens": bool(tokens["tp2_offline_vanilla"])
              and tokens["tp2_offline_vanilla"] == tokens["tp2_offline_kvcached"],
              "kvcached_active_tp2": "tensor parallel 2" in text,
              "each_rank_on_its_gpu": "kvcached: rank 0 " in text and "on cuda:0" in text
              and "kvcached: rank 1 " in text and "on cuda:1" in text}
    return {"checks": checks, "tokens": tokens, "errors_in_logs": {r: base.errors(p) for r, p in logs.items()}}


def registry_mapped(name: str) -> int:
    from kvcached.registry import read_instance

    return read_instance(name).mapped_bytes


def part_server(gpus: Gpus) -> dict:
    small, name = base.model(SMALL), "tp2-kvcached"
    server = base.Server(name, small, 8430, True, args=tuple(TP), KVCACHED_TRIM_IDLE_S="1")
    try:
        ready_s = server.wait_ready()
        time.sleep(3)
        idle = gpus.used()
        done, samples = base.sampled(gpus, lambda: base.burst(server, REQUESTS, WORDS, MAX_TOKENS))
        time.sleep(4)
        after = gpus.used()
        peak = [max(s["used"][i] for s in samples) for i in (0, 1)]
        base.log(f"burst: GPUs MiB idle {[u >> 20 for u in idle]}, peak {[u >> 20 for u in peak]}, "
                 f"after {[u >> 20 for u in after]}")
        subprocess.run([sys.executable, "-m", "kvcached.cli.kvctl", "limit", name, str(LIMIT)], check=True)
        both = SimpleNamespace(snapshot=lambda: {"used": gpus.used(), "mapped": registry_mapped(name)})
        limited, limit_samples = base.sampled(both, lambda: base.burst(server, REQUESTS, WORDS, MAX_TOKENS), 0.05)
        limit_peak = [max(s["used"][i] for s in limit_samples) for i in (0, 1)]
        mapped_peak = max(s["mapped"] for s in limit_samples)
        base.log(f"limited burst: GPUs peak MiB {[u >> 20 for u in limit_peak]}, registry peak {mapped_peak >> 20} MiB")
        errs = base.errors(server.log_path)
    finally:
        server.stop()
    demand = REQUESTS * (WORDS + 12 + MAX_TOKENS) * KV_PER_TOKEN  # about a token per word, plus the "Request i:"
    checks = {
        "burst_complete": all(t == MAX_TOKENS for t in done),
        "both_gpus_rise": all(p - i >= demand // 2 for p, i in zip(peak, idle)),
        "both_gpus_fall_back": all(a - i <= SLACK for a, i in zip(after, idle)),
        "gpus_move_together": abs((peak[0] - idle[0]) - (peak[1] - idle[1])) <= SLACK,
        "demand_exceeds_limit": demand > LIMIT,
        "limited_burst_complete": all(t == MAX_TOKENS for t in limited),
        "registry_under_limit": mapped_peak <= LIMIT,
        "both_gpus_under_limit": all(p - i <= LIMIT + SLACK for p, i in zip(limit_peak, idle)),
        "no_errors_in_log": not errs,
    }
    return {"checks": checks, "ready_s": ready_s, "kv_demand_bytes": demand, "idle": idle, "peak": peak, "after": after,
            "limited_peak": limit_peak, "registry_limited_peak": mapped_peak, "errors": errs,
            "samples": samples[::5]}


def part_throughput(gpus: Gpus) -> dict:
    large, result = base.model(base.LARGE), {}
    for name, kvcached, port in (("vanilla", False, 8431), ("kvcached", True, 8432)):
        server = base.Server(f"tp2-tput-{name}", large, port, kvcached, args=tuple(TP))
        try:
            server.wait_ready()
            base.burst(server, 8, 200, 16)  # warm-up
            started = time.monotonic()
            done = base.burst(server, 256, 1000, 128)
            seconds = time.monotonic() - started
            result[name] = {"seconds": seconds, "completion_tokens": done,
                            "tokens_per_s": sum(t for t in done if isinstance(t, int)) / seconds,
                            "errors": base.errors(server.log_path)}
            base.log(f"{name}: {result[name]['tokens_per_s']:.0f} output tokens/s over {seconds:.1f} s")
        finally:
            server.stop()
        time.sleep(10)
    ratio = result["kvcached"]["tokens_per_s"] / result["vanilla"]["tokens_per_s"]
    checks = {"all_complete": all(t == 128 for r in result.values() for t in r["completion_tokens"]),
              "throughput_at_least_0.95_of_vanilla": ratio >= 0.95}
    return {"checks": checks, "ratio": ratio, "servers": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["tokens", "server", "throughput", "offline-child"])
    parser.add_argument("--model")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.part == "offline-child":
        return offline_child(args)
    os.makedirs(os.path.join(OUT, "logs"), exist_ok=True)
    base.check_hook()
    gpus = Gpus()
    result = {"tokens": part_tokens, "server": part_server, "throughput": part_throughput}[args.part](gpus)
    with open(os.path.join(OUT, f"check_vllm_tp_{args.part}.json"), "w") as f:
        json.dump(result, f, indent=1)
    failed = [name for name, ok in result["checks"].items() if not ok]
    base.log(f"{args.part}: {'FAILED ' + ', '.join(failed) if failed else 'all checks passed'}: {result['checks']}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
