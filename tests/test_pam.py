"""`esr pam enable|disable|status` on this host's real PAM configuration,
which the test restores whatever happens."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import ESR


def test_pam_enable_disable_status_on_this_host():
    if os.geteuid() != 0 or not shutil.which("pam-auth-update"):
        pytest.skip("needs root and pam-auth-update")
    watched = [
        "/etc/pam.d/common-session",
        "/etc/pam.d/common-session-noninteractive",
        "/etc/pam.d/sshd",
    ] + [str(p) for p in Path("/var/lib/pam").glob("*")]
    saved = {p: Path(p).read_bytes() for p in watched if Path(p).exists()}
    profile = Path("/usr/share/pam-configs/esr")
    had_profile = profile.exists()
    backups = [Path(p + ".esr-backup") for p in watched]
    had_backup = {b: b.exists() for b in backups}
    try:
        status = subprocess.run([ESR, "pam", "status"], capture_output=True, text=True)
        assert status.returncode == 3 and status.stdout.strip() == "disabled"
        r = subprocess.run([ESR, "pam", "enable"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        common = Path("/etc/pam.d/common-session").read_text()
        assert f"pam_exec.so quiet {ESR} pam" in common
        assert "esr" not in Path("/etc/pam.d/common-session-noninteractive").read_text()
        assert (
            Path("/etc/pam.d/common-session.esr-backup").read_bytes()
            == saved["/etc/pam.d/common-session"]
        )
        again = subprocess.run([ESR, "pam", "enable"], capture_output=True, text=True)
        assert again.returncode == 0 and "already enabled" in again.stdout
        assert Path("/etc/pam.d/common-session").read_text() == common
        assert subprocess.run([ESR, "pam", "status"], capture_output=True).returncode == 0
        r = subprocess.run([ESR, "pam", "disable"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert Path("/etc/pam.d/common-session").read_bytes() == saved["/etc/pam.d/common-session"]
        again = subprocess.run([ESR, "pam", "disable"], capture_output=True, text=True)
        assert again.returncode == 0
        assert subprocess.run([ESR, "pam", "status"], capture_output=True).returncode == 3
    finally:
        for path, data in saved.items():
            Path(path).write_bytes(data)
        if not had_profile:
            profile.unlink(missing_ok=True)
        for b in backups:
            if not had_backup[b]:
                b.unlink(missing_ok=True)
        subprocess.run(["pam-auth-update", "--package", "--remove", "esr"], capture_output=True)
        for path, data in saved.items():
            Path(path).write_bytes(data)
