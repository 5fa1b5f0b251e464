"""kvctl as operators run it: a real subprocess against real engines (KVCacheManager on the host backend) or
registrations in this process, over real /dev/shm segments."""

from __future__ import annotations

import json
import os
import pty
import random
import re
import select
import signal
import subprocess
import sys
import time
from typing import Optional

import pytest

from kvcached import registry
from waiting import wait_until
from registry_helpers import (  # noqa: F401 (fixtures)
    empty_ipc_dir, ipc_dir, PAGE, REPO, engines, env, fakes, kvctl, kvctl_json,
)

MiB = 1 << 20


def _one_line_error(out, code: int, prefix: str = "kvctl: error: ") -> str:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), out.stderr
    assert out.stdout == ""
    return lines[0]


def test_three_engines_list_limit_and_rss(engines):
    """kvctl list --json shows three engines' exact memory; a limit on one shrinks its RSS at once and stops its
    growth; the other two are untouched."""
    a, b, c = engines("a", "b", "c")
    assert a.cmd("alloc 31")["ok"]  # with the null block: page 0 full            -> 1 page
    assert b.cmd("alloc 32")["ok"]  # page 0 full, 1 block in page 1               -> 2 pages
    assert c.cmd("alloc 95")["ok"]  # pages 0-2 full                               -> 3 pages
    assert c.cmd("alloc 64")["ok"]  # pages 3-4                                    -> 5 pages
    assert c.cmd("free")["stats"] == {"limit": 16 * PAGE, "used": 3 * PAGE, "premapped": 2 * PAGE}
    listed = kvctl_json(a.name, b.name, c.name)
    expect = {a.name: (PAGE, 0), b.name: (2 * PAGE, 0), c.name: (3 * PAGE, 2 * PAGE)}
    for e in (a, b, c):
        r = listed[e.name]
        assert (r["used_bytes"], r["premapped_bytes"]) == expect[e.name]
        assert (r["status"], r["alive"], r["pid"], r["device"], r["backend"]) == ("alive", True, e.pid, "cpu", "host")
        assert (r["limit_bytes"], r["virtual_bytes"], r["page_bytes"]) == (16 * PAGE, 16 * PAGE, PAGE)
        assert r["used_bytes"] == e.cmd("stats")["stats"]["used"]
    every = {r["name"] for r in json.loads(kvctl("list", "--json").stdout)}
    assert {a.name, b.name, c.name} <= every
    table = kvctl("list", a.name, b.name, c.name)
    assert table.returncode == 0 and "48M" in table.stdout and "32M" in table.stdout

    # kvctl limit: one page of C's reserve goes; kvctl reports how long the engine took to apply it.
    before = c.rss()
    out = kvctl("limit", c.name, "64M")
    assert out.returncode == 0, out.stderr
    assert f"{c.name}: limit 64M (67108864 bytes), applied in" in out.stdout
    assert out.stdout.split("applied in ")[1].split(" ms")[0].isdigit()
    assert before - c.rss() >= PAGE - MiB  # already gone when kvctl returns
    assert c.cmd("stats")["stats"] == {"limit": 4 * PAGE, "used": 3 * PAGE, "premapped": PAGE}

    # The same path without waiting for the engine: its watcher alone applies it while the engine is idle.
    before = c.rss()
    registry.request_limit(c.name, 3 * PAGE, wait_s=0)
    assert wait_until(lambda: before - c.rss() >= PAGE - MiB, timeout=30, interval=0.002)
    assert c.cmd("stats")["stats"] == {"limit": 3 * PAGE, "used": 3 * PAGE, "premapped": 0}
    before = c.rss()
    assert c.cmd("alloc 1")["ok"] is False  # every mapped page is full: no page above the limit
    assert c.cmd("alloc 32")["ok"] is False and c.rss() - before < MiB

    # Lowering below what is in use keeps the pages in use; the record shows the deficit.
    out = kvctl("limit", c.name, "16M")
    assert out.returncode == 0 and "32M in use above it" in out.stdout
    r = kvctl_json(c.name)[c.name]
    assert (r["limit_bytes"], r["used_bytes"], r["deficit_bytes"]) == (PAGE, 3 * PAGE, 2 * PAGE)

    # The other two are unaffected and can still grow.
    for e, used in ((a, PAGE), (b, 2 * PAGE)):
        assert e.cmd("stats")["stats"]["limit"] == 16 * PAGE
        assert e.cmd("alloc 40")["ok"]
        assert kvctl_json(e.name)[e.name]["used_bytes"] > used

    # limit-percent is a share of the instance's own device total.
    total = listed[a.name]["device_total_bytes"]
    out = kvctl("limit-percent", a.name, "0.5")
    assert out.returncode == 0, out.stderr
    assert kvctl_json(a.name)[a.name]["limit_bytes"] == int(total * 0.5 / 100)


