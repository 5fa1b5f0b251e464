"""The elastic plan: how vLLM's KV cache config is rewritten in the engine core, and read back in the worker.

Note: kvcached's layout (kvcached/layout.py) puts layer l's page of block id i at `l * G * b + i * b` of one
reservation of the device's memory (b: one layer's page of one block; G blocks of every layer share a compound page),
so block ids are sparse and num_blocks becomes the id space. vLLM describes its KV memory as KVCacheTensors, in one of
two forms (versions.py):
  - one tensor for all layers, layer l's block i at `offset + l * layer_stride + i * block_stride` (0.32): kvcached's
    layout with layer_stride = G * b and block_stride = b;
  - one tensor per layer, blocks contiguous (0.26): layer l's tensor is the slice of N * b bytes at l * G * b.
Either way vLLM's own view code builds the per-layer tensors for whichever attention backend it chose. The engine core
makes the plan before the worker allocates and before the scheduler exists; the plan travels to the worker inside the
KVCacheConfig, and stays in this process for the block pool.

Note [tensor parallel]: every rank has the same KV cache spec for its shard of the heads, so one plan serves them all:
the block pool and its limits count one rank's bytes, and each rank maps its own shard of every page on its own device
(pagetable.py). `devices` predicts each rank's device with vLLM's own formula (Worker.init_device; the worker checks
it). Refused, before any worker starts (`check_parallel`): pipeline and context parallel (ranks that hold different
layers or tokens would need their own tables), data parallel (several engine cores, each would need its own registry
name and plan; untested), and several nodes or Ray/external launchers (all ranks must share this host's /dev/shm).
"""

from __future__ import annotations

import atexit
import glob
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from ...config import Config
from ...devices import parse_device
from ...errors import KVCachedError
from ...layout import KVGeometry, KVLayout, piece_page_bytes
from ...procinfo import start_ticks
from ...vmm.probe import device_memory, granularity_of
from . import versions

_ATTR = "kvcached_plan"
_current: Optional["ElasticPlan"] = None
_tables: list = []  # page tables this engine core created: removed at exit


@dataclass(frozen=True)
class ElasticPlan:
    devices: tuple[str, ...]  # one per tensor-parallel rank, in rank order
    num_layers: int
    block_bytes: int  # one layer's page of one block (vLLM's page_size_bytes)
    block_size: int  # tokens per block
    piece_page_bytes: int
    granularity: int
    virtual_bytes: int
    table_path: str
    ipc_name: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))  # a list after travelling through asdict

    @property
    def world_size(self) -> int:
        return len(self.devices)

    def layout(self) -> KVLayout:
        return KVLayout(self.geometry(), self.piece_page_bytes, self.granularity, self.virtual_bytes)

    def geometry(self) -> KVGeometry:
        return KVGeometry(self.num_layers, (self.block_bytes,), torch.int8, pieces_per_layer=1)


def current_plan() -> ElasticPlan:
    if _current is None:
        raise KVCachedError("kvcached: the engine core made no elastic plan (get_kv_cache_configs was not patched)")
    return _current


def plan_of(kv_cache_config: Any) -> ElasticPlan:
    """The plan a worker received inside its KVCacheConfig."""
    fields = getattr(kv_cache_config, _ATTR, None)
    if fields is None:
        raise KVCachedError(
            "kvcached is enabled in this vLLM worker, but its KV cache config carries no kvcached plan: the engine "
            "core process was not patched. Is kvcached installed in the same environment (kvcached_autopatch.pth)?"
        )
    return ElasticPlan(**fields)


