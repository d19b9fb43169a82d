"""The kernel matrix: esr's programs on the kernel of each supported Debian
release, Debian 11 (5.10), 12 (6.1) and 13 (6.12), each its own
linux-image package, booted under qemu. The onedir binary esr ships is
copied into each guest and runs `esr check` and the kernel test table
(kernel_table.py): exec, failed exec and argv limits; the open syscalls;
connect over v4 and v6, refused included; fork tracking through setsid and
a double fork; a cgroup escape; lost-record accounting; the terminal;
ptrace and io_uring (whose submission tracepoint 5.10 names differently).

The binary is built on Debian 12 and needs its glibc (2.35 or later), which
Debian 11's userland lacks (2.31): 5.10 is booted under Debian 12's
userland, from Debian 11's kernel package. `make test-kernels` runs this."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guest

from helpers import REQUIRE_BPF, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.kernels]


@dataclass(frozen=True)
class Kernel:
    release: str  # the userland
    kernel: str  # the release whose kernel package boots
    version: str  # what `uname -r` starts with


KERNELS = {
    "5.10": Kernel("bookworm", "bullseye", "5.10."),
    "6.1": Kernel("bookworm", "bookworm", "6.1."),
    "6.12": Kernel("trixie", "trixie", "6.12."),
}
ROWS = [
    "exec",
    "argv limits",
    "open syscalls",
    "connect v4 and v6",
    "fork tracking",
    "cgroup escape",
    "lost records",
    "terminal",
    "ptrace and io_uring",
]


@pytest.fixture(scope="module", params=list(KERNELS))
def booted(request, tmp_path_factory):
    """One guest per kernel; what `esr check` and the table found there."""
    k = KERNELS[request.param]
    reason = guest.unavailable(release=k.release, kernel=k.kernel)
    if reason:
        if REQUIRE_BPF or os.environ.get("ESR_REQUIRE_GUEST") == "1":
            pytest.fail(f"the {request.param} guest is required, but {reason}")
        pytest.skip(reason)
    onedir, gen = ROOT / "build/dist/esr", ROOT / "build/bench/gen"
    if not (onedir / "esr").exists():
        pytest.fail(f"no {onedir}/esr: run `make binary` (make test-kernels does)")
    workdir = tmp_path_factory.mktemp(f"kernel-{request.param}")
    # Static: the guest has no liburing.
    uring_ops = workdir / "uring_ops"
    source = ROOT / "tests/programs/uring_ops.c"
    subprocess.run(
        ["gcc", "-O2", "-static", "-o", str(uring_ops), str(source), "-l:liburing.a"], check=True
    )
    t0 = time.monotonic()
    with guest.Guest(release=k.release, kernel=k.kernel, workdir=workdir) as g:
        booted_in = time.monotonic() - t0
        g.copy_to(onedir, "/opt/esr")
        g.copy_to(gen, "/opt/gen")
        g.copy_to(uring_ops, "/opt/uring_ops")
        g.copy_to(Path(__file__).parent / "kernel_table.py", "/opt/kernel_table.py")
        uname = g.ssh("uname -r").stdout.strip()
        check = g.ssh("/opt/esr/esr check", check=False)
        print(f"\n{request.param}: esr check exits {check.returncode} {check.stderr.strip()}")
        t1 = time.monotonic()
        table = json.loads(
            g.ssh(
                "python3 /opt/kernel_table.py /opt/esr/esr /opt/gen /opt/uring_ops", timeout=1200
            ).stdout
        )
        print(
            f"\n{request.param} ({uname}): boot {booted_in:.0f} s, table"
            f" {time.monotonic() - t1:.0f} s"
        )
        for row, (ok, seen) in table.items():
            print(f"  {row}: {'ok' if ok else 'FAILED'}: {seen}")
        yield request.param, uname, check, table


def test_the_release_boots_its_own_kernel(booted):
    kernel, uname, _check, _table = booted
    assert uname.startswith(KERNELS[kernel].version)


def test_esr_check_passes(booted):
    kernel, _uname, check, _table = booted
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"kernel: {KERNELS[kernel].version}" in check.stdout


def test_forks_execs_and_exits_are_hooked_through_raw_tracepoints(booted):
    # Every supported kernel has them: the tracepoints are only the fallback.
    _kernel, _uname, check, _table = booted
    assert "raw tracepoints: available" in check.stdout, check.stdout


def test_esr_check_says_in_one_line_what_the_kernel_lacks(booted):
    _kernel, _uname, check, _table = booted
    if check.returncode != 0:
        [line] = check.stderr.splitlines()
        assert line.startswith("esr: cannot record on this kernel: "), line


@pytest.mark.parametrize("row", ROWS)
def test_row(booted, row):
    _kernel, _uname, _check, table = booted
    ok, seen = table[row]
    assert ok, seen
