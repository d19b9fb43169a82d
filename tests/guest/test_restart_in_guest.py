"""Recording never stops, on a real systemd host (a Debian bookworm guest):
an ssh session runs the benchmark's generator at 5,000 opens a second
while the host side restarts esr, kills it (Restart=on-failure brings it
back) and upgrades it to a package whose programs differ; each time the
session goes on in the same recording, and every open is recorded or
counted lost. Then a stop ends the sessions and a purge leaves nothing in
/sys/fs/bpf."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guest

from helpers import REQUIRE_BPF, ROOT, deb_file

pytestmark = pytest.mark.slow

USER = "alice"
GEN = "/usr/lib/esr/bench/gen"
RATE = 5000
# Rings big enough for the seconds no daemon runs under emulation, where a
# restart took up to 18 s: 16 MiB per CPU hold about 160,000 opens.
CONFIG = "enhanced_recording:\n  disk_buffer_size: 4096\n"

# Run in the guest on a session's recording: what the test checks, without
# copying 100,000 events out of it. It reads them one at a time: held all at
# once, 600,000 events took 2 GiB, all of the guest's memory. Under
# emulation it gets through 4,000 to 6,000 events a second.
SUMMARY = """
import json, subprocess, sys
sid = sys.argv[1]
opens, resumes, commands, end = 0, [], [], None
with subprocess.Popen(["esr", "show", sid], stdout=subprocess.PIPE, text=True) as show:
    for line in show.stdout:
        end = json.loads(line)
        if end["event"] == "session.disk":
            opens += end["path"] == "/etc/hostname" and end["program"] == "gen"
        elif end["event"] == "session.resume":
            resumes.append(end)
        elif end["event"] == "session.command":
            commands.append([end["path"], *end["argv"]])
if show.returncode:
    sys.exit(f"esr show exited {show.returncode}")
print(json.dumps({"opens": opens, "resumes": resumes, "end": end, "commands": commands}))
"""


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    reason = guest.unavailable()
    if reason:
        if REQUIRE_BPF or os.environ.get("ESR_REQUIRE_GUEST") == "1":
            pytest.fail(f"the systemd guest is required, but {reason}")
        pytest.skip(reason)
    deb, upgrade = deb_file(), upgrade_deb()
    t0 = time.monotonic()
    with guest.Guest(workdir=tmp_path_factory.mktemp("guest")) as g:
        g.copy_to(deb, "/tmp/esr.deb")
        g.copy_to(upgrade, "/tmp/esr-upgrade.deb")
        g.ssh("apt-get install -y /tmp/esr.deb", timeout=600)
        # Ring sizes apply at a start, not across a restart.
        g.ssh("cat >> /etc/esr/esr.yaml && systemctl stop esr && systemctl start esr", input=CONFIG)
        g.ssh("esr pam enable")
        print(f"guest up and esr installed in {time.monotonic() - t0:.0f} s")
        yield g


def upgrade_deb() -> Path:
    debs = sorted((ROOT / "build" / "upgrade").glob("esr_*+upgrade_amd64.deb"))
    if not debs:
        pytest.fail("no build/upgrade/esr_*+upgrade_amd64.deb: run `make upgrade-deb`")
    return debs[-1]


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


def rows(vm) -> list[dict]:
    return [json.loads(line) for line in vm.ssh("esr sessions --format json").stdout.splitlines()]


def sids(vm) -> list[str]:
    return [r["sid"] for r in rows(vm) if r["login"] == USER]


def row(vm, sid: str) -> dict:
    # Not a grep for the sid: root's own ssh session that runs the grep is
    # recorded too, with the sid in its command.
    [found] = (r for r in rows(vm) if r["sid"] == sid)
    return found


class Generator:
    """An ssh session of the user that runs the generator for seconds once
    before is done, after an optional script."""

    def __init__(self, vm, key, seconds: int, before: str = ""):
        self.vm = vm
        self.known = set(sids(vm))
        self.proc = vm.popen(
            f"{before} echo go | {GEN} open {seconds} {RATE} --cpu -1; wait",
            user=USER,
            key=key,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def sid(self) -> str:
        for _ in range(100):
            new = set(sids(self.vm)) - self.known
            if new:
                return new.pop()
            time.sleep(0.3)
        raise AssertionError("the session was never recorded")

    def finish(self) -> tuple[int, dict]:
        """Opens generated, and the summary of the session's recording."""
        sid = self.sid()
        out, err = self.proc.communicate(timeout=300)
        assert self.proc.returncode == 0, err
        generated = json.loads(out.splitlines()[-1])["events"]["disk"]
        for _ in range(100):
            if row(self.vm, sid)["state"] == "closed":
                break
            time.sleep(0.3)
        t0 = time.monotonic()
        summary = json.loads(self.vm.ssh(["python3", "-c", SUMMARY, sid], timeout=600).stdout)
        print(f"summary of {summary['end']['ei'] + 1} events: {time.monotonic() - t0:.1f} s")
        assert "intact" in self.vm.ssh(f"esr verify {sid}").stdout
        summary["sid"] = sid
        return generated, summary


