"""kvcached in real vLLM (CPU build) at tensor parallel 2: outputs, each rank's KV memory, limits on every rank.

SmolLM2-135M has 9 attention heads, which vLLM cannot split over 2 ranks; scripts/prepare_model.py writes beside it a
copy with zero-padded heads (12 Q / 4 KV, the same function), used here. Each rank is one worker process
(`VLLM::Worker_TP<rank>`) pinned to one core (VLLM_CPU_OMP_THREADS_BIND, from this process's CPU affinity: vLLM's
automatic binding wants one NUMA node per rank). Each rank's KV is read in its own reservation, found by the line
kvcached logs per rank; pages are one rank's shard: 4 blocks of 128 tokens x 30 layers x 64 KiB = 7,864,320 bytes.
Marker `vllm`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks.servers import Server, ServerSpec
from test_vllm_e2e import (MODEL, Sampler, TAG, complete, long_prompt, page_reader, peak_pages, record, resident_bytes,
                           run_offline, wait_for)

pytestmark = pytest.mark.vllm

TP_MODEL = MODEL.rstrip("/") + "-kv4"
PAGE = 7864320  # one rank's shard of a page
CORES = sorted(os.sched_getaffinity(0))
BIND = "|".join(str(CORES[rank % len(CORES)]) for rank in range(2))  # rank r on core r (mod the cores we have)
RANK_LINE = re.compile(r"kvcached: rank (\d+) \(pid (\d+)\): \d+ layers of KV over a reservation of (\d+) bytes at "
                       r"(0x[0-9a-f]+)")


def tokens(done: subprocess.CompletedProcess) -> list:
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("TOKENS ")]
    return json.loads(line[len("TOKENS "):])


def ranks(server: Server) -> dict[int, tuple[int, int, int]]:
    """rank -> (worker pid, start, end of its KV reservation), from the lines kvcached logged at start-up."""
    with open(server.log_path) as f:
        found = {int(rank): (int(pid), int(address, 16), int(address, 16) + int(size))
                 for rank, pid, size, address in RANK_LINE.findall(f.read())}
    assert sorted(found) == [0, 1], found
    return found


def resident(server: Server) -> list[int]:
    """Each rank's resident KV bytes, rank order."""
    return [resident_bytes(*where) for _, where in sorted(ranks(server).items())]


def state(server: Server) -> str:
    r = record(server.spec.name)
    return f"registry used {r.used_bytes}, premapped {r.premapped_bytes}; ranks resident {resident(server)}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One kvcached server at tensor parallel 2 for the server tests."""
    env = {"KVCACHED_TRIM_IDLE_S": "0.5", "KVCACHED_MAX_CACHED_TOKENS": "512", "VLLM_CPU_OMP_THREADS_BIND": BIND}
    spec = ServerSpec(f"{TAG}-tp2", TP_MODEL, 18610, kvcached=True, extra_args=["--tensor-parallel-size", "2"],
                      extra_env=env)
    started = Server(spec, str(tmp_path_factory.mktemp("vllm-tp-logs"))).start()
    try:
        started.wait_ready(timeout_s=600)
        yield started
    finally:
        started.stop()
        subprocess.run([sys.executable, "-m", "kvcached.cli.kvctl", "delete", spec.name], capture_output=True)


def test_tp2_greedy_tokens_are_identical_with_and_without_kvcached():
    env = {"VLLM_CPU_OMP_THREADS_BIND": BIND}
    vanilla = tokens(run_offline({**env, "ENABLE_KVCACHED": "false", "KVCACHED_AUTOPATCH": "0"},
                                 "--tensor-parallel-size", "2", model=TP_MODEL))
    done = run_offline({**env, "ENABLE_KVCACHED": "true", "KVCACHED_AUTOPATCH": "1"},
                       "--tensor-parallel-size", "2", model=TP_MODEL)
    elastic = tokens(done)
    assert "tensor parallel 2; sizes and the limit are per device" in done.stdout + done.stderr
    assert len(vanilla) == 8 and all(vanilla)
    assert elastic == vanilla


