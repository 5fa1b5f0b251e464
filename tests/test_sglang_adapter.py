"""kvcached's SGLang adapter on the host backend: token slots, buffers, limits, frees, release, the prefix-cache bound.

SGLang 0.5.15.post1 cannot be imported without a CUDA driver (sgl_kernel loads libcuda; its memory pool module imports
triton), so these tests drive the SGLang-free layer under the patched classes (token_slots.py, cache_bound.py,
support.py) with SGLang's call pattern; the patched SGLang classes themselves run on the GPU machine
(scripts/gpu/check_sglang.py). `RecencyCache` stands in for SGLang's radix cache where only its accounting matters.
"""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch

from kvcached import BlockError, KVCacheManager, KVGeometry
from conftest import quiet_config
from kvcached.integrations.sglang.autopatch import SUPPORTED_SGLANG, check_version
from kvcached.integrations.sglang.cache_bound import bound_cached_tokens, shrink_when_idle
from kvcached.integrations.sglang.support import unsupported_reason
from kvcached.integrations.sglang.token_slots import TokenSlots

# SGLang's NHD rows for a 4-layer model with 2 KV heads of 64 dims in bf16: 256 bytes per token per piece. With 256 KiB
# per piece in a page, a page holds 1024 tokens of all 8 pieces (2 MiB) and spans 8192 slot ids.
LAYERS, HEADS, DIM = 4, 2, 64
TOKENS_PER_PAGE, IDS_PER_PAGE, PAGE = 1024, 8192, 2 << 20


@pytest.fixture
def make_slots():
    made = []

    def make(limit_bytes=None, pages: int = 16, **config) -> TokenSlots:
        geometry = KVGeometry(LAYERS, (1, HEADS, DIM), torch.bfloat16)
        kv = KVCacheManager(geometry, "cpu", virtual_bytes=pages * PAGE, background=False,
                            config=quiet_config(page_size_mb=0.25, **config), limit_bytes=limit_bytes)
        made.append(kv)
        return TokenSlots(kv, 1, "cpu")

    yield make
    for kv in made:
        kv.shutdown()


def used_pages(slots: TokenSlots) -> int:
    return slots.kv.memory_stats().used_bytes // PAGE


def test_slots_are_block_ids_after_the_padding_slot(make_slots):
    slots = make_slots()
    assert (slots.tokens_per_page, slots.num_rows, slots.capacity) == (1024, 16 * IDS_PER_PAGE, 16 * 1024 - 1)
    assert slots.alloc(3).tolist() == [1, 2, 3]
    assert slots.alloc(TOKENS_PER_PAGE - 4).tolist() == list(range(4, TOKENS_PER_PAGE))
    assert slots.alloc(2).tolist() == [IDS_PER_PAGE, IDS_PER_PAGE + 1]  # next page, at its sparse ids
    assert slots.alloc(1).dtype == torch.int64
    assert (slots.allocated_tokens(), used_pages(slots)) == (TOKENS_PER_PAGE + 2, 2)


def test_buffers_are_views_of_the_reservation_one_row_per_slot(make_slots):
    slots = make_slots()
    k_buffer, v_buffer = slots.buffers()
    assert len(k_buffer) == len(v_buffer) == LAYERS
    assert {tuple(b.shape) for b in k_buffer + v_buffer} == {(16 * IDS_PER_PAGE, HEADS, DIM)}
    slot = int(slots.alloc(5)[-1])
    k_buffer[2][slot] = 1.5
    v_buffer[2][slot] = -2.0
    layer = slots.kv.kv_tensors[2]
    assert layer[0, slot].eq(1.5).all() and layer[1, slot].eq(-2.0).all()
    assert v_buffer[2].data_ptr() - k_buffer[2].data_ptr() == TOKENS_PER_PAGE * HEADS * DIM * 2  # V follows K in a page


def test_available_size_is_short_at_the_limit_and_alloc_refuses_without_change(make_slots):
    slots = make_slots(limit_bytes=2 * PAGE)
    assert slots.available_size() == 2 * TOKENS_PER_PAGE - 1
    held = slots.alloc(1500)
    assert slots.available_size() == 2 * TOKENS_PER_PAGE - 1 - 1500
    assert slots.alloc(slots.available_size() + 1) is None
    assert (slots.allocated_tokens(), used_pages(slots)) == (1500, 2)
    assert len(slots.alloc(slots.available_size())) == 2 * TOKENS_PER_PAGE - 1 - 1500
    assert slots.available_size() == 0
    slots.free(held)
    assert slots.available_size() == 1500


def test_freeing_every_slot_unmaps_to_the_padding_page(make_slots):
    slots = make_slots()
    ids = slots.alloc(3 * TOKENS_PER_PAGE)
    assert used_pages(slots) == 4
    slots.free(ids[TOKENS_PER_PAGE:])
    assert used_pages(slots) == 2
    slots.free(ids[:TOKENS_PER_PAGE])
    stats = slots.kv.memory_stats()
    assert (stats.used_bytes, stats.premapped_bytes, slots.allocated_tokens()) == (PAGE, 0, 0)


