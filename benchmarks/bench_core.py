"""Core benchmark: KV growth/shrink throughput, block fast path, page table per step, mapper stall, read bandwidth.

Runs a Llama-3.1-8B-shaped KV cache (32 layers, K and V, 8 KV heads, head size 128, bf16, 16-token blocks) on the
given device, prints a table and writes JSON. Targets (H100): growth >= 1 TB/s, alloc/free fast path <= 5 us per call,
the page table's work per engine step with nothing new <= 5 us, read bandwidth >= 0.98x a plain tensor.

    python -m benchmarks.bench_core --device cuda:0 --out benchmarks/results/
    python -m benchmarks.bench_core --device cpu --grow-gib 2     # the host backend
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from kvcached import Config, KVCacheManager, KVGeometry

LLAMA_8B = KVGeometry(num_layers=32, block_shape=(16, 8, 128), dtype=torch.bfloat16)
GB = 1e9


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def make_manager(device: str, virtual_bytes: int, **config) -> KVCacheManager:
    values = dict(min_reserved_pages=0, max_reserved_pages=0, trim_idle_s=60.0)
    values.update(config)
    return KVCacheManager(LLAMA_8B, device, virtual_bytes=virtual_bytes, background=False,
                          config=Config(**values))


def driver_floor(manager: KVCacheManager, pages: int) -> dict:
    """Map and unmap `pages` pages straight through the backend (no allocator): the floor the manager sits on."""
    vmm, size = manager.vmm, manager.layout.page_bytes
    base = vmm.reserve(pages * size)
    try:
        start = time.perf_counter()
        for i in range(pages):
            vmm.map(base + i * size, size)
        mapped = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(pages):
            vmm.unmap(base + i * size, size)
        unmapped = time.perf_counter() - start
    finally:
        vmm.unreserve(base, pages * size)
    return {"map_GBps": pages * size / mapped / GB, "unmap_GBps": pages * size / unmapped / GB}


def per_piece_handles(manager: KVCacheManager, pages: int) -> dict:
    """The layout not taken: one handle per layer piece (2 MiB each), as a per-layer layout would need."""
    vmm, size = manager.vmm, manager.layout.page_bytes
    piece = size // LLAMA_8B.num_pieces
    piece = max(vmm.granularity, piece - piece % vmm.granularity)
    count = size // piece
    base = vmm.reserve(pages * size)
    try:
        start = time.perf_counter()
        for i in range(pages * count):
            vmm.map(base + i * piece, piece)
        mapped = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(pages * count):
            vmm.unmap(base + i * piece, piece)
        unmapped = time.perf_counter() - start
    finally:
        vmm.unreserve(base, pages * size)
    return {"handle_bytes": piece, "map_GBps": pages * size / mapped / GB, "unmap_GBps": pages * size / unmapped / GB}


def growth(manager: KVCacheManager, pages: int) -> dict:
    """alloc() that must map every page synchronously, then free() that unmaps them (no reserve)."""
    g = manager.layout.blocks_per_page
    start = time.perf_counter()
    ids = manager.alloc(pages * g - 1)  # page 0 already holds the null block
    grow = time.perf_counter() - start
    assert ids is not None, "not enough memory for the growth test; lower --grow-gib"
    bytes_mapped = manager.memory_stats().used_bytes - manager.layout.page_bytes
    start = time.perf_counter()
    manager.free(ids)
    shrink = time.perf_counter() - start
    return {"bytes": bytes_mapped, "grow_GBps": bytes_mapped / grow / GB, "shrink_GBps": bytes_mapped / shrink / GB}


def fast_path(manager: KVCacheManager, calls: int) -> dict:
    """alloc(16) + free of those 16 blocks, inside an already mapped page: no driver call."""
    held = manager.alloc(32)  # keep page 0 partly used so the 16 blocks never empty it
    for _ in range(1000):
        manager.free(manager.alloc(16))
    start = time.perf_counter()
    for _ in range(calls):
        manager.free(manager.alloc(16))
    elapsed = time.perf_counter() - start
    manager.free(held)
    return {"calls": 2 * calls, "us_per_call": elapsed / (2 * calls) * 1e6}


def page_table_step(num_pages: int, calls: int) -> dict:
    """What vLLM pays per step when nothing new is mapped: the scheduler's settle() after an allocation and the
    worker's before_step()/after_step(), on a table as large as a small model's on an 80 GB GPU (16 MiB pages)."""
    import tempfile

    from kvcached.pagetable import PageFollower, PageTable, TableVirtualMemory
    from kvcached.vmm import open_vmm

    host = open_vmm("cpu")
    page = host.granularity
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        table = PageTable.create(os.path.join(folder, "pages"), num_pages, page)
        base = host.reserve(num_pages * page)
        follower, decider = PageFollower(table, host, base), TableVirtualMemory(table, ["cpu"], page)
        decider.map(0, page)
        decider.settle()
        start = time.perf_counter()
        for _ in range(calls):
            decider.settle()
        settle_us = (time.perf_counter() - start) / calls * 1e6
        start = time.perf_counter()
        for _ in range(calls):
            follower.before_step()
            follower.after_step()
        step_us = (time.perf_counter() - start) / calls * 1e6
        follower.close()
        host.unreserve(base, num_pages * page)
        table.close()
    return {"pages": num_pages, "settle_us": settle_us, "before_after_step_us": step_us}


def engine_work(device: str, seconds: float) -> None:
    """Stand-in for an engine step between allocations: a GPU kernel of that length, waited for as an engine waits
    (without the GIL); on the host, a sleep."""
    if device.startswith("cuda"):
        torch.cuda._sleep(int(seconds * 1.7e9))  # cycles at about the H100's SM clock
        torch.cuda.synchronize(device)
    else:
        time.sleep(seconds)


def mapper_stall(device: str, virtual_bytes: int, pages: int, cycles: int = 4) -> dict:
    """The engine's thread allocs and frees 16 blocks at a time (50 us of GPU work between calls) while the mapper maps
    and unmaps pages behind it, growing to `pages` pages and back `cycles` times. Every call's latency is recorded."""
    manager = KVCacheManager(LLAMA_8B, device, virtual_bytes=virtual_bytes, background=True,
                             config=Config(min_reserved_pages=2, max_reserved_pages=4, trim_idle_s=60.0))
    try:
        time.sleep(0.2)  # let the mapper fill its first reserve
        steps = pages * manager.layout.blocks_per_page // 16
        latencies, empty = [], 0
        for _ in range(cycles):
            held = []
            for _ in range(steps):
                empty += manager.memory_stats().premapped_bytes == 0
                start = time.perf_counter()
                ids = manager.alloc(16)
                latencies.append(time.perf_counter() - start)
                assert ids is not None, "out of memory in the stall test"
                held.append(ids)
                engine_work(device, 50e-6)
            for ids in held:
                start = time.perf_counter()
                manager.free(ids)
                latencies.append(time.perf_counter() - start)
                engine_work(device, 50e-6)
        latencies.sort()
        return {
            "calls": len(latencies), "allocs_with_empty_reserve": empty,
            "p50_us": latencies[len(latencies) // 2] * 1e6, "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
            "max_us": latencies[-1] * 1e6,
        }
    finally:
        manager.shutdown()


def read_bandwidth(manager: KVCacheManager, blocks: int, repeats: int) -> dict:
    """Gather `blocks` blocks of each layer piece, as paged attention reads them, elastic vs a plain tensor
    (medians of alternated repetitions)."""
    device = manager.device
    ids = manager.alloc(blocks)
    assert ids is not None
    index = torch.tensor(ids, device=device)
    plain = torch.zeros((2, blocks, *LLAMA_8B.block_shape), dtype=LLAMA_8B.dtype, device=device)
    plain_index = torch.arange(blocks, device=device)
    layers = manager.kv_tensors[:8]  # 8 layers read per measurement keep the plain copy small

    def timed(read) -> float:
        synchronize(device)
        start = time.perf_counter()
        read()
        synchronize(device)
        return time.perf_counter() - start

    def read_elastic():
        for kv in layers:
            kv[0].index_select(0, index).sum(dtype=torch.float32)
            kv[1].index_select(0, index).sum(dtype=torch.float32)

    def read_plain():
        for _ in layers:
            plain[0].index_select(0, plain_index).sum(dtype=torch.float32)
            plain[1].index_select(0, plain_index).sum(dtype=torch.float32)

    nbytes = len(layers) * 2 * blocks * manager.layout.block_bytes
    read_elastic(), read_plain()  # warm up
    elastic, plain_times = [], []
    for _ in range(repeats):  # alternated, so that both see the same clocks and the same neighbours
        elastic.append(timed(read_elastic))
        plain_times.append(timed(read_plain))
    elastic_s, plain_s = statistics.median(elastic), statistics.median(plain_times)
    manager.free(ids)
    return {"bytes": nbytes, "elastic_GBps": nbytes / elastic_s / GB, "plain_GBps": nbytes / plain_s / GB,
            "ratio": plain_s / elastic_s}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_core", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu", help="cpu or cuda:N")
    parser.add_argument("--grow-gib", type=float, default=8.0, help="KV memory mapped in the growth test (GiB)")
    parser.add_argument("--read-blocks", type=int, default=4096, help="blocks per piece read in the bandwidth test")
    parser.add_argument("--calls", type=int, default=50000, help="alloc+free pairs in the fast-path test")
    parser.add_argument("--out", default="results", help="folder for bench_core_<device>.json")
    args = parser.parse_args()

    page = 128 << 20
    pages = max(2, int(args.grow_gib * (1 << 30)) // page)
    virtual = (pages + 4) * page
    manager = make_manager(args.device, virtual)
    results = {"device": args.device, "geometry": "Llama-3.1-8B: 32 layers, K+V, 16x8x128 bf16 blocks",
               "page_bytes": manager.layout.page_bytes, "blocks_per_page": manager.layout.blocks_per_page,
               "host": platform.node(), "torch": torch.__version__}
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name(args.device)
    steps = [
        ("driver_floor", lambda: driver_floor(manager, min(pages, 16))),
        ("per_piece_handles", lambda: per_piece_handles(manager, min(pages, 4))),
        ("growth", lambda: growth(manager, pages)),
        ("fast_path", lambda: fast_path(manager, args.calls)),
        ("page_table_step", lambda: page_table_step(5000, 20000)),
        ("read_bandwidth", lambda: read_bandwidth(manager, args.read_blocks, 50)),
    ]
    for name, step in steps:
        print(f"[bench] {name} ...", flush=True)
        results[name] = step()
    manager.shutdown()
    print("[bench] mapper_stall ...", flush=True)
    results["mapper_stall"] = mapper_stall(args.device, virtual, min(pages, 24))
    report(results)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_core_{args.device.replace(':', '')}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"[bench] wrote {path}")


