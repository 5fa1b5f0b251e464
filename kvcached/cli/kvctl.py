"""kvctl: list the KV cache instances of this machine and set their memory limits.

Run with a command for one-shot use (`kvctl list --json`, `kvctl limit llama 2G`), or without one for an interactive
shell (`kvcached>` prompt, history in ~/.kvctl_history, tab completion of commands and instance names). An error is
one line on stderr; a one-shot command then exits non-zero (2 for a bad command line, 1 for anything else), the shell
keeps running. Only a shell line starting with `!` runs a shell command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Optional

from .. import registry
from ..devices import devices_label
from ..errors import KVCachedError, RegistryError
from ..registry import InstanceRecord, InstanceStatus
from ..units import format_size, parse_size
from .common import OneLineParser, UsageError, number, port, positive_float, print_error

PROMPT = "kvcached> "
HISTORY = "~/.kvctl_history"
_NO_LIMIT = ("none", "off", "unlimited")
_EXIT = object()


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="kvctl",
        description="List kvcached instances (KV caches in shared memory) and set their memory limits. "
        "Without a command, starts an interactive shell.",
        epilog="Sizes: 512M, 2G, 1.5GiB or bytes (K/M/G/T and KiB.. are binary, KB/MB/GB decimal); 'none' removes "
        "a limit. A limit takes effect within 100 ms and is kept for the name across engine restarts, unless the "
        "engine starts with a limit of its own. In the shell, '!cmd' runs a shell command.",
    )
    commands = parser.add_subparsers(dest="command", metavar="command", parser_class=OneLineParser)

    def add(name: str, summary: str) -> argparse.ArgumentParser:  # each command's --help starts with what it does
        return commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")

    p = add("list", "list instances: memory, limit, state")
    p.add_argument("ipc", nargs="*", help="instance names (default: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output, exact byte counts")

    p = add("limit", "cap an instance's memory per device (each tensor-parallel rank): limit <ipc> <size>")
    p.add_argument("ipc", help="instance name")
    p.add_argument("size", help="512M, 2G, 1.5GiB, bytes, or 'none'; on each of the instance's devices")

    p = add("limit-percent", "cap an instance's memory per device at a percentage of its device's memory")
    p.add_argument("ipc", help="instance name")
    p.add_argument("pct", help="0 to 100, of the total memory of the instance's device (per rank)")

    p = add("watch", "print the list again every few seconds (Ctrl-C stops)")
    p.add_argument("-n", "--interval", type=positive_float, default=1.0, metavar="SEC", help="seconds (default 1)")
    p.add_argument("-c", "--count", type=_count, default=0, metavar="N", help="stop after N screens (default: never)")
    p.add_argument("ipc", nargs="*", help="instance names (default: all)")

    p = add("kvtop", "live screen of instances and device memory (q quits)")
    p.add_argument("ipc", nargs="*", help="instance names (default: all)")
    p.add_argument("--refresh", type=positive_float, default=1.0, metavar="SEC", help="seconds between updates")

    p = add("delete", "remove an instance's segment and its saved limit")
    p.add_argument("ipc", help="instance name")
    p.add_argument("--force", action="store_true", help="also when the instance is alive (it stays unregistered)")

    add("clean", "remove the segments of dead instances and their saved limits")
    p = add("metrics", "serve the instances' memory as Prometheus gauges at /metrics (Ctrl-C stops)")
    p.add_argument("--port", type=port, default=9400, help="port (default 9400)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p = add("help", "show help, or a command's help")
    p.add_argument("topic", nargs="?", help="a command")
    add("exit", "leave the shell")
    add("quit", "leave the shell")
    return parser


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


_NAMED = ("list", "limit", "limit-percent", "watch", "kvtop", "delete")  # commands that take instance names


# ---- commands ----------------------------------------------------------------------------------------------------


def _list(args) -> int:
    records = registry.list_instances(args.ipc)
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
    else:
        print(format_table(records))
    return 0


def format_table(records: list[InstanceRecord]) -> str:
    """The list as a table: figures per device; a TOTAL column (used on all ranks) when an instance spans several."""
    if not records:
        return "no kvcached instances"
    several = any(r.num_devices > 1 for r in records)
    header = ("NAME", "STATUS", "PID", "DEVICE", "PREALLOC", "USED", "LIMIT", "FREE", "VIRTUAL") + ("TOTAL",) * several
    rows = [header]
    for r in records:
        if r.status in (InstanceStatus.FOREIGN, InstanceStatus.INVALID):
            rows.append((r.name, r.status, "", "", "", "", "", "", r.reason) + ("",) * several)
            continue
        rows.append((r.name, r.status, str(r.pid), devices_label(r.devices), format_size(r.premapped_bytes),
                     format_size(r.used_bytes), format_size(r.limit_bytes), format_size(r.free_bytes),
                     format_size(r.virtual_bytes)) + (format_size(r.total_used_bytes),) * several)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if several:
        lines.append("PREALLOC, USED, LIMIT, FREE and VIRTUAL are per device (each tensor-parallel rank); "
                     "TOTAL is USED on all of an instance's devices")
    notes = [f"{r.name}: {format_size(r.deficit_bytes)} in use above the limit, given back as it is freed"
             for r in records if r.deficit_bytes]
    return "\n".join(lines + notes)


def _parse_limit(text: str) -> Optional[int]:
    if text.strip().lower() in _NO_LIMIT:
        return None
    return parse_size(text)


def _set_limit(name: str, limit: Optional[int]) -> int:
    result = registry.request_limit(name, limit)
    shown = "no limit" if limit is None else f"{format_size(limit)} ({limit} bytes)"
    if result.applied is None:
        print(f"{name}: limit {shown} saved; the instance is dead, it applies when one starts under this name")
        return 0
    if result.apply_error:
        raise RegistryError(f"{name}: the engine failed to apply the limit {shown} (see its log)")
    if not result.applied:
        raise RegistryError(f"{name}: limit {shown} saved, but the engine did not apply it within 1 s")
    record = registry.read_instance(name)
    deficit = record.deficit_bytes
    note = f"; {format_size(deficit)} in use above it is given back as freed" if deficit else ""
    where = f" per device ({devices_label(record.devices)})" if record.num_devices > 1 else ""
    print(f"{name}: limit {shown}{where}, applied in {result.latency_s * 1000:.0f} ms{note}")
    return 0


def _limit(args) -> int:
    return _set_limit(args.ipc, _parse_limit(args.size))


def _limit_percent(args) -> int:
    pct = number(args.pct)
    if not 0 <= pct <= 100:
        raise ValueError(f"percentage must be a number from 0 to 100, got {args.pct!r}")
    record = registry.read_instance(args.ipc)
    if record.status in (InstanceStatus.FOREIGN, InstanceStatus.INVALID):
        raise RegistryError(f"instance {args.ipc!r} is {record.status} ({record.reason}); it is not changed")
    return _set_limit(args.ipc, int(record.device_total_bytes * pct / 100))


def _watch(args) -> int:
    registry.list_instances(args.ipc)  # unknown names are an error now, not an empty screen forever
    shown = 0
    while True:
        records = registry.list_instances(args.ipc, missing_ok=True)
        if sys.stdout.isatty():
            sys.stdout.write("\x1b[H\x1b[2J")
        print(f"every {args.interval:g}s  {time.strftime('%H:%M:%S')}")
        print(format_table(records), flush=True)
        shown += 1
        if args.count and shown >= args.count:
            return 0
        time.sleep(args.interval)


def _kvtop(args) -> int:
    from .kvtop import run

    return run(args.ipc, args.refresh)


def _delete(args) -> int:
    record = registry.delete(args.ipc, force=args.force)
    what = "its saved limit" if record is None else f"the segment ({record.status}) and its saved limit"
    print(f"{args.ipc}: removed {what}")
    return 0


def _clean(args) -> int:
    removed = registry.clean_dead(forget_limits=True)
    print(f"removed {len(removed)} dead instance(s)" + (": " + ", ".join(removed) if removed else ""))
    return 0


def _metrics(args) -> int:
    from . import metrics_exporter  # prometheus-client is needed only here (kvcached[router])

    try:
        metrics_exporter.serve(args.port, args.host)
    except OSError as exc:
        raise OSError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return 0


def _help(args) -> int:
    parser = build_parser()
    if args.topic is None:
        parser.print_help()
        return 0
    if args.topic not in COMMANDS:
        raise UsageError(f"unknown command {args.topic!r} (commands: {', '.join(COMMANDS)})")
    parser.parse_args([args.topic, "--help"])  # prints the command's help and raises SystemExit(0)
    return 0


_HANDLERS = {"list": _list, "limit": _limit, "limit-percent": _limit_percent, "watch": _watch, "kvtop": _kvtop,
             "delete": _delete, "clean": _clean, "metrics": _metrics, "help": _help, "exit": lambda a: 0, "quit": lambda a: 0}
COMMANDS = tuple(_HANDLERS)


# ---- running a command line ----------------------------------------------------------------------------------------


def run(argv: list[str], prefix: str = "kvctl: error: ") -> int:
    """Run one command; errors print one line (after `prefix`) and give the exit code."""
    try:
        if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
            raise UsageError(f"unknown command {argv[0]!r} (commands: {', '.join(COMMANDS)}; see 'help')")
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 0
        return _HANDLERS[args.command](args)
    except SystemExit as exc:  # --help, or help <command>
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print()
        return 130
    except UsageError as exc:
        print_error(prefix, exc)
        return 2
    except (KVCachedError, ValueError, OSError) as exc:
        print_error(prefix, exc)
        return 1


def run_line(line: str) -> object:
    """One shell line: a command, `!shell command`, or exit/quit (returns _EXIT)."""
    line = line.strip()
    if not line or line.startswith("#"):
        return 0
    if line.startswith("!"):
        sys.stdout.flush()
        return subprocess.run(line[1:], shell=True).returncode
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        print_error("error: ", ValueError(f"cannot split the line: {exc}"))
        return 2
    if argv and argv[0] in ("exit", "quit"):
        return _EXIT
    return run(argv, prefix="error: ")


def shell() -> int:
    interactive = sys.stdin.isatty()
    history = os.path.expanduser(HISTORY)
    if interactive:
        _setup_readline(history)
        print("kvctl shell: 'help' lists the commands, 'exit' leaves, Tab completes, '!cmd' runs a shell command")
    else:
        sys.stdin.reconfigure(errors="replace")  # junk bytes must not end the shell
    try:
        while True:
            try:
                line = input(PROMPT) if interactive else sys.stdin.readline()
            except EOFError:
                print()
                break
            except KeyboardInterrupt:
                print()
                continue
            if not interactive and not line:
                break
            if run_line(line) is _EXIT:
                break
    finally:
        if interactive:
            _save_history(history)
    return 0


def _setup_readline(history: str) -> None:
    import readline

    try:
        readline.read_history_file(history)
    except (OSError, ValueError):
        pass
    readline.set_history_length(1000)
    readline.set_completer_delims(" \t\n")
    readline.set_completer(_Completer().complete)
    readline.parse_and_bind("tab: complete")


def _save_history(history: str) -> None:
    import readline

    try:
        readline.write_history_file(history)
        os.chmod(history, 0o600)
    except OSError:
        pass


class _Completer:
    """Commands as the first word, then instance names (re-read at most once a second) and the command's options."""

    def __init__(self) -> None:
        self._names: list[str] = []
        self._read_at = float("-inf")
        self._matches: list[str] = []

    def complete(self, text: str, state: int) -> Optional[str]:
        if state == 0:
            import readline

            words = readline.get_line_buffer()[: readline.get_begidx()].split()
            if not words:
                options = list(COMMANDS)
            elif words[0] in _NAMED:
                options = self._instance_names() + _OPTIONS.get(words[0], [])
            elif words[0] == "help":
                options = list(COMMANDS)
            else:
                options = []
            self._matches = [o + " " for o in options if o.startswith(text)]
        return self._matches[state] if state < len(self._matches) else None

    def _instance_names(self) -> list[str]:
        if time.monotonic() - self._read_at > 1.0:
            try:
                self._names = [r.name for r in registry.list_instances()]
            except (KVCachedError, OSError):
                self._names = []
            self._read_at = time.monotonic()
        return self._names


_OPTIONS = {"list": ["--json"], "watch": ["-n", "--count"], "kvtop": ["--refresh"], "delete": ["--force"]}


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return shell()
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