def test_frees_of_a_group_are_applied_together_at_its_end(make_slots):
    slots = make_slots()
    a, b = slots.alloc(10), slots.alloc(20)
    slots.free_group_begin()
    slots.free(a)
    slots.free(b[:0])
    slots.free(b)
    assert slots.allocated_tokens() == 30
    slots.free_group_end()
    assert slots.allocated_tokens() == 0


def test_a_double_free_raises_and_changes_nothing(make_slots):
    slots = make_slots()
    ids = slots.alloc(4)
    slots.free(ids[:2])
    with pytest.raises(BlockError, match="not allocated"):
        slots.free(ids)
    assert slots.allocated_tokens() == 2


def test_restore_state_gives_back_what_was_allocated_since_the_backup(make_slots):
    slots = make_slots()
    kept = slots.alloc(7)
    state = slots.backup_state()
    slots.alloc(5)
    slots.alloc(TOKENS_PER_PAGE)
    slots.restore_state(state)
    assert (slots.allocated_tokens(), used_pages(slots)) == (7, 1)
    assert slots.alloc(1).tolist() == [TOKENS_PER_PAGE - 1]  # page 0 again: the manager reuses the last freed first
    assert kept.tolist() == list(range(1, 8))
    with pytest.raises(ValueError, match="latest backup_state"):
        slots.restore_state(state)


def test_clear_releases_all_memory_but_the_padding_page_and_allocation_resumes(make_slots):
    slots = make_slots(limit_bytes=3 * PAGE)
    slots.alloc(2 * TOKENS_PER_PAGE)
    slots.clear()  # SGLang's flush_cache, as release_memory_occupation calls it
    stats = slots.kv.memory_stats()
    assert (stats.used_bytes, stats.premapped_bytes, slots.allocated_tokens()) == (PAGE, 0, 0)
    assert slots.alloc(3).tolist() == [1, 2, 3]  # resume: pages map again on demand
    assert slots.available_size() == 3 * TOKENS_PER_PAGE - 4


def test_alloc_rejects_a_count_that_is_not_whole_pages():
    geometry = KVGeometry(LAYERS, (4, HEADS, DIM), torch.bfloat16)
    kv = KVCacheManager(geometry, "cpu", virtual_bytes=4 * PAGE, background=False,
                        config=quiet_config(page_size_mb=0.25))
    try:
        slots = TokenSlots(kv, 4, "cpu")
        assert slots.alloc(8).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]  # blocks 1 and 2, four slots each
        with pytest.raises(ValueError, match="not a multiple of page size 4"):
            slots.alloc(6)
    finally:
        kv.shutdown()


class RecencyCache:
    """SGLang's radix cache as far as the bound sees it: finished requests' slots, evicted least recent first."""

    def __init__(self, slots: TokenSlots) -> None:
        self.slots, self.entries, self.protected = slots, OrderedDict(), 0

    def insert(self, key: str, ids: torch.Tensor) -> None:
        self.entries[key] = ids

    def evictable_size(self) -> int:
        return sum(len(ids) for ids in self.entries.values())

    def protected_size(self) -> int:
        return self.protected

    def evict(self, num_tokens: int) -> None:
        evicted = 0
        while evicted < num_tokens and self.entries:
            _, ids = self.entries.popitem(last=False)
            self.slots.free(ids)
            evicted += len(ids)


def test_cached_tokens_are_bounded_least_recent_first(make_slots):
    slots = make_slots()
    cache = RecencyCache(slots)
    running = slots.alloc(100)  # a request still running
    for i in range(5):
        cache.insert(f"req{i}", slots.alloc(300))
    bound_cached_tokens(cache, cache.evict, 1000)
    assert list(cache.entries) == ["req2", "req3", "req4"]
    assert slots.allocated_tokens() == 100 + 900
    slots.free(running)


