"""Child process for test_pagetable: follows a page table with real host memory, answers on stdin/stdout.

Arguments: the table's path, the device and the follower's rank. Commands: "mapped" -> bytes mapped by the follower, and bytes the OS
holds in the reservation (host: from smaps; GPU: the driver's used memory); "pages" -> the pages mapped, as JSON;
"sync" -> one pass of the follower thread's work, done now ("True" when the mappings match the table); "hold" /
"release" -> start and end a step (no unmapping meanwhile); "oom on" / "oom off" -> make every new mapping fail with
ENOMEM, a real out-of-memory error of the OS (RLIMIT_DATA just below what the process holds), and back; "quit".
"""

import json
import os
import re
import resource
import subprocess
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


class Child:
    """The test's handle on this script run as a child process."""

    def __init__(self, path: str, device: str, rank: int = 0) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), path, device, str(rank)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.ask(None) == "ready"

    def ask(self, command):
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def pages(self) -> list[int]:
        return json.loads(self.ask("pages"))

    def mapped(self) -> tuple[int, int]:
        mapped, resident = self.ask("mapped").split()
        return int(mapped), int(resident)

    def close(self) -> None:
        self.ask("quit")
        self.proc.wait(timeout=10)


def out_of_memory(on: bool) -> None:
    with open("/proc/self/status") as f:
        held = int(re.search(r"VmData:\s+(\d+) kB", f.read()).group(1)) * 1024
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
    resource.setrlimit(resource.RLIMIT_DATA, (held - (1 << 20) if on else hard, hard))


if __name__ == "__main__":
    table = PageTable.attach(sys.argv[1])
    vmm = open_vmm(sys.argv[2])
    size = table.num_pages * table.page_bytes
    base = vmm.reserve(size)
    follower = PageFollower(table, vmm, base, rank=int(sys.argv[3]))
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "mapped":
            held = resident_bytes(base, size) if vmm.device == "cpu" else vmm.total_memory() - vmm.free_memory()
            print(follower.mapped_bytes(), held, flush=True)
        elif command == "pages":
            print(json.dumps(follower.mapped.nonzero()[0].tolist()), flush=True)
        elif command == "sync":
            print(follower.sync(), flush=True)
        elif command == "hold":
            follower.before_step()
            print("held", flush=True)
        elif command == "release":
            follower.after_step()
            print("released", flush=True)
        elif command in ("oom on", "oom off"):
            out_of_memory(command == "oom on")
            print(command, flush=True)
        elif command == "quit":
            follower.close()
            break
