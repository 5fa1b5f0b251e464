"""The shared-memory registry (kvcached/registry.py) with real /dev/shm segments and real processes."""

from __future__ import annotations

import grp
import logging
import mmap
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from kvcached import registry
from kvcached.procinfo import start_ticks
from kvcached.registry import format as record_format
from kvcached.registry.segment import open_segment
from kvcached.errors import ConfigError
from kvcached.registry import RegistryError
from waiting import wait_until
from registry_helpers import (  # noqa: F401 (fixtures)
    empty_ipc_dir, ipc_dir, PAGE, PREFIX, REPO, FakeEngine, children, engines, env, fakes, start_fake_child, unique,
)

BAD_NAMES = ["", "a/b", "/etc/passwd", "..", "../x", "a..b", ".hidden", "-x", "x" * 65, "a b", "naïve", "a\0b",
             "a\\b", "semi;colon", 42]


def _segment_bytes(name: str) -> bytes:
    with open(registry.segment_path(name), "rb") as f:
        return f.read()


def _write_segment(name: str, data: bytes, mode: int = 0o600) -> str:
    path = registry.segment_path(name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.write(fd, data)
    os.close(fd)
    return path


def _with_header(data: bytes, **changes) -> bytes:
    """`data` (a segment image) with header fields replaced."""
    keys = ["magic", "version", "size", "name", "device", "backend", "gpu_id", "pid", "ticks", "pidns", "created",
            "virtual", "total", "page", "num_devices"]
    values = dict(zip(keys, record_format.HEADER.unpack_from(data, 0)))
    values.update(changes)
    return record_format.HEADER.pack(*[values[k] for k in keys]) + data[record_format.HEADER.size :]


def _with_heartbeat(data: bytes, heartbeat_ns: int) -> bytes:
    at = record_format.ENGINE_AT
    values = list(record_format.ENGINE.unpack_from(data, at + 8))
    values[3] = heartbeat_ns
    part = record_format.pack_part(0, record_format.ENGINE, tuple(values))
    return data[:at] + part + data[at + len(part) :]


# ---- names ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_names_are_refused_with_what_is_allowed(bad):
    with pytest.raises(ConfigError) as info:
        FakeEngine(bad)
    message = str(info.value)
    assert repr(bad) in message and "A-Z a-z 0-9 . _ -" in message and "'..'" in message
    assert "\n" not in message
    assert not [p for p in os.listdir(registry.shm_dir()) if p.startswith(".kvcached-tmp.") and str(os.getpid()) in p]


def test_default_names_are_unique_per_instance():
    engines = [FakeEngine(None) for _ in range(3)]  # no name: what an engine without KVCACHED_IPC_NAME gets
    names = [e.name for e in engines]
    try:
        assert len(set(names)) == 3 and all(f"-{os.getpid()}-" in n for n in names)
        assert all(registry.read_instance(n).alive for n in names)
    finally:
        for e in engines:
            e.close()
    assert not any(os.path.exists(registry.segment_path(n)) for n in names)


def test_a_live_name_cannot_be_taken_twice(fakes):
    a = fakes()
    with pytest.raises(ConfigError, match=f"{a.name!r} is in use by a live instance \\(pid {os.getpid()}\\)"):
        FakeEngine(a.name)
    assert registry.read_instance(a.name).alive


# ---- format, mode, trust ---------------------------------------------------------------------------------------------


def test_record_holds_exact_figures_and_mode_0600(fakes):
    e = fakes(used=3 * PAGE, premapped=2 * PAGE, limit=10 * PAGE, total=100 * PAGE)
    st = os.stat(registry.segment_path(e.name))
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    r = registry.read_instance(e.name)
    assert (r.status, r.pid, r.device, r.backend, r.format_version) == ("alive", os.getpid(), "cpu", "host", 2)
    assert (r.devices, r.gpu_ids, r.num_devices, r.total_used_bytes, r.total_mapped_bytes) == (
        ("cpu",), ("",), 1, 3 * PAGE, 5 * PAGE)
    assert (r.limit_bytes, r.used_bytes, r.premapped_bytes, r.free_bytes) == (10 * PAGE, 3 * PAGE, 2 * PAGE, 5 * PAGE)
    assert (r.virtual_bytes, r.device_total_bytes, r.page_bytes) == (16 * PAGE, 100 * PAGE, PAGE)
    e.set(used_bytes=12 * PAGE, premapped_bytes=0)
    r = registry.read_instance(e.name)
    assert (r.used_bytes, r.premapped_bytes, r.free_bytes, r.deficit_bytes) == (12 * PAGE, 0, 0, 2 * PAGE)
    data = _segment_bytes(e.name)
    assert data[:8] == b"KVCACHED" and len(data) == registry.RECORD_SIZE


def test_group_mode_0660_and_group_segments_are_trusted(fakes, monkeypatch):
    gid = grp.getgrnam("nogroup").gr_gid
    monkeypatch.setenv("KVCACHED_IPC_GROUP", "nogroup")
    e = fakes()
    st = os.stat(registry.segment_path(e.name))
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
    registry.request_limit(e.name, 5 * PAGE)
    st = os.stat(registry.limit_path(e.name))
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
    # Another user's segment shared through the group is trusted; without the group it is foreign.
    os.chown(registry.segment_path(e.name), 65534, gid)
    assert registry.read_instance(e.name).status == "alive"
    monkeypatch.delenv("KVCACHED_IPC_GROUP")
    assert registry.read_instance(e.name).status == "foreign"
    os.chown(registry.segment_path(e.name), os.geteuid(), gid)


def test_bad_group_is_a_config_error(monkeypatch):
    monkeypatch.setenv("KVCACHED_IPC_GROUP", "no-such-group-kvcached")
    with pytest.raises(ConfigError, match="KVCACHED_IPC_GROUP='no-such-group-kvcached' is invalid"):
        FakeEngine(unique("g"))


def test_foreign_segments_are_listed_never_read_or_changed(fakes):
    mine = fakes()
    image = _segment_bytes(mine.name)
    name = unique("foreign")
    path = _write_segment(name, _with_header(image, name=name.encode(), pid=999999999))  # dead pid
    os.chown(path, 65534, 65534)
    limit = registry.limit_path(name)
    with open(limit, "w") as f:
        f.write("12345\n")
    os.chown(limit, 65534, 65534)
    before = (os.stat(path), _segment_bytes(name))

    (r,) = registry.list_instances([name])
    assert (r.status, r.uid, r.pid, r.alive, r.used_bytes) == ("foreign", 65534, 0, False, 0)
    assert "nobody" in r.reason and r.name in [x.name for x in registry.list_instances()]
    assert registry.read_persisted_limit(name) is None
    with pytest.raises(RegistryError, match="foreign"):
        registry.request_limit(name, PAGE)
    with pytest.raises(RegistryError, match="owned by nobody"):
        registry.delete(name, force=True)
    assert name not in registry.clean_dead()
    with pytest.raises(ConfigError, match="pick another"):
        FakeEngine(name)
    after = (os.stat(path), _segment_bytes(name))
    assert after[1] == before[1]
    assert (after[0].st_ino, after[0].st_mtime_ns) == (before[0].st_ino, before[0].st_mtime_ns)
    assert open(limit).read() == "12345\n"


def test_segments_are_found_by_magic_and_version_never_by_size(fakes):
    image = _segment_bytes(fakes().name)
    bad_magic, old, small, bigger, link = (unique(t) for t in ("magic", "version", "small", "bigger", "link"))
    _write_segment(bad_magic, _with_header(image, magic=b"NOTKVCAC", name=bad_magic.encode()))
    _write_segment(old, _with_header(image, version=1, size=512, name=old.encode())[:512])  # kvcached before TP
    _write_segment(small, b"KVCACHED")
    _write_segment(bigger, _with_header(image, name=bigger.encode()) + b"\0" * 4096)
    os.symlink(registry.segment_path(bigger), registry.segment_path(link))
    records = {r.name: r for r in registry.list_instances([bad_magic, old, small, bigger, link])}
    assert records[bad_magic].status == "invalid" and "bad magic" in records[bad_magic].reason
    assert records[old].status == "invalid"
    assert records[old].reason == "format version 1 (512 bytes); this kvcached reads version 2"
    assert records[small].status == "invalid" and "too small" in records[small].reason
    assert records[bigger].status == "alive" and records[bigger].used_bytes == PAGE  # extra bytes do not matter
    assert records[link].status == "invalid"  # never followed
    # A segment whose name field differs from its file is not trusted either.
    misnamed = unique("misnamed")
    _write_segment(misnamed, image)
    assert "holds the name" in registry.read_instance(misnamed).reason
    with pytest.raises(RegistryError, match="invalid"):
        registry.request_limit(misnamed, PAGE)
    assert registry.clean_dead() == []  # none of them is a dead segment of ours
    for name in (bad_magic, old, small, misnamed):
        assert os.path.exists(registry.segment_path(name))


def test_a_version_1_segment_of_a_dead_process_is_dead_and_its_name_can_be_taken(fakes):
    """After an upgrade, the segment a stopped engine of the old format left is cleaned like any dead one, so the
    engine restarts under its name; a live old-format engine's segment stays invalid (its figures are not read)."""
    image = _segment_bytes(fakes().name)
    dead, live = unique("v1-dead"), unique("v1-live")
    _write_segment(dead, _with_header(image, version=1, size=512, name=dead.encode(), pid=999999999)[:512])
    _write_segment(live, _with_header(image, version=1, size=512, name=live.encode())[:512])  # this process
    records = {r.name: r for r in registry.list_instances([dead, live])}
    reason = "format version 1 (512 bytes); this kvcached reads version 2"
    assert (records[dead].status, records[dead].pid, records[dead].reason, records[dead].format_version) == (
        "dead", 999999999, reason, 1)
    assert (records[dead].used_bytes, records[dead].devices) == (0, ())
    assert (records[live].status, records[live].reason) == ("invalid", reason)
    e = fakes(dead)  # starting under the dead one's name cleans it and takes the name
    r = registry.read_instance(e.name)
    assert (r.status, r.format_version, r.pid) == ("alive", 2, os.getpid())
    assert registry.read_instance(live).status == "invalid"


# ---- tensor parallel: one record, several devices ------------------------------------------------------------------


def test_a_tensor_parallel_record_lists_its_devices_with_per_device_figures(fakes):
    e = fakes(used=3 * PAGE, premapped=PAGE, limit=10 * PAGE, total=100 * PAGE, devices=("cpu", "cpu"))
    data = _segment_bytes(e.name)
    assert len(data) == registry.RECORD_SIZE == 1024
    assert record_format.HEADER.unpack_from(data, 0)[-1] == 2  # the number of devices
    assert data[512:640] == (b"cpu" + b"\0" * 61) * 2 and data[640:] == b"\0" * 384  # rank order; no GPU ids
    r = registry.read_instance(e.name)
    assert (r.status, r.device, r.backend, r.gpu_id, r.devices, r.gpu_ids, r.num_devices) == (
        "alive", "cpu", "host", "", ("cpu", "cpu"), ("", ""), 2)
    # Figures are each device's; the totals count every rank.
    assert (r.limit_bytes, r.used_bytes, r.premapped_bytes, r.free_bytes, r.device_total_bytes) == (
        10 * PAGE, 3 * PAGE, PAGE, 6 * PAGE, 100 * PAGE)
    assert (r.total_used_bytes, r.total_mapped_bytes) == (6 * PAGE, 8 * PAGE)
    d = r.to_dict()
    assert (d["devices"], d["gpu_ids"], d["num_devices"], d["total_used_bytes"], d["total_mapped_bytes"]) == (
        ["cpu", "cpu"], ["", ""], 2, 6 * PAGE, 8 * PAGE)
    e.set(used_bytes=5 * PAGE, premapped_bytes=0)  # the engine part moves; the devices part stays
    r = registry.read_instance(e.name)
    assert (r.devices, r.total_used_bytes, r.total_mapped_bytes) == (("cpu", "cpu"), 10 * PAGE, 10 * PAGE)
    assert _segment_bytes(e.name)[512:] == data[512:]


def test_a_gpu_record_names_each_ranks_gpu_and_stays_readable_after_its_process_dies(children):
    """A real process registers on cuda:0,1 (no CUDA driver is initialised in it, on any machine: the GPU ids are the
    CUDA_VISIBLE_DEVICES entries, as devices.gpu_id_of falls back); killed, its record reads dead with its devices."""
    name = unique("tp-gpu")
    uuids = ("GPU-11111111-2222-3333-4444-555555555555", "GPU-66666666-7777-8888-9999-000000000000")
    proc = start_fake_child(name, pages=2, devices=("cuda:0", "cuda:1"), CUDA_VISIBLE_DEVICES=",".join(uuids))
    children.append(proc)
    r = registry.read_instance(name)
    assert (r.status, r.pid, r.backend, r.device, r.gpu_id) == ("alive", proc.pid, "cuda", "cuda:0", uuids[0])
    assert (r.devices, r.gpu_ids, r.num_devices, r.total_used_bytes) == (("cuda:0", "cuda:1"), uuids, 2, 4 * PAGE)
    proc.kill()
    proc.wait(10)
    r = registry.read_instance(name)
    assert (r.status, r.devices, r.gpu_ids, r.used_bytes) == ("dead", ("cuda:0", "cuda:1"), uuids, 2 * PAGE)

    other = unique("tp-gpu-index")  # without CUDA_VISIBLE_DEVICES: the CUDA index
    proc = start_fake_child(other, devices=("cuda:1", "cuda:0"), CUDA_VISIBLE_DEVICES="")
    children.append(proc)
    r = registry.read_instance(other)
    assert (r.devices, r.gpu_ids, r.device, r.gpu_id) == (("cuda:1", "cuda:0"), ("1", "0"), "cuda:1", "1")


@pytest.mark.parametrize("devices, message", [
    (("cpu",) * 9, "1 to 8 devices (one per tensor-parallel rank); this one has 9: cpu, cpu, cpu, cpu, cpu"),
    ((), "1 to 8 devices (one per tensor-parallel rank); this one has 0"),
    (("cuda:0", "cpu"), "an instance's devices must all be GPUs or all the host, got cuda:0, cpu"),
])
def test_a_record_of_too_many_or_mixed_devices_is_refused_with_the_count(devices, message):
    name = unique("refused")
    with pytest.raises(ConfigError) as info:
        FakeEngine(name, devices=devices)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not os.path.exists(registry.segment_path(name))
    assert [p for p in os.listdir(registry.shm_dir()) if p.startswith(".kvcached-tmp.")] == []


def test_a_record_with_a_bad_device_count_is_invalid(fakes):
    image = _segment_bytes(fakes(devices=("cpu", "cpu")).name)
    none, nine = unique("no-devices"), unique("nine-devices")
    _write_segment(none, _with_header(image, name=none.encode(), num_devices=0))
    _write_segment(nine, _with_header(image, name=nine.encode(), num_devices=9))
    records = {r.name: r for r in registry.list_instances([none, nine])}
    assert (records[none].status, records[none].reason) == ("invalid", "lists 0 devices (1 to 8 are possible)")
    assert (records[nine].status, records[nine].reason) == ("invalid", "lists 9 devices (1 to 8 are possible)")
    assert (records[nine].devices, records[nine].num_devices, records[nine].total_used_bytes) == ((), 0, 0)


# ---- limits --------------------------------------------------------------------------------------------------------


def test_each_requested_limit_is_applied_once_in_order_while_idle(fakes):
    """The engine is idle (no publish): its watcher alone applies each request, once, in order."""
    e = fakes(used=2 * PAGE, premapped=4 * PAGE)
    limits = [8 * PAGE, 3 * PAGE, 0, 5 * PAGE, 2 * PAGE]
    for i, limit in enumerate(limits):
        result = registry.request_limit(e.name, limit, wait_s=0)
        assert result.generation == i + 1 and result.applied is None
        assert wait_until(lambda: len(e.applied) == i + 1, timeout=30)
    assert [limit for _, limit in e.applied] == limits
    r = wait_until(lambda: (x := registry.read_instance(e.name)).applied_generation == 5 and x, timeout=30)
    assert (r.limit_bytes, r.requested_limit, r.persisted_limit, r.requested_generation) == (2 * PAGE,) * 3 + (5,)


def test_request_limit_waits_for_the_engine_and_reports(fakes):
    e = fakes()
    result = registry.request_limit(e.name, 7 * PAGE, wait_s=30)
    assert result.applied is True and not result.apply_error and result.latency_s >= 0
    assert registry.read_instance(e.name).limit_bytes == 7 * PAGE
    result = registry.request_limit(e.name, None, wait_s=30)  # restoring "no limit" works as well
    assert result.applied is True and e.applied[-1][1] is None
    assert registry.read_persisted_limit(e.name) is None and not os.path.exists(registry.limit_path(e.name))
    assert registry.read_instance(e.name).requested_limit is None
    with pytest.raises(ConfigError, match="a limit must be a number of bytes >= 0, got -1"):
        registry.request_limit(e.name, -1)
    with pytest.raises(RegistryError, match="unknown instance"):
        registry.request_limit(unique("nobody-here"), PAGE)


def test_a_failing_apply_is_logged_and_the_watcher_goes_on(fakes, caplog):
    e = fakes(fail=True)
    with caplog.at_level(logging.ERROR, logger="kvcached"):
        logging.getLogger("kvcached").propagate = True
        try:
            result = registry.request_limit(e.name, 3 * PAGE)
        finally:
            logging.getLogger("kvcached").propagate = False
    assert result.apply_error and not result.applied
    assert any("applying the limit" in rec.getMessage() for rec in caplog.records)
    assert registry.read_instance(e.name).apply_error
    e.fail = False
    result = registry.request_limit(e.name, 4 * PAGE)
    assert result.applied and registry.read_instance(e.name).limit_bytes == 4 * PAGE


def test_operator_limit_survives_restart_unless_engine_has_its_own():
    name = unique("persist")
    e = FakeEngine(name)
    registry.request_limit(name, 6 * PAGE)
    e.close()
    assert not os.path.exists(registry.segment_path(name))
    assert registry.read_persisted_limit(name) == 6 * PAGE  # close() keeps the operator's limit

    e = FakeEngine(name)  # no limit of its own: the operator's is applied before open() returns
    try:
        assert [limit for _, limit in e.applied] == [6 * PAGE]
        r = registry.read_instance(name)
        assert (r.limit_bytes, r.persisted_limit) == (6 * PAGE, 6 * PAGE)
    finally:
        e.close()

    e = FakeEngine(name, explicit_limit=2 * PAGE, limit=2 * PAGE)  # its own limit wins
    try:
        time.sleep(0.1)
        assert e.applied == [] and registry.read_instance(name).limit_bytes == 2 * PAGE
    finally:
        e.close()

    assert registry.delete(name) is None  # no segment left; the saved limit goes
    assert not os.path.exists(registry.limit_path(name))
    with pytest.raises(RegistryError, match="unknown instance"):
        registry.delete(name)


def test_concurrent_writers_lose_no_update(fakes, children):
    """An engine publishing as fast as it can while two kvctl processes set limits: nothing torn, nothing lost.

    Every figure the engine publishes has premapped = (used / 4096 mod 7) * 4096, so a torn read shows.
    """
    e = fakes()
    stop = threading.Event()
    published = []

    def publisher():
        i = 0
        while not stop.is_set():
            i += 1
            e.set(used_bytes=i * 4096, premapped_bytes=(i % 7) * 4096)
        published.append(i)

    torn = []

    def reader():
        while not stop.is_set():
            r = registry.read_instance(e.name)
            if r.premapped_bytes != (r.used_bytes // 4096 % 7) * 4096:
                torn.append(r)

    per_writer = 150
    writer = (
        "import sys\nfrom kvcached import registry\nname, base = sys.argv[1], int(sys.argv[2])\nbad = 0\n"
        "for k in range({n}):\n"
        "    registry.request_limit(name, base + k, wait_s=0)\n"
        "    r = registry.read_instance(name)\n"
        "    bad += r.premapped_bytes != (r.used_bytes // 4096 % 7) * 4096\n"
        "print(bad)\n"
    ).format(n=per_writer)
    threads = [threading.Thread(target=publisher), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    try:
        procs = [subprocess.Popen([sys.executable, "-c", writer, e.name, str(base)], stdout=subprocess.PIPE, text=True,
                                  env=env(), cwd=REPO) for base in (10**9, 2 * 10**9)]
        children.extend(procs)
        outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert [p.returncode for p in procs] == [0, 0] and outputs == ["0", "0"], outputs
    assert torn == []
    r = registry.read_instance(e.name)
    last = published[0]
    # The engine's last write and kvctl's every increment are both there.
    assert (r.used_bytes, r.premapped_bytes) == (last * 4096, (last % 7) * 4096)
    assert r.requested_generation == 2 * per_writer
    assert r.requested_limit in (10**9 + per_writer - 1, 2 * 10**9 + per_writer - 1)
    assert r.persisted_limit == r.requested_limit  # saved and requested under one lock: they agree
    assert wait_until(lambda: registry.read_instance(e.name).applied_generation == 2 * per_writer, timeout=30)
    assert e.applied[-1][1] == r.requested_limit


def test_publish_writes_the_figures_without_a_syscall_or_lock_file(fakes):
    """publish() is called under the page allocator's lock: it must only write the mapping (no file lock is taken,
    so a kvctl holding the segment's flock cannot stall it)."""
    e = fakes()
    with open_segment(e.name, write=True) as seg:
        assert seg.lock()  # an operator holds the flock meanwhile
        for used in range(1, 2001):  # e.set publishes, and keeps what the watcher's own refresh reads the same
            e.set(used_bytes=used * PAGE)
        assert registry.read_instance(e.name).used_bytes == 2000 * PAGE
        seg.unlock()


def test_heartbeat_moves_while_idle(fakes):
    e = fakes()

    def heartbeat() -> int:
        with open_segment(e.name) as seg:
            return record_format.read_part(seg.mm, record_format.ENGINE_AT, record_format.ENGINE)[3]

    first = heartbeat()
    assert wait_until(lambda: heartbeat() > first, timeout=30)  # no publish() meanwhile: the watcher wrote it


# ---- liveness and cleanup ------------------------------------------------------------------------------------------


def test_reused_pid_and_other_namespaces(fakes):
    image = _segment_bytes(fakes().name)
    ticks = start_ticks(os.getpid())
    same, reused, other_ns_fresh, other_ns_stale = (unique(t) for t in ("same", "reused", "nsfresh", "nsstale"))
    _write_segment(same, _with_header(image, name=same.encode()))
    _write_segment(reused, _with_header(image, name=reused.encode(), ticks=ticks + 1))  # our pid, another start
    now = time.monotonic_ns()
    _write_segment(other_ns_fresh, _with_heartbeat(_with_header(image, name=other_ns_fresh.encode(), pid=1,
                                                                pidns=1), now))
    _write_segment(other_ns_stale, _with_heartbeat(_with_header(image, name=other_ns_stale.encode(), pid=os.getpid(),
                                                                pidns=1), now - int(10e9)))
    status = {r.name: r.status for r in registry.list_instances([same, reused, other_ns_fresh, other_ns_stale])}
    assert status == {same: "alive", reused: "dead", other_ns_fresh: "alive", other_ns_stale: "dead"}
    assert set(registry.clean_dead()) >= {reused, other_ns_stale}
    assert os.path.exists(registry.segment_path(same)) and os.path.exists(registry.segment_path(other_ns_fresh))


def test_killed_instance_is_dead_and_the_next_start_removes_only_it(fakes, children):
    keep = fakes()
    dead_name, other_name = unique("killed"), unique("other")
    victim = start_fake_child(dead_name, pages=3)
    survivor = start_fake_child(other_name)
    children.extend([victim, survivor])
    victim.kill()
    victim.wait(10)
    r = registry.read_instance(dead_name)
    assert (r.status, r.alive, r.pid, r.used_bytes) == ("dead", False, victim.pid, 3 * PAGE)
    # An invalid file and another user's dead segment under the prefix must survive the cleanup.
    invalid = unique("junk")
    _write_segment(invalid, b"\xff" * 600)
    foreign = unique("foreign-dead")
    path = _write_segment(foreign, _with_header(_segment_bytes(dead_name), name=foreign.encode()))
    os.chown(path, 65534, 65534)
    stats_before = {n: os.stat(registry.segment_path(n)) for n in (keep.name, other_name, invalid, foreign)}

    fakes()  # the next instance to start cleans up
    assert not os.path.exists(registry.segment_path(dead_name))
    for n, st in stats_before.items():
        after = os.stat(registry.segment_path(n))
        assert (after.st_ino, after.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), n
    assert registry.read_instance(other_name).alive and registry.read_instance(keep.name).alive


def test_a_process_that_exits_without_shutdown_leaves_no_segment(engines):
    """open_cache() registers; the process then returns from main without shutdown(): the record goes at interpreter
    exit (not left behind as dead), and the operator's saved limit for the name stays."""
    (engine,) = engines("no-shutdown")
    registry.request_limit(engine.name, 2 * PAGE, wait_s=30)
    assert registry.read_instance(engine.name).alive
    assert engine.cmd("leave") == {"bye": True}
    assert engine.proc.wait(60) == 0
    assert not os.path.exists(registry.segment_path(engine.name))
    assert engine.name not in [r.name for r in registry.list_instances()]
    assert registry.read_persisted_limit(engine.name) == 2 * PAGE


def test_close_removes_only_its_own_segment():
    e = FakeEngine(unique("replaced"))
    path = registry.segment_path(e.name)
    os.unlink(path)  # e.g. `kvctl delete --force`, then another instance took the name
    other = FakeEngine(e.name)
    try:
        e.close()
        assert registry.read_instance(other.name).alive
    finally:
        other.close()
    assert not os.path.exists(path)


def test_delete_refuses_live_instances_without_force(fakes, caplog):
    e = fakes()
    with pytest.raises(RegistryError, match="alive"):
        registry.delete(e.name)
    registry.request_limit(e.name, PAGE)
    removed = registry.delete(e.name, force=True)
    assert removed.alive and not os.path.exists(registry.segment_path(e.name))
    assert not os.path.exists(registry.limit_path(e.name))


def test_segment_unchanged_by_a_reader_mapping(fakes):
    """kvcached's own readers (open_segment, as list/read use) map the segment read-only: a stray write through their
    mapping raises, and the record is unchanged."""
    e = fakes()
    before = _segment_bytes(e.name)[:256]
    seg = open_segment(e.name)
    try:
        with pytest.raises(TypeError, match="read-only|readonly"):
            seg.mm[0:8] = b"XXXXXXXX"
        assert seg.record().alive
    finally:
        seg.close()
    assert _segment_bytes(e.name)[:256] == before
