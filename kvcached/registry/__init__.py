"""Shared-memory registry: one record per KV cache instance, read by kvctl and kvtop, and the limit an operator sets.

Modules, each with its own Note: names.py (where files live, who may use them), format.py (the 1024-byte record and
its seqlock), records.py (InstanceRecord, InstanceStatus, liveness), segment.py (open files, flock, saved limits),
registration.py (the engine's side), admin.py (the operator's side). Nothing here imports torch.
"""

from ..errors import RegistryError
from .admin import LimitRequest, clean_dead, delete, list_instances, read_instance, request_limit
from .format import FORMAT_VERSION, HEARTBEAT_S, MAX_DEVICES, RECORD_SIZE, STALE_S, WATCH_INTERVAL_S
from .names import LIMIT_PREFIX, NAME_RULE, SEGMENT_PREFIX, default_name, limit_path, segment_path, shm_dir, validate_name
from .records import InstanceRecord, InstanceStatus
from .registration import Registration
from .segment import read_persisted_limit

__all__ = [
    "FORMAT_VERSION", "HEARTBEAT_S", "LIMIT_PREFIX", "MAX_DEVICES", "NAME_RULE", "RECORD_SIZE", "SEGMENT_PREFIX",
    "STALE_S", "WATCH_INTERVAL_S", "InstanceRecord", "InstanceStatus", "LimitRequest", "Registration", "RegistryError",
    "clean_dead", "default_name", "delete", "limit_path", "list_instances", "read_instance", "read_persisted_limit",
    "request_limit", "segment_path", "shm_dir", "validate_name",
]
