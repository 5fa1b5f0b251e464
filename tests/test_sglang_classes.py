"""kvcached's patched SGLang classes against SGLang 0.5.15.post1's own code, on the host backend (no GPU).

SGLang's memory-pool, radix-cache, scheduler and model-runner modules import without a CUDA driver when SGLang's Python
dependencies are there, but SGLang is not in the test venv (its pins, torch 2.11 with CUDA among them, would replace
the vLLM CPU build's torch): these tests skip unless `sglang` imports. To run them (about 6 GB, a few minutes):

    python3.11 -m venv /tmp/sgl-cpu && /tmp/sgl-cpu/bin/pip install pytest psutil orjson pybase64 msgspec \\
        setproctitle pyzmq uvloop partial-json-parser pydantic fastapi triton torchvision ipython pillow \\
        transformers==5.12.1 tokenizers==0.22.2 && /tmp/sgl-cpu/bin/pip install --no-deps sglang==0.5.15.post1
    /tmp/sgl-cpu/bin/pip install --no-deps --no-build-isolation -e .     # kvcached's SGLang plugin entry point
    /tmp/sgl-cpu/bin/python -m pytest tests/test_sglang_classes.py

What runs: the autopatch hooks replace each name autopatch.py lists, in a fresh interpreter; the elastic pool
(ElasticMHATokenToKVPool over a host reservation) with SGLang's own set_kv_buffer and get_key_buffer; the elastic
allocator under SGLang's RadixCache with the prefix-cache bound; the scheduler's idle leak check with kvcached's count;
refusals at start-up (a bad variable at `import sglang`, an unsupported setting in the model runner, before any pool,
ENABLE_KVCACHED without KVCACHED_AUTOPATCH through SGLang's plugin loader).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

sglang = pytest.importorskip("sglang", reason="SGLang 0.5.15.post1 is not installed in this venv (see the docstring)")

from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey  # noqa: E402

from kvcached.integrations.sglang.cache_bound import bound_cached_tokens, shrink_when_idle  # noqa: E402
from kvcached.integrations.sglang.pool import ElasticMHATokenToKVPool, ElasticTokenToKVPoolAllocator  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS, DIM, LAYERS = 2, 64, 4
TOKENS_PER_PAGE, IDS_PER_PAGE = 1024, 8192  # 256 KiB per layer piece, 256 bytes per token per piece, 8 pieces


@pytest.fixture
def pool(monkeypatch):
    monkeypatch.setenv("KVCACHED_PAGE_SIZE_MB", "0.25")
    monkeypatch.setenv("KVCACHED_VIRTUAL_SIZE", "64M")
    monkeypatch.setenv("KVCACHED_MIN_RESERVED_PAGES", "0")
    monkeypatch.setenv("KVCACHED_MAX_RESERVED_PAGES", "0")
    monkeypatch.setenv("KVCACHED_IPC_NAME", f"sglang-classes-{os.getpid()}")
    made = ElasticMHATokenToKVPool(20000, page_size=1, dtype=torch.bfloat16, head_num=HEADS, head_dim=DIM,
                                   layer_num=LAYERS, device="cpu", enable_memory_saver=False, v_head_dim=DIM)
    yield made
    made.shutdown()


def test_autopatch_replaces_every_listed_name_when_sglang_is_imported():
    code = textwrap.dedent("""
        import kvcached.integrations.startup as startup
        startup.run()
        assert startup.ACTIVE and startup.ERROR is None
        import sglang.srt.model_executor.model_runner_kv_cache_mixin as mixin
        import sglang.srt.model_executor.model_runner as runner
        import sglang.srt.mem_cache.kv_cache_builder as builder
        import sglang.srt.mem_cache.radix_cache as radix
        import sglang.srt.managers.scheduler as scheduler
        import sglang.srt.managers.scheduler_components.invariant_checker as checker
        from kvcached.integrations.sglang import pool
        assert mixin.MHATokenToKVPool is pool.ElasticMHATokenToKVPool
        assert mixin.TokenToKVPoolAllocator is pool.ElasticTokenToKVPoolAllocator
        wrapped = [mixin.ModelRunnerKVCacheMixin.init_memory_pool, mixin.ModelRunnerKVCacheMixin._init_pools,
                   runner.ModelRunner.init_cuda_graphs, builder.build_kv_cache, radix.RadixCache.cache_finished_req,
                   scheduler.Scheduler.get_next_batch_to_run, scheduler.Scheduler.on_idle,
                   checker.SchedulerInvariantChecker._check_full_pool]
        assert all(getattr(f, "__wrapped__", None) for f in wrapped), wrapped
        profile = mixin.ModelRunnerKVCacheMixin._profile_available_bytes
        assert profile.__module__ == "kvcached.integrations.sglang.autopatch"
        print("PATCHED", len(wrapped) + 3)
    """)
    env = dict(os.environ, ENABLE_KVCACHED="1", KVCACHED_AUTOPATCH="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "PATCHED 11" in out.stdout


def test_the_pool_stores_and_reads_kv_through_sglangs_own_code(pool):
    assert pool.size == pool.slots.num_rows - 1  # SGLang's store bound: size + page_size rows
    # SGLang's budget of 20000 tokens plus the padding slot fills 20 pages of 1024 tokens (of the 32 that 64M allows)
    assert (pool.slots.num_rows, pool.slots.capacity) == (20 * IDS_PER_PAGE, 20 * TOKENS_PER_PAGE - 1)
    allocator = ElasticTokenToKVPoolAllocator(20000, dtype=torch.bfloat16, device="cpu", kvcache=pool,
                                              need_sort=False)
    loc = allocator.alloc(3)
    assert loc.tolist() == [1, 2, 3]
    k = torch.arange(3 * HEADS * DIM, dtype=torch.bfloat16).view(3, HEADS, DIM)
    pool.set_kv_buffer(SimpleNamespace(layer_id=2), loc, k, -k)
    assert torch.equal(pool.get_key_buffer(2)[loc], k) and torch.equal(pool.get_value_buffer(2)[loc], -k)
    assert torch.equal(pool.slots.kv.kv_tensors[2][0, 1:4, 0], k)  # the manager's own view of layer 2's K
    assert pool.data_ptrs.tolist() == [b.data_ptr() for b in pool.k_buffer + pool.v_buffer]
    assert pool.data_strides.tolist() == [HEADS * DIM * 2] * (2 * LAYERS)
    assert pool.get_kv_size_bytes() == (1 << 20, 1 << 20)  # one 2 MiB page mapped, split between K and V


def test_the_radix_cache_frees_evicted_prefixes_to_the_manager_and_keeps_the_bound(pool):
    allocator = ElasticTokenToKVPoolAllocator(20000, dtype=torch.bfloat16, device="cpu", kvcache=pool,
                                              need_sort=False)
    tree = RadixCache.create_simulated(mock_allocator=allocator)
    requests = [allocator.alloc(TOKENS_PER_PAGE) for _ in range(3)]  # run together: their first slots are on
    assert [int(r[0]) // IDS_PER_PAGE for r in requests] == [0, 1, 2]  # pages 0, 1 and 2
    for i, slots in enumerate(requests):  # they finish: 300 tokens of each stay cached, the rest is freed
        tree.insert(InsertParams(key=RadixKey(list(range(i * 10000, i * 10000 + 300))), value=slots[:300]))
        allocator.free(slots[300:])
    assert (tree.evictable_size(), allocator.slots.allocated_tokens()) == (900, 900)
    evict = lambda n: tree.evict(EvictParams(num_tokens=n))  # noqa: E731
    bound_cached_tokens(tree, evict, 700)  # SGLang evicts whole leaves: one request's 300 tokens
    assert (tree.evictable_size(), allocator.slots.allocated_tokens()) == (600, 600)
    shrink_when_idle(tree, evict, allocator.slots, allocator.slots.max_cached_tokens)
    assert pool.slots.kv.memory_stats().used_bytes == 2 * (2 << 20)  # the padding page and one cached page
    assert allocator.slots.allocated_tokens() == tree.evictable_size() == 300
    allocator.clear()  # flush_cache, as release_memory_occupation calls it
    assert pool.slots.kv.memory_stats().used_bytes == 2 << 20


def test_the_idle_leak_check_counts_slots_not_memory(pool):
    """SGLang's invariant: available + evictable + protected == total, with available counted as slots not held."""
    import sglang.srt.managers.scheduler_components.invariant_checker as checker
    from sglang.srt.managers.scheduler_components.pool_stats_observer import PoolStats

    from kvcached.integrations.sglang import autopatch

    allocator = ElasticTokenToKVPoolAllocator(20000, dtype=torch.bfloat16, device="cpu", kvcache=pool,
                                              need_sort=False)
    allocator.alloc(500)
    original = checker.SchedulerInvariantChecker._check_full_pool
    autopatch._patch_invariant_checker(checker)
    try:
        tree = SimpleNamespace(protected_size=lambda: 500)
        me = SimpleNamespace(is_hybrid_swa=False, is_hybrid_ssm=False, tree_cache=tree,
                             max_total_num_tokens=allocator.size,
                             pool_stats_observer=SimpleNamespace(session_held_tokens=lambda: 0),
                             server_args=SimpleNamespace(dcp_size=1), token_to_kv_pool_allocator=allocator,
                             _check_pool_invariant=checker.SchedulerInvariantChecker._check_pool_invariant)
        stats = PoolStats(full_num_used=0, full_token_usage=0.0, full_available_size=3, full_evictable_size=0)
        leak, message = checker.SchedulerInvariantChecker._check_full_pool(me, stats)
        assert not leak, message
        allocator.alloc(1)  # a slot nobody accounts for: a leak
        assert checker.SchedulerInvariantChecker._check_full_pool(me, stats)[0]
    finally:
        checker.SchedulerInvariantChecker._check_full_pool = original


