"""The Debian package on this host: install, use, remove, purge; and the
unit file, checked by systemd's own tools."""

from __future__ import annotations

import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import Session, deb_file, require_bpf, sid_from_stderr

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


@pytest.mark.parametrize("unit", ["esr.service", "esr-ui.service"])
def test_unit_passes_systemd_analyze_without_warnings(deb, unit):
    sh("dpkg", "-i", str(deb))
    try:
        path = f"/lib/systemd/system/{unit}"
        r = sh("systemd-analyze", "verify", path, check=False)
        assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
        r = sh("systemd-analyze", "security", "--offline=true", path)
        score = float(re.search(rf"exposure level for {unit}: ([\d.]+)", r.stdout).group(1))
        assert score <= 5.0
    finally:
        sh("dpkg", "-P", "esr")


def test_the_ui_ships_disabled_and_serves_from_the_package(deb, tmp_path):
    sh("dpkg", "-i", str(deb))
    try:
        assert not Path("/etc/systemd/system/multi-user.target.wants/esr-ui.service").exists()
        data = tmp_path / "data"
        s = Session(data, "packaged", login="alice")
        s.command(100, 1, b"/usr/bin/packaged-command", b"--flag")
        s.end()
        args = ["/usr/bin/esr", "--data-dir", str(data)]
        assert "1 read" in sh(*args, "index", "--index", str(tmp_path / "ix")).stdout
        url_file = tmp_path / "url"
        ui = subprocess.Popen(
            [*args, "ui", "--listen", "127.0.0.1:0", "--index", str(tmp_path / "ix"),
             "--token-file", str(url_file)],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert "its address with the token is in" in ui.stderr.readline()
            assert oct(url_file.stat().st_mode & 0o777) == "0o600"
            url = url_file.read_text().strip()
            base = url.split("?")[0]
            with pytest.raises(urllib.error.HTTPError, match="401"):
                urllib.request.urlopen(base)
            token = url.split("token=")[1]
            get = urllib.request.build_opener()
            get.addheaders = [("Authorization", f"Bearer {token}")]
            assert b"<mark>packaged</mark>-command" in get.open(base + "search?q=packaged").read()
            player = get.open(base + "static/player/asciinema-player.min.js").read()
            assert len(player) > 100_000
        finally:
            ui.terminate()
            ui.wait(10)
    finally:
        sh("dpkg", "-P", "esr")
