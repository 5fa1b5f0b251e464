"""One vLLM and one SGLang server on one GPU, both on kvcached: alternating bursts, memory following load.

Note: the two bundles pin different packages, so each server gets its own site folder: vLLM 0.26.0 in /tmp/site (its
install script, sourced by the shell that runs this script), SGLang 0.5.15.post1 in /tmp/site-sg (its install script
with the path changed; the environment it exports is read from --sglang-env, made with `env -0`). kvcached itself is
installed into the machine's Python, so that its start-up hook (a .pth, which PYTHONPATH does not read) patches both.
On the GPU machine, after both bundles are unpacked (/tmp/vc, /tmp/sg) and kvcached is installed (pip install .):

    sed 's#/tmp/site#/tmp/site-sg#g' /tmp/sg/sglang-gpu-install.sh > /tmp/sg/install-sg.sh
    env -u PYTHONPATH bash -c 'source /tmp/sg/install-sg.sh >&2 && env -0' > /tmp/sg/env
    source /tmp/vc/vllm-gpu-install.sh && python3 scripts/gpu/check_mixed.py --sglang-env /tmp/sg/env

Both servers start at once (--sequential: vLLM first), each registered under its engine's name (mixed-vllm,
mixed-sglang); `kvctl list` must show both, alive, each with a pid of its server. Then bursts on one server at a time:
vLLM, SGLang, vLLM, SGLang. During each, every 100 ms: the device's memory, each server's processes' memory (NVML),
and each instance's mapped KV (the registry). The server in a burst must map more, the other no more than before it;
after each burst both must come back to the floor: with --max-cached-tokens 0 (the default: no cached prefixes kept),
the null block's page alone, exactly. Every wait has a timeout, and no burst starts after --budget-s. JSON goes to
$OUT/check_mixed.json after every phase (the servers' logs to $OUT/logs/, their tails into the JSON); exit 1 when a
check failed. About 4 minutes on the H100, most of it the two starts (SGLang's first compiles its kernels, ~1 min).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback

import check_sglang
import check_vllm

MIB = 1 << 20
ENGINES = ("vllm", "sglang")
ORDER = ("vllm", "sglang", "vllm", "sglang")


class SGLangServer(check_vllm.Server):
    """`python -m sglang.launch_server` with kvcached on, in the environment of SGLang's own site folder."""

    def __init__(self, name: str, engine_kwargs: dict, port: int, base_env: dict[str, str], **extra_env: str) -> None:
        self.start(name, port, check_sglang.launch_command(engine_kwargs, port),
                   check_vllm.env(True, name, base_env, KVCACHED_IPC_NAME=name, **extra_env))


class Probe:
    """One reading: the device (NVML), each server's processes (NVML; None where NVML lists no process of it) and
    each instance's mapped KV bytes (the registry; None while it is not registered)."""

    def __init__(self, gpu: check_vllm.Gpu, servers: dict[str, check_vllm.Server]) -> None:
        self.gpu, self.servers = gpu, servers
        self.pids = {engine: [str(server.proc.pid)] for engine, server in servers.items()}

    def refresh_pids(self) -> None:
        """Each server's process tree (vLLM's engine core is a child process): read once both are up."""
        self.pids = {engine: server.pids() for engine, server in self.servers.items()}

    def snapshot(self) -> dict:
        from kvcached import registry

        nvml = self.gpu.snapshot()
        out = {"used": nvml["used"], "nvml": {}, "mapped": {}}
        for engine, server in self.servers.items():
            mine = [used for pid, used in nvml["processes"].items() if pid in self.pids[engine]]
            out["nvml"][engine] = sum(mine) if mine else None
            try:
                out["mapped"][engine] = check_vllm.kv_mapped(server.name)
            except registry.RegistryError:
                out["mapped"][engine] = None
        return out


