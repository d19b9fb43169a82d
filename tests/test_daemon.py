"""`esr daemon`: real OpenSSH logins on loopback recorded through PAM, the
control socket, and the daemon's life cycle."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers import (
    ESR,
    Daemon,
    commands,
    executed,
    free_port,
    listener,
    only_new,
    require_bpf,
    sid_from_stderr,
)


def test_ssh_command_session_is_recorded(daemon, sshd):
    srv = listener()
    port = srv.getsockname()[1]
    before = daemon.sessions(sshd.user)
    connect = f"import socket; socket.create_connection(('127.0.0.1', {port})).close()"
    r = sshd.ssh(f'ls /; cat /etc/hostname; python3 -c "{connect}"')
    assert r.returncode == 0, r.stderr
    assert open("/etc/hostname").read().strip().encode() in r.stdout
    [row] = only_new(before, daemon.wait_closed(sshd.user, len(before) + 1))
    events = daemon.esr.events(row["sid"])

    start = events[0]
    assert start["event"] == "session.start"
    assert (start["login"], start["user"]) == (sshd.user, sshd.user)
    assert start["addr.remote"] == "127.0.0.1" and start["service"] == sshd.service
    assert 0 < start["audit_session_id"] < 0xFFFFFFFF
    assert start["loginuid"] == pwd.getpwnam(sshd.user).pw_uid

    run = executed(events)
    assert ["/usr/bin/ls", "/"] in run and ["/usr/bin/cat", "/etc/hostname"] in run
    assert any(c[0].endswith("python3") or "python3" in c[0] for c in run)
    assert [e for e in events if e["event"] == "session.disk" and e["path"] == "/etc/hostname"]
    [net] = [e for e in events if e["event"] == "session.network"]
    assert (net["dst_addr"], net["dst_port"], net["return_code"]) == ("127.0.0.1", port, 0)
    end = events[-1]
    assert end["event"] == "session.end" and end["enhanced_recording"] is True
    assert end["reason"] == "exited"

    # The privileged monitor (the anchor) and the PAM hook are not the user's activity.
    anchor = start["seed_pid"]
    assert not [e for e in events if e.get("pid") == anchor]
    assert not [c for c in commands(events) if "pam" in c["argv"]]
    assert all(c["unix_uid"] == pwd.getpwnam(sshd.user).pw_uid for c in commands(events))

    # The audit log has the same session.
    log = daemon.data_dir / "log" / "events.log"
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    mine = [e for e in logged if e["sid"] == row["sid"]]
    assert {"session.start", "session.command", "session.network", "session.end"} <= {
        e["event"] for e in mine
    }
    srv.close()


def test_interactive_ssh_session_is_recorded(daemon, sshd):
    before = daemon.sessions(sshd.user)
    r = sshd.ssh(tty=True, input=b"stty -echo\nhead -c3 /etc/hostname\nuname -s\nexit\n")
    assert r.returncode == 0, r.stderr
    [row] = only_new(before, daemon.wait_closed(sshd.user, len(before) + 1))
    events = daemon.esr.events(row["sid"])
    run = executed(events)
    assert ["/usr/bin/head", "-c3", "/etc/hostname"] in run
    assert ["/usr/bin/uname", "-s"] in run
    assert ["/usr/bin/stty", "-echo"] in run
    assert events[-1]["interactive"] is True


def test_two_concurrent_ssh_sessions_keep_their_events_apart(daemon, sshd):
    before = daemon.sessions(sshd.user)
    procs = [
        subprocess.Popen(
            sshd.argv(
                f"for i in $(seq 1 15); do cat /nonexistent/ssh-{k}-$i 2>/dev/null; "
                "sleep 0.02; done; true"
            )
        )
        for k in range(2)
    ]
    assert [p.wait(60) for p in procs] == [0, 0]
    rows = only_new(before, daemon.wait_closed(sshd.user, len(before) + 2))
    assert len(rows) == 2
    seen = set()
    for row in rows:
        paths = {
            e["path"]
            for e in daemon.esr.events(row["sid"], "disk")
            if e["path"].startswith("/nonexistent/ssh-")
        }
        ks = {p.split("-")[1] for p in paths}
        assert len(ks) == 1 and len(paths) == 15
        seen |= ks
    assert seen == {"0", "1"}


def test_ssh_sftp_and_scp_are_recorded(daemon, sshd, tmp_path):
    before = daemon.sessions(sshd.user)
    local = tmp_path / "payload.txt"
    local.write_text("hello\n")
    r = subprocess.run(sshd.scp_argv(local, "copied.txt"), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = only_new(before, daemon.wait_closed(sshd.user, len(before) + 1))
    assert rows
    disk = [e for row in rows for e in daemon.esr.events(row["sid"], "disk")]
    assert [e for e in disk if e["path"].endswith("copied.txt") and e["return_code"] >= 0]


def test_login_succeeds_while_the_daemon_is_down_or_hung(daemon_root, sshd):
    d = Daemon(daemon_root)
    assert not d.socket.exists()
    t0 = time.monotonic()
    r = sshd.ssh("echo up")
    assert r.returncode == 0 and r.stdout.strip() == b"up"
    down = time.monotonic() - t0

    d.start()
    try:
        d.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        r = sshd.ssh("echo hung")
        hung = time.monotonic() - t0
        assert r.returncode == 0 and r.stdout.strip() == b"hung"
        # Open and close each wait at most the hook's timeout (0.8 s).
        assert hung < down + 2 * 1.0 + 1.0
    finally:
        d.proc.send_signal(signal.SIGCONT)
        d.stop()


def test_restart_between_sessions_and_sigterm_during_one(daemon_root, sshd):
    d = Daemon(daemon_root).start()
    try:
        before = d.sessions(sshd.user)
        assert sshd.ssh("true").returncode == 0
        assert len(only_new(before, d.wait_closed(sshd.user, len(before) + 1))) == 1
        d.stop()
        d.start()
        before = d.sessions(sshd.user)
        assert sshd.ssh("head -c1 /etc/hostname").returncode == 0
        [row] = only_new(before, d.wait_closed(sshd.user, len(before) + 1))
        assert ["/usr/bin/head", "-c1", "/etc/hostname"] in executed(d.esr.events(row["sid"]))

        # SIGTERM while a session is open: it is ended cleanly.
        before = d.sessions(sshd.user)
        ssh = subprocess.Popen(sshd.argv("sleep 3"))
        d.wait_new(sshd.user, before, timeout=10)
        d.stop()
        [row] = only_new(before, d.sessions(sshd.user))
        assert row["state"] == "closed" and row["reason"] == "recorder stopped"
        assert b"intact" in d.esr("verify", row["sid"]).stdout
        assert ssh.wait(20) == 0
    finally:
        d.stop()


def test_a_killed_daemons_sessions_are_taken_over_or_ended_on_next_start(daemon_root):
    d = Daemon(daemon_root).start()
    try:
        # The kernel side stayed pinned: the next daemon goes on with it.
        r = d.esr.popen(
            "run", "--config", str(d.config), "--", "sleep", "2", stderr=subprocess.PIPE
        )
        sid = sid_from_stderr(r.stderr.readline())
        time.sleep(0.3)
        d.stop(signal.SIGKILL)
        r.kill()
        [row] = [x for x in d.sessions() if x["sid"] == sid]
        assert row["state"] == "open"
        d.start()
        d.wait_sids_closed(sid)
        [row] = [x for x in d.sessions() if x["sid"] == sid]
        assert row["reason"] == "exited"
        [resume] = [e for e in d.esr.events(sid) if e["event"] == "session.resume"]
        assert resume["cause"] == "crash"

        # Nothing pinned any more (as after a reboot): the recording is ended.
        r = d.esr.popen(
            "run", "--config", str(d.config), "--", "sleep", "5", stderr=subprocess.PIPE
        )
        sid = sid_from_stderr(r.stderr.readline())
        time.sleep(0.3)
        d.stop(signal.SIGKILL)
        r.kill()
        d.remove_pins()
        d.start()
        [row] = [x for x in d.sessions() if x["sid"] == sid]
        assert row["state"] == "closed" and row["reason"] == "recorder stopped"
        assert b"closed" in d.esr("verify", sid).stdout
        assert "session.ended_by_restart" in d.log.read_text()
    finally:
        d.stop()
        d.remove_pins()


def test_esr_run_registers_with_the_daemon(daemon):
    r = daemon.esr("run", "--config", str(daemon.config), "--", "sh", "-c", "cat /etc/hostname")
    assert b"by the esr daemon" in r.stderr
    sid = sid_from_stderr(r.stderr)
    daemon.wait_sids_closed(sid, timeout=10)
    assert ["/usr/bin/cat", "/etc/hostname"] in executed(daemon.esr.events(sid))


def test_ten_parallel_esr_run_sessions_under_one_daemon(daemon):
    procs = [
        daemon.esr.popen(
            "run",
            "--config",
            str(daemon.config),
            "--",
            "sh",
            "-c",
            f"for i in $(seq 1 20); do cat /nonexistent/d-{k}-$i 2>/dev/null; done; true",
            stderr=subprocess.PIPE,
        )
        for k in range(10)
    ]
    sids = [sid_from_stderr(p.communicate(timeout=60)[1]) for p in procs]
    daemon.wait_sids_closed(*sids)
    for k, sid in enumerate(sids):
        paths = sorted(
            e["path"]
            for e in daemon.esr.events(sid, "disk")
            if e["path"].startswith("/nonexistent/d-")
        )
        assert paths == sorted(f"/nonexistent/d-{k}-{i}" for i in range(1, 21))


def test_status_reports_counters(daemon):
    daemon.esr("run", "--config", str(daemon.config), "--", "cat", "/etc/hostname")
    r = daemon.esr("status", "--config", str(daemon.config), "--format", "json")
    status = json.loads(r.stdout)
    assert status["events"]["command"] >= 1 and status["events"]["disk"] >= 1
    assert status["lost"]["buffer"] == {"command": 0, "disk": 0, "network": 0, "terminal": 0}
    assert status["buffer_pages"] == {"command": 128, "disk": 128, "network": 128, "terminal": 512}
    assert status["uptime_s"] >= 0 and status["bytes_written"] > 0
    text = daemon.esr("status", "--config", str(daemon.config)).stdout.decode()
    assert "sessions open:" in text and "lost per buffer:" in text


def test_second_daemon_on_the_same_data_dir_fails(daemon):
    r = subprocess.run(
        [ESR, "daemon", "--config", str(daemon.config)], capture_output=True, timeout=30
    )
    assert r.returncode != 0
    assert r.stderr.decode().strip().splitlines() == [
        f"esr: an esr daemon (pid {daemon.proc.pid}) is already recording into {daemon.data_dir}"
    ]


@pytest.mark.parametrize(
    "raw, error",
    [
        (b"this is not json\n", "bad request"),
        (b'{"op": "open"}\n', "bad request"),
        (b'{"op": "launch"}\n', "bad request"),
        (b'{"op": "open", "login": "x", "seed_pid": 1, "anchor_pid": 1}\n', "exactly one"),
        (b'{"op": "open", "login": "x", "seed_pid": 999999999}\n', "no process"),
        (
            b'{"op": "open", "login": "x", "seed_pid": 1}\n',
            "seed_pid 1 is not a child of the requesting process",
        ),
        (
            b'{"op": "open", "login": "x", "seed_pid": 1, '
            b'"audit_sessionid": 18446744073709551616}\n',
            "audit_sessionid",
        ),
        (b'{"op": "status"', "incomplete request"),
        (b"\xff\xfe\x00garbage\n", "bad request"),
        (b"{}" * 40000, "too large"),
    ],
)
def test_bad_requests_get_an_error_and_the_daemon_keeps_recording(daemon, raw, error):
    reply = daemon.request(raw)
    assert reply["ok"] is False and error in reply["error"]
    sid = sid_from_stderr(daemon.esr("run", "--config", str(daemon.config), "--", "true").stderr)
    daemon.wait_sids_closed(sid)
    assert ["/usr/bin/true"] in executed(daemon.esr.events(sid))


def test_half_sent_request_times_out(daemon):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(daemon.socket))
        s.sendall(b'{"op": "sta')
        t0 = time.monotonic()
        reply = json.loads(s.recv(65536))
        assert time.monotonic() - t0 < 5
    assert reply["ok"] is False and "timed out" in reply["error"]


def test_non_root_clients_are_refused_and_logged(tmp_path):
    require_bpf()
    # A socket nobody can reach (0600, in root's private dirs) would refuse
    # everyone at connect(); open it up to exercise the daemon's own check.
    daemon = Daemon(tmp_path, Path(f"/run/esr-test-{secrets.token_hex(4)}/esr.sock")).start()
    os.chmod(daemon.socket, 0o666)
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        's.sendall(b\'{"op": "open", "login": "mallory", "seed_pid": 1}\\n\')\n'
        "print(s.recv(4096).decode())\n"
    )
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            script,
            str(daemon.socket),
        ],
        capture_output=True,
        timeout=30,
    )
    reply = json.loads(r.stdout)
    assert reply["ok"] is False and "permission denied" in reply["error"]
    daemon.stop()
    shutil.rmtree(daemon.socket.parent, ignore_errors=True)
    assert (
        "event=control.refused" in daemon.log.read_text()
        and "peer_uid=65534" in daemon.log.read_text()
    )


def test_a_flood_of_requests_does_not_starve_recording(daemon):
    stop = threading.Event()
    errors = []

    def flood():
        while not stop.is_set():
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(5)
                    s.connect(str(daemon.socket))
                    s.sendall(b'{"op": "status"}\n')
                    s.recv(65536)
            except OSError as err:
                errors.append(err)

    # Connections that never finish their request, holding client slots.
    idle = []
    for _ in range(100):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(daemon.socket))
        s.sendall(b'{"op"')
        idle.append(s)
    threads = [threading.Thread(target=flood) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        t0 = time.monotonic()
        r = daemon.esr(
            "run",
            "--config",
            str(daemon.config),
            "--",
            "sh",
            "-c",
            "for i in $(seq 1 200); do head -c1 /etc/hostname >/dev/null; done",
        )
        took = time.monotonic() - t0
    finally:
        stop.set()
        for t in threads:
            t.join()
        for s in idle:
            s.close()
    sid = sid_from_stderr(r.stderr)
    daemon.wait_sids_closed(sid)
    heads = [c for c in commands(daemon.esr.events(sid)) if c["path"] == "/usr/bin/head"]
    assert len(heads) == 200
    assert took < 30


def test_session_ends_when_sshd_dies_without_closing_it(daemon, sshd):
    before = daemon.sessions(sshd.user)
    ssh = subprocess.Popen(sshd.argv("sleep 60"))
    [row] = daemon.wait_new(sshd.user, before)
    anchor = daemon.esr.events(row["sid"])[0]["seed_pid"]
    os.kill(anchor, signal.SIGKILL)  # the privileged monitor: PAM never closes
    subprocess.run(["pkill", "-KILL", "-u", sshd.user], check=False)
    ssh.wait(30)
    daemon.wait_sids_closed(row["sid"], msg="the session was never ended")
    assert "event=session.anchor_exited" in daemon.log.read_text()


def test_seeded_session_ends_even_if_esr_run_is_killed(daemon, tmp_path):
    started = tmp_path / "started"
    p = daemon.esr.popen(
        "run",
        "--config",
        str(daemon.config),
        "--",
        "sh",
        "-c",
        f"touch {started}; sleep 0.5; head -c1 /etc/hostname",
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    sid = sid_from_stderr(p.stderr.readline())
    while not started.exists():
        time.sleep(0.01)
    p.kill()  # never sends its close
    daemon.wait_sids_closed(sid)
    assert ["/usr/bin/head", "-c1", "/etc/hostname"] in executed(daemon.esr.events(sid))


# Forks n children held before their exec and opens a session seeded with
# each (a seed must be forked by whoever asks); prints {sid: pid}.
HELD = r"""
import json, os, socket, sys
n, path = int(sys.argv[1]), sys.argv[2]
r, w = os.pipe()
sids = {}
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os.execv("/usr/bin/head", ["head", "-c1", "/etc/hostname"])
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(json.dumps({"op": "open", "login": "many", "seed_pid": pid}).encode() + b"\n")
        reply = json.loads(s.makefile().readline())
    assert reply["ok"], reply
    sids[reply["sid"]] = pid
