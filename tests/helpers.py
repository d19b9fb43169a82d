"""What the tests share: the esr CLI under test, reading its output, the BPF
gate (skip without root/BPF; fail instead under ESR_REQUIRE_BPF=1), and
small network fixtures. Fixtures themselves are in conftest.py."""

from __future__ import annotations

import fcntl
import functools
import json
import os
import pty
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

ROOT = Path(__file__).resolve().parent.parent
ESR = os.environ.get("ESR_BIN", str(ROOT / ".venv" / "bin" / "esr"))
REQUIRE_BPF = os.environ.get("ESR_REQUIRE_BPF") == "1"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@functools.cache
def bpf_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to load BPF programs"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "the kernel has no BTF"
    r = subprocess.run([ESR, "check"], capture_output=True, text=True)
    if r.returncode != 0:
        bad = [line for line in r.stdout.splitlines() if "missing" in line or "cannot" in line]
        return f"`esr check` failed: {(bad or r.stderr.splitlines() or ['?'])[-1]}"
    return None


def require_bpf():
    reason = bpf_unavailable()
    if reason:
        if REQUIRE_BPF:
            pytest.fail(f"ESR_REQUIRE_BPF=1, but BPF is unavailable: {reason}")
        pytest.skip(reason)


class Esr:
    """The esr command line, pointed at one data dir."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.env = dict(os.environ, ESR_DATA_DIR=str(data_dir))

    def __call__(self, *args, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run([ESR, *args], capture_output=True, env=self.env, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise AssertionError(
                f"esr {' '.join(map(str, args))} exited {r.returncode}:\n"
                f"{r.stderr.decode(errors='replace')}"
            )
        return r

    def popen(self, *args, **kw) -> subprocess.Popen:
        return subprocess.Popen([ESR, *args], env=self.env, **kw)

    def record(self, *argv, check=True, **kw) -> str:
        """Run argv under `esr run`; returns the session id."""
        r = self("run", "--", *argv, check=check, **kw)
        return sid_from_stderr(r.stderr)

    def events(self, sid: str, kind: str | None = None) -> list[dict]:
        args = ["show", sid] + (["--type", kind] if kind else [])
        return [json.loads(line) for line in self(*args).stdout.splitlines()]

    def sessions(self) -> list[dict]:
        return [
            json.loads(line) for line in self("sessions", "--format", "json").stdout.splitlines()
        ]


def sid_from_stderr(stderr: bytes | str) -> str:
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    for line in stderr.splitlines():
        if line.startswith("esr: recording session "):
            return line.split()[3]
    raise AssertionError(f"no session id in esr's stderr:\n{stderr}")


def commands(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "session.command"]


def executed(events: list[dict]) -> list[list[str]]:
    """[path, *argv] of every successful exec."""
    return [[e["path"], *e["argv"]] for e in commands(events) if e["return_code"] == 0]


def deb_file() -> Path:
    """The newest built package; fails (not skips) when there is none."""
    debs = sorted((ROOT / "build").glob("esr_*_amd64.deb"))
    if not debs:
        pytest.fail("no build/esr_*_amd64.deb: run `make deb` (make test does)")
    return debs[-1]


def listener(family=socket.AF_INET, host="127.0.0.1") -> socket.socket:
    """A TCP listener on a free port that accepts and closes every connection."""
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, 0))
    srv.listen(16)

    def accept():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    return srv


def free_port(family=socket.AF_INET, host="127.0.0.1") -> int:
    """A TCP port nothing listens on (at the time of the call)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# Starts esr as systemd starts a service whose descriptor store holds
# something: those descriptors from 3 on, named in $LISTEN_FDNAMES, and
# $LISTEN_PID its own pid.
_LAUNCH = """
import fcntl, os, sys
names, argv = sys.argv[1], sys.argv[2:]
given = [int(fd) for fd in os.environ.pop("ESR_TEST_FDS").split()] if names else []
above = max([*given, 3 + len(given)]) + 1
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above) for fd in given]
for fd in given:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
if names:
    os.environ.update(LISTEN_FDS=str(len(high)), LISTEN_FDNAMES=names, LISTEN_PID=str(os.getpid()))
os.execv(argv[0], argv)
"""