def check_parallel(vllm_config: Any) -> None:
    """Refuse parallel setups kvcached cannot serve (see the Note); tensor parallel of any size is fine."""
    parallel = vllm_config.parallel_config
    sizes = {name: getattr(parallel, name, 1) for name in (
        "pipeline_parallel_size", "prefill_context_parallel_size", "decode_context_parallel_size",
        "data_parallel_size", "nnodes")}
    refused = [f"{name}={size}" for name, size in sizes.items() if size != 1]
    backend = parallel.distributed_executor_backend
    if parallel.tensor_parallel_size > 1 and backend in ("ray", "external_launcher"):
        refused.append(f"distributed_executor_backend={backend!r}")
    if refused:
        raise KVCachedError(
            f"kvcached supports tensor parallel on one host (vLLM's own worker processes); pipeline, context and data "
            f"parallel size and nnodes must be 1, got {', '.join(refused)}; unset ENABLE_KVCACHED to run this engine "
            f"without kvcached")


def devices_of(vllm_config: Any) -> tuple[str, ...]:
    """Each tensor-parallel rank's device, in rank order: "cpu" for all, or rank r's GPU as Worker.init_device picks
    it (its local rank is r: pipeline and data parallel are refused), after CUDA_VISIBLE_DEVICES."""
    kind = str(vllm_config.device_config.device_type)
    tp = vllm_config.parallel_config.tensor_parallel_size
    try:
        if not parse_device(kind).is_cuda:
            return ("cpu",) * tp
    except ValueError:
        raise KVCachedError(f"kvcached supports vLLM on 'cpu' and 'cuda' devices, not {kind!r}") from None
    from vllm.platforms import current_platform

    return tuple(f"cuda:{current_platform.logical_device_id_to_visible_device_id(rank)}" for rank in range(tp))


def common_granularity(devices: tuple[str, ...]) -> int:
    """The mapping granularity, the same on every device (one layout serves all ranks), else refused."""
    found = {device: granularity_of(device) for device in dict.fromkeys(devices)}
    if len(set(found.values())) != 1:
        raise KVCachedError(f"kvcached needs the same mapping granularity on every tensor-parallel device, got "
                            f"{found}; unset ENABLE_KVCACHED to run this engine without kvcached")
    return found[devices[0]]


def make_plan(vllm_config: Any, kv_cache_specs: list[dict], config: Config) -> ElasticPlan:
    """Decide the layout for the model's KV cache specs; refuse setups kvcached cannot serve, saying why."""
    check_parallel(vllm_config)
    devices = devices_of(vllm_config)
    if len(kv_cache_specs) != len(devices) or any(specs != kv_cache_specs[0] for specs in kv_cache_specs):
        raise KVCachedError(f"kvcached needs one equal KV cache spec per tensor-parallel rank; got "
                            f"{len(kv_cache_specs)} for {len(devices)} ranks")
    specs = kv_cache_specs[0]
    page_sizes = {spec.page_size_bytes for spec in specs.values()}
    block_sizes = {spec.block_size for spec in specs.values()}
    if len(page_sizes) != 1 or len(block_sizes) != 1:
        raise KVCachedError(f"kvcached needs one KV page size for all layers; this model has {sorted(page_sizes)} bytes")
    granularity = common_granularity(devices)
    block_bytes = page_sizes.pop()
    piece = piece_page_bytes(config.page_size_bytes, devices[0], block_bytes, granularity)
    name = config.ipc_name or default_ipc_name(vllm_config)
    plan = ElasticPlan(
        devices=devices,
        num_layers=len(specs),
        block_bytes=block_bytes,
        block_size=block_sizes.pop(),
        piece_page_bytes=piece,
        granularity=granularity,
        virtual_bytes=config.virtual_size or min(device_memory(device)[1] for device in set(devices)),
        table_path=page_table_path(config.ipc_dir, name),
        ipc_name=name,
    )
    plan.layout()  # raises ConfigError now for a geometry that cannot work
    return plan


def rewrite_configs(kv_cache_configs: list, plan: ElasticPlan) -> None:
    """Point vLLM's configs at the elastic layout: sparse block ids over one reservation."""
    global _current
    for kv_cache_config in kv_cache_configs:
        layers = kv_layers(kv_cache_config)
        if len(layers) != plan.num_layers:
            raise KVCachedError(f"kvcached planned {plan.num_layers} layers, the KV cache config has {len(layers)}")
        kv_cache_config.num_blocks = plan.layout().num_block_ids
        kv_cache_config.kv_cache_tensors = _elastic_tensors(layers, plan.layout())
        setattr(kv_cache_config, _ATTR, asdict(plan))
    _current = plan