def read_env(path: str) -> dict[str, str]:
    """The environment `env -0` wrote (NUL-separated NAME=value)."""
    with open(path, "rb") as f:
        items = [item.decode() for item in f.read().split(b"\0") if item]
    env = dict(item.split("=", 1) for item in items if "=" in item)
    if not env.get("PYTHONPATH", "").startswith("/tmp/site-sg"):
        sys.exit(f"{path}: PYTHONPATH is {env.get('PYTHONPATH')!r}, not SGLang's /tmp/site-sg (see the docstring)")
    return env


def registered(servers: dict[str, check_vllm.Server], probe: Probe) -> dict:
    """`kvctl list --json` for both names: each must be alive, with a pid of its own server's process tree."""
    listed = check_sglang.kvctl("list", "--json", *(s.name for s in servers.values()))
    if listed.returncode != 0:
        return {"ok": False, "error": (listed.stdout + listed.stderr).strip()[-2000:]}
    records = {r["name"]: r for r in json.loads(listed.stdout)}
    ok = all(s.name in records and records[s.name]["alive"] and str(records[s.name]["pid"]) in probe.pids[engine]
             for engine, s in servers.items())
    return {"ok": ok, "records": list(records.values())}


def settle(probe: Probe, floor: dict[str, int | None], timeout_s: float) -> tuple[dict, float]:
    """Until every instance maps no more than its floor, or (floors unknown: None) mapped memory stopped changing for
    2 s; at most `timeout_s`. Returns the last reading and the seconds it took."""
    known = all(f is not None for f in floor.values())
    t0 = time.monotonic()
    last, steady_since = None, t0
    while True:
        snap = probe.snapshot()
        now = time.monotonic()
        if snap["mapped"] != last:
            last, steady_since = snap["mapped"], now
        if known:
            done = all(snap["mapped"][e] is not None and snap["mapped"][e] <= f for e, f in floor.items())
        else:
            done = now - steady_since >= 2.0
        if done or now - t0 >= timeout_s:
            return snap, round(now - t0, 2)
        time.sleep(0.1)


def vllm_burst(server: check_vllm.Server, args) -> list:
    return check_vllm.burst(server, args.vllm_requests, args.vllm_words, args.vllm_max_tokens, args.request_timeout)


def sglang_burst(server: check_vllm.Server, args, seed: int, vocab: int) -> list:
    """One /generate call with a batch of random prompts: SGLang schedules them as it would concurrent requests."""
    prompts = check_sglang.burst_prompts(seed, args.sglang_requests, args.sglang_input_len, vocab)
    body = {"input_ids": prompts,
            "sampling_params": {"temperature": 0, "max_new_tokens": args.sglang_output_len, "ignore_eos": True}}
    try:
        outputs = check_sglang.post(server.port, "/generate", body, timeout=args.request_timeout)
        return [o["meta_info"]["completion_tokens"] for o in outputs]
    except Exception as exc:  # noqa: BLE001 - a failed burst is a result
        return [f"error: {exc}"]