class FdStore:
    """systemd's side of a restart as far as esr uses it: a notify socket
    ($NOTIFY_SOCKET) that keeps the descriptors the daemon stores
    (FDSTORE=1, FDNAME=, FDSTOREREMOVE=1, BARRIER=1), for the next daemon."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.fds: dict[str, int] = {}
        self.lock = threading.Lock()
        self.states: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 16)
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in msg.decode().splitlines() if "=" in line)
            with self.lock:
                self.states.append(msg.decode())
                if fields.get("FDSTORE") == "1" and fds:
                    name = fields.get("FDNAME", "stored")
                    if name in self.fds:  # the same one again, in esr's use of names
                        os.close(self.fds[name])
                    self.fds[name] = fds.pop()
                elif fields.get("FDSTOREREMOVE") == "1":
                    fd = self.fds.pop(fields.get("FDNAME", ""), None)
                    if fd is not None:
                        os.close(fd)
                for fd in fds:  # a barrier's pipe, closed once what came before is done
                    os.close(fd)

    def drop(self):
        """What `systemctl stop` does to the store."""
        with self.lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds = {}

    def close(self):
        self.drop()
        self.sock.close()


class Daemon:
    def __init__(
        self, root: Path, socket_path: Path | None = None, store: bool = False, extra: str = ""
    ):
        """store: run as under systemd, with a descriptor store (FdStore);
        extra: more of the config file."""
        self.root = root
        self.config = root / "esr.yaml"
        self.socket = socket_path or root / "esr.sock"
        self.log = root / "daemon.log"
        self.data_dir = root / "data"
        # One pin directory per daemon: tests run several at once.
        self.pin_dir = Path("/sys/fs/bpf") / f"esr-test-{secrets.token_hex(4)}"
        self.config.write_text(
            f"data_dir: {self.data_dir}\ncontrol_socket: {self.socket}\npin_dir: {self.pin_dir}\n"
            + extra
        )
        self.esr = Esr(self.data_dir)
        self.proc = None
        self.store = FdStore(root / f"notify-{secrets.token_hex(4)}") if store else None

    def start(self):
        env = dict(os.environ)
        argv = [ESR, "daemon", "--config", str(self.config)]
        if self.store is not None:
            env["NOTIFY_SOCKET"] = str(self.store.path)
            with self.store.lock:
                named = list(self.store.fds.items())
            env["ESR_TEST_FDS"] = " ".join(str(fd) for _, fd in named)
            argv = [
                sys.executable,
                "-c",
                _LAUNCH,
                ":".join(name for name, _ in named),
                *argv,
            ]
            self.proc = subprocess.Popen(
                argv,
                env=env,
                stderr=open(self.log, "ab"),
                pass_fds=[fd for _, fd in named],
            )
        else:
            self.proc = subprocess.Popen(argv, stderr=open(self.log, "ab"))
        deadline = time.time() + 20
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.time() < deadline, "daemon did not answer on its socket"
            try:
                if self.request(b'{"op": "status"}\n', timeout=1)["ok"]:
                    return self
            except OSError:
                pass
            time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None
        if sig == signal.SIGTERM and self.store is not None:
            self.store.drop()

    def remove_pins(self):
        """What a reboot does to the pin directory."""
        shutil.rmtree(self.pin_dir, ignore_errors=True)

    def request(self, raw: bytes, timeout=5) -> dict:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(self.socket))
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            return json.loads(s.recv(65536))

    def sessions(self, login=None) -> list[dict]:
        rows = self.esr.sessions()
        return [r for r in rows if login is None or r["login"] == login]

    def wait_closed(self, login: str, count: int, timeout=15) -> list[dict]:
        deadline = time.time() + timeout
        while True:
            rows = [r for r in self.sessions(login) if r["state"] == "closed"]
            if len(rows) >= count or time.time() > deadline:
                return rows
            time.sleep(0.1)

    def wait_sids_closed(self, *sids: str, timeout=15, msg="the session was never closed"):
        """Until every one of sids is listed and closed; fails after timeout."""
        deadline = time.time() + timeout
        while True:
            rows = {r["sid"]: r for r in self.sessions()}
            if all(rows.get(sid, {}).get("state") == "closed" for sid in sids):
                return
            assert time.time() < deadline, msg
            time.sleep(0.1)

    def wait_new(self, login: str, before: list[dict], timeout=15) -> list[dict]:
        """Until login has sessions not in before (open or not); returns them."""
        deadline = time.time() + timeout
        while not (new := only_new(before, self.sessions(login))):
            assert time.time() < deadline, f"no new session for {login}"
            time.sleep(0.1)
        return new


def only_new(rows_before, rows_after):
    old = {r["sid"] for r in rows_before}
    return [r for r in rows_after if r["sid"] not in old]


def wait_port(port, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


class SshServer:
    def __init__(self, port, user, key, service):
        self.port, self.user, self.key, self.service = port, user, key, service

    def options(self, port_flag="-p") -> list[str]:
        """The one spelling of the client options (scp takes the port as -P)."""
        return [
            "-i",
            str(self.key),
            port_flag,
            str(self.port),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ]

    def argv(self, *cmd, tty=False) -> list[str]:
        return ["ssh", *self.options(), *(["-tt"] if tty else []), f"{self.user}@127.0.0.1", *cmd]

    def scp_argv(self, local, remote) -> list[str]:
        return ["scp", *self.options("-P"), str(local), f"{self.user}@127.0.0.1:{remote}"]

    def ssh(self, *cmd, tty=False, input=None, timeout=60) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.argv(*cmd, tty=tty), input=input, capture_output=True, timeout=timeout
        )


class Terminal:
    """A program run on a pseudo-terminal of a given size, typed at as a
    user would."""

    # Still running: a test that failed half-way leaves its program here, and
    # the conftest ends it rather than leave it behind the test run.
    running: ClassVar[set[Terminal]] = set()

    def __init__(self, argv: list[str], env: dict | None = None, rows: int = 24, cols: int = 80):

        self.output = b""
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execvpe(argv[0], argv, env or dict(os.environ))
        Terminal.running.add(self)
        self.resize(rows, cols)

    @classmethod
    def end_all(cls) -> None:
        """Kill what is still running, and reap it."""
        for term in list(cls.running):
            os.kill(term.pid, signal.SIGKILL)
            os.waitpid(term.pid, 0)
            os.close(term.fd)
        cls.running.clear()

    def resize(self, rows: int, cols: int) -> None:
        """As a terminal window does: the kernel sends the program SIGWINCH."""
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, text: str | bytes) -> None:
        os.write(self.fd, text.encode() if isinstance(text, str) else text)

    def expect(self, wanted: bytes, timeout: float = 20) -> None:
        """Read until wanted has been printed since the last expect()."""

        start = len(self.output)
        deadline = time.monotonic() + timeout
        while wanted not in self.output[start:]:
            left = deadline - time.monotonic()
            assert left > 0, f"{wanted!r} never came; the terminal shows:\n{self.output[-2000:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    chunk = b""
                assert chunk, f"the program ended before {wanted!r}:\n{self.output[-2000:]!r}"
                self.output += chunk

    def wait(self, timeout: float = 30) -> int:
        """Read what is left, and the program's exit status."""

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not select.select([self.fd], [], [], 0.2)[0]:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    os.close(self.fd)
                    Terminal.running.discard(self)
                    return os.waitstatus_to_exitcode(status)
                continue
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                _, status = os.waitpid(self.pid, 0)
                os.close(self.fd)
                Terminal.running.discard(self)
                return os.waitstatus_to_exitcode(status)
            self.output += chunk
        Terminal.end_all()
        raise AssertionError(f"the program did not end:\n{self.output[-2000:]!r}")


