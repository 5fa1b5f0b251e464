"""KVCacheManager: exact block ids, placement that keeps pages freeable, limits, KV tensors, bad use."""

from __future__ import annotations

import pytest
import torch

from kvcached import BlockError, KVGeometry, ShutdownError
from conftest import BLOCKS_PER_PAGE, IDS_PER_PAGE, PAGE, SMALL, device_used_bytes, quiet_config


def test_layout_of_the_small_geometry(make_manager):
    manager = make_manager()
    layout = manager.layout
    assert (layout.block_bytes, layout.page_bytes) == (4096, PAGE)
    assert (layout.blocks_per_page, layout.ids_per_page, layout.num_pages) == (BLOCKS_PER_PAGE, IDS_PER_PAGE, 64)
    assert manager.num_block_ids == 64 * IDS_PER_PAGE
    assert [tuple(t.shape) for t in manager.kv_tensors] == [(2, 64 * IDS_PER_PAGE, 16, 2, 64)] * 4


def test_alloc_hands_out_ascending_ids_after_the_null_block(make_manager):
    manager = make_manager()
    assert manager.null_block == 0
    assert manager.alloc(3) == [1, 2, 3]
    assert manager.alloc(2) == [4, 5]
    assert manager.memory_stats().used_bytes == PAGE


def test_alloc_spills_to_the_next_page_at_its_sparse_ids(make_manager):
    manager = make_manager()
    first = manager.alloc(BLOCKS_PER_PAGE - 1)  # fills page 0 next to the null block
    assert first == list(range(1, BLOCKS_PER_PAGE))
    assert manager.alloc(2) == [IDS_PER_PAGE, IDS_PER_PAGE + 1]
    assert manager.memory_stats().used_bytes == 2 * PAGE


def test_alloc_fills_the_fullest_page_first(make_manager):
    manager = make_manager()
    page0 = manager.alloc(BLOCKS_PER_PAGE - 1)
    page1 = manager.alloc(BLOCKS_PER_PAGE)
    manager.free(page0[:10])  # page 0: 10 free; page 1: full
    manager.free(page1[:100])  # page 1: 100 free
    # The fuller page (fewer free blocks) is filled first; within a page the last freed block is reused first.
    assert manager.alloc(4) == [10, 9, 8, 7]
    assert manager.alloc(8) == [6, 5, 4, 3, 2, 1, IDS_PER_PAGE + 99, IDS_PER_PAGE + 98]


def test_freeing_the_last_block_of_a_page_unmaps_it(make_manager, device):
    manager = make_manager()
    ids = manager.alloc(BLOCKS_PER_PAGE * 2)
    assert manager.memory_stats().used_bytes == 3 * PAGE
    manager.free(ids[BLOCKS_PER_PAGE:])
    assert manager.memory_stats().used_bytes == 2 * PAGE
    manager.free(ids[:BLOCKS_PER_PAGE])
    stats = manager.memory_stats()
    assert (stats.used_bytes, stats.premapped_bytes) == (PAGE, 0)  # the null block's page stays


def test_alloc_returns_none_at_the_limit_and_changes_nothing(make_manager):
    manager = make_manager(limit_bytes=2 * PAGE)
    ids = manager.alloc(2 * BLOCKS_PER_PAGE - 1)
    assert ids is not None and manager.available_size() == 0
    assert manager.alloc(1) is None
    assert manager.num_allocated() == 2 * BLOCKS_PER_PAGE
    manager.free(ids[:1])
    assert manager.alloc(1) == ids[:1]


def test_alloc_larger_than_what_is_left_returns_none(make_manager):
    manager = make_manager(limit_bytes=3 * PAGE)
    assert manager.available_size() == 3 * BLOCKS_PER_PAGE - 1
    assert manager.alloc(3 * BLOCKS_PER_PAGE) is None
    assert manager.memory_stats().used_bytes == PAGE  # no page was mapped for the failed request
    assert len(manager.alloc(3 * BLOCKS_PER_PAGE - 1)) == 3 * BLOCKS_PER_PAGE - 1