def test_killed_engine_shows_dead_then_delete_and_next_start_remove_it(engines, fakes):
    a, b, c = engines("a", "b", "c")
    assert b.cmd("alloc 40")["ok"]
    b.kill9()
    listed = kvctl_json(a.name, b.name, c.name)
    dead = listed[b.name]
    assert (dead["status"], dead["alive"], dead["pid"], dead["used_bytes"]) == ("dead", False, b.pid, 2 * PAGE)
    assert listed[a.name]["alive"] and listed[c.name]["alive"]
    table = kvctl("list", b.name).stdout
    assert "dead" in table.splitlines()[1]
    others = {e.name: os.stat(registry.segment_path(e.name)) for e in (a, c)}

    out = kvctl("delete", b.name)
    assert out.returncode == 0 and "removed the segment (dead)" in out.stdout, out.stderr
    assert not os.path.exists(registry.segment_path(b.name))
    _one_line_error(kvctl("list", b.name), 1)

    c.kill9()
    assert kvctl_json(c.name)[c.name]["status"] == "dead"
    fakes()  # the next instance to start removes the dead one
    assert not os.path.exists(registry.segment_path(c.name))
    st = os.stat(registry.segment_path(a.name))
    assert (st.st_ino, st.st_mtime_ns) == (others[a.name].st_ino, others[a.name].st_mtime_ns)
    assert kvctl_json(a.name)[a.name]["alive"] and a.cmd("alloc 1")["ok"]


def test_operator_limit_survives_engine_restart_unless_it_has_its_own(engines):
    """A limit set with kvctl stays with the name: an engine restarted under it starts capped, from the first page;
    one started with a limit of its own keeps its own."""
    (first,) = engines("restart")
    name = first.name
    assert kvctl("limit", name, "48M").returncode == 0
    first.stop()
    assert not os.path.exists(registry.segment_path(name)) and registry.read_persisted_limit(name) == 3 * PAGE

    (second,) = engines(name=name)
    assert second.cmd("stats")["stats"]["limit"] == 3 * PAGE
    assert second.cmd("alloc 95")["ok"] and second.cmd("alloc 1")["ok"] is False  # 3 pages, and not one more
    r = kvctl_json(name)[name]
    assert (r["limit_bytes"], r["used_bytes"], r["persisted_limit"], r["pid"]) == (3 * PAGE, 3 * PAGE, 3 * PAGE,
                                                                                   second.pid)
    second.stop()

    (third,) = engines(name=name, limit=5 * PAGE)
    assert third.cmd("stats")["stats"]["limit"] == 5 * PAGE
    assert kvctl_json(name)[name]["limit_bytes"] == 5 * PAGE
    third.stop()
    out = kvctl("delete", name)  # no segment left: the saved limit goes
    assert out.returncode == 0 and "removed its saved limit" in out.stdout
    assert registry.read_persisted_limit(name) is None


