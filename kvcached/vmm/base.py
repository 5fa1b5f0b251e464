"""The virtual-memory interface both backends implement.

Note: the KV cache needs only four verbs, in two pairs: `reserve`/`unreserve` a range of addresses that holds no
memory, and `map`/`unmap` physical memory at a place inside it. A backend hides how it gets physical memory (CUDA:
cuMemCreate + cuMemMap + cuMemSetAccess; host: an anonymous mapping populated at a fixed address). Cost is per
call, not per byte (shared/DESIGN-NOTES.md), so callers map large, aligned pieces.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class VirtualMemory(ABC):
    """One device's virtual memory: `device` is "cpu" or "cuda:N"."""

    device: str
    granularity: int  # bytes; every size and offset passed in must be a multiple

    @abstractmethod
    def reserve(self, size: int) -> int:
        """Reserve `size` bytes of address space (no memory behind it); returns the base address."""

    @abstractmethod
    def unreserve(self, address: int, size: int) -> None:
        """Give back a range from reserve(); everything mapped inside must be unmapped first."""

    @abstractmethod
    def map(self, address: int, size: int) -> None:
        """Back [address, address+size) with physical memory, readable and writable."""

    @abstractmethod
    def unmap(self, address: int, size: int) -> None:
        """Return the physical memory behind a range given to map(), after work in flight on it has finished."""

    @abstractmethod
    def total_memory(self) -> int:
        """Bytes of physical memory of the device (or of the host, or of its cgroup)."""

    @abstractmethod
    def free_memory(self) -> int:
        """Bytes the driver (or OS) says can still be allocated now, by anyone."""

    @abstractmethod
    def tensor(self, address: int, size: int) -> torch.Tensor:
        """A uint8 torch tensor over [address, address+size) that shares the memory (no copy)."""

    @property
    def devices(self) -> tuple[str, ...]:
        """The devices this memory lives on, in rank order: one, unless several processes map it (tensor parallel)."""
        return (self.device,)

    def check_aligned(self, address: int, size: int) -> None:
        if size <= 0:
            raise ValueError(f"size must be > 0, got {size}")
        if address % self.granularity or size % self.granularity:
            raise ValueError(
                f"address {address:#x} and size {size} must be multiples of the granularity {self.granularity}"
            )

    def close(self) -> None:
        """Release what the backend holds itself (not the ranges callers reserved)."""
