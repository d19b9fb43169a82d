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