def test_resize_grows_at_once_and_shrinking_never_takes_blocks_in_use(make_manager):
    manager = make_manager(limit_bytes=PAGE)
    assert manager.alloc(BLOCKS_PER_PAGE) is None
    manager.resize(3 * PAGE)
    held = manager.alloc(BLOCKS_PER_PAGE)
    assert held is not None and manager.memory_stats().used_bytes == 2 * PAGE
    manager.resize(PAGE)  # below what is in use: the deficit stays until freed, nothing more is mapped
    stats = manager.memory_stats()
    assert (stats.limit_bytes, stats.used_bytes) == (PAGE, 2 * PAGE)
    assert manager.alloc(BLOCKS_PER_PAGE) is None
    manager.free(held)
    assert manager.memory_stats().used_bytes == PAGE


def test_below_a_lowered_limit_the_emptiest_pages_take_no_new_blocks_and_are_unmapped_as_freed(make_manager):
    manager = make_manager(config=quiet_config(max_reserved_pages=4, trim_idle_s=60))
    ids = manager.alloc(4 * BLOCKS_PER_PAGE - 1)  # pages 0-3, full
    on_page = {p: [b for b in ids if b // IDS_PER_PAGE == p] for p in range(4)}
    manager.free(on_page[0][:10] + on_page[1][:101] + on_page[3][:212])  # page 2 stays full
    manager.resize(2 * PAGE)  # two pages above the limit: the two emptiest, 3 and 1, take no new blocks
    assert manager.memory_stats().used_bytes == 4 * PAGE
    assert manager.available_size() == 10
    assert manager.alloc(11) is None
    assert sorted(manager.alloc(10)) == on_page[0][:10]  # page 0's, the fullest
    manager.free(on_page[3][212:])  # page 3 is empty: unmapped, not kept in the reserve
    stats = manager.memory_stats()
    assert (stats.used_bytes, stats.premapped_bytes, manager.available_size()) == (3 * PAGE, 0, 0)
    manager.free(on_page[1][101:])
    stats = manager.memory_stats()
    assert (stats.used_bytes, stats.premapped_bytes, manager.available_size()) == (2 * PAGE, 0, 0)
    manager.free(on_page[2][:5])  # at the limit, no longer above it: freed blocks are handed out again
    assert manager.available_size() == 5


def test_the_null_blocks_page_is_filled_first_and_never_left_to_drain_below_a_lowered_limit(make_manager):
    manager = make_manager(config=quiet_config(max_reserved_pages=4, trim_idle_s=60))
    ids = manager.alloc(4 * BLOCKS_PER_PAGE - 1)  # pages 0-3, full
    on_page = {p: [b for b in ids if b // IDS_PER_PAGE == p] for p in range(4)}
    manager.free(on_page[0] + on_page[2][:3])  # page 0 holds the null block only, the emptiest page; page 2: 3 free
    manager.resize(3 * PAGE)  # one page above the limit: page 2 drains, as page 0 never could
    assert manager.available_size() == BLOCKS_PER_PAGE - 1
    assert manager.alloc(BLOCKS_PER_PAGE) is None
    assert sorted(manager.alloc(2)) == [510, 511]  # page 0's (last freed, first reused), before the fuller pages 1 and 3
    manager.free(on_page[1][:2])  # page 1: 2 free, still fuller than page 2
    assert sorted(manager.alloc(BLOCKS_PER_PAGE - 1)) == list(range(1, 510)) + on_page[1][:2]
    assert manager.available_size() == 0  # page 2's 3 free blocks stay free: it drains
    manager.free(on_page[2][3:])
    stats = manager.memory_stats()
    assert (stats.used_bytes, stats.premapped_bytes, manager.available_size()) == (3 * PAGE, 0, 0)


def test_resize_to_none_removes_the_limit(make_manager):
    manager = make_manager(limit_bytes=PAGE)
    manager.resize(None)
    assert manager.memory_stats().limit_bytes == 64 * PAGE
    assert manager.available_size() == 64 * BLOCKS_PER_PAGE - 1


def test_clear_frees_everything_but_the_null_block(make_manager):
    manager = make_manager()
    manager.alloc(700)
    manager.alloc(5)
    manager.clear()
    assert manager.num_allocated() == 1
    assert manager.memory_stats().used_bytes == PAGE
    assert manager.alloc(2) == [1, 2]


def test_without_a_null_block_ids_start_at_zero_and_idle_memory_is_zero(make_manager):
    manager = make_manager(reserve_null_block=False)
    assert manager.null_block is None
    ids = manager.alloc(2)
    assert ids == [0, 1]
    manager.free(ids)
    assert manager.memory_stats().mapped_bytes == 0


def test_kv_tensors_hold_every_piece_of_every_block_apart(make_manager, device):
    manager = make_manager()
    ids = manager.alloc(BLOCKS_PER_PAGE + 20)  # two pages
    index = torch.tensor(ids, device=manager.device)
    for layer, kv in enumerate(manager.kv_tensors):
        for piece in range(2):
            values = index.to(torch.float32) * 16 + layer * 2 + piece  # exact in bf16 only below 256
            kv[piece, index] = (values % 251).to(kv.dtype).view(-1, 1, 1, 1).expand(-1, 16, 2, 64)
    for layer, kv in enumerate(manager.kv_tensors):
        for piece in range(2):
            expected = ((index.to(torch.float32) * 16 + layer * 2 + piece) % 251).to(kv.dtype)
            got = kv[piece, index]
            assert torch.equal(got.amin(dim=(1, 2, 3)), expected) and torch.equal(got.amax(dim=(1, 2, 3)), expected)


def test_single_buffer_layers_for_mla_or_packed_kv(make_manager):
    geometry = KVGeometry(num_layers=3, block_shape=(32, 576), dtype=torch.float16, pieces_per_layer=1)
    manager = make_manager(geometry)
    assert manager.layout.block_bytes == 32 * 576 * 2
    assert [tuple(t.shape)[1:] for t in manager.kv_tensors] == [(32, 576)] * 3
    ids = manager.alloc(4)
    manager.kv_tensors[2][ids] = 7.0
    assert float(manager.kv_tensors[2][ids].float().sum()) == 7.0 * 4 * 32 * 576


def test_mapping_shows_in_device_memory_and_unmapping_gives_it_back(make_manager, device):
    manager = make_manager(virtual_bytes=64 * PAGE)
    before = device_used_bytes(device)
    ids = manager.alloc(8 * BLOCKS_PER_PAGE)
    grown = device_used_bytes(device) - before
    manager.free(ids)
    shrunk = device_used_bytes(device) - before
    assert 8 * PAGE <= grown < 8 * PAGE + (8 << 20)
    assert shrunk < 4 << 20


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3", None])
def test_alloc_of_a_bad_count_raises(make_manager, bad):
    manager = make_manager()
    with pytest.raises(ValueError, match="block count > 0"):
        manager.alloc(bad)


def test_double_free_raises_and_changes_nothing(make_manager):
    manager = make_manager()
    ids = manager.alloc(4)
    manager.free(ids[:2])
    with pytest.raises(BlockError, match=r"1 \(not allocated\)"):
        manager.free(ids)  # ids[2:] are still allocated and must stay so
    assert manager.num_allocated() == 3
    manager.free(ids[2:])
    assert manager.num_allocated() == 1


def test_ids_never_handed_out_are_refused(make_manager):
    manager = make_manager()
    manager.alloc(2)
    with pytest.raises(BlockError, match=r"300 \(not allocated\)"):
        manager.free([300, 1])
    with pytest.raises(BlockError, match="not a block id of this cache"):
        manager.free([BLOCKS_PER_PAGE + 5])  # in page 0's id range but past its G blocks
    with pytest.raises(BlockError, match="not a block id"):
        manager.free([-3])
    assert manager.num_allocated() == 3


def test_repeated_ids_and_the_null_block_are_refused(make_manager):
    manager = make_manager()
    ids = manager.alloc(2)
    with pytest.raises(BlockError, match="repeated"):
        manager.free([ids[0], ids[0]])
    with pytest.raises(BlockError, match="null block"):
        manager.free([0])
    assert manager.num_allocated() == 3


def test_use_after_shutdown_raises(make_manager):
    manager = make_manager()
    ids = manager.alloc(1)
    manager.shutdown()
    for call in (lambda: manager.alloc(1), lambda: manager.free(ids), manager.available_size, lambda: manager.resize(0)):
        with pytest.raises(ShutdownError):
            call()
    manager.shutdown()  # twice is harmless


def test_negative_limit_is_refused(make_manager):
    manager = make_manager()
    with pytest.raises(ValueError, match="limit must be >= 0"):
        manager.resize(-1)
    assert manager.memory_stats().limit_bytes == 64 * PAGE


def test_a_limit_below_one_page_leaves_no_room_for_the_null_block(device):
    from kvcached import KVCacheManager

    with pytest.raises(MemoryError, match="null block"):
        KVCacheManager(SMALL, device, virtual_bytes=4 * PAGE, limit_bytes=PAGE - 1, config=quiet_config())
