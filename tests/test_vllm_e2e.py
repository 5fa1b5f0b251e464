"""kvcached in real vLLM (CPU build) with a real model: outputs, memory that follows load, limits, prefix caching.

Needs the vLLM CPU venv and the SmolLM2 model (scripts/test.sh sets both up); marker `vllm`. KV memory is read two
ways: the registry's used bytes (what kvcached decided) and what the OS holds in the worker's KV reservation, the
latter exact where whole-process RSS is blurred by the allocator: resident bytes from /proc/<worker>/smaps, and, where
a limit must hold at every instant, the pages mapped there, read every fraction of a millisecond (`held_pages`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import vllm_offline

from benchmarks.servers import Server, ServerSpec
from kvcached.registry import list_instances

pytestmark = pytest.mark.vllm

MODEL = os.environ.get("KVCACHED_MODEL_DIR", os.path.expanduser("~/.cache/kvcached/models/SmolLM2-135M-Instruct"))
HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = vllm_offline.PROMPTS  # the offline child's 8 prompts
PAGE = 5898240  # SmolLM2 on the host: 2 blocks of 128 tokens x 30 layers x 96 KiB, rounded to the block size
MAX_CACHED_TOKENS = 512  # 4 blocks: at most 2 pages held by cached blocks when idle
TAG = f"e2e{os.getpid()}"


WORDS = "the cat sat on a mat and the dog ran in the park while birds sang over green trees near the river bank".split()


def long_prompt(i: int, words: int = 440) -> str:
    """A distinct prompt of words + 10 tokens (one token per word with SmolLM2's tokenizer): no shared prefix blocks."""
    return f"Request {i}: " + " ".join(WORDS[(i + k * 7) % len(WORDS)] for k in range(words)) + ". Summarize the list."


def complete(server: Server, prompt: str, max_tokens: int = 16, timeout: float = 300.0) -> dict:
    body = json.dumps({"model": server.spec.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(server.url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def burst(server: Server, count: int, max_tokens: int = 48, first: int = 0) -> list[dict]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda i: complete(server, long_prompt(i), max_tokens), range(first, first + count)))


def record(name: str):
    (found,) = [r for r in list_instances() if r.name == name]
    return found


def worker_pid(server: Server) -> int:
    (pid,) = [pid for pid, role in server.pids().items() if role == "Worker"]
    return pid


def kv_range(server: Server) -> tuple[int, int]:
    """[start, end) of the worker's KV reservation, as kvcached logged it at start-up."""
    with open(server.log_path) as f:
        size, address = re.findall(r"over a reservation of (\d+) bytes at (0x[0-9a-f]+)", f.read())[-1]
    return int(address, 16), int(address, 16) + int(size)


def kv_resident_bytes(server: Server) -> int:
    """Resident bytes inside the worker's KV reservation, from smaps (exact, but slow to read: tens of ms)."""
    return resident_bytes(worker_pid(server), *kv_range(server))


def resident_bytes(pid: int, base: int, end: int) -> int:
    """Resident bytes of process `pid` in [base, end), from its smaps."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if head:
                inside = base <= int(head.group(1), 16) < end
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


class Sampler:
    """Takes readings in a thread while a block runs, every `period_s` (0: back to back); `peak` is the largest."""

    def __init__(self, read, period_s: float = 0.05) -> None:
        self.read, self.period_s, self.samples, self._stop = read, period_s, [], threading.Event()

    def __enter__(self) -> "Sampler":
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.monotonic() - self._started

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.samples.append(self.read())

    @property
    def peak(self):
        return max(self.samples)


_QUERY = struct.Struct("<QQQQQQQQQIIIIQQ")  # struct procmap_query (linux/fs.h, Linux 6.11+)
_PROCMAP_QUERY = (3 << 30) | (_QUERY.size << 16) | (ord("f") << 8) | 17  # _IOWR('f', 17, struct procmap_query)
_WRITABLE, _COVERING_OR_NEXT = 0x02, 0x10
_RW_MAPPING = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) rw", re.M)


def held_pages(server: Server):
    """A reader of the KV pages the worker holds, fast enough to run back to back (see page_reader)."""
    return page_reader(worker_pid(server), *kv_range(server), PAGE)


def page_reader(pid: int, base: int, end: int, page: int):
    """A reader of the pages of `page` bytes that process `pid` holds in its KV reservation [base, end).

    The host backend populates a page when it maps it and frees it when it unmaps it, so the pages mapped writable in
    the worker's KV reservation are its resident KV memory. The kernel's PROCMAP_QUERY answers that in tens of
    microseconds, one mapping per call, asking only about the reservation; where it is missing (Linux before 6.11),
    /proc/<pid>/maps is read whole (milliseconds). smaps, which walks page tables, takes tens of ms."""
    path = f"/proc/{pid}/maps"
    fd = os.open(path, os.O_RDONLY)

    def pages(ranges) -> frozenset[int]:
        return frozenset(p for start, stop in ranges if base <= start < end
                         for p in range((start - base) // page, (min(stop, end) - base) // page))

    def query() -> frozenset[int]:
        ranges, address = [], base
        while address < end:
            answer = bytearray(_QUERY.pack(_QUERY.size, _WRITABLE | _COVERING_OR_NEXT, address, *[0] * 12))
            try:
                fcntl.ioctl(fd, _PROCMAP_QUERY, answer)
            except FileNotFoundError:  # no writable mapping at or after `address`
                break
            start, stop = _QUERY.unpack(answer)[3:5]
            ranges.append((start, stop))
            address = stop
        return pages(ranges)

    def read_maps() -> frozenset[int]:
        with open(path, "rb") as f:
            text = f.read()
        return pages((int(m.group(1), 16), int(m.group(2), 16)) for m in _RW_MAPPING.finditer(text))

    try:
        query()
        return query
    except OSError:  # ENOTTY or EINVAL: a kernel without PROCMAP_QUERY
        return read_maps


def peak_pages(readings: list[frozenset[int]]) -> int:
    """The most pages held at once, counting a page only when two consecutive readings both show it.

    One reading is not atomic (the kernel answers one mapping at a time): a page unmapped during a reading and another
    one mapped after it could both appear. A torn reading alone so cannot raise the peak, and any state the worker
    keeps for two readings (well under a millisecond apart with PROCMAP_QUERY) is caught."""
    return max(len(a & b) for a, b in zip(readings, readings[1:]))


def run_offline(env: dict, *args: str, model: str = MODEL) -> subprocess.CompletedProcess:
    """tests/vllm_offline.py (with `args`) in its own session; the whole group is killed afterwards, stragglers
    included."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHED") and k != "ENABLE_KVCACHED"}
    clean.update(env)
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "vllm_offline.py"), model, *args], env=clean,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_for(predicate, timeout: float, state=lambda: "") -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not reached within {timeout} s; {state()}")
        time.sleep(0.02)
    return time.monotonic() - start


