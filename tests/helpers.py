"""What the tests share: the esr CLI under test, reading its output, the BPF
gate (skip without root/BPF; fail instead under ESR_REQUIRE_BPF=1), and
small network fixtures. Fixtures themselves are in conftest.py."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ESR = os.environ.get("ESR_BIN", str(ROOT / ".venv" / "bin" / "esr"))
REQUIRE_BPF = os.environ.get("ESR_REQUIRE_BPF") == "1"


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

    def lose(self, counts: list[int], untracked: int = 0, dt=0.01):
        for i, n in enumerate(counts):
            self.lost[i] += n
        return self._add(lambda ei, t: self.schema.Lost(ei, t, counts, untracked), None, dt)

    def flush(self) -> Session:
        from esr.recording import KIND_EVENTS

        if self.pending:
            lost = [e.lost for e in self.pending if type(e) is self.schema.Lost]
            self.writer.append(
                KIND_EVENTS,
                self.pending,
                records=self.records,
                lost=[sum(x) for x in zip(*lost)] if lost else (),
            )
        self.pending, self.records = [], [0, 0, 0]
        return self

    def end(self, dt: float = 1.0) -> Path:
        from esr.recording import KIND_END

        self.flush()
        self.time += int(dt * 1e9)
        end = self.schema.SessionEnd(
            self.ei, self.time, "exited", True, False, [0, 0, 0], self.lost, 0
        )
        self.writer.append(KIND_END, [end])
        self.writer.close()
        return self.path