class Session:
    """A recording written without the kernel, as the recorder writes one:
    events are added in order and go to disk as a frame at each flush()."""

    START_NS = 1_790_000_000 * 10**9

    def __init__(self, data_dir: Path, sid: str, login: str = "alice", start_ns: int = 0, **start):
        from esr import recording, schema

        self.schema = schema
        (data_dir / "sessions").mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "sessions" / f"{sid}.esr"
        self.writer = recording.Writer.create(str(self.path), sid, 1)
        self.time = start_ns or self.START_NS
        self.start = schema.SessionStart(
            0, self.time, sid, "srv", "host", login, login, seed_pid=100, **start
        )
        self.writer.append(recording.KIND_START, [self.start])
        self.ei = 1
        self.pending: list = []
        self.records = [0, 0, 0]
        self.lost = [0, 0, 0]
        self.untracked = 0

    def _add(self, make, buffer: int | None, dt: float):
        self.time += int(dt * 1e9)
        event = make(self.ei, self.time)
        self.ei += 1
        self.pending.append(event)
        if buffer is not None:
            self.records[buffer] += 1
        return event

    def command(self, pid: int, ppid: int, path: bytes, *argv: bytes, rc: int = 0, dt=0.5):
        program = path.rsplit(b"/", 1)[-1][:15]
        return self._add(
            lambda ei, t: self.schema.Command(
                ei, t, pid, ppid, 7, program, path, list(argv), rc, 1000, 1000
            ),
            0,
            dt,
        )

    def open(self, pid: int, path: bytes, rc: int = 3, flags: int = 0, dt=0.001):
        return self._add(
            lambda ei, t: self.schema.Disk(ei, t, pid, 7, b"prog", path, flags, rc), 1, dt
        )

    def connect(self, pid: int, addr: str, port: int, rc: int = 0, dt=0.01):
        return self._add(
            lambda ei, t: self.schema.Network(
                ei, t, pid, 7, b"curl", 4, "10.0.0.1", 40000, addr, port, rc
            ),
            2,
            dt,
        )

    def ptrace(self, pid: int, request: str, target: int, target_program: bytes, dt=0.01):
        """pid attached to target (or wrote to it), which joined the session."""
        return self._add(
            lambda ei, t: self.schema.Ptrace(
                ei, t, pid, 7, b"gdb", request, target, target, target_program, 0, True
            ),
            0,
            dt,
        )

    def lose(self, counts: list[int], untracked: int = 0, dt=0.01):
        for i, n in enumerate(counts):
            self.lost[i] += n
        self.untracked += untracked
        return self._add(lambda ei, t: self.schema.Lost(ei, t, counts, untracked), None, dt)

    def flush(self) -> Session:
        from esr.recording import KIND_EVENTS

        if self.pending:
            # As the recorder counts them: per buffer, then untracked forks.
            kinds = len(self.schema.LOST_KINDS)
            lost = [0] * kinds
            for e in self.pending:
                if type(e) is self.schema.Lost:
                    for i, n in enumerate([*e.lost, *[0] * (kinds - 1 - len(e.lost))]):
                        lost[i] += n
                    lost[-1] += e.untracked_forks
            self.writer.append(KIND_EVENTS, self.pending, records=self.records, lost=lost)
        self.pending, self.records = [], [0, 0, 0]
        return self

    def end(self, dt: float = 1.0) -> Path:
        from esr.recording import KIND_END

        self.flush()
        self.time += int(dt * 1e9)
        end = self.schema.SessionEnd(
            self.ei, self.time, "exited", True, False, [0, 0, 0], self.lost, self.untracked
        )
        self.writer.append(KIND_END, [end])
        self.writer.close()
        return self.path
