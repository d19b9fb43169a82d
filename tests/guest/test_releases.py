"""esr's BPF programs on each supported Debian release's own kernel: the
onedir binary, copied into a bullseye (5.10), bookworm (6.1) and trixie (6.12)
guest, loads all its programs (`esr check`) and records a command."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guest

from helpers import REQUIRE_BPF, ROOT, sid_from_stderr

pytestmark = pytest.mark.slow

KERNELS = {"bullseye": "5.10.", "bookworm": "6.1.", "trixie": "6.12."}

BULLSEYE = pytest.mark.xfail(
    strict=True,
    reason=(
        "esr does not run on Debian 11 yet. (1) The binary is built on bookworm and needs glibc"
        " 2.35 (bullseye has 2.31): \"version `GLIBC_2.35' not found (required by"
        ' /opt/esr/_internal/libpython3.11.so.1.0)". (2) Kernel 5.10 rejects exec_enter and'
        " execat_enter: their bpf_loop callback is a BPF_PSEUDO_FUNC reference (kernel 5.13) and"
        ' bpf_loop itself needs 5.17, so the load fails with "number of funcs in func_info'
        " doesn't match number of subprogs\"."
    ),
)


@pytest.mark.parametrize(
    "release", [pytest.param("bullseye", marks=BULLSEYE), "bookworm", "trixie"]
)
def test_esr_check_loads_and_records(release, tmp_path):
    reason = guest.unavailable(release=release)
    if reason:
        if REQUIRE_BPF or os.environ.get("ESR_REQUIRE_GUEST") == "1":
            pytest.fail(f"the {release} guest is required, but {reason}")
        pytest.skip(reason)
    onedir = ROOT / "build/dist/esr"
    if not (onedir / "esr").exists():
        pytest.fail(f"no {onedir}/esr: run `make binary` (make test does)")

    with guest.Guest(release=release, workdir=tmp_path) as g:
        print(f"{release}: boot to ssh {g.boot_seconds:.1f} s")
        g.copy_to(onedir, "/opt/esr")
        check = g.ssh("/opt/esr/esr check", check=False)
        out = check.stdout + check.stderr
        assert f"kernel: {KERNELS[release]}" in out, out
        assert check.returncode == 0, out
        assert "recorder programs: 18 loaded and attached" in out, out

        run = g.ssh("cd /tmp && /opt/esr/esr run -- sh -c 'ls /; cat /etc/hostname'")
        assert "esr-guest" in run.stdout
        shown = g.ssh(f"/opt/esr/esr show {sid_from_stderr(run.stderr)} --format text").stdout
        assert "/usr/bin/ls /" in shown and "/usr/bin/cat /etc/hostname" in shown, shown
