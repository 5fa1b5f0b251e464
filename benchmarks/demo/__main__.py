"""The main demo: kvcached's elastic KV cache against vLLM's static KV pool, on bursty and multi-model traffic.

    python -m benchmarks.demo --quick                      # from the repository root; `bash scripts/demo.sh` sets up
    python -m benchmarks.demo --device cuda:0 --model DIR  # on a GPU
    python -m benchmarks.demo --replot DIR                 # checks, plots and table again from DIR's JSON

Note (what): three experiments, each run with kvcached (ENABLE_KVCACHED=true KVCACHED_AUTOPATCH=1) and with vLLM's
static pool: 1. bursty single model (bursty.py), 2. two models with alternating bursts (two_models.py), 3. three
instances under intermittent peaks (peaks.py); and, on request (--experiments 4), kvcached only: 4. more models than
fit at once behind kvcached-router, served on demand, warm vs cold TTFT (router.py). Output: a results folder with
every memory sample and request (JSON), summary.txt, PNG plots (report.py, plots.py). All kvcached runs come first
(instances a, b, c), then all baseline runs, so servers are reused across experiments (harness.py). On the CPU the
model runs in float32 by default: on AVX2 machines without bf16 units it decodes 2-3x faster than bf16.

Limits: on 2 cores the servers compete for CPU, so absolute latencies are those of a small machine; compare modes, not
machines. Without matplotlib (a bare GPU machine) the demo measures and writes its JSON and table; the plots are made
later with --replot where matplotlib is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

from benchmarks.demo import bursty, peaks, router, two_models
from benchmarks.demo.config import DemoConfig, resolve, size_budget
from benchmarks.demo.harness import T0, Harness, log, write_json
from benchmarks.demo.report import compute_checks, failed_requests, make_plots, summary_table
from benchmarks.modelinfo import DEFAULT_MODEL
from benchmarks.servers import ServerError, check_model_dir, check_port_free, install_cleanup

EXPERIMENTS = {1: bursty, 2: two_models, 3: peaks, 4: router}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.demo",
        description="kvcached demo: elastic KV cache vs vLLM's static KV pool on bursty and multi-model traffic. "
                    "Writes JSON of every sample and request, a summary table and PNG plots to --out.",
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="local Hugging Face model folder (default: $KVCACHED_MODEL_DIR, or the SmolLM2-135M-Instruct "
                        "folder scripts/prepare_model.py makes)")
    g.add_argument("--device", default="auto",
                   help="engine device: cpu, cuda, cuda:N, or auto (default: cuda:0 if NVML sees a GPU, else cpu); "
                        "on a GPU memory is NVML's per process")
    g.add_argument("--dtype", default="auto",
                   help="model dtype passed to vLLM; auto: float32 on CPU (faster there without bf16 units), "
                        "the model's own on GPU")
    g.add_argument("--experiments", default=None,
                   help="comma list of 1,2,3,4 (default 1,2,3; with --quick 1,2); 4, the router, runs in kvcached "
                        "mode only")
    g.add_argument("--kvcached", choices=("both", "on", "off"), default="both",
                   help="run kvcached (on), the static-pool baseline (off), or both (default)")
    g.add_argument("--quick", action="store_true",
                   help="the shortened CI version: smaller bursts, experiments 1 and 2 (~5 min on 2 idle cores)")
    g.add_argument("--out", default=None, help="results folder (default benchmarks/results/demo-<time>)")
    g.add_argument("--port-base", type=int, default=8100,
                   help="servers listen on 127.0.0.1:port-base+0..7, experiment 4's router and engines on "
                        "+8..+12 (default 8100)")
    w = p.add_argument_group("workload (defaults: full run / --quick; on a GPU where it differs)")
    w.add_argument("--bursts", type=int, help="experiment 1: bursts (3 / 2)")
    w.add_argument("--concurrency", type=int, help="requests per burst, experiments 1-2 (6 / 3; GPU 32 / 16)")
    w.add_argument("--max-tokens", type=int,
                   help="output tokens per request, fixed with ignore_eos (180 / 64; GPU 256 / 128)")
    w.add_argument("--context-tokens", type=int,
                   help="tokens of per-request context before each prompt: more KV per request at little decode "
                        "cost (200 / 100; GPU 600 / 300)")
    w.add_argument("--pause", type=float, help="seconds between bursts (6 / 4)")
    w.add_argument("--idle", type=float, help="seconds of idle before the first burst (5 / 4)")
    w.add_argument("--e2-rounds", type=int, help="experiment 2: rounds of (burst on A, burst on B) (1 / 1)")
    w.add_argument("--e3-max-tokens", type=int, help="experiment 3: output tokens per request (96 / 48; GPU 128 / 64)")
    w.add_argument("--e3-peak", type=int, help="experiment 3: requests one instance's ramp may hold at once; "
                                               "sizes the budget (12 / 9; GPU 48 / 32)")
    w.add_argument("--e3-ramp", type=float, help="experiment 3: seconds of each instance's ramp (12 / 10)")
    w.add_argument("--e3-rate",
                   help="experiment 3: arrival rate from,to in requests/s (0.3,1.2 / 0.3,1.5; GPU 4,40 / 4,30)")
    w.add_argument("--e3-gap", type=float, help="experiment 3: seconds between ramps (5 / 4)")
    m = p.add_argument_group("memory and engine")
    m.add_argument("--static-pool", default=None,
                   help="the baseline's static KV pool for experiments 1-2 (--kv-cache-memory-bytes, e.g. 2G); "
                        "default 2G on CPU; on a GPU vLLM sizes it within --gpu-share")
    m.add_argument("--gpu-share", type=float, default=0.42,
                   help="GPU only: --gpu-memory-utilization of every server (default 0.42: two static pools fit "
                        "one GPU, and a kvcached server passes vLLM's start-up memory check beside the others)")
    m.add_argument("--enforce-eager", action="store_true",
                   help="GPU only: no CUDA graphs (faster start-up; the CPU always runs eager)")
    m.add_argument("--e3-budget", default=None,
                   help="experiment 3's total KV budget (default: --e3-peak requests of this model); each static "
                        "instance gets a third")
    m.add_argument("--e4-engine-memory", default=None,
                   help="experiment 4: the memory one engine holds (default 2.4G on CPU, 2G on a GPU); each model's "
                        "`memory` in the router's config is sized from it so that two engines fit and a third not")
    m.add_argument("--max-model-len", type=int, default=1024, help="vLLM --max-model-len (default 1024)")
    m.add_argument("--block-size", type=int, default=None, help="vLLM block size (default 128 on CPU, 16 on GPU)")
    m.add_argument("--kvcached-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the kvcached servers, e.g. KVCACHED_PAGE_SIZE_MB=0.375 (repeatable)")
    o = p.add_argument_group("other")
    o.add_argument("--sample-hz", type=float, default=5.0, help="memory samples per second (default 5)")
    o.add_argument("--startup-timeout", type=float, default=600.0,
                   help="seconds for a server to become healthy (default 600: a busy 2-core machine needs minutes)")
    o.add_argument("--request-timeout", type=float, default=600.0, help="seconds for one request (default 600)")
    o.add_argument("--python", default=sys.executable, help="interpreter with vLLM for the servers")
    o.add_argument("--replot", metavar="DIR", help="only redo checks, plots and table from DIR's JSON")
    return p


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def preflight(cfg: DemoConfig) -> None:
    """Everything that can be checked before any server starts: model and ports (raises ServerError)."""
    check_model_dir(cfg.model)
    ports = 8 + (1 + router.MODELS if 4 in cfg.experiments else 0)
    for i in range(ports):
        check_port_free(cfg.port_base + i, hint=f"choose another --port-base (the demo uses {ports} ports from it)")
    if not have_matplotlib():
        log(f"WARNING: no matplotlib in {sys.executable}: no plots now; make them later where matplotlib is, with "
            f"python -m benchmarks.demo --replot {cfg.out}")
    os.makedirs(cfg.out, exist_ok=True)


def finish_outputs(results: dict, samples: list[dict], out: str) -> int:
    """Checks, plots and the summary table (printed and written to summary.txt); returns 3 if plotting failed."""
    code = 0
    results["checks"] = compute_checks(results)
    results["failed_requests"] = failed_requests(results)
    if have_matplotlib():
        try:
            results["plots"] = [os.path.basename(p) for p in make_plots(results, samples, out)]
            log("plots: " + ", ".join(results["plots"]))
        except Exception as e:  # noqa: BLE001  (the measurements are kept whatever the plots do)
            log(f"ERROR while plotting: {type(e).__name__}: {e}")
            code = 3
    table = summary_table(results)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(table + "\n")
    print(f"\n{table}\n")
    return code


def replot(folder: str) -> int:
    """Checks, plots and table again from a results folder's JSON; nothing is run."""
    missing = [n for n in ("results.json", "samples.json") if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        print(f"[demo] ERROR: --replot {folder}: no {' or '.join(missing)} there (a demo's results folder has both)",
              file=sys.stderr)
        return 2
    with open(os.path.join(folder, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(folder, "samples.json")) as f:
        samples = json.load(f)["samples"]
    code = finish_outputs(results, samples, folder)
    write_json(os.path.join(folder, "results.json"), results)
    return code


def run_all(h: Harness) -> None:
    """Every experiment in kvcached mode, then every one in static mode (servers are reused within a mode)."""
    for mode in h.cfg.modes:
        for exp in h.cfg.experiments:
            EXPERIMENTS[exp].run(h, mode)
        h.stop()


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replot:
        return replot(args.replot)
    try:
        cfg = resolve(args)
        preflight(cfg)
        size_budget(cfg, args.e3_budget)
    except (ServerError, ValueError, KeyError, OSError) as e:
        print(f"[demo] ERROR: {e}", file=sys.stderr)
        return 2
    try:
        h = Harness(cfg)
    except RuntimeError as e:  # NVML missing or no such GPU
        print(f"[demo] ERROR: --device {cfg.device}: {e}", file=sys.stderr)
        return 2
    install_cleanup()
    log(f"results in {cfg.out}")
    log(f"model {cfg.model} ({cfg.dtype}, {cfg.kv_bytes_per_token} KV bytes/token), device {cfg.device}"
        + (f" (each server's share {cfg.gpu_share:g}, {'eager' if cfg.enforce_eager else 'CUDA graphs'})"
           if cfg.gpu else "")
        + f", experiments {cfg.experiments}, modes {cfg.modes}" + (" (quick)" if cfg.quick else ""))
    h.sampler.start()
    code = 0
    try:
        run_all(h)
    except ServerError as e:
        log(f"ERROR: {e}")
        code = 2
    except KeyboardInterrupt:
        log("interrupted: stopping servers, writing what was measured")
        code = 130
    except SystemExit as e:  # SIGTERM/SIGHUP (servers.install_cleanup): servers are stopped; keep what was measured
        log(f"terminated ({e.code}): writing what was measured")
        code = e.code if isinstance(e.code, int) else 1
    finally:
        h.stop()
        h.sampler.stop()
    h.results["wall_s"] = round(time.monotonic() - T0, 1)
    output_code = finish_outputs(h.results, h.all_samples(), cfg.out)
    code = code or output_code
    h.save()
    log(f"done in {time.monotonic() - T0:.0f}s; results: {cfg.out}/results.json, samples: {cfg.out}/samples.json")
    return code


if __name__ == "__main__":
    sys.exit(main())