def test_an_idle_engine_keeps_only_the_pages_its_bound_fills(make_slots):
    slots = make_slots()
    cache = RecencyCache(slots)
    batches = [slots.alloc(TOKENS_PER_PAGE) for _ in range(3)]  # three requests at once: pages 0-3
    assert [int(ids[0]) // IDS_PER_PAGE for ids in batches] == [0, 1, 2]
    for i, ids in enumerate(batches):
        cache.insert(f"a{i}", ids[:200])  # the prefixes stay cached, the rest is freed: pages 0, 1, 2 stay
        slots.free(ids[200:])
    assert (cache.evictable_size(), used_pages(slots)) == (600, 3)
    assert slots.max_cached_tokens == TOKENS_PER_PAGE  # the default bound: one page of tokens
    bound_cached_tokens(cache, cache.evict, slots.max_cached_tokens)
    assert cache.evictable_size() == 600  # under the token bound...
    shrink_when_idle(cache, cache.evict, slots, slots.max_cached_tokens)  # ...but over the pages it allows
    assert used_pages(slots) == 2  # a0 went, but page 0 keeps the padding slot; a1 went with page 1
    assert list(cache.entries) == ["a2"]


def test_an_idle_engine_gives_its_reserve_back(make_slots):
    slots = make_slots(max_reserved_pages=4, trim_idle_s=3600.0)
    cache = RecencyCache(slots)
    slots.free(slots.alloc(3 * TOKENS_PER_PAGE))  # freed pages stay premapped: the engine is busy for an hour
    assert slots.kv.memory_stats().premapped_bytes == 3 * PAGE
    shrink_when_idle(cache, cache.evict, slots, slots.max_cached_tokens)
    stats = slots.kv.memory_stats()
    assert (stats.used_bytes, stats.premapped_bytes) == (PAGE, 0)


def test_an_engine_with_a_running_request_keeps_its_cached_pages(make_slots):
    slots = make_slots()
    cache = RecencyCache(slots)
    for i in range(3):
        ids = slots.alloc(TOKENS_PER_PAGE)
        cache.insert(f"a{i}", ids[:200])
        slots.free(ids[200:])
    cache.protected = 50  # a running request holds a cached prefix
    shrink_when_idle(cache, cache.evict, slots, TOKENS_PER_PAGE)
    assert cache.evictable_size() == 600


def settings(**overrides):
    args = dict(tp_size=1, pp_size=1, dp_size=1, dcp_size=1, attn_cp_size=1, enable_dp_attention=False,
                enable_hierarchical_cache=False, enable_unified_memory=False, enable_page_major_kv_layout=False,
                enable_hisparse=False, prefill_only_disable_kv_cache=False, enable_lmcache=False,
                enable_return_routed_experts=False, enable_return_indexer_topk=False,
                speculative_algorithm=None, disaggregation_mode="null", page_size=1)
    runner = dict(device="cuda", use_mla_backend=False, is_hybrid_swa=False, mambaish_config=None,
                  is_draft_worker=False)
    for key, value in overrides.items():
        (args if key in args else runner)[key] = value
    return SimpleNamespace(**args), SimpleNamespace(**runner)


@pytest.mark.parametrize("override, reason", [
    ({}, None),
    ({"tp_size": 2}, "tp_size=2: kvcached supports one GPU per SGLang engine (size 1)"),
    ({"speculative_algorithm": "EAGLE"}, "speculative decoding (EAGLE) is not supported by kvcached"),
    ({"page_size": 16}, "page_size=16: kvcached supports SGLang's token pool with page size 1"),
    ({"enable_hierarchical_cache": True},
     "the hierarchical cache (enable_hierarchical_cache) is not supported by kvcached"),
    ({"enable_return_routed_experts": True},
     "returning routed experts (enable_return_routed_experts) is not supported by kvcached"),
    ({"disaggregation_mode": "prefill"},
     "PD disaggregation (disaggregation_mode=prefill) is not supported by kvcached"),
    ({"use_mla_backend": True}, "MLA models (a latent KV pool) are not supported by kvcached"),
    ({"is_hybrid_swa": True}, "hybrid sliding-window models (two KV pools) are not supported by kvcached"),
    ({"device": "cpu"}, "device 'cpu': kvcached supports SGLang on CUDA GPUs"),
])
def test_settings_kvcached_cannot_serve_are_refused_by_name(override, reason):
    assert unsupported_reason(*settings(**override)) == reason


def test_the_hnd_layout_is_refused(monkeypatch):
    monkeypatch.setenv("SGLANG_USE_HND_KVCACHE", "1")
    assert unsupported_reason(*settings()) == "SGLANG_USE_HND_KVCACHE: kvcached supports the NHD KV layout only"


def test_an_unsupported_sglang_version_is_refused():
    assert SUPPORTED_SGLANG == ("0.5.15.post1",)
    check_version("0.5.15.post1")
    with pytest.raises(RuntimeError, match=r"SGLang 0.5.23 is not supported: kvcached patches SGLang 0.5.15.post1"):
        check_version("0.5.23")


@pytest.mark.parametrize("env, active, message", [
    ({}, False, None),
    ({"ENABLE_KVCACHED": "1", "KVCACHED_AUTOPATCH": "1"}, True, None),
    ({"ENABLE_KVCACHED": "1"}, False, "ENABLE_KVCACHED is set but KVCACHED_AUTOPATCH is not, so SGLang would run its "
                                     "static KV pool"),
    ({"ENABLE_KVCACHED": "1", "KVCACHED_AUTOPATCH": "1"}, False, "its start-up hook did not patch this SGLang process"),
])
def test_sglangs_plugin_check_stops_a_process_that_would_run_unpatched(monkeypatch, env, active, message):
    from kvcached.integrations import startup
    from kvcached.integrations.sglang import plugin

    for name in ("ENABLE_KVCACHED", "KVCACHED_AUTOPATCH"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(startup, "ACTIVE", active)
    monkeypatch.setattr(startup, "ERROR", None)
    if message is None:
        plugin.check()
        return
    with pytest.raises(SystemExit, match=message):  # SystemExit: SGLang catches and logs a plugin's Exception
        plugin.check()