def main_pid(vm) -> str:
    return vm.ssh("systemctl show -p MainPID --value esr").stdout.strip()


def test_restart_loses_nothing(vm, user_key):
    # The generator runs until the restart is over (SIGUSR1) and a few
    # seconds more, however long the restart takes under emulation: a
    # session that ended before it would have nothing to resume.
    gen = Generator(vm, user_key, 600)
    gen.sid()
    time.sleep(4)
    t0 = time.monotonic()
    vm.ssh("systemctl restart esr")
    print(f"systemctl restart: {time.monotonic() - t0:.1f} s")
    time.sleep(4)
    vm.ssh("pkill -USR1 -x gen")
    generated, s = gen.finish()
    [resume] = s["resumes"]
    print(f"restart: generated {generated}, recorded {s['opens'] - 1}, gap {resume['gap_ms']} ms")
    assert (resume["cause"], resume["programs"]) == ("restart", "kept")
    assert not any(s["end"]["lost"].values())
    assert s["opens"] == generated + 1  # it opens once more to warm up


def test_a_killed_recorder_loses_nothing_uncounted_and_follows_what_forked(vm, user_key):
    flag = "/tmp/esr-test-down"
    # What the session forks while no recorder runs execs once one does.
    gen = Generator(
        vm,
        user_key,
        20,
        before=f"(while [ ! -e {flag} ]; do sleep 0.1; done;"
        " sh -c 'sleep 15; exec head -c1 /etc/hostname >/dev/null') &",
    )
    gen.sid()
    time.sleep(4)
    before = main_pid(vm)
    vm.ssh(f"kill -9 {before} && touch {flag}")
    generated, s = gen.finish()
    assert main_pid(vm) != before  # Restart=on-failure
    [resume] = s["resumes"]
    lost = s["end"]["lost"]["disk"]
    print(
        f"kill -9: generated {generated}, recorded {s['opens'] - 1}, lost {lost}"
        f" (not written {resume.get('unwritten', {}).get('disk', 0)}), gap {resume['gap_ms']} ms"
    )
    assert resume["cause"] == "crash"
    assert s["opens"] + lost == generated + 1
    assert ["/usr/bin/head", "-c1", "/etc/hostname"] in s["commands"]


def test_an_upgrade_replaces_the_programs_and_keeps_the_session(vm, user_key):
    # As apt does it, in two steps: the files of the running daemon are
    # replaced, then the package is configured, which restarts it.
    t0 = time.monotonic()
    vm.ssh("dpkg --unpack /tmp/esr-upgrade.deb", timeout=600)
    unpacked = time.monotonic() - t0
    # The configure takes 30 to 60 s on a busy 2-core host: the generator
    # runs until it is over (SIGUSR1), and a few seconds more under the new
    # daemon. A session that ended before the old daemon stops would have
    # nothing to resume.
    gen = Generator(vm, user_key, 600)
    gen.sid()
    time.sleep(4)
    t0 = time.monotonic()
    vm.ssh("dpkg --configure esr", timeout=600)
    print(f"upgrade: dpkg --unpack {unpacked:.1f} s, --configure {time.monotonic() - t0:.1f} s")
    time.sleep(4)
    vm.ssh("pkill -USR1 -x gen")
    assert vm.ssh("dpkg-query -W -f '${Version}' esr").stdout.endswith("+upgrade")
    generated, s = gen.finish()
    [resume] = s["resumes"]
    lost = s["end"]["lost"]["disk"]
    print(
        f"upgrade: generated {generated}, recorded {s['opens'] - 1}, lost {lost},"
        f" gap {resume['gap_ms']} ms"
    )
    assert (resume["cause"], resume["programs"]) == ("restart", "replaced")
    assert s["opens"] + lost == generated + 1
    log = vm.ssh("journalctl -u esr --no-pager -o cat").stdout
    assert "programs=replaced" in log


def test_stop_ends_the_sessions_and_purge_leaves_nothing(vm, user_key):
    gen = Generator(vm, user_key, 60)
    sid = gen.sid()
    vm.ssh("systemctl stop esr")
    assert vm.ssh("ls /sys/fs/bpf").stdout.split() == []
    assert vm.ssh("pgrep -x esr-keeper", check=False).returncode == 1
    ended = row(vm, sid)
    assert (ended["state"], ended["reason"]) == ("closed", "recorder stopped")
    gen.proc.kill()
    gen.proc.wait()

    vm.ssh("systemctl start esr")
    assert "esr" in vm.ssh("ls /sys/fs/bpf").stdout.split()
    vm.ssh("apt-get purge -y esr", timeout=600)
    assert vm.ssh("ls -A /sys/fs/bpf").stdout.split() == []
