"""The ways out of a recorded session that esr closes: filling the task
table for everyone, reaching into a process outside the session (ptrace,
process_vm_writev), working through io_uring instead of syscalls, and the
records a session leaves behind saying so."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers import ESR, Daemon, commands, listener, require_bpf, sid_from_stderr


@pytest.fixture
def small_table(tmp_path):
    require_bpf()
    d = Daemon(tmp_path)
    with d.config.open("a") as f:
        f.write("max_tracked_tasks: 256\nmax_tasks_per_session: 32\n")
    d.start()
    yield d
    d.stop()


def test_one_session_cannot_take_the_task_table_from_the_others(small_table):
    d = small_table
    spawn = "for i in $(seq 300); do sleep 6 & done; echo ready; wait"
    hog = subprocess.Popen(
        [ESR, "run", "--config", str(d.config), "--", "sh", "-c", spawn],
        env=d.esr.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert hog.stdout.readline() == b"ready\n"
        # 300 sleeping children: more than the whole table, were it not shared.
        other = d.esr(
            "run", "--config", str(d.config), "--", "sh", "-c",
            "for i in $(seq 20); do /bin/true; done",
        )  # fmt: skip
    finally:
        _, err = hog.communicate(timeout=60)
    hog_sid, other_sid = sid_from_stderr(err), sid_from_stderr(other.stderr)
    d.wait_sids_closed(hog_sid, other_sid)

    ran = [c for c in commands(d.esr.events(other_sid)) if c["path"] == "/bin/true"]
    assert len(ran) == 20
    rows = {r["sid"]: r for r in d.esr.sessions()}
    assert rows[other_sid]["lost"]["processes"] == 0

    # The hog kept its share (its first children are recorded); the rest is
    # counted as lost, where its reviewer looks: LOST, session.lost, the end.
    hog_events = d.esr.events(hog_sid)
    assert 16 <= len([c for c in commands(hog_events) if c["path"].endswith("sleep")]) <= 32
    untracked = sum(e.get("untracked_forks", 0) for e in hog_events if e["event"] == "session.lost")
    [end] = [e for e in hog_events if e["event"] == "session.end"]
    assert untracked == end["untracked_forks"] >= 300 - 32
    assert rows[hog_sid]["lost"]["processes"] == untracked and rows[hog_sid]["damaged"] is None
    listing = d.esr("sessions").stdout.decode().splitlines()
    [line] = [x for x in listing if x.startswith(hog_sid)]
    _sid, _start, _end, _who, _cmd, _disk, _net, lost, *_command = line.split()
    assert int(lost) == untracked


@pytest.fixture
def victim():
    """A process in no session, as a daemon of the host would be."""
    proc = subprocess.Popen(["/usr/bin/python3", "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_code_injected_with_gdb_into_a_process_outside_is_recorded(esr, victim, tmp_path):
    proof = tmp_path / "injected"
    sid = esr.record(
        "gdb", "-p", str(victim.pid), "-batch", "-ex", f'call (int)system("id > {proof}")'
    )
    assert proof.read_text().startswith("uid=")
    events = esr.events(sid)
    attach = [e for e in events if e["event"] == "session.ptrace" and e["request"] == "attach"]
    assert attach, "gdb's attach was not recorded"
    first = attach[0]
    assert first["target_tgid"] == victim.pid and first["target_program"] == "python3"
    assert first["return_code"] == 0 and first["followed"] is True
    # What the injected call ran is in the session, under the victim.
    ran = {c["path"]: c for c in commands(events) if c["return_code"] == 0}
    assert ran["/bin/sh"]["ppid"] == victim.pid and "/usr/bin/id" in ran
    # gdb detached at the end: the victim left the session again.
    detach = [e for e in events if e["event"] == "session.ptrace" and e["request"] == "detach"]
    assert any(e.get("left") for e in detach)
    text = esr("show", sid, "--format", "text").stdout.decode()
    assert "attach " in text and "(python3)" in text and "[now recorded here]" in text
    audit = [json.loads(x) for x in (esr.data_dir / "log" / "events.log").read_text().splitlines()]
    logged = [e for e in audit if e["event"] == "session.ptrace" and e["request"] == "attach"]
    assert logged and logged[0]["code"] == "E4400W" and logged[0]["sid"] == sid


def test_a_process_written_with_process_vm_writev_is_recorded(esr, victim):
    # Write one byte of the victim's own memory back to it: harmless, and
    # enough for the kernel to call it a write.
    writer = (
        "import ctypes, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "pid = int(sys.argv[1])\n"
        "maps = open(f'/proc/{pid}/maps').read().splitlines()\n"
        "addr = int(next(m for m in maps if ' rw-p ' in m).split('-')[0], 16)\n"
        "class iovec(ctypes.Structure):\n"
        "    _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]\n"
        "buf = ctypes.create_string_buffer(1)\n"
        "local, remote = iovec(ctypes.addressof(buf), 1), iovec(addr, 1)\n"
        "libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)\n"
        "n = libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)\n"
        "assert n == 1, ctypes.get_errno()\n"
    )
    # The victim is in the session from then on, until it exits: end it once
    # the write is done, or the session would last as long as it does.
    writer += "print('written', flush=True)\n"
    run = esr.popen(
        "run", "--", "/usr/bin/python3", "-c", writer, str(victim.pid),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert run.stdout.readline() == b"written\n"
    victim.kill()
    _, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    events = esr.events(sid_from_stderr(err))
    [write] = [e for e in events if e["event"] == "session.ptrace"]
    assert write["request"] == "process_vm_writev" and write["target_pid"] == victim.pid
    assert write["return_code"] == 1 and write["followed"] is True


@pytest.fixture(scope="module")
def uring_ops(tmp_path_factory):
    out = tmp_path_factory.mktemp("uring") / "uring_ops"
    source = Path(__file__).parent / "programs" / "uring_ops.c"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(source), "-luring"], check=True)
    return out


@pytest.mark.parametrize("sqpoll", [False, True])
def test_io_uring_rings_and_what_they_run_are_recorded(esr, uring_ops, sqpoll):
    srv = listener()
    port = srv.getsockname()[1]
    sid = esr.record(str(uring_ops), "/etc/hostname", str(port), *(["sqpoll"] if sqpoll else []))
    srv.close()
    events = esr.events(sid)
    rings = [e for e in events if e["event"] == "session.io_uring"]
    [setup] = [e for e in rings if e["operation"] == "setup"]
    [me] = [c for c in commands(events) if c["path"] == str(uring_ops)]
    assert setup["pid"] == setup["ring_pid"] == me["pid"] and setup["sq_entries"] == 8
    assert bool(setup["setup_flags"] & 0x2) == sqpoll  # IORING_SETUP_SQPOLL
    ran = {e["operation"]: e for e in rings if e["operation"] != "setup"}
    assert {"openat", "connect"} <= set(ran) and ran["openat"]["opcode"] == 18
    assert all(e["ring_fd"] == setup["ring_fd"] for e in ran.values())
    # Neither went through the syscalls: io_uring is the only trace of them.
    assert not [e for e in esr.events(sid, "disk") if e["path"] == "/etc/hostname"]
    text = esr("show", sid, "--format", "text").stdout.decode()
    assert "io_uring openat on ring fd" in text
