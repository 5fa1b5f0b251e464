"""Operator tools over the shared-memory registry: `kvctl` (list instances, set limits, a shell) and `kvtop` (a live
screen). They never import torch or touch a GPU: records come from /dev/shm, device memory from NVML."""
