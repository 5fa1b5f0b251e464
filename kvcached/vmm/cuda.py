"""CUDA virtual memory through the driver API of NVIDIA's `cuda-bindings` (pure Python over libcuda).

Note: `map` is cuMemCreate + cuMemMap + cuMemSetAccess of one handle covering the whole piece, and `unmap` is
cuCtxSynchronize + cuMemUnmap + cuMemRelease of that handle. The driver's cost is per handle, not per byte (a 128 MiB
handle maps in ~55 us, 64 handles of 2 MiB in ~3.5 ms), so callers map large pieces. cuMemMap cannot map a handle at an
offset, so a handle is always mapped whole, where it was created for. The driver only answers in a thread whose current
context is set: every call first makes the device's primary context (the one torch uses) current in the calling thread.
Unmap does not wait for kernels in flight, so unmap synchronises the context first. Every CUresult is checked and turned
into a DriverError naming the call; the driver never aborts the process from here.
"""

from __future__ import annotations

import threading

import torch

from ..errors import DriverError, NoCudaDriverError
from .base import VirtualMemory

try:
    from cuda.bindings import driver as _cu
except ImportError:  # cuda-bindings not installed
    _cu = None


def _check(call: str, result):
    """Unpack a cuda-bindings result tuple, raising DriverError unless it is CUDA_SUCCESS."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != _cu.CUresult.CUDA_SUCCESS:
        _, name = _cu.cuGetErrorName(err)
        _, text = _cu.cuGetErrorString(err)
        name = name.decode() if isinstance(name, bytes) else name
        text = text.decode() if isinstance(text, bytes) else text
        out_of_memory = err == _cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY
        raise DriverError(f"{call} failed: {name} ({text})", out_of_memory=out_of_memory)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def init_driver() -> None:
    """cuInit, with a clear NoCudaDriverError when the bindings or libcuda are missing."""
    if _cu is None:
        raise NoCudaDriverError("no CUDA driver: the cuda-bindings package is not installed (pip install 'kvcached[gpu]')")
    try:
        result = _cu.cuInit(0)
    except Exception as exc:  # the bindings raise when libcuda.so cannot be loaded
        raise NoCudaDriverError(f"no CUDA driver: libcuda could not be loaded ({exc})") from None
    _check("cuInit", result)


class CudaVirtualMemory(VirtualMemory):
    def __init__(self, device_index: int = 0) -> None:
        init_driver()
        count = _check("cuDeviceGetCount", _cu.cuDeviceGetCount())
        if not 0 <= device_index < count:
            raise ValueError(f"CUDA device index {device_index} does not exist (this machine has {count})")
        self.device = f"cuda:{device_index}"
        self.device_index = device_index
        self._cu_device = _check("cuDeviceGet", _cu.cuDeviceGet(device_index))
        self._context = _check("cuDevicePrimaryCtxRetain", _cu.cuDevicePrimaryCtxRetain(self._cu_device))
        self._thread_has_context = threading.local()
        self._handles: dict[int, tuple[object, int]] = {}
        self._handles_lock = threading.Lock()
        self._prop = self.allocation_prop(device_index)
        self.granularity = int(
            _check(
                "cuMemGetAllocationGranularity",
                _cu.cuMemGetAllocationGranularity(
                    self._prop, _cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
                ),
            )
        )
        self._access = _cu.CUmemAccessDesc()
        self._access.location.type = _cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._access.location.id = device_index
        self._access.flags = _cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE

    @staticmethod
    def allocation_prop(device_index: int):
        """Pinned device memory on `device_index`, the kind every KV page is made of."""
        prop = _cu.CUmemAllocationProp()
        prop.type = _cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = _cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device_index
        return prop

    def _enter(self) -> None:
        """Make the device's primary context current in this thread (once per thread)."""
        if getattr(self._thread_has_context, "set", False):
            return
        _check("cuCtxSetCurrent", _cu.cuCtxSetCurrent(self._context))
        self._thread_has_context.set = True

    def reserve(self, size: int) -> int:
        self.check_aligned(0, size)
        self._enter()
        return int(_check("cuMemAddressReserve", _cu.cuMemAddressReserve(size, self.granularity, 0, 0)))

    def unreserve(self, address: int, size: int) -> None:
        self.check_aligned(address, size)
        self._enter()
        _check("cuMemAddressFree", _cu.cuMemAddressFree(address, size))

    def map(self, address: int, size: int) -> None:
        self.check_aligned(address, size)
        with self._handles_lock:
            if address in self._handles:
                raise ValueError(f"{address:#x} is already mapped")
        self._enter()
        handle = _check("cuMemCreate", _cu.cuMemCreate(size, self._prop, 0))
        try:
            _check("cuMemMap", _cu.cuMemMap(address, size, 0, handle, 0))
            try:
                _check("cuMemSetAccess", _cu.cuMemSetAccess(address, size, [self._access], 1))
            except DriverError:
                _cu.cuMemUnmap(address, size)
                raise
        except DriverError:
            _cu.cuMemRelease(handle)
            raise
        with self._handles_lock:
            self._handles[address] = (handle, size)

    def unmap(self, address: int, size: int) -> None:
        with self._handles_lock:
            handle, mapped_size = self._handles.get(address, (None, 0))
            if handle is None or mapped_size != size:
                raise ValueError(f"[{address:#x}, +{size}) was not mapped by map() as one piece")
            del self._handles[address]
        self._enter()
        # Kernels still reading or writing the range would fault once it is unmapped.
        _check("cuCtxSynchronize", _cu.cuCtxSynchronize())
        _check("cuMemUnmap", _cu.cuMemUnmap(address, size))
        _check("cuMemRelease", _cu.cuMemRelease(handle))

    def total_memory(self) -> int:
        self._enter()
        return int(_check("cuMemGetInfo", _cu.cuMemGetInfo())[1])

    def free_memory(self) -> int:
        self._enter()
        return int(_check("cuMemGetInfo", _cu.cuMemGetInfo())[0])

    def tensor(self, address: int, size: int) -> torch.Tensor:
        owner = _CudaArray(address, size)
        return torch.as_tensor(owner, device=self.device)

    def close(self) -> None:
        if self._handles:
            raise DriverError(f"close() with {len(self._handles)} pieces still mapped; unmap them first")
        _check("cuDevicePrimaryCtxRelease", _cu.cuDevicePrimaryCtxRelease(self._cu_device))


class _CudaArray:
    """A bare __cuda_array_interface__ so torch wraps device memory it did not allocate, without copying."""

    def __init__(self, address: int, size: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (size,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
        }