def report(r: dict) -> None:
    rows = [
        ("KV growth (alloc maps pages)", f"{r['growth']['grow_GBps']:.0f} GB/s", ">= 1000 GB/s on H100"),
        ("KV shrink (free unmaps pages)", f"{r['growth']['shrink_GBps']:.0f} GB/s", ""),
        ("driver floor: map one page", f"{r['driver_floor']['map_GBps']:.0f} GB/s", "same run"),
        ("driver floor: unmap one page", f"{r['driver_floor']['unmap_GBps']:.0f} GB/s", "same run"),
        (f"per-piece handles ({r['per_piece_handles']['handle_bytes'] >> 20} MiB): map",
         f"{r['per_piece_handles']['map_GBps']:.0f} GB/s", "layout not taken"),
        ("alloc/free fast path (16 blocks)", f"{r['fast_path']['us_per_call']:.2f} us/call", "<= 5 us"),
        (f"page table per step, nothing new ({r['page_table_step']['pages']} pages)",
         f"{r['page_table_step']['settle_us'] + r['page_table_step']['before_after_step_us']:.2f} us/step",
         f"settle {r['page_table_step']['settle_us']:.2f} + before/after_step "
         f"{r['page_table_step']['before_after_step_us']:.2f} us (<= 5 us)"),
        ("engine thread with mapper: p99 / max", f"{r['mapper_stall']['p99_us']:.1f} / {r['mapper_stall']['max_us']:.0f} us",
         f"{r['mapper_stall']['calls']} calls, reserve empty at {r['mapper_stall']['allocs_with_empty_reserve']} allocs"),
        ("read: elastic / plain", f"{r['read_bandwidth']['elastic_GBps']:.0f} / {r['read_bandwidth']['plain_GBps']:.0f} GB/s",
         f"ratio {r['read_bandwidth']['ratio']:.3f} (>= 0.98)"),
    ]
    width = max(len(a) for a, _, _ in rows)
    print(f"\nkvcached core benchmark on {r['device']} ({r.get('gpu', r['host'])}), page {r['page_bytes'] >> 20} MiB "
          f"= {r['blocks_per_page']} blocks x 64 pieces")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>18}  {note}")


if __name__ == "__main__":
    main()
