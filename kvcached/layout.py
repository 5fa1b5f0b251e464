"""Where each KV block lives in the reservation: compound pages under dense per-layer tensors.

Note: attention kernels want each layer's blocks dense (one tensor per layer piece, a fixed block stride), while the
driver wants few, large handles (one 128 MiB handle maps ~60x faster per byte than 64 handles of 2 MiB). Both hold with
sparse block ids. Let b be the bytes of one block of one piece (a piece is a layer's K or V, or its single buffer for
MLA and CPU layouts), L the number of pieces, and P the page size, a multiple of the granularity and of b. The tensor of
piece l starts at l*G*b and has block stride b, so block id i of piece l sits at l*G*b + i*b. With M = P/b ids per page,
block id p*M + j (0 <= j < G) of every piece falls inside page p, at p*P + (l*G + j)*b: one handle maps G blocks of
all L pieces at once. Ids with j >= G are never handed out. Per-layer tensors overlap in address space, harmlessly, and
the reservation carries an unmapped tail so that the last piece's view stays inside it.

Limits: block ids are sparse (up to M/G = L times the count of usable blocks, plus rounding), so id space is bounded by
int32 as engines store ids: checked here. A page is the unit of growth: G blocks of every layer at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from .devices import parse_device
from .errors import ConfigError
from .units import ceil_div


@dataclass(frozen=True)
class KVGeometry:
    """What the engine stores: `num_layers` x `pieces_per_layer` tensors of blocks shaped `block_shape`."""

    num_layers: int
    block_shape: tuple[int, ...]  # one block of one piece, e.g. (block_size, num_kv_heads, head_size)
    dtype: torch.dtype
    pieces_per_layer: int = 2  # 2: K and V apart; 1: one buffer (MLA, or K|V packed)

    def __post_init__(self) -> None:
        if self.num_layers <= 0:
            raise ConfigError(f"num_layers must be > 0, got {self.num_layers}")
        if self.pieces_per_layer not in (1, 2):
            raise ConfigError(f"pieces_per_layer must be 1 or 2, got {self.pieces_per_layer}")
        if not self.block_shape or any(int(d) <= 0 for d in self.block_shape):
            raise ConfigError(f"block_shape must be non-empty with every dimension > 0, got {self.block_shape}")

    @property
    def block_bytes(self) -> int:
        return math.prod(self.block_shape) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def num_pieces(self) -> int:
        return self.num_layers * self.pieces_per_layer


_CUDA_PIECE_PAGE = 2 << 20  # the driver's granularity: mapping costs per handle, so pages are as large as allowed
_HOST_PIECE_PAGE = 256 << 10  # mapping host memory costs per byte: small pages keep the idle floor low


def piece_page_bytes(configured: Optional[int], device: str, block_bytes: int, granularity: int) -> int:
    """Memory of one layer piece in a page: KVCACHED_PAGE_SIZE_MB when set, else the backend's default (at least
    one block, rounded up to the granularity)."""
    if configured is not None:
        return configured
    default = _CUDA_PIECE_PAGE if parse_device(device).is_cuda else _HOST_PIECE_PAGE
    return max(default, ceil_div(block_bytes, granularity) * granularity)


class KVLayout:
    """Page arithmetic for one geometry: which ids a page holds, and per-layer tensor views over a base tensor."""

    def __init__(self, geometry: KVGeometry, piece_page_bytes: int, granularity: int, virtual_bytes: int) -> None:
        b, pieces = geometry.block_bytes, geometry.num_pieces
        if piece_page_bytes <= 0:
            raise ConfigError(f"page size must be > 0, got {piece_page_bytes} bytes")
        if piece_page_bytes % granularity:
            raise ConfigError(
                f"page size {piece_page_bytes} bytes is not a multiple of the device's granularity {granularity} bytes"
            )
        if b > piece_page_bytes:
            raise ConfigError(
                f"a block of {b} bytes does not fit a page of {piece_page_bytes} bytes; "
                f"raise KVCACHED_PAGE_SIZE_MB or use a smaller block size"
            )
        blocks_per_piece = piece_page_bytes // b
        unit = math.lcm(granularity, b)
        self.geometry = geometry
        self.block_bytes = b
        self.page_bytes = ceil_div(blocks_per_piece * b * pieces, unit) * unit
        self.blocks_per_page = self.page_bytes // (pieces * b)  # G
        self.ids_per_page = self.page_bytes // b  # M
        self.num_pages = virtual_bytes // self.page_bytes
        if self.num_pages < 1:
            raise ConfigError(f"virtual size {virtual_bytes} bytes is smaller than one page of {self.page_bytes} bytes")
        tail = ceil_div(pieces * self.blocks_per_page * b, granularity) * granularity
        self.reserved_bytes = self.num_pages * self.page_bytes + tail
        self.num_block_ids = self.num_pages * self.ids_per_page
        if self.num_block_ids >= 2**31:
            raise ConfigError(
                f"{self.num_block_ids} block ids exceed int32; lower KVCACHED_VIRTUAL_SIZE or raise the block size"
            )

    @property
    def num_blocks(self) -> int:
        """Blocks that can be handed out when every page is mapped."""
        return self.num_pages * self.blocks_per_page

    def page_of(self, block_id: int) -> int:
        return block_id // self.ids_per_page

    def is_valid(self, block_id: int) -> bool:
        return 0 <= block_id < self.num_block_ids and block_id % self.ids_per_page < self.blocks_per_page

    def pages_under(self, block_ids: Iterable[int]) -> range:
        """The pages under every piece of these ids, handed out or not (vLLM's V2 warm-up writes to ids 1, 2, ...
        regardless): piece i of id b is at (i * G + b) * block_bytes, so an id past its page's G blocks reaches into
        the next page in the later pieces. Empty for no ids."""
        ids = list(block_ids)
        if not ids:
            return range(0)
        first = min(ids) * self.block_bytes // self.page_bytes
        end = ((self.geometry.num_pieces - 1) * self.blocks_per_page + max(ids) + 1) * self.block_bytes
        last = (end - 1) // self.page_bytes
        if min(ids) < 0 or last >= self.num_pages:
            raise ValueError(f"block ids {min(ids)}..{max(ids)} lie outside the {self.num_pages} pages")
        return range(first, last + 1)

    def block_ids(self, page: int) -> range:
        first = page * self.ids_per_page
        return range(first, first + self.blocks_per_page)

    def piece_view(self, base: torch.Tensor, piece: int) -> torch.Tensor:
        """Piece `piece`'s tensor, shape (num_block_ids, *block_shape), over the uint8 tensor of the reservation."""
        start = piece * self.blocks_per_page * self.block_bytes
        raw = base[start : start + self.num_block_ids * self.block_bytes]
        return raw.view(self.geometry.dtype).view(self.num_block_ids, *self.geometry.block_shape)

    def layer_views(self, base: torch.Tensor) -> list[torch.Tensor]:
        """One tensor per layer: (num_block_ids, *block_shape), or (2, num_block_ids, *block_shape) for K and V."""
        g = self.geometry
        pieces = [self.piece_view(base, i) for i in range(g.num_pieces)]
        if g.pieces_per_layer == 1:
            return pieces
        return [_stack_kv(pieces[2 * layer], pieces[2 * layer + 1]) for layer in range(g.num_layers)]


def _stack_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """K and V as one (2, ...) tensor without copying: V sits a fixed distance after K."""
    distance = (v.data_ptr() - k.data_ptr()) // k.element_size()
    size: Sequence[int] = (2, *k.shape)
    return k.as_strided(size, (distance, *k.stride()))
