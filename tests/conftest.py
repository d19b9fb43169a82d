"""Fixtures; what tests share besides them is in helpers.py."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import (
    ESR,
    SSHD,
    Daemon,
    Esr,
    SshServer,
    Terminal,
    free_port,
    require_bpf,
    wait_port,
)


@pytest.fixture(autouse=True)
def _no_terminal_left():
    yield
    Terminal.end_all()


@pytest.fixture
def bpf():
    require_bpf()


@pytest.fixture
def esr(tmp_path) -> Esr:
    return Esr(tmp_path / "data")


@pytest.fixture(scope="module")
def daemon_root(tmp_path_factory):
    require_bpf()
    return tmp_path_factory.mktemp("daemon")


@pytest.fixture
def daemon(daemon_root):
    d = Daemon(daemon_root).start()
    yield d
    d.stop()
    d.remove_pins()


@pytest.fixture(scope="module")
def sshd(daemon_root):
    """sshd on loopback with its own PAM service (named after its argv[0])
    running the esr hook, and a test user with a key. All undone after."""
    service = f"esr-test-sshd-{secrets.token_hex(3)}"
    user = f"esrt{secrets.token_hex(3)}"
    work = daemon_root / "sshd"
    work.mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", work / "host_key"], check=True
    )
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", work / "user_key"], check=True
    )
    subprocess.run(["useradd", "-m", "-s", "/bin/bash", user], check=True)
    pam_file = Path("/etc/pam.d") / service
    try:
        home = Path(pwd.getpwnam(user).pw_dir)
        (home / ".ssh").mkdir(mode=0o700)
        shutil.copy(work / "user_key.pub", home / ".ssh" / "authorized_keys")
        shutil.chown(home / ".ssh", user, user)
        shutil.chown(home / ".ssh" / "authorized_keys", user, user)
        hook = f"session optional pam_exec.so quiet {ESR} pam --config {daemon_root / 'esr.yaml'}"
        pam_file.write_text(Path("/etc/pam.d/sshd").read_text() + hook + "\n")
        os.symlink(SSHD, work / service)
        os.makedirs("/run/sshd", exist_ok=True)
        port = free_port()
        proc = subprocess.Popen(
            [
                str(work / service),
                "-D",
                "-p",
                str(port),
                "-o",
                "ListenAddress=127.0.0.1",
                "-o",
                f"HostKey={work / 'host_key'}",
                "-o",
                "UsePAM=yes",
                "-o",
                "PidFile=none",
                "-E",
                str(work / "sshd.log"),
            ]
        )
        wait_port(port)
        yield SshServer(port, user, work / "user_key", service)
        proc.terminate()
        proc.wait(10)
    finally:
        pam_file.unlink(missing_ok=True)
        subprocess.run(["pkill", "-KILL", "-u", user], check=False)
        subprocess.run(["userdel", "-r", "-f", user], check=False, capture_output=True)
