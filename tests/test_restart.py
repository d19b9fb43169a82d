"""Recording goes on across a restart of the daemon: the kernel side stays
pinned, the rings stay in the descriptor store (systemd's, stood in for by
FdStore), and the next daemon takes the sessions over in the same
recordings, accounting for every record the session's generator made."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from helpers import ROOT, Daemon, sid_from_stderr

GEN = ROOT / "build" / "bench" / "gen"
# Enough ring for a few seconds of the generator with no daemon running.
BIG_DISK_BUFFER = "enhanced_recording:\n  disk_buffer_size: 1024\n"


@pytest.fixture
def daemons(daemon_root, request):
    """Daemons of one data dir, stopped and unpinned at the end."""
    made = []

    def make(**kw):
        root = daemon_root / f"{request.node.name[:40]}-{len(made)}"
        root.mkdir()
        d = Daemon(root, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()
        d.remove_pins()
        if d.store is not None:
            d.store.close()


def generate(d: Daemon, script: str, seconds: float, rate: int) -> subprocess.Popen:
    """A session running script, which runs the generator (as $GEN) for
    seconds at rate opens per second once it says `go`."""
    gen = f"echo go | {GEN} open {seconds} {rate} --cpu -1"
    return d.esr.popen(
        "run",
        "--config",
        str(d.config),
        "--",
        "sh",
        "-c",
        script.replace("$GEN", gen),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(d: Daemon, p: subprocess.Popen, sid: str) -> tuple[int, list[dict]]:
    """What the generator made, and the session's events once it ended."""
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    d.wait_sids_closed(sid, timeout=30)
    generated = json.loads(out.splitlines()[-1])["events"]["disk"]
    return generated, d.esr.events(sid)


def opens(events: list[dict]) -> int:
    """The generator's opens recorded (one more than it counts: it warms up)."""
    return sum(
        1
        for e in events
        if e["event"] == "session.disk" and e["path"] == "/etc/hostname" and e["program"] == "gen"
    )


def restart(d: Daemon, sig: int, down: float = 1.0) -> None:
    d.stop(sig)
    time.sleep(down)
    d.start()


def test_a_restart_hands_the_session_over_without_losing_a_record(daemons):
    d = daemons(store=True, extra=BIG_DISK_BUFFER).start()
    p = generate(d, "$GEN", 6, 5000)
    sid = sid_from_stderr(p.stderr.readline())
    time.sleep(2)
    restart(d, signal.SIGUSR2)
    generated, events = finish(d, p, sid)

    [resume] = [e for e in events if e["event"] == "session.resume"]
    assert (resume["cause"], resume["programs"]) == ("restart", "kept")
    assert resume["gap_ms"] >= 1000 and not any(resume["lost"].values())
    end = events[-1]
    assert end["event"] == "session.end" and end["reason"] == "exited"
    assert not any(end["lost"].values())
    assert opens(events) == generated + 1
    assert [s["sid"] for s in d.sessions()] == [sid]
    assert b"intact" in d.esr("verify", sid).stdout
    assert "session.adopted" in d.log.read_text()


def test_after_a_crash_every_record_is_recorded_or_counted_and_forks_stay_tracked(
    daemons, tmp_path
):
    d = daemons(store=True, extra=BIG_DISK_BUFFER).start()
    flag = tmp_path / "go"
    # What the session forks while no daemon runs execs after one does again.
    p = generate(
        d,
        f"while [ ! -e {flag} ]; do sleep 0.02; done;"
        " (sleep 4; exec head -c1 /etc/hostname >/dev/null) & $GEN; wait",
        6,
        5000,
    )
    sid = sid_from_stderr(p.stderr.readline())
    d.wait_new("root", [], timeout=10)
    time.sleep(1)
    d.stop(signal.SIGKILL)
    flag.touch()
    time.sleep(1.5)
    d.start()
    generated, events = finish(d, p, sid)

    [resume] = [e for e in events if e["event"] == "session.resume"]
    assert resume["cause"] == "crash"
    end = events[-1]
    assert end["reason"] == "exited"
    assert opens(events) + end["lost"]["disk"] == generated + 1
    assert ["/usr/bin/head", "-c1", "/etc/hostname"] in [
        [e["path"], *e["argv"]] for e in events if e["event"] == "session.command"
    ]
    assert b"intact" in d.esr("verify", sid).stdout


def test_without_a_descriptor_store_a_handover_counts_what_it_cannot_keep(daemons):
    d = daemons(extra=BIG_DISK_BUFFER).start()
    p = generate(d, "$GEN", 5, 5000)
    sid = sid_from_stderr(p.stderr.readline())
    time.sleep(2)
    restart(d, signal.SIGUSR2)
    generated, events = finish(d, p, sid)
    [resume] = [e for e in events if e["event"] == "session.resume"]
    end = events[-1]
    # The rings went with the daemon: what the programs could not send is
    # counted for the session.
    assert resume["lost"]["disk"] > 0
    assert opens(events) + end["lost"]["disk"] == generated + 1