print(json.dumps(sids), flush=True)
sys.stdin.readline()
import time
for i in range(0, n, 50):  # a busy host, not one burst of 1100 execs
    os.write(w, b"x" * min(50, n - i))
    time.sleep(0.02)
for pid in pids:
    os.waitpid(pid, 0)
"""


def test_more_than_a_thousand_concurrent_sessions(daemon):
    n = 1100
    held = subprocess.Popen(
        ["/usr/bin/python3", "-c", HELD, str(n), str(daemon.socket)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    sids = json.loads(held.stdout.readline())
    assert len(sids) == n
    status = json.loads(
        daemon.esr("status", "--config", str(daemon.config), "--format", "json").stdout
    )
    assert status["sessions_open"] >= n
    held.communicate("go\n", timeout=120)
    deadline = time.time() + 60
    while True:
        rows = {r["sid"]: r for r in daemon.sessions("many")}
        if all(rows.get(s, {}).get("state") == "closed" for s in sids) or time.time() > deadline:
            break
        time.sleep(1)
    # Ending a thousand sessions (an fsync each) keeps the daemon's main
    # thread busy; the drain thread empties the buffers meanwhile.
    for sid in sids:
        row = rows[sid]
        assert row["state"] == "closed"
        assert row["events"]["command"] == 1 and row["lost"]["command"] == 0, row
    # Spot-check that each session holds its own process.
    for sid, pid in [(s, p) for s, p in sids.items() if rows[s]["events"]["command"]][::100]:
        [head] = daemon.esr.events(sid, "command")
        assert head["pid"] == pid and head["argv"] == ["-c1", "/etc/hostname"]


def test_sighup_reopens_the_audit_log_and_applies_what_can_change(daemon):
    log_dir = daemon.data_dir / "log"
    current = (log_dir / "events.log").resolve()
    rotated = current.with_name(current.name + ".1")
    current.rename(rotated)  # what logrotate does
    daemon.config.write_text(
        daemon.config.read_text()
        + "audit_disk_events: true\naudit_failed_connects: false\nmax_sessions: 8\n"
    )
    try:
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        while "event=daemon.reload" not in daemon.log.read_text():
            assert time.time() < deadline
            time.sleep(0.05)
        line = [x for x in daemon.log.read_text().splitlines() if "event=daemon.reload" in x][-1]
        assert "applied=audit_disk_events,audit_failed_connects" in line
        assert "needs_restart=max_sessions" in line
        refused = f"import socket; socket.socket().connect_ex(('127.0.0.1', {free_port()}))"
        r = daemon.esr(
            "run", "--config", str(daemon.config), "--", "/usr/bin/python3", "-c", refused
        )
        sid = sid_from_stderr(r.stderr)
        daemon.wait_sids_closed(sid, timeout=10)
        logged = [json.loads(line) for line in current.read_text().splitlines()]
        assert any(e["event"] == "session.disk" and e["sid"] == sid for e in logged)
        # The failed connect is in the recording, and no longer in the log.
        [connect] = daemon.esr.events(sid, "network")
        assert connect["return_code"] == -111
        assert not any(e["event"] == "session.network" and e["sid"] == sid for e in logged)
        assert not any(e["sid"] == sid for e in map(json.loads, rotated.read_text().splitlines()))
    finally:
        daemon.config.write_text(f"data_dir: {daemon.data_dir}\ncontrol_socket: {daemon.socket}\n")


def test_when_every_session_slot_is_taken_the_next_open_is_refused(tmp_path):
    require_bpf()
    d = Daemon(tmp_path)
    d.config.write_text(d.config.read_text() + "max_sessions: 1\n")
    d.start()
    try:
        first = d.esr.popen(
            "run", "--config", str(d.config), "--", "sleep", "2", stderr=subprocess.PIPE
        )
        sid_from_stderr(first.stderr.readline())
        r = d.esr("run", "--config", str(d.config), "--", "true", check=False)
        assert r.returncode == 1
        assert r.stderr.decode().strip() == "esr: all 1 session slots are in use"
        assert first.wait(30) == 0
        assert d.proc.poll() is None
        # The refused session left no recording behind, and a restart is clean.
        assert len(list((d.data_dir / "sessions").glob("*.esr"))) == 1
        d.stop()
        d.start()
        assert "session.recovered" not in d.log.read_text()
    finally:
        d.stop()


def test_esr_run_passes_sigterm_on_while_the_daemon_records(daemon):
    run = daemon.esr.popen(
        "run", "--config", str(daemon.config), "--", "sleep", "30", stderr=subprocess.PIPE
    )
    sid = sid_from_stderr(run.stderr.readline())
    run.send_signal(signal.SIGTERM)
    assert run.wait(10) == 128 + signal.SIGTERM  # sleep's status: it got the signal
    daemon.wait_sids_closed(sid)


def test_a_running_program_cannot_be_claimed_as_a_seed(daemon):
    child = subprocess.Popen(["sleep", "30"])  # ours, but already running something else
    try:
        reply = daemon.request(
            json.dumps({"op": "open", "login": "x", "seed_pid": child.pid}).encode() + b"\n"
        )
    finally:
        child.kill()
        child.wait()
    assert reply["ok"] is False
    assert reply["error"] == (
        f"seed_pid {child.pid} already runs another program: a seed must be held before "
        "its first exec"
    )


# Starts a connect that never finishes (its SYN is dropped), hands the
# socket to argv[2] and exits while it is still connecting.
HAND_OVER_CONNECTING = r"""
import socket, sys
s = socket.socket()
s.setblocking(False)
assert s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 115  # EINPROGRESS
with socket.socket(socket.AF_UNIX) as u:
    u.connect(sys.argv[2])
    socket.send_fds(u, [b"s"], [s.fileno()])