def test_tp2_each_rank_kv_follows_a_burst_and_returns_to_the_floor(server):
    name, floor = server.spec.name, 2 * PAGE  # the null block's page + one page of cached prefix blocks (512 tokens)
    (pid0, _, _), (pid1, _, _) = ranks(server).values()
    assert pid0 != pid1
    wait_for(lambda: record(name).mapped_bytes <= floor and max(resident(server)) <= floor, 10, lambda: state(server))
    with Sampler(lambda: resident(server)) as sampled:
        with ThreadPoolExecutor(8) as pool:  # 8 prompts of 450 tokens + 16: 4 blocks (one page) each
            results = list(pool.map(lambda i: complete(server, long_prompt(i), 16), range(8)))
    assert all(r["usage"]["completion_tokens"] == 16 for r in results)
    peaks = [max(sample[rank] for sample in sampled.samples) for rank in (0, 1)]
    print(f"\nTP 2 burst of 8 x 466 tokens: peak resident KV per rank {[p / PAGE for p in peaks]} pages")
    assert min(peaks) >= 8 * PAGE, sampled.samples  # 32 blocks in use at once: 8 pages, on each rank

    def settled() -> bool:  # every rank holds what the registry says (per device), at the floor
        mapped = record(name).mapped_bytes
        return mapped <= floor and resident(server) == [mapped] * 2 and record(name).mapped_bytes == mapped

    wait_for(settled, 5, lambda: state(server))
    assert record(name).page_bytes == PAGE


def test_tp2_kvctl_limit_holds_on_every_rank(server):
    name, limit = server.spec.name, 4 * PAGE  # the null block's page + 3 pages: three requests at a time
    subprocess.run([sys.executable, "-m", "kvcached.cli.kvctl", "limit", name, str(limit)], check=True)
    wait_for(lambda: record(name).limit_bytes == limit, timeout=1.0)
    readers = [page_reader(*where, PAGE) for _, where in sorted(ranks(server).items())]
    try:
        with Sampler(readers[0], period_s=0.0005) as rank0, Sampler(readers[1], period_s=0.0005) as rank1, \
                Sampler(lambda: record(name).mapped_bytes) as mapped:
            with ThreadPoolExecutor(6) as pool:
                results = list(pool.map(lambda i: complete(server, long_prompt(i), 16), range(100, 106)))
        assert all(r["usage"]["completion_tokens"] == 16 for r in results)
        peaks = [peak_pages(rank0.samples), peak_pages(rank1.samples)]
        print(f"\nTP 2 under a limit of {limit // PAGE} pages per device: peak pages held per rank {peaks} "
              f"({len(rank0.samples)} and {len(rank1.samples)} readings), registry peak {mapped.peak // PAGE}")
        assert mapped.peak <= limit
        assert peaks == [4, 4]  # three requests at a time need 13 blocks: 4 pages, the limit, on both ranks
    finally:
        subprocess.run([sys.executable, "-m", "kvcached.cli.kvctl", "limit", name, "100G"], check=True)


def test_pipeline_parallel_is_refused_at_start_up():
    done = run_offline({"ENABLE_KVCACHED": "true", "KVCACHED_AUTOPATCH": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                        "VLLM_CPU_OMP_THREADS_BIND": BIND}, "--pipeline-parallel-size", "2")
    assert done.returncode != 0
    assert ("kvcached supports tensor parallel on one host (vLLM's own worker processes); pipeline, context and data "
            "parallel size and nnodes must be 1, got pipeline_parallel_size=2; unset ENABLE_KVCACHED") in done.stderr
    assert "kvcached is active" not in done.stdout + done.stderr
    assert "Worker" not in done.stdout + done.stderr  # refused before the executor started any worker process
