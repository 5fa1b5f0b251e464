"""Registry, kvctl and kvtop against a CUDA KV cache, on a GPU machine (the test suite covers the host backend).

    PYTHONPATH=. python scripts/check_registry_gpu.py

Prints the record kvctl reads (the GPU's UUID included), NVML's view of the device, whether the NVML reader appears
among the GPU's compute processes (it must not: no CUDA context), kvtop's screen, and the GPU memory a kvctl limit frees.
"""
import json
import os
import subprocess
import sys
import time

import torch

from kvcached import Config, KVGeometry, open_cache

env = dict(os.environ, PYTHONPATH=os.getcwd(), COLUMNS="100", LINES="24")
py = sys.executable
m = open_cache(KVGeometry(4, (16, 2, 64), torch.bfloat16), "cuda:0", name="gpu-check", virtual_bytes=64 << 24,
               config=Config(min_reserved_pages=0, max_reserved_pages=4, trim_idle_s=600))
ids = m.alloc(1200)
m.free(ids[600:])
print("stats", m.memory_stats())
print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout)
out = subprocess.run([py, "-m", "kvcached.cli.kvctl", "list", "--json", "gpu-check"], capture_output=True, text=True,
                     env=env)
rec = json.loads(out.stdout)[0]
print("record", {k: rec[k] for k in ("status", "device", "backend", "gpu_id", "devices", "gpu_ids", "used_bytes",
                                     "premapped_bytes", "limit_bytes", "device_total_bytes")}, out.stderr)
# kvtop in the background: it must not appear among the GPU's compute processes (no CUDA context).
top = subprocess.Popen([py, "-c", "import time; from kvcached.devices import Nvml; n = Nvml(); "
                        "print(n.memory(%r)); time.sleep(4)" % rec["gpu_id"]], env=env)
time.sleep(2.5)
apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                      capture_output=True, text=True).stdout
print("compute apps:", apps.strip().replace("\n", "; "), "| engine pid", os.getpid(), "| NVML reader pid", top.pid,
      "| reader has a context:", str(top.pid) in apps)
top.wait()
out = subprocess.run([py, "-m", "kvcached.cli.kvtop", "--once", "gpu-check"], capture_output=True, text=True, env=env)
print(out.stdout, out.stderr)
before = torch.cuda.mem_get_info()[0]
t0 = time.monotonic()
out = subprocess.run([py, "-m", "kvcached.cli.kvctl", "limit", "gpu-check", "32M"], capture_output=True, text=True,
                     env=env)
print(out.stdout, out.stderr, "freed on the GPU:", (torch.cuda.mem_get_info()[0] - before) >> 20, "MiB")
print("stats", m.memory_stats())
m.shutdown()
print("segment left:", os.path.exists("/dev/shm/kvcached.gpu-check"))
subprocess.run([py, "-m", "kvcached.cli.kvctl", "delete", "gpu-check"], env=env)  # the saved limit too
