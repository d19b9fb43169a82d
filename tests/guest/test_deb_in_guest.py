"""The user's main path on a real systemd host (a Debian bookworm guest under
qemu, kernel 6.1): apt install the .deb, enable the service and PAM, ssh in,
see the session recorded; reboot and see it again; purge and find nothing
left."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guest

from helpers import REQUIRE_BPF, deb_file

pytestmark = pytest.mark.slow

USER = "alice"


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    reason = guest.unavailable()
    if reason:
        if REQUIRE_BPF or os.environ.get("ESR_REQUIRE_GUEST") == "1":
            pytest.fail(f"the systemd guest is required, but {reason}")
        pytest.skip(reason)
    deb = deb_file()
    with guest.Guest(workdir=tmp_path_factory.mktemp("guest")) as g:
        g.copy_to(deb, "/tmp/esr.deb")
        yield g


@pytest.fixture(scope="module")
def user_key(vm, tmp_path_factory):
    key = tmp_path_factory.mktemp("keys") / "id_alice"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    vm.ssh(
        f"useradd -m -s /bin/bash {USER}"
        f" && install -d -m 700 -o {USER} -g {USER} ~{USER}/.ssh"
        f" && install -m 600 -o {USER} -g {USER} /dev/stdin ~{USER}/.ssh/authorized_keys",
        input=key.with_suffix(".pub").read_text(),
    )
    return key


def sessions(vm) -> list[dict]:
    out = vm.ssh("esr sessions --format json").stdout
    return [json.loads(line) for line in out.splitlines()]


def login_and_work(vm, key, marker: str) -> dict:
    """ssh in as the user, do some work, and return the session it made."""
    before = {s["sid"] for s in sessions(vm)}
    vm.ssh(
        f"ls / >/dev/null; cat /etc/hostname; touch /tmp/{marker};"
        " python3 -c \"import socket; socket.socket().connect_ex(('127.0.0.1', 22))\"",
        user=USER,
        key=key,
    )
    for _ in range(100):
        new = [s for s in sessions(vm) if s["sid"] not in before and s["state"] == "closed"]
        if new:
            return new[0]
        vm.ssh("sleep 0.2")
    raise AssertionError(f"no closed session for the login; sessions: {sessions(vm)}")


def events(vm, sid: str) -> list[dict]:
    return [json.loads(line) for line in vm.ssh(f"esr show {sid}").stdout.splitlines()]


# Fetches a page of esr ui in the guest, with the token of the address the
# service wrote, until it holds the text asked for (the index is built in
# the background after start).
FETCH = """
import sys, time, urllib.request
base, token = open("/run/esr-ui/url").read().strip().split("?token=")
for _ in range(100):
    auth = {"Authorization": "Bearer " + token}
    page = urllib.request.urlopen(urllib.request.Request(base + sys.argv[1], headers=auth))
    page = page.read().decode()
    if sys.argv[2] in page:
        break
    time.sleep(0.2)
print(page)
"""


def check_ui(vm, sid: str) -> None:
    """esr-ui.service ships disabled; started, its hardened unit reads the
    recordings and serves them."""
    assert vm.ssh("systemctl is-enabled esr-ui", check=False).stdout.strip() == "disabled"
    vm.ssh(
        "systemctl start esr-ui && for i in $(seq 100); do test -s /run/esr-ui/url && break;"
        " sleep 0.1; done"
    )
    assert sid in vm.ssh(["python3", "-c", FETCH, "", sid]).stdout
    found = vm.ssh(["python3", "-c", FETCH, "search?q=hostname", "/etc/<mark>"]).stdout
    assert "/usr/bin/cat /etc/<mark>hostname</mark>" in found
    assert vm.ssh("stat -c %a /var/cache/esr /run/esr-ui").stdout.split() == ["700", "700"]
    assert vm.ssh("systemctl is-active esr-ui").stdout.strip() == "active"


def test_install_enable_record_reboot_purge(vm, user_key):
    r = vm.ssh("apt-get install -y /tmp/esr.deb", timeout=600)
    assert "esr" in r.stdout
    vm.ssh("systemctl enable --now esr")
    assert vm.ssh("systemctl is-active esr").stdout.strip() == "active"

    # The same BPF object loads on the guest's 6.1 kernel, which has kprobes.
    check = vm.ssh("esr check").stdout
    assert re.search(r"recorder programs: \d+ loaded and attached", check), check
    assert "kprobe: available" in check

    # The hardened unit, as systemd itself rates it.
    security = vm.ssh("systemd-analyze security esr.service", check=False).stdout
    score = float(security.rsplit("exposure level for esr.service:", 1)[1].split()[0])
    assert score <= 5.0, security[-2000:]

    assert "enabled in /etc/pam.d/common-session" in vm.ssh("esr pam enable").stdout
    session = login_and_work(vm, user_key, "before-reboot")
    assert (session["login"], session["user"]) == (USER, USER)
    recorded = events(vm, session["sid"])
    start = recorded[0]
    assert start["event"] == "session.start" and start["addr.remote"] == "10.0.2.2"
    commands = {
        (e["path"], tuple(e["argv"]))
        for e in recorded
        if e["event"] == "session.command" and e["return_code"] == 0
    }
    assert ("/usr/bin/ls", ("/",)) in commands and ("/usr/bin/cat", ("/etc/hostname",)) in commands
    assert [
        e for e in recorded if e["event"] == "session.disk" and e["path"] == "/tmp/before-reboot"
    ]
    [net] = [e for e in recorded if e["event"] == "session.network"]
    assert (net["dst_addr"], net["dst_port"], net["return_code"]) == ("127.0.0.1", 22, 0)
    assert recorded[-1]["event"] == "session.end" and recorded[-1]["enhanced_recording"] is True
    audit = vm.ssh(f'grep -c \'"sid":"{session["sid"]}"\' /var/lib/esr/log/events.log').stdout
    assert int(audit) >= 4
    assert "intact" in vm.ssh(f"esr verify {session['sid']}").stdout
    check_ui(vm, session["sid"])

    vm.reboot()
    assert vm.ssh("systemctl is-active esr", check=False).stdout.strip() == "active"
    session = login_and_work(vm, user_key, "after-reboot")
    assert [
        e
        for e in events(vm, session["sid"])
        if e["event"] == "session.disk" and e["path"] == "/tmp/after-reboot"
    ]

    out = vm.ssh("apt-get purge -y esr", timeout=600)
    assert "purged" in out.stdout + out.stderr
    left = vm.ssh(
        "ls -d /etc/esr /var/lib/esr /run/esr /usr/lib/esr /usr/bin/esr "
        "/lib/systemd/system/esr.service /usr/share/pam-configs/esr "
        "/lib/systemd/system/esr-ui.service /var/cache/esr /run/esr-ui "
        "/etc/systemd/system/multi-user.target.wants/esr.service /sys/fs/bpf/esr 2>/dev/null; "
        "grep -l esr /etc/pam.d/* 2>/dev/null; true"
    ).stdout
    assert left.strip() == ""
    assert vm.ssh("dpkg-query -W -f='${db:Status-Status}' esr", check=False).stdout in (
        "",
        "not-installed",
    )
    assert (
        vm.ssh("systemctl list-unit-files esr.service --no-legend", check=False).stdout.strip()
        == ""
    )
    # Logins still work without it.
    assert vm.ssh("id -un", user=USER, key=user_key).stdout.strip() == USER
