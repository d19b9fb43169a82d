"""A full data dir, for real: a 2 MB tmpfs, sessions that outgrow it, and
the space coming back. Nothing may be lost silently, every session must
end, and the holes must read as the recorder's, not as edits."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from test_daemon import Daemon

from esr import recording, schema
from helpers import ESR, Esr, require_bpf, sid_from_stderr

PY = "/usr/bin/python3"

OPENS = """
import os, sys
for _ in range(int(sys.argv[1])):
    os.close(os.open("/etc/hostname", os.O_RDONLY))
"""

# Fills the filesystem of argv[1] with argv[1]/filler, opens markers while it
# is full, waits for argv[2] to appear (if given), frees the space and opens
# more markers.
FILL = """
import os, sys, time
mnt, go = sys.argv[1], sys.argv[2]
fd = os.open(os.path.join(mnt, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
try:
    while True:
        os.write(fd, b"x" * 65536)
except OSError:
    pass
for i in range(20000):
    try:
        open(f"/nonexistent/full-{i}")
    except OSError:
        pass
if go:
    print("full", flush=True)
    while not os.path.exists(go):
        time.sleep(0.05)
else:
    time.sleep(0.5)
os.unlink(os.path.join(mnt, "filler"))
time.sleep(0.5)
for i in range(100):
    try:
        open(f"/nonexistent/after-{i}")
    except OSError:
        pass
"""


@pytest.fixture
def small_disk(tmp_path):
    require_bpf()
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def audit_events(data_dir: Path, sid: str) -> list[dict]:
    lines = (data_dir / "log" / "events.log").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["sid"] == sid]


def one_warning(stderr: bytes, sid: str) -> str:
    [line] = [x for x in stderr.decode().splitlines() if "could not be written" in x]
    assert line.startswith("esr: warning: ") and f"of session {sid} " in line
    return line


def test_a_full_disk_loses_nothing_silently(small_disk):
    esr = Esr(small_disk / "data")
    r = esr("run", "--", PY, "-c", OPENS, "2000000", check=False, timeout=300)
    sid = sid_from_stderr(r.stderr)
    assert r.returncode == 1  # the command's was 0: the recording has holes
    one_warning(r.stderr, sid)

    # The audit log is on the full disk too: its session.end used the reserve.
    [end] = [e for e in audit_events(esr.data_dir, sid) if e["event"] == "session.end"]
    assert end["reason"] == "exited"
    assert end["unwritten"]["disk"] > 0 and end["lost"]["disk"] >= end["unwritten"]["disk"]
    # Every open is in the recording or counted, per session.
    assert end["events"]["disk"] + end["lost"]["disk"] >= 2_000_000
    assert end["seal"]["frames"] > 0
    path = str(esr.data_dir / "sessions" / f"{sid}.esr")
    holes = [
        e
        for frame in recording.Reader(path, sid)
        if frame.flags & recording.FLAG_GAP or frame.kind == recording.KIND_END
        for e in frame.events()
        if type(e) is schema.Lost and e.reason
    ]
    assert holes and {e.reason for e in holes} == {"disk_full"}
    assert sum(e.lost[1] for e in holes) == end["unwritten"]["disk"]

    [row] = esr.sessions()
    assert row["state"] == "closed" and row["damaged"] is None
    assert row["events"]["disk"] == end["events"]["disk"]
    assert row["lost"]["disk"] == end["lost"]["disk"]
    verified = esr("verify", sid).stdout.decode()
    assert ": intact: " in verified and ", closed; " in verified
    assert "not written, counted by the recorder (disk_full)" in verified


def test_recording_picks_up_again_when_space_is_back(small_disk):
    esr = Esr(small_disk / "data")
    r = esr("run", "--", PY, "-c", FILL, str(small_disk), "", check=False)
    sid = sid_from_stderr(r.stderr)
    assert r.returncode == 1
    one_warning(r.stderr, sid)
    disk = esr.events(sid, "disk")
    after = {e["path"] for e in disk if e["path"].startswith("/nonexistent/after-")}
    assert after == {f"/nonexistent/after-{i}" for i in range(100)}, (
        f"{len(after)} of the 100 opens after space came back recorded; verify says "
        f"{esr('verify', sid, check=False).stdout!r}; the session's audit lines: "
        f"{[e for e in audit_events(esr.data_dir, sid) if e['event'] != 'session.disk']}"
    )
    while_full = [e for e in disk if e["path"].startswith("/nonexistent/full-")]
    events = audit_events(esr.data_dir, sid)
    [end] = [e for e in events if e["event"] == "session.end"]
    assert end["unwritten"]["disk"] > 0 and len(while_full) + end["lost"]["disk"] >= 20000
    verified = esr("verify", sid).stdout.decode()
    assert "counted by the recorder (disk_full)" in verified and ", closed; " in verified


def test_the_daemon_says_so_and_refuses_new_sessions_until_space_is_back(small_disk, tmp_path):
    d = Daemon(tmp_path)
    d.data_dir = small_disk / "data"
    d.esr = Esr(d.data_dir)
    d.config.write_text(
        f"data_dir: {d.data_dir}\ncontrol_socket: {d.socket}\non_disk_full: refuse_new_sessions\n"
    )
    d.start()
    go = tmp_path / "go"
    try:
        run = subprocess.Popen(
            [ESR, "run", "--config", str(d.config), "--", PY, "-c", FILL, str(small_disk), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        sid = sid_from_stderr(run.stderr.readline())
        assert run.stdout.readline() == b"full\n"
        deadline = time.time() + 20
        while True:
            status = json.loads(
                d.esr("status", "--config", str(d.config), "--format", "json").stdout
            )
            if status["disk_full"] and sid in status["lost"]["not_written"]:
                break
            assert time.time() < deadline, status
            time.sleep(0.1)
        text = d.esr("status", "--config", str(d.config)).stdout.decode()
        assert "DISK FULL OR FAILING" in text and f"not written in session {sid}: " in text

        refused = d.esr("run", "--config", str(d.config), "--", "true", check=False)
        assert refused.returncode == 1
        assert refused.stderr.decode().strip() == (
            f"esr: {d.data_dir} is full or failing: new sessions are refused until what is "
            "recorded can be written again (on_disk_full: refuse_new_sessions)"
        )

        go.touch()
        _out, err = run.communicate(timeout=60)
        assert run.returncode == 1
        one_warning(err, sid)
        d.wait_sids_closed(sid)
        log = d.log.read_text()
        assert f"event=recording.not_written sid={sid} reason=disk_full" in log
        assert f"event=recording.resumed sid={sid}" in log
        # Space is back: sessions open again.
        d.esr("run", "--config", str(d.config), "--", "true")
    finally:
        go.touch()
        d.stop()
