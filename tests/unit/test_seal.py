"""Seals without the kernel: a recording sealed over four epochs, then cut,
emptied, rewritten and re-sealed by someone who took the host's key later,
and checked with the verification key on a copy elsewhere."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from esr import schema, seal, show
from esr.audit import AuditLog
from esr.datadir import DataDir
from esr.errors import RecordingError, SealError
from esr.recorder import recover
from esr.recording import KIND_END, KIND_EVENTS, KIND_START, Reader, Writer
from esr.seal import HostKey, Sealer, VerificationKey

SID = "0123-sealed"
START = 1_700_000_000  # seconds: when the key was made
EPOCH = 60  # seconds


class Clock:
    def __init__(self, monkeypatch):
        self.ns = START * 1_000_000_000
        monkeypatch.setattr(seal.time, "time_ns", lambda: self.ns)
        monkeypatch.setattr(seal.time, "time", lambda: self.ns / 1e9)

    def epoch(self, n: int, into: int = 1) -> int:
        """Move to `into` seconds into epoch n; returns the time in ns."""
        self.ns = (START + n * EPOCH + into) * 1_000_000_000
        return self.ns


def _disk(ei: int, t: int) -> schema.Disk:
    return schema.Disk(ei, t, 42, 7, b"cat", b"/etc/hostname", 0, 3)


def record(datadir: DataDir, clock: Clock, key: HostKey | None) -> None:
    """What the recorder does: two frames per epoch in epochs 0..3, each
    followed by a seal; the end sealed and copied into the audit log."""
    writer = Writer.create(datadir.recording(SID), SID, 1, sealed=True)
    sealer = Sealer.create(datadir.seal(SID), SID)
    start = schema.SessionStart(0, clock.epoch(0), SID, "srv", "host", "alice", "alice")
    writer.append(KIND_START, [start])
    sealer.seal(seal.KIND_FLUSH, writer, key)
    ei = 1
    for epoch in range(4):
        for into in (10, 20):
            t = clock.epoch(epoch, into)
            writer.append(KIND_EVENTS, [_disk(ei + i, t) for i in range(5)], records=[0, 5, 0])
            ei += 5
            sealer.seal(seal.KIND_FLUSH, writer, key)
    end = schema.SessionEnd(ei, clock.epoch(3, 30), "exited", True, False, [0, 40, 0], [0] * 3, 0)
    writer.append(KIND_END, [end], reserved=True)
    writer.close()
    prev = sealer.prev
    sealed = sealer.seal(seal.KIND_END, writer, key, reserved=True)
    sealer.close(sync=True)
    audit = AuditLog(datadir.log_dir, "srv")
    line = schema.AuditFormat(schema.Identity.of(start)).line(
        end, {"seal": sealer.audit_field(sealed, prev)}
    )
    audit.write(line, reserved=True)
    audit.close()


@pytest.fixture
def clock(monkeypatch) -> Clock:
    return Clock(monkeypatch)


@pytest.fixture
def host(tmp_path, clock) -> tuple[DataDir, VerificationKey]:
    """A data dir with a key, a session recorded and sealed in it, and the
    verification key, as `esr keygen` printed it, kept elsewhere."""
    datadir = DataDir(str(tmp_path / "data"))
    datadir.ensure()
    verification = HostKey.create(datadir.seal_key(), EPOCH, force=False)
    kept = tmp_path / "verification.key"
    kept.write_text(verification.line())
    key = HostKey.load(datadir.seal_key())
    record(datadir, clock, key)
    key.close()
    return datadir, VerificationKey.load(str(kept))


def verify(datadir: DataDir, key: VerificationKey | None) -> str:
    """esr verify: the one line, whether it passes or not."""
    try:
        return show.verify(datadir, SID, key)
    except RecordingError as err:
        return f"FAILED: {err}"


def offsets_of(datadir: DataDir, sid: str) -> list[int]:
    """Where each frame starts, and where the last one ends."""
    frames = list(Reader(datadir.recording(sid), sid))
    return [f.offset for f in frames] + [frames[-1].end]


def offsets(datadir: DataDir) -> list[int]:
    return offsets_of(datadir, SID)


def test_an_intact_recording_verifies_with_the_key_on_a_copy_elsewhere(host, tmp_path, clock):
    datadir, key = host
    clock.epoch(1000)  # verified much later, on another machine
    copy = DataDir(str(tmp_path / "elsewhere"))
    os.makedirs(copy.sessions_dir)
    for path in (datadir.recording(SID), datadir.seal(SID)):
        shutil.copy(path, copy.sessions_dir)
    shutil.copytree(datadir.log_dir, copy.log_dir)
    line = verify(copy, key)
    assert line == (
        f"{SID}: intact: 10 frames, events 0..41, closed; sealed with key {key.id.hex()}, "
        "epochs 0..3; the audit log holds the same end seal"
    )
    assert "not checked: give --key" in verify(copy, None)


def test_the_host_keeps_only_the_current_key(host, clock):
    datadir, key = host
    path = datadir.seal_key()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    size = os.path.getsize(path)
    host_key = HostKey.load(path)
    assert host_key.epoch == 3 and host_key.key == key.key(3)
    clock.epoch(7)
    assert host_key.current(clock.ns) == (7, key.key(7))
    assert os.path.getsize(path) == size  # rewritten in place
    text = Path(path).read_text()
    assert "epoch=00000000000000000007" in text and key.key(3).hex() not in text
    host_key.close()


def test_a_cut_at_a_frame_boundary_says_what_is_missing(host):
    datadir, key = host
    os.truncate(datadir.recording(SID), offsets(datadir)[6])
    assert verify(datadir, key) == (
        f"FAILED: {SID}: sealed through its end at frame 9 (events 0..41) but the file "
        "ends after frame 5 (events 0..25)"
    )
    assert verify(datadir, None) == verify(datadir, key)  # no key needed to see it
    [row] = show.sessions(datadir)
    assert "sealed through its end at frame 9" in row["damaged"]


def test_an_emptied_recording_says_what_is_missing(host):
    datadir, key = host
    os.truncate(datadir.recording(SID), 0)
    assert verify(datadir, key) == (
        f"FAILED: {SID}: sealed through its end at frame 9 (events 0..41) but the file is empty"
    )


def test_the_tail_of_both_files_cut_is_caught_by_the_audit_logs_end_seal(host):
    datadir, key = host
    os.truncate(datadir.recording(SID), offsets(datadir)[6])
    os.truncate(datadir.seal(SID), 6 * seal.SEAL.size)  # seals 0..5: frames 0..5
    assert verify(datadir, key) == (
        f"FAILED: {SID}: the audit log seals the end at frame 9 (events 0..41) but the file "
        "ends after frame 5 (events 0..25)"
    )


def _steal_key_and_reseal(datadir: DataDir, clock: Clock, keep: int, at: int, claim=None):
    """Root on the host in epoch `at`: cut the recording and its seals to the
    first `keep` frames, drop the audit log, end the session anew and seal
    the end with the host's key (claiming epoch `claim`, if given)."""
    os.truncate(datadir.recording(SID), offsets(datadir)[keep])
    os.truncate(datadir.seal(SID), keep * seal.SEAL.size)
    shutil.rmtree(datadir.log_dir)
    clock.epoch(at)
    stolen = HostKey.load(datadir.seal_key())
    stolen.current(clock.ns)
    writer, summary, _cut = Writer.resume(datadir.recording(SID), SID, 1)
    end = schema.SessionEnd(
        summary.last_ei + 1, clock.ns, "exited", True, False, [0] * 3, [0] * 3, 0
    )
    writer.append(KIND_END, [end], reserved=True)
    writer.close()
    sealer, _seals = Sealer.resume(datadir.seal(SID), SID)
    if claim is not None:  # an earlier epoch, MACed with the key at hand
        key_at_hand = stolen.key
        stolen.current = lambda _now: (claim, key_at_hand)  # type: ignore[method-assign]
    sealer.seal(seal.KIND_END, writer, stolen, reserved=True)
    sealer.close()
    stolen.close()