"""

# Opens argv[2] sockets, all at once, and connects each to port argv[1]:
# with thousands, one most likely takes the memory of a socket closed just
# before.
CONNECTS = r"""
import resource, socket, sys
n = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 64, n + 64))
sockets = [socket.socket() for _ in range(n)]
for s in sockets:
    s.connect(("127.0.0.1", int(sys.argv[1])))
"""


def links_held(pid: int) -> int:
    """How many BPF links and perf events process pid holds: its attached
    programs."""
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        held += target in ("anon_inode:bpf_link", "anon_inode:[perf_event]")
    return held


def test_a_connect_an_ended_session_left_unfinished_hides_no_later_one(daemon, tmp_path):
    """The hook on TCP state changes goes with the last session, so a
    connect still in progress then is never finished. Its socket closes
    later, and a socket of a later session takes its memory: that socket's
    connect is recorded all the same, as every other one."""
    attached_always = links_held(daemon.proc.pid)
    # A full accept queue (backlog 0, one connection nobody accepts) drops
    # every further SYN: the connect stays in progress.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    waiting = socket.create_connection(full.getsockname())
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(str(tmp_path / "holder"))
    holder.listen(1)
    esr_run = ("run", "--config", str(daemon.config), "--", "/usr/bin/python3", "-c")
    r = daemon.esr(
        *esr_run, HAND_OVER_CONNECTING, str(full.getsockname()[1]), str(tmp_path / "holder")
    )
    daemon.wait_sids_closed(sid_from_stderr(r.stderr))
    conn, _ = holder.accept()
    _, [fd], _, _ = socket.recv_fds(conn, 1, 1)
    deadline = time.monotonic() + 10
    while json.loads(
        daemon.esr("status", "--config", str(daemon.config), "--format", "json").stdout
    )["session_hooks_attached"]:
        assert time.monotonic() < deadline, "the session hooks stayed attached"
        time.sleep(0.1)
    # Detached in a thread of the daemon's: until then they still run.
    while links_held(daemon.proc.pid) > attached_always:
        assert time.monotonic() < deadline, "the session hooks were never detached"
        time.sleep(0.1)
    srv = listener()
    os.close(fd)  # with no hook attached
    r = daemon.esr(*esr_run, CONNECTS, str(srv.getsockname()[1]), "2000")
    sid = sid_from_stderr(r.stderr)
    daemon.wait_sids_closed(sid)
    connects = [
        e for e in daemon.esr.events(sid, "network") if e["dst_port"] == srv.getsockname()[1]
    ]
    for s in (srv, full, waiting, conn, holder):
        s.close()
    assert len(connects) == 2000


# Opens a session the way a PAM-like client would, with argv[2] in every
# field it gives, for a child it forked and holds; prints the sid.
OPEN_FIELDS = r"""
import json, os, socket, sys
path, evil = sys.argv[1], sys.argv[2]
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.read(r, 1)
    os.execv("/usr/bin/true", ["true"])