def kv_state(server: Server) -> str:
    r = record(server.spec.name)
    return (f"registry used {r.used_bytes / PAGE:.2f} pages, premapped {r.premapped_bytes / PAGE:.2f}, "
            f"resident {kv_resident_bytes(server)} bytes (a page is {PAGE})")


def start(spec: ServerSpec, log_dir: str) -> Server:
    server = Server(spec, log_dir).start()
    server.wait_ready(timeout_s=600)
    return server


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("vllm-logs"))


@pytest.fixture(scope="module")
def pair(logs):
    """Two kvcached servers on one machine, started together."""
    env = {"KVCACHED_TRIM_IDLE_S": "0.5", "KVCACHED_MAX_CACHED_TOKENS": str(MAX_CACHED_TOKENS)}
    servers = [Server(ServerSpec(f"{TAG}-{x}", MODEL, port, kvcached=True, extra_env=env), logs).start()
               for x, port in (("a", 18311), ("b", 18312))]
    try:
        for server in servers:
            server.wait_ready(timeout_s=600)
        yield servers
    finally:
        for server in servers:
            server.stop()
            # The segment is gone with the engine; the limit the tests set persists per name until deleted.
            subprocess.run([sys.executable, "-m", "kvcached.cli.kvctl", "delete", server.spec.name], capture_output=True)


def test_offline_greedy_tokens_are_identical_with_and_without_kvcached():
    def run(enabled: bool) -> list:
        done = run_offline({"ENABLE_KVCACHED": "true" if enabled else "false",
                            "KVCACHED_AUTOPATCH": "1" if enabled else "0"})
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("kvcached is active" in done.stdout + done.stderr) == enabled  # vLLM logs to stdout
        (line,) = [line for line in done.stdout.splitlines() if line.startswith("TOKENS ")]
        return json.loads(line[len("TOKENS "):])

    vanilla, elastic = run(False), run(True)
    assert len(vanilla) == 8 and all(vanilla)
    assert elastic == vanilla


def test_served_greedy_outputs_are_identical_with_and_without_kvcached(logs, pair):
    vanilla = start(ServerSpec(f"{TAG}-vanilla", MODEL, 18310, kvcached=False, kv_cache_bytes=1 << 30), logs)
    try:
        expected = [complete(vanilla, p, 24)["choices"][0]["text"] for p in PROMPTS]
    finally:
        vanilla.stop()
    got = [complete(pair[0], p, 24)["choices"][0]["text"] for p in PROMPTS]
    assert got == expected
    assert len(set(expected)) == 8


