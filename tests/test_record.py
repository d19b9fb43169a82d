"""What `esr run` records, for real: the BPF programs are loaded, real
processes run, and the assertions are on the events `esr show` prints."""

from __future__ import annotations

import base64
import json
import os
import pty
import select
import shutil
import socket
import subprocess
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from esr import loader, recording, seal
from esr.config import Config
from esr.datadir import DataDir
from esr.recorder import Recorder
from helpers import ESR, ROOT, Esr, commands, executed, free_port, listener, sid_from_stderr

pytestmark = pytest.mark.usefixtures("bpf")

PY = "/usr/bin/python3"


def opened(events, path: str) -> list[dict]:
    return [e for e in events if e["event"] == "session.disk" and e["path"] == path]


def ran(events, program: str) -> list[dict]:
    return [
        e for e in commands(events) if e["return_code"] == 0 and e["path"].endswith("/" + program)
    ]


# --- session.disk -----------------------------------------------------------------


def test_ls_la_opens_the_user_and_group_databases(esr):
    sid = esr.record("ls", "-la", "/")
    events = esr.events(sid)
    [ls] = ran(events, "ls")
    assert ls["argv"] == ["-la", "/"]
    for path in ("/etc/passwd", "/etc/group"):
        opens = [e for e in opened(events, path) if e["pid"] == ls["pid"]]
        assert opens, f"ls did not open {path}"
        assert all(e["return_code"] >= 0 and e["program"] == "ls" for e in opens)
        assert all(e["code"] == "T4001I" and e["sid"] == sid for e in opens)


@pytest.mark.parametrize(
    "call, path, flags, result",
    [
        ("os.open(p, os.O_RDONLY)", "/etc/hostname", os.O_RDONLY, "fd"),
        (
            "os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)",
            "{tmp}/new",
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
            "fd",
        ),
        ("os.open(p, os.O_RDONLY)", "/nonexistent/esr-test", os.O_RDONLY, -2),
        ("os.open(p, os.O_RDONLY)", "relative/path/as/passed", os.O_RDONLY, -2),
    ],
)
def test_open_records_path_flags_and_result(esr, tmp_path, call, path, flags, result):
    path = path.format(tmp=tmp_path)
    script = f"import os\np = {path!r}\ntry:\n    {call}\nexcept OSError:\n    pass\n"
    sid = esr.record(PY, "-c", script)
    [e] = [e for e in opened(esr.events(sid), path) if e["program"].startswith("python")]
    assert e["flags"] & 0o7777777 & ~os.O_CLOEXEC == flags
    if result == "fd":
        assert e["return_code"] >= 3
    else:
        assert e["return_code"] == result


def test_creat_and_openat2_are_recorded(esr, tmp_path):
    target = tmp_path / "created"
    script = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"libc.creat({str(target).encode()!r}, 0o600)\n"
        "class How(ctypes.Structure):\n"
        "    _fields_ = [('flags', ctypes.c_uint64), ('mode', ctypes.c_uint64),\n"
        "                ('resolve', ctypes.c_uint64)]\n"
        "how = How(os.O_RDONLY, 0, 0)\n"
        "libc.syscall(437, -100, b'/etc/hostname', ctypes.byref(how), ctypes.sizeof(how))\n"
    )
    events = esr.events(esr.record(PY, "-c", script))
    [creat] = opened(events, str(target))
    assert creat["flags"] == os.O_CREAT | os.O_WRONLY | os.O_TRUNC and creat["return_code"] >= 3
    assert [e for e in opened(events, "/etc/hostname") if e["flags"] == os.O_RDONLY]


# --- session.command ---------------------------------------------------------------


def test_obfuscated_command_is_recorded_decoded(esr):
    hidden = base64.b64encode(b"cat /etc/hostname\n").decode()
    sid = esr.record("sh", "-c", f"echo {hidden} | base64 -d | sh")
    events = esr.events(sid)
    assert ["/usr/bin/cat", "/etc/hostname"] in executed(events)
    [base64_cmd] = ran(events, "base64")
    assert base64_cmd["argv"] == ["-d"]


