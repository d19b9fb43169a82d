"""Smoke test of the qemu guest harness: boot, systemd, BTF, ssh as a new
user, file copy, reboot, poweroff. Run with: python3 -m pytest -m slow tests/guest

Skips when qemu/debootstrap are missing; ESR_REQUIRE_GUEST=1 fails instead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guest  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    reason = guest.unavailable()
    if reason:
        if os.environ.get("ESR_REQUIRE_GUEST") == "1":
            pytest.fail(f"ESR_REQUIRE_GUEST=1, but {reason}")
        pytest.skip(reason)
    # workdir under pytest's tmp dir: console.log survives for post-mortems.
    with guest.Guest(workdir=tmp_path_factory.mktemp("guest")) as g:
        yield g


def system_state(vm) -> str:
    return vm.ssh("systemctl is-system-running --wait", check=False, timeout=300).stdout.strip()


def test_boots_systemd_kernel_with_btf(vm):
    assert system_state(vm) in ("running", "degraded"), vm.ssh("systemctl --failed").stdout
    assert vm.ssh("uname -r").stdout.startswith("6.1.")
    assert vm.ssh("test -e /sys/kernel/btf/vmlinux", check=False).returncode == 0
    vm.ssh(["python3", "-c", "import socket; socket.create_connection"])


def test_ssh_as_new_user(vm, tmp_path):
    key = tmp_path / "id_user"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    vm.ssh("useradd -m -s /bin/bash esrtest"
           " && install -d -m 700 -o esrtest -g esrtest ~esrtest/.ssh"
           " && install -m 600 -o esrtest -g esrtest /dev/stdin ~esrtest/.ssh/authorized_keys",
           input=key.with_suffix(".pub").read_text())
    r = vm.ssh("id -un; echo $HOME; sudo -n true 2>/dev/null || echo no-sudo",
               user="esrtest", key=key)
    assert r.stdout.split() == ["esrtest", "/home/esrtest", "no-sudo"]
    # Only the user's own key gets in: the image's root key is not accepted.
    assert vm.ssh("true", user="esrtest", check=False).returncode == 255


def test_copy_to(vm, tmp_path):
    (tmp_path / "hello.txt").write_text("hello guest\n")
    vm.copy_to(tmp_path / "hello.txt", "/tmp/hello.txt")
    assert vm.ssh("cat /tmp/hello.txt").stdout == "hello guest\n"


def test_reboot_comes_back(vm):
    before = vm.ssh("cat /proc/sys/kernel/random/boot_id").stdout
    vm.ssh("touch /root/survives-reboot")
    vm.reboot()
    assert vm.ssh("cat /proc/sys/kernel/random/boot_id").stdout != before
    assert vm.ssh("ps -p 1 -o comm=").stdout.strip() == "systemd"
    assert system_state(vm) in ("running", "degraded")
    # Same overlay disk: state from before the reboot is still there.
    vm.ssh("test -e /root/survives-reboot && id esrtest")


def test_poweroff(vm):
    vm.poweroff()
    assert vm.proc.returncode == 0