def test_a_bad_setting_stops_sglang_at_import_saying_why():
    code = "import kvcached.integrations.startup as startup; startup.run(); import sglang"
    env = dict(os.environ, ENABLE_KVCACHED="1", KVCACHED_AUTOPATCH="1", KVCACHED_PAGE_SIZE_MB="big", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert "kvcached is enabled (ENABLE_KVCACHED, KVCACHED_AUTOPATCH) but could not start: " \
           "KVCACHED_PAGE_SIZE_MB='big' is invalid" in out.stderr


def test_a_setting_kvcached_cannot_serve_stops_the_model_runner_before_any_pool():
    code = textwrap.dedent("""
        import sys
        from types import SimpleNamespace
        sys.path.insert(0, "tests")
        import kvcached.integrations.startup as startup
        startup.run()
        import sglang.srt.model_executor.model_runner_kv_cache_mixin as mixin
        from test_sglang_adapter import settings
        args, runner = settings(tp_size=2)
        runner.server_args = args
        try:
            mixin.ModelRunnerKVCacheMixin.init_memory_pool(runner, 0)
        except RuntimeError as exc:
            print("REFUSED", exc)
    """)
    env = dict(os.environ, ENABLE_KVCACHED="1", KVCACHED_AUTOPATCH="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert "REFUSED kvcached is enabled (ENABLE_KVCACHED) but cannot serve this SGLang engine: tp_size=2: kvcached " \
           "supports one GPU per SGLang engine (size 1)." in out.stdout, out.stderr[-3000:]


def test_sglang_stops_when_kvcached_is_enabled_without_autopatch():
    from importlib.metadata import entry_points

    if not any(ep.name == "kvcached" for ep in entry_points(group="sglang.srt.plugins")):
        pytest.skip("kvcached is not installed in this venv (pip install --no-deps --no-build-isolation -e .)")
    code = "from sglang.srt.plugins import load_plugins; load_plugins(); print('NOT STOPPED')"
    env = {k: v for k, v in os.environ.items() if k != "KVCACHED_AUTOPATCH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(env, ENABLE_KVCACHED="1", PYTHONPATH=ROOT))
    assert out.returncode != 0 and "NOT STOPPED" not in out.stdout
    assert "ENABLE_KVCACHED is set but KVCACHED_AUTOPATCH is not, so SGLang would run its static KV pool" in out.stderr