def test_every_command_of_a_script_is_recorded(esr, tmp_path):
    script = tmp_path / "deploy.sh"
    script.write_text("#!/bin/sh\nid -u\nuname -r\nhead -c1 /etc/hostname\n")
    script.chmod(0o755)
    events = esr.events(esr.record(str(script)))
    run = executed(events)
    assert ["/usr/bin/id", "-u"] in run
    assert ["/usr/bin/uname", "-r"] in run
    assert ["/usr/bin/head", "-c1", "/etc/hostname"] in run
    # The script itself, as its caller ran it, and what the kernel ran for it.
    [first] = [c for c in commands(events) if c["path"] == str(script)]
    assert first["argv"] == [] and first["return_code"] == 0
    assert first["interpreter"] == ["/bin/sh"] and first["exe"] == os.path.realpath("/bin/sh")


def test_an_exec_names_the_binary_that_runs_behind_a_symlink_or_a_memfd(esr, tmp_path):
    link = tmp_path / "innocent"
    link.symlink_to("/usr/bin/id")
    fileless = tmp_path / "fileless.py"
    fileless.write_text(
        "import os\n"
        "fd = os.memfd_create('sneaky')\n"
        "os.write(fd, open('/usr/bin/true', 'rb').read())\n"
        "os.execv(f'/proc/self/fd/{fd}', ['true'])\n"
    )
    events = esr.events(esr.record("sh", "-c", f"{link} -u; {PY} {fileless}"))
    [id_] = [c for c in commands(events) if c["path"] == str(link)]
    assert id_["exe"] == "/usr/bin/id" and id_["exe_ino"] == os.stat("/usr/bin/id").st_ino
    [memfd] = [c for c in commands(events) if c["path"].startswith("/proc/self/fd/")]
    assert memfd["memfd"] is True and memfd["exe"] == "memfd:sneaky"
    assert memfd["return_code"] == 0
    text = esr("show", events[0]["sid"], "--format", "text").stdout.decode()
    assert "[/usr/bin/id]" in text and "[memfd memfd:sneaky]" in text


def test_a_binary_deeper_than_kept_is_named_by_its_tail(esr, tmp_path):
    deep = tmp_path.joinpath(*["d"] * 40)
    deep.mkdir(parents=True)
    binary = deep / "tool"
    shutil.copy("/usr/bin/true", binary)
    events = esr.events(esr.record(str(binary)))
    [run] = [c for c in commands(events) if c["path"] == str(binary)]
    assert run["return_code"] == 0 and run["exe_truncated"] is True
    assert run["exe"].startswith(".../d/") and run["exe"].endswith("/d/d/tool")
    assert str(binary).endswith(run["exe"][3:])


def test_failed_exec_of_a_missing_program(esr):
    r = esr("run", "--", "sh", "-c", "/no/such/program --flag; exit 0")
    events = esr.events(sid_from_stderr(r.stderr))
    [failed] = [c for c in commands(events) if c["path"] == "/no/such/program"]
    assert failed["return_code"] == -2
    assert failed["argv"] == ["--flag"]


def test_exec_denied_is_recorded_with_eacces(esr, tmp_path):
    script = tmp_path / "not-executable"
    script.write_text("echo hi\n")
    script.chmod(0o644)
    sid = esr.record(
        PY, "-c", f"import os\ntry: os.execv({str(script)!r}, ['x', 'arg'])\nexcept OSError: pass"
    )
    [denied] = [c for c in commands(esr.events(sid)) if c["path"] == str(script)]
    assert denied["return_code"] == -13 and denied["argv"] == ["arg"]