request = {"op": "open", "login": "L" + evil, "user": "U" + evil, "seed_pid": pid,
           "remote_addr": "R" + evil, "service": "S" + evil, "tty": "T" + evil}
with socket.socket(socket.AF_UNIX) as s:
    s.connect(path)
    s.sendall(json.dumps(request).encode() + b"\n")
    reply = json.loads(s.makefile().readline())
assert reply["ok"], reply
os.write(w, b"x")
os.waitpid(pid, 0)
with socket.socket(socket.AF_UNIX) as s:
    s.connect(path)
    s.sendall(json.dumps({"op": "close", "sid": reply["sid"]}).encode() + b"\n")
    s.makefile().readline()
print(reply["sid"])
"""


def test_no_session_field_reaches_the_terminal_raw(daemon):
    evil = "\x1b]0;pwn\x07\nFORGED"
    env = dict(daemon.esr.env, SUDO_USER="U" + evil)  # esr run records it as the user
    r = subprocess.run(
        [ESR, "run", "--config", str(daemon.config), "--login", "L" + evil, "--", "true"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    sids = [sid_from_stderr(r.stderr)]
    r = subprocess.run(
        ["/usr/bin/python3", "-c", OPEN_FIELDS, str(daemon.socket), evil],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    sids.append(r.stdout.decode().strip())
    daemon.wait_sids_closed(*sids)
    outputs = [
        daemon.esr("sessions").stdout,
        daemon.esr("status", "--config", str(daemon.config)).stdout,
    ]
    outputs += [daemon.esr("show", sid, "--format", "text").stdout for sid in sids]
    outputs += [daemon.esr("show", sid).stdout for sid in sids]
    for out in outputs:
        assert b"\x1b" not in out and b"\x07" not in out
        assert not [line for line in out.splitlines() if line.startswith(b"FORGED")]
    starts = [daemon.esr("show", sid, "--format", "text").stdout.splitlines()[0] for sid in sids]
    escaped = rb"\x1b]0;pwn\x07\x0aFORGED"
    assert b"login='L" + escaped + b"'" in starts[0] and b"user='U" + escaped + b"'" in starts[0]
    for field in (b"remote='R", b"service='S", b"tty='T"):
        assert field + escaped + b"'" in starts[1]
    listing = daemon.esr("sessions").stdout
    assert listing.count(b"L" + escaped) == 2


def test_an_idle_daemon_still_moves_the_sealing_key_on_each_epoch(tmp_path):
    """With no session open the daemon sleeps, but not past an epoch: a key
    left unchanged could still seal for the epochs gone by."""
    require_bpf()
    d = Daemon(tmp_path)
    d.esr("keygen", "--epoch", "1")

    def epoch() -> int:
        line = (d.data_dir / "seal.key").read_text()
        return int(line.split(" epoch=")[1].split()[0])

    d.start()
    try:
        before = epoch()
        time.sleep(3.5)
        assert epoch() >= before + 3
    finally:
        d.stop()
        d.remove_pins()