def test_a_key_taken_later_cannot_reseal_an_earlier_end(host, clock):
    datadir, key = host
    _steal_key_and_reseal(datadir, clock, keep=5, at=5)  # frames of epochs 0 and 1
    assert verify(datadir, key) == (
        f"FAILED: {SID}: no seal in epochs 2..4 though the session was open: the recorder "
        "was stopped or stalled, or the seal file was cut and sealed again"
    )


def test_a_key_taken_later_cannot_pass_for_an_earlier_one(host, clock):
    datadir, key = host
    _steal_key_and_reseal(datadir, clock, keep=5, at=5, claim=2)
    assert verify(datadir, key) == (
        f"FAILED: {SID}: seal 5 (epoch 2) does not authenticate: it was forged or altered, "
        "or a seal before it was removed"
    )


def test_a_frame_rewritten_with_its_chain_recomputed_is_caught_by_its_seal(host):
    datadir, key = host
    frames = list(Reader(datadir.recording(SID), SID))
    path = datadir.recording(SID)
    os.unlink(path)
    writer = Writer.create(path, SID, 1, sealed=True)
    for frame in frames:
        events = frame.events()
        if frame.index == 3:  # what someone wants gone
            events = [_disk(e.ei, e.time) if type(e) is schema.Disk else e for e in events]
            events[0] = schema.Disk(events[0].ei, events[0].time, 42, 7, b"cat", b"/x", 0, 3)
        writer.append(frame.kind, events, frame.records, frame.lost, reserved=True)
    writer.close()
    assert verify(datadir, key) == (
        f"FAILED: {SID}: frames 3..3 were rewritten after they were sealed (seal 3, epoch 1)"
    )