def test_bad_inputs_give_one_line_errors_and_change_nothing(fakes):
    e = fakes(used=2 * PAGE, limit=8 * PAGE)
    before = registry.read_instance(e.name)
    cases = [
        (("limit", e.name, "12XB"), 1, "unknown unit"),
        (("limit", e.name, "lots"), 1, "is not a size"),
        (("limit", e.name, "-5"), 1, "is not a size"),
        (("limit", e.name, "1e9"), 1, "is not a size"),
        (("limit", e.name, "2Q"), 1, "unknown unit"),
        (("limit", "no-such-instance", "1G"), 1, "unknown instance 'no-such-instance'"),
        (("limit", "../etc/passwd", "1G"), 1, "invalid IPC name"),
        (("limit", "a/b", "1G"), 1, "invalid IPC name"),
        (("limit",), 2, "the following arguments are required"),
        (("limit", e.name, "1G", "extra"), 2, "unrecognized arguments"),
        (("limit-percent", e.name, "101"), 1, "from 0 to 100"),
        (("limit-percent", e.name, "-1"), 1, "from 0 to 100"),
        (("limit-percent", e.name, "nan"), 1, "from 0 to 100"),
        (("limit-percent", e.name, "ten"), 1, "from 0 to 100"),
        (("limit-percent", "no-such-instance", "10"), 1, "unknown instance"),
        (("list", "no-such-instance"), 1, "unknown instance"),
        (("list", "x" * 80), 1, "invalid IPC name"),
        (("delete", "no-such-instance"), 1, "unknown instance"),
        (("delete", e.name), 1, "alive"),
        (("watch", "-n", "0"), 2, "expected a number of seconds > 0"),
        (("watch", "no-such-instance", "-c", "1"), 1, "unknown instance"),
        (("kvtop", "--refresh", "-1"), 2, "expected a number of seconds > 0"),
        (("frobnicate",), 2, "unknown command 'frobnicate'"),
        (("echo", "hi"), 2, "unknown command 'echo'"),
        (("!ls",), 2, "unknown command '!ls'"),
        (("--bogus",), 2, "unrecognized arguments"),
        (("help", "nothing"), 2, "unknown command 'nothing'"),
    ]
    for argv, code, text in cases:
        line = _one_line_error(kvctl(*argv), code)
        assert text in line, (argv, line)
    after = registry.read_instance(e.name)
    assert (after.limit_bytes, after.requested_generation, after.persisted_limit) == (8 * PAGE, 0, None)
    assert after.used_bytes == before.used_bytes and e.applied == []
    assert os.path.exists(registry.segment_path(e.name))


def test_help_watch_and_clean(fakes):
    e = fakes(used=3 * PAGE)
    out = kvctl("--help")
    assert out.returncode == 0 and all(c in out.stdout for c in ("list", "limit-percent", "watch", "kvtop", "delete"))
    out = kvctl("help", "limit")
    assert out.returncode == 0 and "usage: kvctl limit" in out.stdout and "512M" in out.stdout
    out = kvctl("watch", "-n", "0.05", "-c", "3", e.name)
    assert out.returncode == 0 and out.stdout.count(e.name) == 3 and out.stdout.count("every 0.05s") == 3
    assert "48M" in out.stdout


def test_clean_removes_dead_segments_and_their_saved_limits_and_keeps_live_ones(engines, fakes):
    live = fakes(used=2 * PAGE)
    dead, restarted = engines("dead", "dead-too")
    for engine in (live, dead, restarted):
        assert registry.request_limit(engine.name, 5 * PAGE, wait_s=30).applied
    dead.kill9()
    restarted.kill9()
    live_segment = os.stat(registry.segment_path(live.name))
    out = kvctl("clean")
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout == f"removed 2 dead instance(s): {', '.join(sorted([dead.name, restarted.name]))}\n"
    for engine in (dead, restarted):
        assert not os.path.exists(registry.segment_path(engine.name))
        assert not os.path.exists(registry.limit_path(engine.name))
    after = os.stat(registry.segment_path(live.name))
    assert (after.st_ino, after.st_mtime_ns) == (live_segment.st_ino, live_segment.st_mtime_ns)
    assert registry.read_instance(live.name).alive and registry.read_persisted_limit(live.name) == 5 * PAGE
    assert kvctl("clean").stdout == "removed 0 dead instance(s)\n"


def _shell(lines: str, **kw):
    return kvctl(input=lines, **kw)


