"""Page arithmetic of the compound layout, and the geometry errors engines can hit."""

from __future__ import annotations

import pytest
import torch

from kvcached import ConfigError, KVGeometry, KVLayout

LLAMA_8B = KVGeometry(num_layers=32, block_shape=(16, 8, 128), dtype=torch.bfloat16)
MIB = 1 << 20


def test_llama_8b_pages_hold_64_blocks_of_every_layer_in_one_128_mib_handle():
    layout = KVLayout(LLAMA_8B, 2 * MIB, 2 * MIB, 80 << 30)
    assert (layout.block_bytes, layout.page_bytes, layout.blocks_per_page, layout.ids_per_page) == (32768, 128 * MIB, 64, 4096)
    assert layout.num_pages == 640
    assert list(layout.block_ids(3)[:2]) == [3 * 4096, 3 * 4096 + 1]
    assert layout.is_valid(3 * 4096 + 63) and not layout.is_valid(3 * 4096 + 64)
    assert layout.page_of(3 * 4096 + 63) == 3


def test_every_piece_of_a_page_lies_inside_that_page():
    layout = KVLayout(LLAMA_8B, 2 * MIB, 2 * MIB, 4 << 30)
    base = torch.empty(layout.reserved_bytes, dtype=torch.uint8, device="meta")
    for piece in (0, 31, 63):
        view = layout.piece_view(base, piece)
        for block in (5 * 4096, 5 * 4096 + 63):
            offset = view[block].storage_offset() * 2  # bf16 elements -> bytes
            assert 5 * layout.page_bytes <= offset < 6 * layout.page_bytes - layout.block_bytes + 1


def test_blocks_that_do_not_divide_the_granularity_round_the_page_up():
    geometry = KVGeometry(num_layers=30, block_shape=(3, 32, 128), dtype=torch.bfloat16, pieces_per_layer=1)  # 24 KiB
    layout = KVLayout(geometry, 2 * MIB, 2 * MIB, 8 << 30)
    assert layout.page_bytes % (2 * MIB) == 0 and layout.page_bytes % layout.block_bytes == 0
    assert layout.blocks_per_page * 30 * layout.block_bytes <= layout.page_bytes
    assert layout.blocks_per_page == 85


def test_page_size_not_a_multiple_of_the_granularity_is_refused():
    with pytest.raises(ConfigError, match="not a multiple of the device's granularity 2097152"):
        KVLayout(LLAMA_8B, 3 * MIB, 2 * MIB, 1 << 30)


def test_a_block_larger_than_a_page_is_refused():
    huge = KVGeometry(num_layers=2, block_shape=(1024, 8, 128), dtype=torch.float32)  # 4 MiB blocks
    with pytest.raises(ConfigError, match="block of 4194304 bytes does not fit a page of 2097152 bytes"):
        KVLayout(huge, 2 * MIB, 2 * MIB, 1 << 30)


def test_virtual_size_below_one_page_is_refused():
    with pytest.raises(ConfigError, match="smaller than one page"):
        KVLayout(LLAMA_8B, 2 * MIB, 2 * MIB, 64 * MIB)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_layers=0, block_shape=(16, 8, 128)), "num_layers must be > 0"),
        (dict(num_layers=2, block_shape=(16, 0, 128)), "every dimension > 0"),
        (dict(num_layers=2, block_shape=()), "non-empty"),
        (dict(num_layers=2, block_shape=(16, 8, 128), pieces_per_layer=3), "pieces_per_layer must be 1 or 2"),
    ],
)
def test_bad_geometry_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        KVGeometry(dtype=torch.float16, **kwargs)


def test_the_pages_under_ids_cover_every_piece_of_them_handed_out_or_not():
    """vLLM's V2 warm-up writes KV to ids 1, 2, ... whether or not they are valid: an invalid id's later pieces reach
    into the next page."""
    layout = KVLayout(LLAMA_8B, 2 * MIB, 2 * MIB, 4 << 30)
    assert layout.pages_under(range(1, 64)) == range(0, 1)  # ids 1..63: valid, all in page 0
    assert layout.pages_under(range(1, 65)) == range(0, 2)  # id 64: piece 63 at (63 * 64 + 64) * 32 KiB = page 1
    assert layout.pages_under(range(1, 1025)) == range(0, 2)
    assert layout.pages_under([5 * 4096 + 7]) == range(5, 6)
    assert layout.pages_under([]) == range(0)
    base = torch.empty(layout.reserved_bytes, dtype=torch.uint8, device="meta")
    for block in (1, 64, 1024, 4095):
        pages = layout.pages_under([block])
        for piece in (0, 63):
            offset = layout.piece_view(base, piece)[block].storage_offset() * 2
            assert pages.start * layout.page_bytes <= offset < pages.stop * layout.page_bytes - layout.block_bytes + 1
    with pytest.raises(ValueError, match=r"^block ids 0\.\.131072 lie outside the 32 pages$"):
        layout.pages_under([0, 32 * 4096])