def test_seals_without_a_key_still_show_a_cut(tmp_path, clock):
    datadir = DataDir(str(tmp_path / "data"))
    datadir.ensure()
    record(datadir, clock, None)
    assert "sealed without a key" in verify(datadir, None)
    os.truncate(datadir.recording(SID), offsets(datadir)[4])
    assert "but the file ends after frame 3" in verify(datadir, None)


def test_with_the_key_unkeyed_seals_do_not_pass(tmp_path, host, clock):
    _datadir, key = host
    datadir = DataDir(str(tmp_path / "unkeyed"))
    datadir.ensure()
    record(datadir, clock, None)
    assert "was made without a key" in verify(datadir, key)


def test_a_missing_seal_file_is_not_an_unsealed_recording(host):
    datadir, _key = host
    os.unlink(datadir.seal(SID))
    shutil.rmtree(datadir.log_dir)
    assert verify(datadir, None) == (
        f"FAILED: {SID}: the seal file is missing or empty, though the frames say it exists"
    )


def test_keygen_does_not_replace_a_key_unless_forced(host):
    datadir, key = host
    with pytest.raises(SealError, match="exists"):
        HostKey.create(datadir.seal_key(), EPOCH, force=False)
    assert HostKey.create(datadir.seal_key(), EPOCH, force=True).id != key.id


def test_the_next_start_ends_what_a_crash_left_open_unless_its_seals_say_more(host, clock):
    datadir, key = host
    host_key = HostKey.load(datadir.seal_key())
    for sid, seals in (("0123-early", False), ("0123-later", True), ("0123-cut", True)):
        writer = Writer.create(datadir.recording(sid), sid, 1, sealed=True)
        sealer = Sealer.create(datadir.seal(sid), sid)
        start = schema.SessionStart(0, clock.epoch(3, 40), sid, "srv", "host", "a", "a")
        writer.append(KIND_START, [start])
        writer.append(KIND_EVENTS, [_disk(1, clock.ns)], records=[0, 1, 0])
        if seals:  # the crash came after the first seal, or before
            sealer.seal(seal.KIND_FLUSH, writer, host_key)
        writer.close()
        sealer.close()
    host_key.close()
    os.truncate(datadir.recording("0123-cut"), offsets_of(datadir, "0123-cut")[1])
    logged = []
    ended = recover(datadir, 1, lambda event, **fields: logged.append((event, fields)))
    assert sorted(ended) == ["0123-early", "0123-later"]
    for sid in ended:
        line = show.verify(datadir, sid, key)
        assert ", closed; sealed with key " in line
        assert line.endswith("its end was written after the recorder stopped")
    [(event, fields)] = [entry for entry in logged if entry[1].get("sid") == "0123-cut"]
    assert event == "recording.damaged"
    assert fields["error"] == (
        "sealed through frame 1 (events 0..1) but the file ends after frame 0 (events 0..0)"
    )