def test_shell_runs_commands_and_only_bang_runs_shell_commands(fakes, tmp_path):
    e = fakes(used=PAGE)
    marker = tmp_path / "ran"
    script = "\n".join([
        "list",
        f"limit {e.name} 64M",
        "frobnicate",
        f"touch {marker}",  # not a command: nothing runs
        "limit-percent nobody 10",
        "help",
        f"!echo bang-ran > {tmp_path / 'bang'}",
        "exit",
        f"limit {e.name} 32M",  # after exit: not run
    ]) + "\n"
    out = _shell(script, HOME=str(tmp_path))
    assert out.returncode == 0
    assert f"{e.name}: limit 64M (67108864 bytes), applied in" in out.stdout
    errors = out.stderr.splitlines()
    commands = "list, limit, limit-percent, watch, kvtop, delete, clean, metrics, help, exit, quit"
    assert errors == [
        f"error: unknown command 'frobnicate' (commands: {commands}; see 'help')",
        f"error: unknown command 'touch' (commands: {commands}; see 'help')",
        "error: unknown instance 'nobody' (see 'kvctl list')",
    ]
    assert not marker.exists() and (tmp_path / "bang").read_text() == "bang-ran\n"
    assert registry.read_instance(e.name).limit_bytes == 4 * PAGE


def _junk_lines(rng: random.Random, names: list[str], count: int) -> list[str]:
    words = ["list", "limit", "limit-percent", "watch", "kvtop", "delete", "help", "--json", "-n", "-c",
             "--refresh", "--help", "-h", "512M", "2G", "1.5GiB", "0", "-1", "101", "nan", "1e400", "'", '"', "\\",
             "..", "../..", "/", "%s", "{}", "$(reboot)", "`id`", ";", "|", "&&", "\t", "\x1b[2J", "\x00", "\x7f",
             "ünïcødé", "x" * 300] + names
    lines = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.5:
            line = " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))
        elif kind < 0.8:
            line = "".join(chr(rng.randint(1, 0x2FF)) for _ in range(rng.randint(1, 60)))
        else:
            line = f"limit {rng.choice(names)} {rng.choice(['64M', '1G', str(rng.randint(0, 1 << 32)), 'x', '-3'])}"
        line = line.replace("\n", " ").replace("\r", " ")
        if line.strip().startswith("!"):  # shell commands are not junk to run
            line = "#" + line
        if line.split() and line.split()[0] in ("watch", "kvtop"):
            line = "help"  # watch runs until Ctrl-C; kvtop wants a terminal (tested elsewhere)
        lines.append(line)
    return lines


def test_random_junk_in_the_shell_never_corrupts_a_segment(fakes, engines, tmp_path):
    (engine,) = engines("junk")
    fake = fakes(used=5 * PAGE)
    names = [engine.name, fake.name]
    images = {n: open(registry.segment_path(n), "rb").read()[:256] for n in names}
    rng = random.Random(20240503)
    script = "\n".join(_junk_lines(rng, names, 400)) + "\n"
    data = script.encode("utf-8", "surrogateescape") + b"\xff\xfe raw bytes \xc3\x28\n" + f"list {fake.name}\n".encode()
    proc = subprocess.run([sys.executable, "-m", "kvcached.cli.kvctl"], input=data, capture_output=True,
                          env=env(HOME=str(tmp_path)), cwd=REPO, timeout=120)
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr
    assert all(line.startswith("error: ") for line in stderr.splitlines()), stderr[:2000]
    stdout = proc.stdout.decode("utf-8", "replace")
    assert stdout.count("applied in") >= 20  # the junk did reach the segments through valid commands too
    assert any(line.startswith(f"{fake.name}  alive") for line in stdout.splitlines()[-3:])  # still there at the end
    for n in names:
        assert open(registry.segment_path(n), "rb").read()[:256] == images[n]  # header untouched
        r = registry.read_instance(n)
        assert r.status == "alive" and r.reason == "" and r.name == n
    # The records still follow the engines: the engine's own figures match, and it still obeys limits.
    stats = engine.cmd("stats")["stats"]
    r = registry.read_instance(engine.name)
    assert (r.limit_bytes, r.used_bytes, r.premapped_bytes) == (stats["limit"], stats["used"], stats["premapped"])
    out = kvctl("limit", engine.name, "32M")
    assert out.returncode == 0, out.stderr
    assert engine.cmd("stats")["stats"]["limit"] == 2 * PAGE