def kv_layers(kv_cache_config: Any) -> list[str]:
    """The KV cache config's layer names in tensor order; refuses forms kvcached cannot place."""
    tensors = kv_cache_config.kv_cache_tensors
    if versions.running().per_layer_kv_tensors:
        if any(len(t.shared_by) != 1 or t.offset != 0 or t.block_stride != 0 for t in tensors):
            raise KVCachedError("kvcached supports one unshared, unpacked KV cache tensor per layer; this model's KV "
                                "cache config shares or packs them")
        return [t.shared_by[0] for t in tensors]
    if len(tensors) != 1 or tensors[0].offset != 0 or tensors[0].host_resident:
        raise KVCachedError(f"kvcached supports KV caches in one backing allocation; this model has {len(tensors)}")
    return list(tensors[0].layers)


def _elastic_tensors(layers: list[str], layout: KVLayout) -> list:
    from vllm.v1.kv_cache_interface import KVCacheTensor

    if versions.running().per_layer_kv_tensors:  # the worker hands out slices of one reservation (worker.py)
        return [KVCacheTensor(size=layout.num_block_ids * layout.block_bytes, shared_by=[name]) for name in layers]
    return [KVCacheTensor(size=layout.reserved_bytes, layers=layers,
                          layer_stride=layout.blocks_per_page * layout.block_bytes, block_stride=layout.block_bytes)]


def usable_bytes(plan: ElasticPlan) -> int:
    """KV bytes when every page is mapped: what vLLM's own capacity checks (max_model_len fits) should see."""
    layout = plan.layout()
    return layout.num_blocks * plan.block_bytes * plan.num_layers


def keep_table(table) -> None:
    """Hold the engine core's page table for its block pool (made after the worker has attached to it)."""
    if not _tables:
        atexit.register(lambda: [t.close() for t in _tables])
    _tables.append(table)


def take_table():
    """The page table made for the current plan; its file is unlinked, as the worker has it mapped by now."""
    table = _tables[-1]
    table.unlink()
    return table


_TABLE_PREFIX = "kvcached-pages."


def page_table_path(ipc_dir: str, name: str) -> str:
    """<KVCACHED_IPC_DIR>/kvcached-pages.<name>.<pid>.<start ticks>: the engine core that made it, exactly (a pid
    alone is reused by the kernel once the process exits)."""
    pid = os.getpid()
    return os.path.join(ipc_dir, f"{_TABLE_PREFIX}{name}.{pid}.{start_ticks(pid)}")


def remove_stale_tables(ipc_dir: str) -> list[str]:
    """Remove page tables (and their wake FIFOs) of this user's engine cores that died before their worker attached
    (kill -9 at start-up); returns the paths removed."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(ipc_dir), _TABLE_PREFIX + "*")):
        try:
            pid, ticks = (int(part) for part in path.removesuffix(".wake").rsplit(".", 2)[1:])
            if os.stat(path).st_uid == os.geteuid() and start_ticks(pid) != ticks:
                os.unlink(path)
                removed.append(path)
        except (ValueError, OSError):
            continue
    return removed


def default_ipc_name(vllm_config: Any) -> str:
    """vllm-<served model name>-<engine pid>: unique per engine, and readable in `kvctl list`."""
    served = getattr(vllm_config.model_config, "served_model_name", None) or vllm_config.model_config.model
    if isinstance(served, (list, tuple)):
        served = served[0]
    model = re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(str(served).rstrip("/")))
    model = re.sub(r"\.{2,}", ".", model)[:40].strip("-.") or "model"  # registry names never hold ".."
    return f"vllm-{model}-{os.getpid()}"