def test_kv_memory_follows_a_burst_and_returns_to_the_floor_within_2_s(pair):
    server = pair[0]
    name = server.spec.name
    floor = PAGE * (1 + 2)  # the null block's page + at most 2 pages of cached prefix blocks
    wait_for(lambda: record(name).mapped_bytes <= floor, 5, lambda: kv_state(server))
    idle_resident = kv_resident_bytes(server)
    assert idle_resident <= floor
    with Sampler(lambda: record(name).used_bytes) as registry, Sampler(lambda: kv_resident_bytes(server)) as resident:
        results = burst(server, 8)
    assert all(r["usage"]["completion_tokens"] == 48 for r in results)
    assert registry.peak >= 12 * PAGE and resident.peak >= 12 * PAGE  # 8 requests of 450 + 48 tokens: 4 blocks each
    back = wait_for(lambda: record(name).mapped_bytes <= floor
                    and kv_resident_bytes(server) <= floor, timeout=2.0, state=lambda: kv_state(server))
    print(f"\nKV floor {floor >> 20} MiB; peak registry {registry.peak >> 20} MiB, resident {resident.peak >> 20} MiB; "
          f"back at the floor {back:.2f} s after the burst")


def test_two_instances_serve_concurrently_and_kvctl_lists_both(pair):
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda s: burst(s, 3, 16, first=100), pair))
    assert [len(r) for r in results] == [3, 3]
    listed = subprocess.run([sys.executable, "-m", "kvcached.cli.kvctl", "list", "--json"], capture_output=True,
                            text=True, check=True).stdout
    rows = {row["name"]: row for row in json.loads(listed)}
    for server in pair:
        row = rows[server.spec.name]
        assert row["status"] == "alive" and row["device"] == "cpu" and row["page_bytes"] == PAGE


def test_kvctl_limit_caps_one_instance_during_a_burst_and_spares_the_other(pair):
    a, b = pair
    limit = 6 * PAGE  # room for 10 blocks beside the null block: two or three requests at a time
    subprocess.run([sys.executable, "-m", "kvcached.cli.kvctl", "limit", b.spec.name, str(limit)], check=True)
    wait_for(lambda: record(b.spec.name).limit_bytes == limit, timeout=1.0)
    try:
        with Sampler(lambda: record(b.spec.name).mapped_bytes) as mapped, \
                Sampler(held_pages(b), period_s=0.0002) as held:
            with ThreadPoolExecutor(2) as pool:
                limited, free = pool.map(lambda s: burst(s, 8, 32, first=200), (b, a))
        assert all(r["usage"]["completion_tokens"] == 32 for r in limited + free)
        peak = peak_pages(held.samples)
        print(f"\nlimited instance: {len(held.samples)} readings of its KV pages in {held.seconds:.1f} s "
              f"({1000 * held.seconds / len(held.samples):.2f} ms each); peak {peak} pages held, registry peak "
              f"{mapped.peak / PAGE:.0f} pages, limit {limit // PAGE} pages")
        assert mapped.peak <= limit and peak * PAGE <= limit
        assert record(a.spec.name).limit_bytes > 100 * PAGE  # the other instance's limit is untouched
    finally:
        subprocess.run([sys.executable, "-m", "kvcached.cli.kvctl", "limit", b.spec.name, "100G"], check=True)


def test_prefix_caching_hits_and_idle_memory_stays_under_the_bound(pair):
    server = pair[0]

    def hits() -> float:
        with urllib.request.urlopen(server.url + "/metrics") as response:
            text = response.read().decode()
        return sum(float(v) for v in re.findall(r"^vllm:prefix_cache_hits_total\{[^}]*\} (\S+)$", text, re.M))

    prompt = long_prompt(300, words=290)  # 302 tokens: two full blocks can be reused
    before = hits()
    first, second = complete(server, prompt), complete(server, prompt)
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert hits() - before >= 256  # the second request reused at least two full 128-token blocks
    bound = PAGE * (1 + 2)
    wait_for(lambda: record(server.spec.name).mapped_bytes <= bound, 2.0)
    assert kv_resident_bytes(server) <= bound


@pytest.mark.parametrize(
    "env, message",
    [
        ({"ENABLE_KVCACHED": "true"}, "KVCACHED_AUTOPATCH is not"),
        ({"ENABLE_KVCACHED": "true", "KVCACHED_AUTOPATCH": "1", "KVCACHED_PAGE_SIZE_MB": "big"},
         "KVCACHED_PAGE_SIZE_MB='big' is invalid"),
        ({"ENABLE_KVCACHED": "true", "KVCACHED_AUTOPATCH": "1", "KVCACHED_PAGE_SIZE_MB": "0.001"},
         "not a multiple of the device's granularity"),
    ],
)
def test_enabled_but_unusable_setups_stop_at_start_up_saying_why(env, message):
    done = run_offline({**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert done.returncode != 0
    assert message in done.stderr
    assert "kvcached is active" not in done.stdout + done.stderr