def summarize(results: dict) -> dict:
    """Per burst and engine: mapped KV and NVML before, at the peak, after; and the checks (pure: tested offline)."""
    page, floor, bursts = results.get("page_bytes", {}), results.get("floor_pages"), results.get("bursts", [])
    table, follows, quiet, at_floor, complete, nvml_follows = [], [], [], [], [], []
    idle = results.get("idle", {}).get("mapped", {})
    if floor is not None and idle:
        at_floor.append(all(idle.get(e) == floor * page.get(e, -1) for e in ENGINES))
    for burst in bursts:
        active, other = burst["engine"], next(e for e in ENGINES if e != burst["engine"])
        row = {"engine": active, "wall_s": burst["wall_s"], "settle_s": burst["settle_s"]}
        for e in ENGINES:
            for source in ("mapped", "nvml"):
                seen = [s[source][e] for s in burst["samples"] if s[source][e] is not None]
                row[f"{e}_{source}_mib"] = [_mib(burst["before"][source][e]), _mib(max(seen, default=None)),
                                            _mib(burst["after"][source][e])]
        table.append(row)
        before, peak = burst["before"]["mapped"], _peak(burst["samples"], "mapped")
        follows.append(None not in (before[active], peak[active]) and peak[active] >= before[active] + 4 * page[active])
        quiet.append(None not in (before[other], peak[other]) and peak[other] <= before[other])
        complete.append(bool(burst["completed"]) and all(t == burst["expected_tokens"] for t in burst["completed"]))
        if floor is not None:
            at_floor.append(all(burst["after"]["mapped"][e] == floor * page[e] for e in ENGINES))
        nvml_before, nvml_peak = burst["before"]["nvml"], _peak(burst["samples"], "nvml")
        if None not in (nvml_before[active], nvml_peak[active], nvml_before[other], nvml_peak[other]):
            nvml_follows.append(nvml_peak[active] > nvml_before[active] and nvml_peak[other] <= nvml_before[other])
    ran = tuple(b["engine"] for b in bursts) == ORDER
    checks = {
        "servers_ready": all(results.get("servers", {}).get(e, {}).get("ready_s") is not None for e in ENGINES),
        "both_registered": bool(results.get("registered", {}).get("ok")),
        "alternating_bursts_ran": ran,
        "bursts_complete": ran and all(complete),
        "active_maps_more_other_not": ran and all(follows) and all(quiet),
        "nvml_per_process_follows_load": ran and len(nvml_follows) == len(ORDER) and all(nvml_follows),
        "idle_at_floor": None if floor is None else (ran and len(at_floor) == len(ORDER) + 1 and all(at_floor)),
        "no_errors_in_logs": not any(results.get("servers", {}).get(e, {}).get("errors") for e in ENGINES),
    }
    return {"summary": {"bursts": table, "idle_mapped_mib": {e: _mib(v) for e, v in idle.items()}}, "checks": checks}


def _peak(samples: list[dict], source: str) -> dict:
    return {e: max((s[source][e] for s in samples if s[source][e] is not None), default=None) for e in ENGINES}


