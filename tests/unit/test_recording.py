"""Recording files without the kernel: what survives a crash, and how every
kind of damage is told apart from an intact file."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from esr import recording, schema
from esr.recording import KIND_END, KIND_EVENTS, KIND_START, Damage, Writer
from esr.room import NoRoom

SID = "unit-session"
DATA = Path(__file__).parent / "data"


def _disk(ei: int) -> schema.Disk:
    return schema.Disk(ei, 1_000 + ei, 42, 7, b"cat", b"/etc/hostname", 0, 3)


@pytest.fixture
def path(tmp_path) -> Path:
    """A closed recording: start, three frames of five opens, end."""
    path = tmp_path / f"{SID}.esr"
    w = Writer.create(str(path), SID, 1)
    w.append(KIND_START, [schema.SessionStart(0, 1, SID, "srv", "host", "alice", "alice")])
    for frame in range(3):
        w.append(KIND_EVENTS, [_disk(1 + 5 * frame + i) for i in range(5)], records=[0, 5, 0])
    w.append(
        KIND_END, [schema.SessionEnd(16, 99, "exited", True, False, [0, 15, 0, 0], [0, 0, 0], 0)]
    )
    w.close()
    return path


def frames(path: Path, sid: str = SID) -> list[recording.Frame]:
    return list(recording.Reader(str(path), sid))


def test_an_intact_recording_verifies_with_its_counts(path):
    summary = recording.verify(str(path), SID)
    assert (summary.frames, summary.last_ei, summary.closed) == (5, 16, True)
    assert summary.records == [0, 15, 0, 0]
    events = [e for f in frames(path) for e in f.events()]
    assert [e.ei for e in events] == list(range(17))


def test_a_crash_mid_frame_leaves_every_complete_frame(path):
    cut = frames(path)[3].offset + 50
    with open(path, "r+b") as f:
        f.truncate(cut)
    with pytest.raises(Damage) as err:
        recording.verify(str(path), SID)
    assert err.value.truncated and err.value.frame == 3
    assert err.value.intact.frames == 3 and err.value.intact.last_ei == 10
    writer, summary, cut_bytes = Writer.resume(str(path), SID, 1)
    writer.close()
    assert cut_bytes == 50 and summary.last_ei == 10
    assert recording.verify(str(path), SID).frames == 3  # the tail is gone, the rest chains


def test_a_cut_at_a_frame_boundary_reads_as_not_closed(path):
    with open(path, "r+b") as f:
        f.truncate(frames(path)[3].offset)
    summary = recording.verify(str(path), SID)
    assert summary.frames == 3 and not summary.closed


@pytest.mark.parametrize(
    "where, reason",
    [
        (lambda fs: fs[2].offset + fs[2].header_size + 3, "checksum mismatch"),  # in a payload
        (lambda fs: fs[2].offset + 30, "sequence break"),  # first_ei in a header
        (lambda fs: fs[2].offset + 1, "bad magic"),
        (lambda fs: fs[2].offset + recording.HEADER.size - 1, "checksum mismatch"),  # the digest
    ],
)
def test_a_flipped_bit_is_found_in_its_frame(path, where, reason):
    offset = where(frames(path))
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(Damage) as err:
        recording.verify(str(path), SID)
    assert err.value.frame == 2 and reason in err.value.reason
    assert not err.value.truncated and err.value.intact.frames == 2


def _rewrite(path: Path, order: list[int]) -> None:
    data = path.read_bytes()
    fs = frames(path)
    path.write_bytes(b"".join(data[fs[i].offset : fs[i].end] for i in order))


def test_reordered_frames_break_the_sequence(path):
    _rewrite(path, [0, 2, 1, 3, 4])
    with pytest.raises(Damage) as err:
        recording.verify(str(path), SID)
    assert err.value.frame == 1 and "sequence break" in err.value.reason


def test_a_missing_frame_breaks_the_sequence(path):
    _rewrite(path, [0, 1, 3, 4])
    with pytest.raises(Damage) as err:
        recording.verify(str(path), SID)
    assert err.value.frame == 2 and "expected to start at 6" in err.value.reason


def test_a_recording_renamed_to_another_session_fails(path):
    with pytest.raises(Damage) as err:
        recording.verify(str(path), "another-session")
    assert err.value.frame == 0 and "checksum mismatch" in err.value.reason


def test_reading_resumes_where_an_earlier_reading_stopped(path):
    whole = recording.verify(str(path), SID)
    first = recording.Reader(str(path), SID)
    for frame in first:
        if frame.index == 2:
            break
    rest = recording.Reader(str(path), SID, after=first.summary)
    assert [f.index for f in rest] == [3, 4]
    assert rest.summary == whole
    assert first.summary.frames == 3  # the earlier reading's summary is left as it was
    tampered = dataclasses.replace(first.summary, digest=bytes(16))
    with pytest.raises(Damage, match=r"frame 3 .*checksum mismatch"):
        list(recording.Reader(str(path), SID, after=tampered))


def test_headers_only_scan_counts_without_reading_payloads(path):
    summary, damage = recording.scan(str(path), SID)
    assert damage is None and summary.records == [0, 15, 0, 0] and summary.closed


def test_a_version_1_recording_still_reads(tmp_path):
    path = tmp_path / "v1-session.esr"
    shutil.copy(DATA / "v1.esr", path)
    summary = recording.verify(str(path), "v1-session")
    assert (summary.frames, summary.closed, summary.records) == (3, True, [1, 1, 0, 0])
    assert summary.lost == [0, 5, 0, 0, 0]
    events = [e for f in frames(path, "v1-session") for e in f.events()]
    assert [type(e) for e in events] == [
        schema.SessionStart,
        schema.Command,
        schema.Disk,
        schema.Lost,
        schema.SessionEnd,
    ]
    assert events[3].lost == [0, 5, 0]
    assert events[4].records == [1, 1, 0] and events[4].interactive


def test_an_empty_file_is_not_an_intact_recording(tmp_path):
    path = tmp_path / f"{SID}.esr"
    path.write_bytes(b"")
    with pytest.raises(Damage) as err:
        recording.verify(str(path), SID)
    assert err.value.reason == "the file is empty" and err.value.intact.frames == 0


def _with_hole(path: Path, flags: int, report: bool) -> None:
    """start, events 1..5, then events 6..10 never written, then 11..15 (and
    the recorder's session.lost for the hole, as ei 16)."""
    w = Writer.create(str(path), SID, 1)
    w.append(KIND_START, [schema.SessionStart(0, 1, SID, "srv", "host", "alice", "alice")])
    w.append(KIND_EVENTS, [_disk(ei) for ei in range(1, 6)], records=[0, 5, 0])
    events: list = [_disk(ei) for ei in range(11, 16)]
    if report:
        events.append(schema.Lost(16, 99, [0, 5, 0], 0, "disk_full", [6, 10]))
    w.append(KIND_EVENTS, events, records=[0, 5, 0], lost=[0, 5, 0], flags=flags)
    w.close()


def test_a_hole_the_recorder_declared_is_not_an_edit(tmp_path):
    path = tmp_path / f"{SID}.esr"
    _with_hole(path, recording.FLAG_GAP, report=True)
    summary = recording.verify(str(path), SID)
    assert summary.gaps == [(6, 10, "disk_full")] and summary.lost == [0, 5, 0, 0, 0]
    assert recording.scan(str(path), SID)[0].gaps == [(6, 10, "")]


@pytest.mark.parametrize(
    "flags, report, reason",
    [
        (0, True, "sequence break: events 11..16 (x6), expected to start at 6"),
        (recording.FLAG_GAP, False, "events 6..10 are missing and no session.lost"),
    ],
)
def test_a_hole_nobody_accounts_for_is_damage(tmp_path, flags, report, reason):
    path = tmp_path / f"{SID}.esr"
    _with_hole(path, flags, report)
    with pytest.raises(Damage) as err:
        recording.verify(str(path), SID)
    assert err.value.frame == 2 and reason in err.value.reason


def test_only_a_reserved_frame_may_take_the_reserve(tmp_path, monkeypatch):
    path = tmp_path / f"{SID}.esr"
    w = Writer.create(str(path), SID, 1)
    w.append(KIND_START, [schema.SessionStart(0, 1, SID, "srv", "host", "alice", "alice")])
    size = path.stat().st_size
    monkeypatch.setattr(w.room, "take", lambda n: False)  # the disk is full
    with pytest.raises(NoRoom):
        w.append(KIND_EVENTS, [_disk(1)], records=[0, 1, 0])
    assert path.stat().st_size == size  # nothing of it was written
    w.append(
        KIND_END,
        [schema.SessionEnd(1, 2, "exited", True, False, [0] * 3, [0] * 3, 0)],
        reserved=True,
    )
    w.close()
    assert recording.verify(str(path), SID).closed
