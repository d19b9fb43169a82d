"""The Debian package on this host: install, use, remove, purge; and the
unit file, checked by systemd's own tools."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from helpers import deb_file, require_bpf, sid_from_stderr

UNIT = "/lib/systemd/system/esr.service"


def sh(*args, check=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(args, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def deb():
    if os.geteuid() != 0:
        pytest.skip("installing a package needs root")
    path = deb_file()
    if sh("dpkg-query", "-W", "-f=${Status}", "esr", check=False).stdout.startswith("install ok"):
        pytest.skip("an esr package is installed on this host already: not touching it")
    yield path
    sh("dpkg", "-P", "esr", check=False)


def test_install_use_remove_purge(deb, tmp_path):
    require_bpf()
    sh("dpkg", "-i", str(deb))
    try:
        assert os.path.realpath("/usr/bin/esr") == "/usr/lib/esr/esr"
        version = sh("/usr/bin/esr", "--version").stdout
        assert re.fullmatch(r"esr \d+\.\d+\.\d+ \(commit [0-9a-f]{7,}(-dirty)?\)\n", version)
        assert sh("/usr/bin/esr", "check").stdout.count(": yes") >= 20
        data = tmp_path / "data"
        r = sh(
            "/usr/bin/esr", "--data-dir", str(data), "run", "--", "sh", "-c", "cat /etc/hostname"
        )
        sid = sid_from_stderr(r.stderr)
        shown = sh("/usr/bin/esr", "--data-dir", str(data), "show", sid, "--type", "command").stdout
        assert '"path":"/usr/bin/cat"' in shown
        assert (
            Path("/etc/esr/esr.yaml").exists()
            and oct(Path("/var/lib/esr").stat().st_mode)[-3:] == "700"
        )
        assert "Default: no" in Path("/usr/share/pam-configs/esr").read_text()
        assert "esr" not in Path("/etc/pam.d/common-session").read_text()  # shipped disabled
        assert Path("/usr/share/man/man1/esr.1.gz").exists()
        # A local edit survives removal (conffile).
        Path("/etc/esr/esr.yaml").write_text("# edited\ndata_dir: /var/lib/esr\n")
        sh("dpkg", "-r", "esr")
        assert not Path("/usr/bin/esr").exists()
        assert Path("/etc/esr/esr.yaml").read_text().startswith("# edited")
    finally:
        r = sh("dpkg", "-P", "esr")
    assert "purged" in r.stdout + r.stderr
    for gone in ("/etc/esr", "/var/lib/esr", "/usr/lib/esr", "/run/esr", UNIT):
        assert not os.path.exists(gone), gone
    status = sh("dpkg-query", "-W", "-f=${db:Status-Status}", "esr", check=False)
    assert status.returncode != 0 or status.stdout == "not-installed"


def test_upgrade_keeps_a_locally_edited_config(deb):
    sh("dpkg", "-i", str(deb))
    try:
        Path("/etc/esr/esr.yaml").write_text("# mine\nflush_interval_ms: 50\n")
        sh("dpkg", "-i", str(deb))
        assert Path("/etc/esr/esr.yaml").read_text() == "# mine\nflush_interval_ms: 50\n"
    finally:
        sh("dpkg", "-P", "esr")


def test_unit_passes_systemd_analyze_without_warnings(deb):
    sh("dpkg", "-i", str(deb))
    try:
        r = sh("systemd-analyze", "verify", UNIT, check=False)
        assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
        r = sh("systemd-analyze", "security", "--offline=true", UNIT)
        score = float(re.search(r"exposure level for esr.service: ([\d.]+)", r.stdout).group(1))
        assert score <= 5.0
    finally:
        sh("dpkg", "-P", "esr")
