"""Child process for test_pagetable: follows a page table with real host memory, answers on stdin/stdout.

Commands: "mapped" -> bytes mapped by the follower and resident in the reservation; "hold" / "release" -> start and
end a step (no unmapping meanwhile); "quit".
"""

import sys

from kvcached.pagetable import PageFollower, PageTable
from kvcached.vmm import open_vmm


def resident_bytes(base: int, size: int) -> int:
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0] and not line.startswith(("Rss", "Size")):
                start = int(line.split("-", 1)[0], 16)
                inside = base <= start < base + size
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


if __name__ == "__main__":
    table = PageTable.attach(sys.argv[1])
    vmm = open_vmm("cpu")
    size = table.num_pages * table.page_bytes
    base = vmm.reserve(size)
    follower = PageFollower(table, vmm, base)
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "mapped":
            print(follower.mapped_bytes(), resident_bytes(base, size), flush=True)
        elif command == "hold":
            follower.before_step()
            print("held", flush=True)
        elif command == "release":
            follower.after_step()
            print("released", flush=True)
        elif command == "quit":
            follower.close()
            break
