"""The ways out of a recorded session that esr closes: filling the task
table for everyone, and the records a session leaves behind saying so."""

from __future__ import annotations

import subprocess

import pytest

from helpers import ESR, Daemon, commands, require_bpf, sid_from_stderr


@pytest.fixture
def small_table(tmp_path):
    require_bpf()
    d = Daemon(tmp_path)
    with d.config.open("a") as f:
        f.write("max_tracked_tasks: 256\nmax_tasks_per_session: 32\n")
    d.start()
    yield d
    d.stop()


def test_one_session_cannot_take_the_task_table_from_the_others(small_table):
    d = small_table
    spawn = "for i in $(seq 300); do sleep 6 & done; echo ready; wait"
    hog = subprocess.Popen(
        [ESR, "run", "--config", str(d.config), "--", "sh", "-c", spawn],
        env=d.esr.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert hog.stdout.readline() == b"ready\n"
        # 300 sleeping children: more than the whole table, were it not shared.
        other = d.esr(
            "run", "--config", str(d.config), "--", "sh", "-c",
            "for i in $(seq 20); do /bin/true; done",
        )  # fmt: skip
    finally:
        _, err = hog.communicate(timeout=60)
    hog_sid, other_sid = sid_from_stderr(err), sid_from_stderr(other.stderr)
    d.wait_sids_closed(hog_sid, other_sid)

    ran = [c for c in commands(d.esr.events(other_sid)) if c["path"] == "/bin/true"]
    assert len(ran) == 20
    rows = {r["sid"]: r for r in d.esr.sessions()}
    assert rows[other_sid]["lost"]["processes"] == 0

    # The hog kept its share (its first children are recorded); the rest is
    # counted as lost, where its reviewer looks: LOST, session.lost, the end.
    hog_events = d.esr.events(hog_sid)
    assert 16 <= len([c for c in commands(hog_events) if c["path"].endswith("sleep")]) <= 32
    untracked = sum(e.get("untracked_forks", 0) for e in hog_events if e["event"] == "session.lost")
    [end] = [e for e in hog_events if e["event"] == "session.end"]
    assert untracked == end["untracked_forks"] >= 300 - 32
    assert rows[hog_sid]["lost"]["processes"] == untracked and rows[hog_sid]["damaged"] is None
    listing = d.esr("sessions").stdout.decode().splitlines()
    [line] = [x for x in listing if x.startswith(hog_sid)]
    _sid, _start, _end, _who, _cmd, _disk, _net, lost, *_command = line.split()
    assert int(lost) == untracked