def test_command_identity_fields(esr):
    sid = esr.record("sh", "-c", "setpriv --reuid=65534 --regid=65534 --clear-groups id -u")
    events = esr.events(sid)
    [ident] = ran(events, "id")
    [setpriv] = ran(events, "setpriv")
    assert ident["unix_uid"] == 65534 and ident["unix_gid"] == 65534
    assert setpriv["unix_uid"] == 0
    assert ident["pid"] == setpriv["pid"]  # setpriv execs id in place
    [sh] = ran(events, "sh")
    assert setpriv["ppid"] == sh["pid"]
    assert all(isinstance(c["cgroup_id"], int) and c["cgroup_id"] > 0 for c in commands(events))
    assert ident["program"] == "id" and ident["code"] == "T4000I"


def _run_in_pty(esr, lines: list[bytes]) -> str:
    """Drive an interactive `esr run -- bash` through a pseudo-terminal."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(
            ESR, [ESR, "run", "--", "bash", "--norc", "--noprofile", "-i"], dict(esr.env, PS1="$ ")
        )
    output = b""
    try:
        for line in lines:
            os.write(fd, line)
            time.sleep(0.3)
        deadline = time.time() + 30
        while time.time() < deadline:
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                output += chunk
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output
    return sid_from_stderr(output.replace(b"\r\n", b"\n"))


def test_commands_typed_after_stty_minus_echo_are_recorded(esr):
    sid = _run_in_pty(
        esr,
        [
            b"stty -echo\n",
            b"cat /etc/hostname\n",
            b"printf secret-%s\\\\n typed\n",
            b"stty echo\n",
            b"exit\n",
        ],
    )
    events = esr.events(sid)
    run = executed(events)
    assert ["/usr/bin/stty", "-echo"] in run
    assert ["/usr/bin/cat", "/etc/hostname"] in run
    end = [e for e in events if e["event"] == "session.end"][-1]
    assert end["interactive"] is True


# --- argv ------------------------------------------------------------------------------

ODD_ARGS = [
    b"with spaces in it",
    b"line one\nline two",
    b"\xff\xfe invalid utf-8 \xc3\x28",
    b"\x1b[31mred\x1b[0m \x1b]0;title\x07",
    b'tab\there, nul-free, quote " and backslash \\',
    "unicode caf\u00e9 \u2603".encode(),
    b"",
]


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([b"arg%d" % i for i in range(200)], id="200-arguments"),
        pytest.param([b"x" * 10240], id="10KiB-argument"),
        pytest.param(ODD_ARGS, id="spaces-newlines-invalid-utf8-escapes"),
    ],
)
def test_argv_round_trips_exactly(esr, args):
    r = esr("run", "--", "/bin/true", *args)
    sid = sid_from_stderr(r.stderr)
    raw = esr("show", sid, "--type", "command").stdout
    # JSON-escaped, never raw: ASCII only, no control bytes but line ends.
    assert all(b < 0x80 for b in raw)
    assert not any(b < 0x20 for b in raw.replace(b"\n", b""))
    [true] = [e for e in map(json.loads, raw.splitlines()) if e["path"] == "/bin/true"]
    if "argv_base64" in true:  # some are not UTF-8: U+FFFD in argv, the bytes here
        assert [base64.b64decode(a) for a in true["argv_base64"]] == args
    else:
        assert [a.encode() for a in true["argv"]] == args
    assert "argv_truncated" not in true
    # The text view escapes too.
    text = esr("show", sid, "--format", "text").stdout
    assert b"\x1b" not in text and b"\xff" not in text


def test_argv_beyond_the_limit_says_what_was_cut(esr):
    args = [b"y" * 1000 for _ in range(40)]  # 40 000 bytes, more than the 16 KiB kept
    sid = sid_from_stderr(esr("run", "--", "/bin/true", *args).stderr)
    [true] = [c for c in commands(esr.events(sid)) if c["path"] == "/bin/true"]
    assert true["argv_truncated"] is True
    assert sum(len(a) + 1 for a in true["argv"]) >= 16 * 1024
    # Whole arguments, then a cut one: the event counts what is missing.
    assert all(a == "y" * 1000 for a in true["argv"][:-1])
    assert true["argv"][-1] == "y" * len(true["argv"][-1])
    assert true["argv_cut_args"] + len(true["argv"]) == 40
    block = len(b"/bin/true\0") + 40 * 1001
    assert true["argv_cut_bytes"] == block - 20480


# --- session.network --------------------------------------------------------------------

CONNECT = (
    "import socket, sys\n"
    "fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\n"
    "s = socket.socket(fam, socket.SOCK_STREAM)\n"
    "s.setblocking(sys.argv[3] == 'blocking')\n"
    "err = s.connect_ex((sys.argv[1], int(sys.argv[2])))\n"
    "if sys.argv[3] != 'blocking':\n"
    "    import select; select.select([], [s], [], 5)\n"
    "    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)\n"
    "print('local', s.getsockname()[1], 'err', err)\n"
)


@pytest.mark.parametrize("mode", ["blocking", "nonblocking"])
@pytest.mark.parametrize(
    "family, host, version",
    [
        (socket.AF_INET, "127.0.0.1", 4),
        (socket.AF_INET6, "::1", 6),
    ],
)
def test_connect_to_a_listener(esr, family, host, version, mode):
    srv = listener(family, host)
    port = srv.getsockname()[1]
    r = esr("run", "--", PY, "-c", CONNECT, host, str(port), mode)
    local_port = int(r.stdout.split()[1])
    [net] = esr.events(sid_from_stderr(r.stderr), "network")
    srv.close()
    assert net["code"] == "T4002I"
    assert (net["dst_addr"], net["dst_port"], net["version"]) == (host, port, version)
    assert (net["src_addr"], net["src_port"]) == (host, local_port)
    assert (net["operation"], net["action"], net["return_code"]) == (0, 0, 0)
    assert net["program"].startswith("python")


@pytest.mark.parametrize("mode", ["blocking", "nonblocking"])
@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_refused_connect_is_recorded_with_its_errno(esr, family, host, mode):
    port = free_port(family, host)
    r = esr("run", "--", PY, "-c", CONNECT, host, str(port), mode)
    assert r.stdout.split()[-1] == b"111"
    [net] = esr.events(sid_from_stderr(r.stderr), "network")
    assert (net["dst_addr"], net["dst_port"]) == (host, port)
    assert net["return_code"] == -111
    assert net["src_port"] > 0


def test_udp_and_unix_connects_are_not_network_events(esr, tmp_path):
    script = (
        "import socket\n"
        "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).connect(('127.0.0.1', 53))\n"
        "u = socket.socket(socket.AF_UNIX)\n"
        f"u.connect_ex({str(tmp_path / 'none.sock')!r})\n"
    )
    assert esr.events(esr.record(PY, "-c", script), "network") == []


# --- membership ------------------------------------------------------------------------


def test_double_forked_daemon_is_recorded_after_the_shell_exits(esr, tmp_path):
    marker = tmp_path / "daemon-was-here"
    r = esr(
        "run",
        "--",
        "sh",
        "-c",
        f"setsid sh -c 'sleep 0.5; touch {marker}' </dev/null >/dev/null 2>&1 & "
        f"nohup sh -c 'sleep 0.3; head -c1 /etc/hostname' >/dev/null 2>&1 & exit 0",
    )
    assert marker.exists()
    assert b"tasks it left running" in r.stderr
    events = esr.events(sid_from_stderr(r.stderr))
    assert ["/usr/bin/touch", str(marker)] in executed(events)
    assert ["/usr/bin/head", "-c1", "/etc/hostname"] in executed(events)
    assert opened(events, str(marker))
    leave = [e for e in events if e["event"] == "session.leave"]
    assert leave and leave[0]["live_tasks"] > 0
    assert events[-1]["event"] == "session.end" and events[-1]["reason"] == "exited"


@pytest.mark.parametrize("raw", [True, False], ids=["raw tracepoints", "tracepoints"])
def test_forks_execs_and_exits_are_followed_through_either_hook(tmp_path, raw):
    if raw and (why := loader.raw_tracepoints()):
        pytest.skip(f"this kernel refuses raw tracepoints: {why}")
    config = Config(data_dir=str(tmp_path / "data"))
    probe = loader.load(config, raw=raw)
    assert probe.raw_tracepoints == raw
    recorder = Recorder(config, probe, DataDir(config.data_dir))
    try:
        shell = subprocess.Popen(
            [
                "/usr/bin/sh",
                "-c",
                "read go; /usr/bin/sh -c '/usr/bin/head -c1 /etc/hostname' & wait",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )
        session = recorder.open_session(login="t", user="t", seed_pid=shell.pid)
        shell.communicate(b"go\n", timeout=30)
        recorder.flush()
        # Every thread's exit was seen: the session ended with its last one.
        assert session.sid not in recorder.registry.by_sid
    finally:
        recorder.close()
    events = Esr(tmp_path / "data").events(session.sid)
    assert ["/usr/bin/sh", "-c", "/usr/bin/head -c1 /etc/hostname"] in executed(events)
    assert ["/usr/bin/head", "-c1", "/etc/hostname"] in executed(events)
    assert events[-1]["event"] == "session.end" and events[-1]["reason"] == "exited"


def _cgroup2() -> Path:
    for line in open("/proc/self/mounts"):
        fields = line.split()
        if fields[2] == "cgroup2":
            return Path(fields[1])
    pytest.skip("no cgroup v2 mount")


def test_leaving_the_cgroup_does_not_escape_recording(esr):
    escape = _cgroup2() / f"esr-escape-{uuid.uuid4().hex[:8]}"
    escape.mkdir()
    try:
        cgroup_id = escape.stat().st_ino
        sid = esr.record("sh", "-c", f"echo $$ > {escape}/cgroup.procs && cat /etc/hostname")
    finally:
        escape.rmdir()
    events = esr.events(sid)
    [cat] = ran(events, "cat")
    [sh] = ran(events, "sh")
    assert sh["cgroup_id"] != cgroup_id
    assert cat["cgroup_id"] == cgroup_id


def test_threads_and_exec_from_a_thread_stay_recorded(esr):
    script = (
        "import os, threading\n"
        "def work():\n"
        "    open('/etc/hostname').close()\n"
        "    os.execv('/usr/bin/head', ['head', '-c1', '/etc/hostname'])\n"
        "threading.Thread(target=work).start()\n"
        "threading.Event().wait(5)\n"
    )
    sid = esr.record(PY, "-c", script)
    events = esr.events(sid)
    assert ["/usr/bin/head", "-c1", "/etc/hostname"] in executed(events)
    [head] = ran(events, "head")
    # After exec the process reads its libraries: still recorded.
    assert [
        e
        for e in events
        if e["event"] == "session.disk" and e["pid"] == head["pid"] and e["program"] == "head"
    ]


def test_processes_outside_the_session_produce_nothing(esr):
    marker = f"/nonexistent/outside-{uuid.uuid4().hex}"
    stop = threading.Event()

    def outside():
        while not stop.is_set():
            try:
                open(marker)
            except OSError:
                pass
            time.sleep(0.005)

    t = threading.Thread(target=outside)
    t.start()
    try:
        sid = esr.record(
            "sh", "-c", "for i in 1 2 3 4 5; do cat /etc/hostname >/dev/null; sleep 0.05; done"
        )
    finally:
        stop.set()
        t.join()
    events = esr.events(sid)
    assert not [e for e in events if marker in json.dumps(e)]
    assert {e["program"] for e in commands(events)} <= {"esr", "sh", "cat", "sleep"}


def test_parallel_sessions_keep_their_events_apart(esr):
    n = 10
    procs = [
        esr.popen(
            "run",
            "--",
            "sh",
            "-c",
            f"for i in $(seq 1 20); do cat /nonexistent/session-{k}-$i 2>/dev/null; done",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for k in range(n)
    ]
    sids = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 1
        sids.append(sid_from_stderr(err))
    for k, sid in enumerate(sids):
        events = esr.events(sid)
        markers = [
            e["path"]
            for e in events
            if e["event"] == "session.disk" and e["path"].startswith("/nonexistent/session-")
        ]
        assert sorted(markers) == sorted(f"/nonexistent/session-{k}-{i}" for i in range(1, 21))
        assert all(e["sid"] == sid for e in events)
        assert len(ran(events, "cat")) == 20


# --- the recorder itself ------------------------------------------------------------


def test_exit_status_is_the_commands(esr):
    assert esr("run", "--", "sh", "-c", "exit 7", check=False).returncode == 7
    assert esr("run", "--", "sh", "-c", "kill -TERM $$", check=False).returncode == 128 + 15
    r = esr("run", "--", "/no/such/cmd", check=False)
    assert r.returncode == 127 and b"esr: cannot run /no/such/cmd" in r.stderr


def test_session_start_end_and_audit_log(esr):
    sid = esr.record("true")
    events = esr.events(sid)
    start, end = events[0], events[-1]
    assert start["event"] == "session.start" and start["code"] == "T2000I" and start["ei"] == 0
    assert start["initial_command"] == ["true"]
    assert end["event"] == "session.end" and end["code"] == "T2004I"
    assert end["enhanced_recording"] is True and end["events"]["command"] >= 1
    assert [e["ei"] for e in events] == list(range(len(events)))
    assert len({e["uid"] for e in events}) == len(events)
    log = esr.data_dir / "log" / "events.log"
    assert log.is_symlink()
    assert log.resolve().name == time.strftime("%Y-%m-%d.00:00:00.log", time.gmtime())
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    by_event = {}
    for e in logged:
        by_event.setdefault(e["event"], []).append(e)
    assert {"session.start", "session.command", "session.end"} <= set(by_event)
    assert "session.disk" not in by_event  # only in the recording unless audit_disk_events
    for e in logged:
        for field in (
            "ei",
            "uid",
            "time",
            "sid",
            "login",
            "user",
            "server_id",
            "server_hostname",
            "code",
        ):
            assert field in e
    [show_end] = [e for e in events if e["event"] == "session.end"]
    # The audit log's has the seal of the recording's end too.
    logged_end = dict(by_event["session.end"][0])
    assert logged_end.pop("seal")["last_ei"] == show_end["ei"]
    assert show_end == logged_end


def test_with_enhanced_recording_off_the_session_lasts_as_long_as_the_command(esr, tmp_path):
    config = tmp_path / "off.yaml"
    config.write_text("enhanced_recording:\n  enabled: false\n")
    r = esr("run", "--config", str(config), "--", "sh", "-c", "sleep 0.5; exit 3", check=False)
    assert r.returncode == 3
    events = esr.events(sid_from_stderr(r.stderr))
    start, end = events[0], events[-1]
    assert end["event"] == "session.end" and end["reason"] == "exited"
    assert end["enhanced_recording"] is False
    lasted = datetime.fromisoformat(end["time"]) - datetime.fromisoformat(start["time"])
    assert lasted.total_seconds() >= 0.5


def test_sessions_lists_counts(esr):
    sid = esr.record("sh", "-c", "cat /etc/hostname")
    [row] = [r for r in esr.sessions() if r["sid"] == sid]
    assert row["state"] == "closed" and row["damaged"] is None
    assert row["events"]["command"] >= 2 and row["events"]["disk"] > 0
    assert row["lost"] == {"command": 0, "disk": 0, "network": 0, "terminal": 0, "processes": 0}
    assert row["command"].startswith("sh -c cat /etc/hostname")
    assert row["end"] >= row["start"]
    text = esr("sessions").stdout.decode()
    assert sid in text


def test_kill_minus_9_of_the_recorder_keeps_complete_frames(esr):
    p = esr.popen(
        "run",
        "--",
        "sh",
        "-c",
        "for i in $(seq 1 100); do head -c1 /etc/hostname >/dev/null; sleep 0.02; done",
        stderr=subprocess.PIPE,
    )
    sid = sid_from_stderr(p.stderr.readline())
    time.sleep(1.0)
    p.kill()
    p.wait()
    # Every complete frame verifies; only the end is missing.
    r = esr("verify", sid, check=False)
    assert r.returncode == 0, r.stderr
    assert b": intact: " in r.stdout and b"not closed" in r.stdout
    shown = esr("show", sid, check=False)
    events = [json.loads(line) for line in shown.stdout.splitlines()]
    assert len(ran(events, "head")) >= 5
    assert events[0]["event"] == "session.start"
    assert not [e for e in events if e["event"] == "session.end"]


def test_lost_records_are_counted_and_written_into_the_session(esr, tmp_path):
    gen = ROOT / "build" / "bench" / "gen"
    config = tmp_path / "small.yaml"
    config.write_text("enhanced_recording:\n  disk_buffer_size: 2\n")  # 8 KiB per CPU
    # gen waits for "go" on stdin; feed it at once and let it open flat out.
    r = esr(
        "run",
        "--config",
        str(config),
        "--",
        "sh",
        "-c",
        f"echo go | {gen} open 1 0 --cpu -1",
        check=True,
    )
    generated = json.loads(r.stdout.splitlines()[-1])["events"]["disk"]
    events = esr.events(sid_from_stderr(r.stderr))
    end = events[-1]
    lost = [e for e in events if e["event"] == "session.lost"]
    assert lost and end["lost"]["disk"] == sum(e["lost"]["disk"] for e in lost) > 0
    # gen opens /etc/hostname once more, before "go", to warm up.
    recorded = [e for e in events if e["event"] == "session.disk" and e["path"] == "/etc/hostname"]
    assert len(recorded) + end["lost"]["disk"] >= generated
    assert all(e["code"] == "E4100W" for e in lost)


def test_a_sealed_recording_verifies_with_the_key_on_a_copy_elsewhere(esr, tmp_path):
    made = esr("keygen", "--epoch", "60")
    key = tmp_path / "verification.key"
    key.write_bytes(made.stdout)
    assert made.stdout.startswith(b"esr-verification-key 1 ")
    assert b"keep the verification key above off this host" in made.stderr
    assert oct((esr.data_dir / "seal.key").stat().st_mode & 0o777) == "0o600"
    again = esr("keygen", check=False)
    assert again.returncode == 1 and b"seal.key exists" in again.stderr
    sid = esr.record("sh", "-c", "cat /etc/hostname; sleep 0.3; head -c1 /etc/hostname")

    copy = tmp_path / "copy"  # what to take to the other machine
    (copy / "sessions").mkdir(parents=True)
    for name in (f"{sid}.esr", f"{sid}.seal"):
        shutil.copy(esr.data_dir / "sessions" / name, copy / "sessions")
    shutil.copytree(esr.data_dir / "log", copy / "log")
    r = esr("verify", sid, "--key", str(key), "--data-dir", str(copy))
    line = r.stdout.decode().strip()
    assert line.startswith(f"{sid}: intact: ") and ", closed; sealed with key " in line
    assert line.endswith("; the audit log holds the same end seal")

    # Both the recording and its seals cut back: the audit log's end seal shows it.
    starts = [f.offset for f in recording.Reader(str(copy / "sessions" / f"{sid}.esr"), sid)]
    os.truncate(copy / "sessions" / f"{sid}.esr", starts[2])
    os.truncate(copy / "sessions" / f"{sid}.seal", seal.SEAL.size)
    r = esr("verify", sid, "--key", str(key), "--data-dir", str(copy), check=False)
    assert r.returncode == 1
    assert r.stderr.decode().startswith(f"esr: {sid}: the audit log seals the end at frame ")
