"""The vLLM integration's parts that need no running engine: the elastic block pool over vLLM's own block classes
(imported from vLLM's CPU build), and the engine core's page-table files.

The pool runs on a real KVCacheManager deciding through a real page table, followed by a real PageFollower mapping
host memory (the worker's side, here in-process); block ids are exact: 2 layers, blocks of 4 KiB per layer, pages of
4 blocks (16 KiB per layer), so page p holds ids 8p..8p+3 (layout.py: sparse ids).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import asdict
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from vllm.v1.core.kv_cache_utils import BlockHash, make_block_hash_with_group_id  # noqa: E402

from kvcached import Config  # noqa: E402
from kvcached.errors import KVCachedError  # noqa: E402
from kvcached.integrations.vllm import plan as planning  # noqa: E402
from kvcached.integrations.vllm.block_pool import ElasticBlockPool  # noqa: E402
from kvcached.pagetable import PageFollower, PageTable  # noqa: E402
from kvcached.vmm import open_vmm  # noqa: E402
from pagetable_child import Child  # noqa: E402
from kvcached.procinfo import start_ticks  # noqa: E402

PAGE = 2 * 4 * 4096  # 2 layers x 4 blocks x 4 KiB


def make_pool(tmp_path, monkeypatch, follow):
    """An elastic pool limited to 3 pages (page 0 holds the null block), no reserve, prefix caching on; `follow(path)`
    starts the worker's side on the page table and returns what stops it."""
    for key in [k for k in os.environ if k.startswith("KVCACHED_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("KVCACHED_IPC_DIR", str(tmp_path))
    monkeypatch.setenv("KVCACHED_PAGE_SIZE_MB", str(4 * 4096 / (1 << 20)))
    monkeypatch.setenv("KVCACHED_MEMORY_LIMIT", str(3 * PAGE))
    monkeypatch.setenv("KVCACHED_MIN_RESERVED_PAGES", "0")
    monkeypatch.setenv("KVCACHED_MAX_RESERVED_PAGES", "0")
    monkeypatch.setenv("KVCACHED_MAX_CACHED_TOKENS", str(16 * 16))  # no bound in play: 16 blocks of 16 tokens
    plan = planning.ElasticPlan(
        devices=("cpu",), num_layers=2, block_bytes=4096, block_size=16, piece_page_bytes=4 * 4096, granularity=4096,
        virtual_bytes=8 * PAGE, table_path=str(tmp_path / "pages"), ipc_name="pool-test",
    )
    table = PageTable.create(plan.table_path, plan.layout().num_pages, PAGE)
    stop = follow(plan.table_path)
    monkeypatch.setattr(planning, "_current", plan)
    monkeypatch.setattr(planning, "_tables", [table])
    return ElasticBlockPool(plan.layout().num_block_ids, True, 16), stop


@pytest.fixture
def pool(tmp_path, monkeypatch):
    """The pool, followed by a PageFollower in this process."""
    vmm = open_vmm("cpu")

    def follow(path: str):
        base = vmm.reserve(8 * PAGE)
        follower = PageFollower(PageTable.attach(path), vmm, base)
        return lambda: (follower.close(), vmm.unreserve(base, 8 * PAGE))

    made, stop = make_pool(tmp_path, monkeypatch, follow)
    yield made
    made.shutdown()
    stop()


def cache(pool: ElasticBlockPool, blocks) -> None:
    """Give blocks prefix-cache hashes, as vLLM does for full blocks, and free them (they stay cached)."""
    for block in blocks:
        key = make_block_hash_with_group_id(BlockHash(b"block-%d" % block.block_id), 0)
        block.set_block_hash(key)
        pool.cached_block_hash_to_block.insert(key, block)
    pool.free_blocks(blocks)


def is_cached(pool: ElasticBlockPool, block_id: int) -> bool:
    return pool.get_cached_block(BlockHash(b"block-%d" % block_id), [0]) is not None


def test_a_full_pool_evicts_the_cached_blocks_of_a_cache_only_page_before_older_ones(pool):
    first = pool.get_new_blocks(3)  # page 0 beside the null block
    second = pool.get_new_blocks(4)  # page 1
    third = pool.get_new_blocks(4)  # page 2
    assert [b.block_id for b in first + second + third] == [1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]
    cache(pool, first[1:])  # blocks 2 and 3: the oldest cached, on page 0, which block 1 still uses
    cache(pool, third)  # page 2: only cached blocks
    assert pool.get_num_free_blocks() == 6 and pool.kv.available_size() == 0  # the limit: 3 pages, all mapped

    with pool.step():  # as vLLM's scheduler: says what it needs, checks, takes
        pool.expect(4)
        assert pool.get_num_free_blocks() == 6  # no new memory: the cached blocks make up the count
        taken = pool.get_new_blocks(4)
    # Evicting by age would take 2, 3, 16, 17 and leave 18 and 19 pinning page 2; the whole of page 2 goes instead.
    assert [b.block_id for b in taken] == [16, 17, 18, 19]
    assert sorted(pool._cached) == [2, 3] and is_cached(pool, 2) and is_cached(pool, 3)
    assert not any(is_cached(pool, i) for i in (16, 17, 18, 19))

    pool.free_blocks(taken + second + first[:1])  # no hashes: back to the manager at once
    # Idle: page 0 (the null block and the two cached blocks) is all that stays mapped.
    assert pool.kv.memory_stats().used_bytes == PAGE and pool.kv.memory_stats().premapped_bytes == 0


def test_cached_blocks_stay_on_no_more_pages_than_they_fill_the_oldest_page_goes(pool):
    pool.max_cached_blocks = 4  # KVCACHED_MAX_CACHED_TOKENS of one page: 4 blocks of 16 tokens
    first, second, third = pool.get_new_blocks(3), pool.get_new_blocks(4), pool.get_new_blocks(4)  # pages 0, 1, 2
    cache(pool, second[:2])
    pool.free_blocks(second[2:])  # page 1: blocks 8 and 9 cached, nothing in use
    cache(pool, third[:2])  # page 2: 16 and 17 cached beside 18 and 19 in use: not a cache-only page yet
    assert sorted(pool._cached) == [8, 9, 16, 17] and pool.kv.pages.pages_in_use() == {0, 1, 2}
    pool.free_blocks(third[2:])  # two cache-only pages holding 4 blocks, which fit one: the older page goes
    assert sorted(pool._cached) == [16, 17] and is_cached(pool, 16) and not is_cached(pool, 8)
    assert pool.kv.pages.pages_in_use() == {0, 2}
    pool.free_blocks(first)
    assert pool.kv.memory_stats().used_bytes == 2 * PAGE  # the null block's page and page 2 (its 2 cached blocks)


def test_an_admission_check_holds_nothing_and_counts_what_could_be_mapped(pool):
    with pool.step():
        pool.expect(100, admission=True)  # will a 100-block prompt fit? (vLLM then compares with the answer)
        assert pool.get_num_free_blocks() == 3 + 2 * 4  # page 0's 3 free blocks, and 2 more pages under the limit
        assert pool.kv.num_allocated() == 1  # the null block only: nothing held
        pool.expect(2)  # the first chunk's blocks: held, so promised
        assert pool.get_num_free_blocks() == 2 and pool.kv.num_allocated() == 3
    assert pool.kv.num_allocated() == 1  # the step is over: held blocks went back


def test_a_pool_whose_worker_is_out_of_memory_promises_nothing_and_raises_nothing(tmp_path, monkeypatch):
    children = []

    def follow(path: str):
        children.append(Child(path, "cpu"))
        return children[0].close

    pool, stop = make_pool(tmp_path, monkeypatch, follow)
    worker = children[0]
    try:
        assert worker.ask("oom on") == "oom on"  # the OS refuses every new mapping (another engine took the memory)
        with pool.step():  # what vLLM's scheduler does for one request needing 4 blocks: 3 on page 0, 1 on page 1
            pool.expect(4)
            assert pool.get_num_free_blocks() == 0  # nothing promised: vLLM waits, as with a full pool
        assert pool.kv.memory_stats().used_bytes == PAGE and worker.pages() == [0]  # page 1 went back
        assert worker.ask("oom off") == "oom off"
        with pool.step():
            pool.expect(4)
            assert pool.get_num_free_blocks() == 4
            assert [b.block_id for b in pool.get_new_blocks(4)] == [1, 2, 3, 8]
        assert worker.pages() == [0, 1]
    finally:
        pool.shutdown()
        stop()


def test_stale_page_tables_are_removed_by_pid_and_start_time(tmp_path):
    me, my_ticks = os.getpid(), start_ticks(os.getpid())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    paths = {
        "mine": tmp_path / f"kvcached-pages.model.{me}.{my_ticks}",  # this live process: kept
        "reused pid": tmp_path / f"kvcached-pages.model.{me}.{my_ticks - 1}",  # same pid, another process: removed
        "dead": tmp_path / f"kvcached-pages.a.b.{int(dead.stdout)}.{my_ticks}",  # exited: removed
        "dead's FIFO": tmp_path / f"kvcached-pages.a.b.{int(dead.stdout)}.{my_ticks}.wake",  # removed with it
        "other file": tmp_path / "kvcached.model",  # a registry segment: not a page table, kept
    }
    for path in paths.values():
        path.write_bytes(b"")
    removed = planning.remove_stale_tables(str(tmp_path))
    assert sorted(removed) == sorted(str(paths[k]) for k in ("reused pid", "dead", "dead's FIFO"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(paths[k].name for k in ("mine", "other file"))


def test_the_page_table_lives_in_the_configured_directory(tmp_path):
    path = planning.page_table_path(str(tmp_path), "llama")
    assert path == str(tmp_path / f"kvcached-pages.llama.{os.getpid()}.{start_ticks(os.getpid())}")


def engine_config(tp: int = 1, **parallel) -> SimpleNamespace:
    """The parts of a VllmConfig the plan reads."""
    sizes = dict(tensor_parallel_size=tp, pipeline_parallel_size=1, prefill_context_parallel_size=1,
                 decode_context_parallel_size=1, data_parallel_size=1, nnodes=1, distributed_executor_backend="mp")
    return SimpleNamespace(parallel_config=SimpleNamespace(**{**sizes, **parallel}),
                           device_config=SimpleNamespace(device_type="cpu"),
                           model_config=SimpleNamespace(served_model_name="m", model="m"))


def kv_specs(num_kv_heads: int = 2, layers: int = 30) -> dict:
    """One rank's KV cache specs as vLLM gives them: SmolLM2's 30 layers, blocks of 128 tokens x heads x 64 in bf16."""
    return {f"layer.{i}": SimpleNamespace(page_size_bytes=2 * 128 * num_kv_heads * 64 * 2, block_size=128)
            for i in range(layers)}


def test_tensor_parallel_2_is_one_plan_for_both_ranks_on_their_devices(tmp_path):
    config = Config(ipc_name="tp-plan", ipc_dir=str(tmp_path))
    plan = planning.make_plan(engine_config(tp=2), [kv_specs(), kv_specs()], config)
    assert plan.devices == ("cpu", "cpu") and plan.world_size == 2
    assert plan.block_bytes == 65536 and plan.layout().blocks_per_page == 4
    assert plan.layout().page_bytes == 7864320  # one rank's shard of a page: 30 layers x 4 blocks x 64 KiB
    assert planning.plan_of(SimpleNamespace(kvcached_plan=asdict(plan))) == plan  # as the worker reads it back


def test_ranks_with_different_kv_specs_are_refused(tmp_path):
    config = Config(ipc_name="tp-plan", ipc_dir=str(tmp_path))
    with pytest.raises(KVCachedError, match="^kvcached needs one equal KV cache spec per tensor-parallel rank; got 2 "
                                            "for 2 ranks$"):
        planning.make_plan(engine_config(tp=2), [kv_specs(), kv_specs(num_kv_heads=1)], config)


@pytest.mark.parametrize("setting, value", [
    ("pipeline_parallel_size", 2), ("decode_context_parallel_size", 2), ("prefill_context_parallel_size", 2),
    ("data_parallel_size", 2), ("nnodes", 2),
])
def test_parallel_setups_other_than_tensor_parallel_are_refused_naming_the_setting(setting, value):
    with pytest.raises(KVCachedError, match=f"^kvcached supports tensor parallel on one host \\(vLLM's own worker "
                                            f"processes\\); pipeline, context and data parallel size and nnodes "
                                            f"must be 1, got {setting}={value}; unset ENABLE_KVCACHED to run this "
                                            f"engine without kvcached$"):
        planning.check_parallel(engine_config(tp=2, **{setting: value}))


def test_tensor_parallel_over_ray_is_refused_and_any_tensor_parallel_size_is_accepted():
    with pytest.raises(KVCachedError, match="got distributed_executor_backend='ray'; unset ENABLE_KVCACHED"):
        planning.check_parallel(engine_config(tp=2, distributed_executor_backend="ray"))
    for tp in (1, 2, 8):
        planning.check_parallel(engine_config(tp=tp))
    assert planning.devices_of(engine_config(tp=4)) == ("cpu",) * 4


class _FailingFollower:
    def before_step(self) -> None:
        raise RuntimeError("cuMemMap failed")


def test_rank_0_that_cannot_map_before_a_step_raises_to_the_engine(monkeypatch):
    from kvcached.integrations.vllm import worker

    monkeypatch.setattr(worker, "_worker_kv", SimpleNamespace(rank=0, follower=_FailingFollower()))
    with pytest.raises(RuntimeError, match="^cuMemMap failed$"):
        worker.run_step(lambda runner: pytest.fail("the step ran"), None)


def test_a_rank_above_0_that_cannot_map_before_a_step_ends_its_worker_process():
    # vLLM drops errors of ranks >= 1; rank 0 would wait for this one in the step's all-reduce (worker.py's Note).
    code = (
        "import logging, sys\n"
        "from types import SimpleNamespace\n"
        "from kvcached.integrations.vllm import worker\n"
        "def fail():\n"
        "    raise RuntimeError('cuMemMap failed')\n"
        "logging.basicConfig(stream=sys.stderr)\n"
        "worker._worker_kv = SimpleNamespace(rank=1, follower=SimpleNamespace(before_step=fail))\n"
        "worker.run_step(lambda runner: print('STEP RAN'), None)\n"
        "print('RETURNED')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stdout == ""  # neither the step nor anything after it ran
    assert re.search(r"kvcached: rank 1 \(pid \d+\) could not map its KV pages before a step; ending this worker",
                     done.stderr)
    assert "RuntimeError: cuMemMap failed" in done.stderr


def test_each_rank_gets_the_gpu_vllm_gives_its_local_rank(monkeypatch):
    import vllm.platforms

    # vLLM's platform maps a local rank to a visible GPU (after CUDA_VISIBLE_DEVICES, assigned GPU ids); the plan asks it
    visible = {0: 2, 1: 1}
    monkeypatch.setattr(vllm.platforms, "current_platform",
                        SimpleNamespace(logical_device_id_to_visible_device_id=visible.__getitem__), raising=False)
    config = engine_config(tp=2)
    config.device_config.device_type = "cuda"
    assert planning.devices_of(config) == ("cuda:2", "cuda:1")


def test_the_v2_warm_up_gets_the_pages_of_its_made_up_blocks_and_gives_them_back(tmp_path, monkeypatch):
    """vLLM 0.26's V2 runner warms up with real steps on made-up requests whose blocks 1, 2, ... no scheduler handed
    out: their pages are mapped for it (here: written through, a crash if not), and unmapped when it is done."""
    import torch
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    from kvcached.integrations.vllm import worker
    from pagetable_child import resident_bytes

    plan = planning.ElasticPlan(
        devices=("cpu",), num_layers=2, block_bytes=4096, block_size=16, piece_page_bytes=4 * 4096, granularity=4096,
        virtual_bytes=8 * PAGE, table_path=str(tmp_path / "pages"), ipc_name="warm-up-test",
    )
    layout = plan.layout()
    table = PageTable.create(plan.table_path, layout.num_pages, PAGE)
    table.set_wanted(0, True)  # the null block's page, as the engine core marks it
    monkeypatch.setattr(worker, "tensor_parallel_rank", lambda: 0)
    monkeypatch.setattr(worker, "_worker_kv", None)
    kv = worker.reservation(SimpleNamespace(**{planning._ATTR: asdict(plan)}), torch.device("cpu"))
    prefill = SchedulerOutput.make_empty()
    prefill.scheduled_new_reqs = [
        NewRequestData(req_id=f"w{i}", prompt_token_ids=[1, 2], mm_features=[], sampling_params=None,
                       pooling_params=None, block_ids=([i],), num_computed_tokens=0, lora_request=None)
        for i in range(1, 9)  # ids 1..8: page 0's valid ids 1..3, then ids 4..7 that no page hands out, then page 1
    ]
    decode = SchedulerOutput.make_empty()
    decode.scheduled_cached_reqs = CachedRequestData.make_empty()
    decode.scheduled_cached_reqs.new_block_ids = [None, ([9],)]
    seen = []

    def model(output):  # the step: writes every layer of every block it was given
        for block in worker.block_ids_of(output):
            for layer in range(plan.num_layers):
                layout.piece_view(kv.raw, layer)[block].fill_(1)
        seen.append(resident_bytes(kv.base, kv.size))

    def warmup_kernels(runner, execute_model, sample_tokens):
        execute_model(prefill)
        execute_model(decode)
        return "warmed"

    try:
        assert worker.block_ids_of(prefill) == list(range(1, 9)) and worker.block_ids_of(decode) == [9]
        assert layout.pages_under(range(1, 9)) == range(0, 2)
        assert worker.warm_up(warmup_kernels, None, model, None) == "warmed"
        assert seen == [2 * PAGE, 2 * PAGE]  # pages 0 and 1, then nothing new for id 9 (page 1)
        assert resident_bytes(kv.base, kv.size) == PAGE  # only the null block's page stays
        assert kv.follower.mapped.nonzero()[0].tolist() == [0]
    finally:
        kv.close()
        table.close()