def test_new_load_time_settings_replace_the_programs_and_keep_the_session(daemons):
    d = daemons(store=True, extra=BIG_DISK_BUFFER).start()
    p = generate(d, "$GEN", 6, 5000)
    sid = sid_from_stderr(p.stderr.readline())
    time.sleep(2)
    d.stop(signal.SIGUSR2)
    d.config.write_text(d.config.read_text() + "terminal:\n  record_input: true\n")
    d.start()
    generated, events = finish(d, p, sid)
    [resume] = [e for e in events if e["event"] == "session.resume"]
    assert resume["programs"] == "replaced"
    # The new programs were attached before the old ones went, over the
    # same maps: an open that began under the old ones ends under the new.
    assert opens(events) + events[-1]["lost"]["disk"] == generated + 1
    assert "programs=replaced" in d.log.read_text()


def test_maps_of_another_size_are_carried_over(daemons, tmp_path):
    d = daemons(store=True).start()
    flag = tmp_path / "go"
    p = generate(
        d,
        f"sleep 30 & while [ ! -e {flag} ]; do sleep 0.02; done; head -c1 /etc/hostname; kill $!",
        1,
        10,
    )
    sid = sid_from_stderr(p.stderr.readline())
    d.wait_new("root", [], timeout=10)
    d.stop(signal.SIGUSR2)
    d.config.write_text(d.config.read_text() + "max_tracked_tasks: 4096\n")
    d.start()
    flag.touch()
    assert p.wait(60) == 0
    d.wait_sids_closed(sid, timeout=30)
    events = d.esr.events(sid)
    log = d.log.read_text()
    assert "maps_changed=" in log and "tracked_tasks" in log
    # The tasks were carried into the larger map: the session sees what its
    # shell does next, and ends when its last task does.
    assert ["/usr/bin/head", "-c1", "/etc/hostname"] in [
        [e["path"], *e["argv"]] for e in events if e["event"] == "session.command"
    ]
    assert events[-1]["event"] == "session.end" and events[-1]["reason"] == "exited"


def test_sigterm_ends_the_sessions_and_leaves_nothing_pinned(daemons):
    d = daemons(store=True).start()
    assert (d.pin_dir / "recorder").exists()
    p = d.esr.popen("run", "--config", str(d.config), "--", "sleep", "3", stderr=subprocess.PIPE)
    sid = sid_from_stderr(p.stderr.readline())
    d.stop()
    [row] = [r for r in d.sessions() if r["sid"] == sid]
    assert row["state"] == "closed" and row["reason"] == "recorder stopped"
    assert not d.pin_dir.exists()
    assert p.wait(10) == 0


def test_a_pin_dir_holds_one_data_dir(daemons, daemon_root):
    d = daemons().start()
    other = daemons()
    other.config.write_text(other.config.read_text().replace(other.pin_dir.name, d.pin_dir.name))
    d.stop(signal.SIGKILL)
    r = other.esr("daemon", "--config", str(other.config), check=False, timeout=30)
    assert r.returncode == 1
    assert b"holds the programs of a recorder of another data dir" in r.stderr
    assert (d.pin_dir / "recorder").exists()  # left to its own daemon
    assert os.path.exists(d.pin_dir)


def test_the_session_hooks_follow_the_sessions_across_a_restart(daemons):
    """While no session is recorded, no program is on a syscall tracepoint
    or on TCP state changes, so every process on the host takes the
    kernel's untraced syscall path and its connects run no program: the
    hooks come with the first session and go with the last, also one that a
    restarted daemon took over."""
    d = daemons(store=True).start()

    def attached() -> bool:
        r = d.esr("status", "--config", str(d.config), "--format", "json")
        status = json.loads(r.stdout)
        links = os.listdir(d.pin_dir / "links")
        pinned = "openat_enter" in links
        assert ("connect_state" in links) == pinned
        assert status["session_hooks_attached"] == pinned
        return pinned

    def detached_soon() -> bool:
        deadline = time.monotonic() + 10
        while attached() and time.monotonic() < deadline:
            time.sleep(0.1)
        return not attached()

    assert not attached()
    assert b"session hooks detached" in d.esr("status", "--config", str(d.config)).stdout
    p = generate(d, "$GEN", 4, 1000)
    sid = sid_from_stderr(p.stderr.readline())
    assert attached()
    restart(d, signal.SIGUSR2)
    assert attached()
    generated, events = finish(d, p, sid)
    assert opens(events) == generated + 1
    assert detached_soon()

    # The daemon took the programs over without loading them: it loads them
    # again for the next session.
    p = generate(d, "$GEN", 1, 1000)
    sid = sid_from_stderr(p.stderr.readline())
    generated, events = finish(d, p, sid)
    assert opens(events) == generated + 1 and generated > 0
    assert detached_soon()