def _mib(value):
    return None if value is None else round(value / MIB, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sglang-env", required=True, help="SGLang's environment, from `env -0` (see above)")
    p.add_argument("--sglang-model", default="/tmp/sg/tok", help="config.json and tokenizer for SGLang's model")
    p.add_argument("--layers", type=int, default=4, help="layers of both random-weight Llamas")
    p.add_argument("--vllm-port", type=int, default=8440)
    p.add_argument("--sglang-port", type=int, default=8441)
    p.add_argument("--vllm-requests", type=int, default=64)
    p.add_argument("--vllm-words", type=int, default=1500, help="words per vLLM prompt")
    p.add_argument("--vllm-max-tokens", type=int, default=128)
    p.add_argument("--sglang-requests", type=int, default=256)
    p.add_argument("--sglang-input-len", type=int, default=256)
    p.add_argument("--sglang-output-len", type=int, default=256)
    check_sglang.add_engine_arguments(p)
    p.add_argument("--max-cached-tokens", type=int, default=0,
                   help="KVCACHED_MAX_CACHED_TOKENS for both (0: idle floor is the null block's page; -1: unset)")
    p.add_argument("--sequential", action="store_true", help="start SGLang once vLLM is up, not both at once")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds for both servers to answer /health")
    p.add_argument("--settle-timeout", type=float, default=20.0, help="seconds for memory to settle after a burst")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds for a burst's requests")
    p.add_argument("--budget-s", type=float, default=330.0, help="no burst starts after this many seconds")
    args = p.parse_args()
    out = check_vllm.OUT
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    path = os.path.join(out, "check_mixed.json")
    results: dict = {"args": vars(args)}

    def save() -> None:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    check_vllm.check_hook()
    sg_env = read_env(args.sglang_env)
    extra = {} if args.max_cached_tokens < 0 else {"KVCACHED_MAX_CACHED_TOKENS": str(args.max_cached_tokens)}
    results.update(floor_pages=1 if args.max_cached_tokens == 0 else None, servers={e: {} for e in ENGINES})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM still stops both servers
    servers: dict[str, check_vllm.Server] = {}
    try:
        gpu = check_vllm.Gpu()
        vllm_model = check_vllm.model(["--layers", str(args.layers)])
        sg_model = check_sglang.make_model(args.sglang_model, args.layers)
        with open(os.path.join(sg_model, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        settings = dict(check_sglang.engine_settings(sg_model, args), enable_memory_saver=False)
        results.update(models={"vllm": vllm_model, "sglang": sg_model}, sglang_settings=settings,
                       device_before=gpu.snapshot()["used"])
        check_vllm.log(f"starting vLLM ({vllm_model}) and SGLang ({sg_model})"
                       f"{' one after the other' * args.sequential}")
        servers["vllm"] = check_vllm.Server("mixed-vllm", vllm_model, args.vllm_port, True, **extra)
        if args.sequential:
            results["servers"]["vllm"]["ready_s"] = round(servers["vllm"].wait_ready(args.ready_timeout), 1)
        servers["sglang"] = SGLangServer("mixed-sglang", settings, args.sglang_port, sg_env, **extra)
        t0 = time.monotonic()
        for engine, server in servers.items():
            left = args.ready_timeout - (time.monotonic() - t0)
            ready_s = server.wait_ready(max(left, 1.0))
            results["servers"][engine].setdefault("ready_s", round(ready_s, 1))
        probe = Probe(gpu, servers)
        probe.refresh_pids()
        results["registered"] = registered(servers, probe)
        results["page_bytes"] = {e: r["page_bytes"] for e in ENGINES for r in results["registered"].get("records", [])
                                 if r["name"] == servers[e].name}
        floor = {e: None if results["floor_pages"] is None else results["floor_pages"] * results["page_bytes"][e]
                 for e in ENGINES}
        results["idle"], results["idle_settle_s"] = settle(probe, floor, args.settle_timeout)
        check_vllm.log(f"both up {results['servers']}; registered {results['registered']['ok']}; idle mapped "
                       f"{ {e: _mib(v) for e, v in results['idle']['mapped'].items()} } MiB")
        save()
        results["bursts"] = []
        for i, engine in enumerate(ORDER):
            if time.monotonic() - check_vllm.START > args.budget_s:
                results["stopped"] = f"budget: {args.budget_s} s spent before burst {i + 1}"
                break
            server = servers[engine]
            work = (lambda: vllm_burst(server, args)) if engine == "vllm" else \
                (lambda: sglang_burst(server, args, i, vocab))
            before, t0 = probe.snapshot(), time.monotonic()
            completed, samples = check_vllm.sampled(probe, work, 0.1)
            wall = round(time.monotonic() - t0, 2)
            after, settle_s = settle(probe, floor, args.settle_timeout)
            expected = args.vllm_max_tokens if engine == "vllm" else args.sglang_output_len
            results["bursts"].append({"engine": engine, "wall_s": wall, "settle_s": settle_s, "completed": completed,
                                      "expected_tokens": expected, "before": before, "after": after,
                                      "samples": samples})
            check_vllm.log(f"burst {i + 1} ({engine}): {wall} s, mapped MiB peak "
                           f"{ {e: _mib(v) for e, v in _peak(samples, 'mapped').items()} }, after "
                           f"{ {e: _mib(v) for e, v in after['mapped'].items()} } ({settle_s} s to settle)")
            save()
    except Exception as exc:  # noqa: BLE001 - what failed goes into the JSON, with the servers' logs
        results["error"] = traceback.format_exc()[-3000:] + str(getattr(exc, "stderr", "") or "")[-2000:]
        check_vllm.log(f"FAILED: {results['error']}")
    finally:
        for engine, server in servers.items():
            part = results["servers"][engine]
            part.update(name=server.name, log=server.log_path, exit_code=server.proc.poll(),
                        errors=check_vllm.errors(server.log_path), log_tail=check_vllm.tail(server.log_path, 8))
        for server in servers.values():
            server.stop()
    results.update(summarize(results), seconds=round(time.monotonic() - check_vllm.START))
    save()
    failed = [name for name, ok in results["checks"].items() if ok is False]
    check_vllm.log(f"{'FAILED ' + ', '.join(failed) if failed else 'all checks passed'}: {results['checks']}")
    check_vllm.log(f"summary: {json.dumps(results['summary'])}; wrote {path}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