def _pty_session(tmp_path):
    master, slave = pty.openpty()
    # Ctrl-C as at a terminal: a test run started in the background (CI's runner, `cmd &`) hands its children
    # SIGINT ignored, and the shell would then never see one (CI failed so)
    proc = subprocess.Popen([sys.executable, "-m", "kvcached.cli.kvctl"], stdin=slave, stdout=slave, stderr=slave,
                            env=env(HOME=str(tmp_path), TERM="xterm"), cwd=REPO, close_fds=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(slave)
    seen = bytearray()

    def expect(text: str, timeout: float = 20.0, required: bool = True) -> Optional[str]:
        """What the session printed up to `text`; None (output kept) when not `required` and it did not come."""
        deadline = time.monotonic() + timeout
        while text.encode() not in seen:
            left = deadline - time.monotonic()
            if left <= 0 and not required:
                return None
            assert left > 0, f"did not see {text!r} in {bytes(seen)[-500:]!r} (exit code {proc.poll()})"
            ready, _, _ = select.select([master], [], [], left)
            if ready:
                try:
                    seen.extend(os.read(master, 4096).replace(b"\x07", b""))  # readline rings on ambiguity
                except OSError:
                    break
        found = bytes(seen).decode("utf-8", "replace")
        seen.clear()
        return found

    return proc, master, expect


def test_interactive_shell_prompt_completion_and_history(fakes, tmp_path):
    e = fakes(used=PAGE)
    proc, master, expect = _pty_session(tmp_path)
    try:
        expect("kvcached> ")
        os.write(master, b"lim\t")
        expect("limit")
        os.write(master, b"\t\t")  # limit or limit-percent: two more tabs list both
        expect("limit-percent")
        os.write(master, b"\x15")  # clear the line
        os.write(master, f"list {e.name[:-3]}\t".encode())
        expect(e.name)
        os.write(master, b"\n")
        out = expect("kvcached> ")
        assert "16M" in out and "alive" in out
        os.write(master, b"bogus\n")
        assert "error: unknown command 'bogus'" in expect("kvcached> ")
        # Ctrl-C (sent as a signal: the pty is not its controlling terminal) gives a fresh prompt. CPython's readline
        # misses a signal that lands between printing the prompt and waiting for input until the next one arrives, so
        # send again until the prompt comes (on a busy machine the first may land in that gap), never on a timer.
        for _ in range(40):
            proc.send_signal(signal.SIGINT)
            if expect("kvcached> ", timeout=0.5, required=False) is not None:
                break
        else:
            pytest.fail("Ctrl-C (SIGINT, 40 times) never gave a fresh prompt")
        os.write(master, b"quit\n")
        assert proc.wait(20) == 0
    finally:
        _end_session(proc, master)
    history = [line.strip() for line in (tmp_path / ".kvctl_history").read_text().splitlines()]
    assert f"list {e.name}" in history and "bogus" in history
    assert oct(os.stat(tmp_path / ".kvctl_history").st_mode & 0o777) == "0o600"

    proc, master, expect = _pty_session(tmp_path)  # history is read back
    try:
        expect("kvcached> ")
        os.write(master, b"\x1b[A")  # up arrow: the last line, "quit"
        expect("quit")
        os.write(master, b"\n")
        assert proc.wait(20) == 0
    finally:
        _end_session(proc, master)


def _end_session(proc, master) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    os.close(master)


@pytest.mark.parametrize("module, argv, shows", [
    ("kvcached.cli.kvctl", ["list"], "kvcached.registry.admin"),
    ("kvcached.cli.kvtop", ["--once"], "kvcached.cli.render"),
    ("kvcached.cli.kvctl", ["kvtop"], "kvcached.cli.kvtop"),  # refused without a terminal, after importing kvtop
])
def test_the_tools_never_import_torch(module, argv, shows):
    """-X importtime lists every module the process imported (`shows`: one the command must have imported)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", module, *argv], capture_output=True, text=True,
                         env=env(COLUMNS="80", LINES="24"), cwd=REPO, timeout=120, stdin=subprocess.DEVNULL)
    imported = [line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert shows in imported, out.stderr[-2000:]
    assert [m for m in imported if m == "torch" or m.startswith("torch.")] == []


def test_a_tensor_parallel_instance_lists_per_device_figures_and_a_total(fakes):
    """An instance on two devices (rank order) shows them as `cpu x2`, its figures per device and a TOTAL column;
    a limit, and limit-percent of its device total, are per device."""
    tp = fakes(used=3 * PAGE, premapped=PAGE, limit=8 * PAGE, total=64 * PAGE, devices=("cpu", "cpu"))
    one = fakes(used=PAGE)
    gpus = fakes(used=2 * PAGE, devices=("cuda:0", "cuda:1"))
    pid = os.getpid()
    out = kvctl("list", tp.name, one.name, gpus.name)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "PID", "DEVICE", "PREALLOC", "USED", "LIMIT", "FREE", "VIRTUAL",
                                "TOTAL"]
    assert re.fullmatch(rf"{tp.name} +alive +{pid} +cpu x2 +16M +48M +128M +64M +256M +96M", lines[1]), lines[1]
    assert re.fullmatch(rf"{one.name} +alive +{pid} +cpu +0B +16M +256M +240M +256M +16M", lines[2]), lines[2]
    assert re.fullmatch(rf"{gpus.name} +alive +{pid} +cuda:0,1 +0B +32M +256M +224M +256M +64M", lines[3]), lines[3]
    assert lines[4:] == ["PREALLOC, USED, LIMIT, FREE and VIRTUAL are per device (each tensor-parallel rank); TOTAL "
                         "is USED on all of an instance's devices"]
    # Without a multi-device instance the table is as it always was: no TOTAL, no footnote.
    lines = kvctl("list", one.name).stdout.splitlines()
    assert lines[0].split()[-1] == "VIRTUAL" and len(lines) == 2

    r = kvctl_json(tp.name)[tp.name]
    assert (r["device"], r["devices"], r["gpu_ids"], r["num_devices"]) == ("cpu", ["cpu", "cpu"], ["", ""], 2)
    assert (r["used_bytes"], r["premapped_bytes"], r["limit_bytes"], r["free_bytes"]) == (3 * PAGE, PAGE, 8 * PAGE,
                                                                                         4 * PAGE)
    assert (r["total_used_bytes"], r["total_mapped_bytes"], r["device_total_bytes"]) == (6 * PAGE, 8 * PAGE, 64 * PAGE)
    r = kvctl_json(gpus.name)[gpus.name]
    assert (r["backend"], r["devices"], r["num_devices"], r["total_used_bytes"]) == ("cuda", ["cuda:0", "cuda:1"], 2,
                                                                                    4 * PAGE)

    out = kvctl("limit", tp.name, "64M")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{tp.name}: limit 64M (67108864 bytes) per device (cpu x2), applied in ")
    assert tp.applied[-1][1] == 4 * PAGE  # not divided among the ranks
    out = kvctl("limit-percent", tp.name, "25")  # of one device's total: 16 pages on each device
    assert out.returncode == 0, out.stderr
    assert tp.applied[-1][1] == 16 * PAGE and kvctl_json(tp.name)[tp.name]["limit_bytes"] == 16 * PAGE

    out = kvctl("watch", "-n", "0.05", "-c", "2", tp.name)
    assert out.returncode == 0 and out.stdout.count("cpu x2") == 2 and out.stdout.count("are per device") == 2
    out = kvctl("limit", "--help")
    assert out.returncode == 0 and "per device (each tensor-parallel rank)" in out.stdout
    out = kvctl("limit-percent", "--help")
    help_text = " ".join(out.stdout.split())  # argparse wraps lines
    assert out.returncode == 0 and "of the total memory of the instance's device (per rank)" in help_text
