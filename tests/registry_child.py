"""A small engine for the registry tests: open_cache() on the host backend, driven by commands on stdin.

Usage: registry_child.py NAME [LIMIT_BYTES]. A page is 16 MiB (4 layers x K,V x 2 MiB pieces) and holds 32 blocks; the null block
takes one slot of the first page. Commands, one per line, each answered by one JSON line on stdout:
  alloc N   -> {"ok": true|false, "stats": ...}   (false: alloc returned None)
  free      -> frees the blocks of the last successful alloc
  stats     -> {"stats": ...}
  exit      -> shuts the manager down (removing its segment) and exits
  leave     -> exits without shutdown() (the segment must still go, at interpreter exit)
"""

import json
import os
import sys

import torch

from kvcached import Config, KVGeometry, open_cache

PAGE_BYTES = 16 << 20
BLOCKS_PER_PAGE = 32


def main() -> None:
    name = sys.argv[1]
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else None  # the engine's own limit, as KVCACHED_MEMORY_LIMIT
    config = Config(page_size_mb=2.0, min_reserved_pages=0, max_reserved_pages=4, trim_idle_s=600.0,
                    log_level="WARNING")
    geometry = KVGeometry(num_layers=4, block_shape=(65536,), dtype=torch.uint8)
    manager = open_cache(geometry, "cpu", name=name, virtual_bytes=16 * PAGE_BYTES, limit_bytes=limit, config=config)
    batches = []

    def reply(**fields) -> None:
        stats = manager.memory_stats()
        fields["stats"] = {"limit": stats.limit_bytes, "used": stats.used_bytes, "premapped": stats.premapped_bytes}
        print(json.dumps(fields), flush=True)

    reply(ready=manager.ipc_name, pid=os.getpid())
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        if command[0] == "alloc":
            ids = manager.alloc(int(command[1]))
            if ids is not None:
                batches.append(ids)
            reply(ok=ids is not None)
        elif command[0] == "free":
            manager.free(batches.pop())
            reply(ok=True)
        elif command[0] == "stats":
            reply(ok=True)
        elif command[0] == "leave":
            print(json.dumps({"bye": True}), flush=True)
            return
        elif command[0] == "exit":
            manager.shutdown()
            print(json.dumps({"bye": True}), flush=True)
            return


if __name__ == "__main__":
    main()
