"""The data dir: what is in sessions/ besides recordings, and the files esr
creates there."""

from __future__ import annotations

import os
import stat
import struct

import pytest

from esr import show
from esr.datadir import DataDir
from esr.errors import RecordingError
from esr.recording import KIND_END, KIND_EVENTS, KIND_START, Reader, Writer
from esr.schema import Disk, SessionEnd, SessionStart

SID = "0123-real"


@pytest.fixture
def datadir(tmp_path) -> DataDir:
    d = DataDir(str(tmp_path / "data"))
    d.ensure()
    w = Writer.create(d.recording(SID), SID, 1)
    w.append(KIND_START, [SessionStart(0, 1, SID, "srv", "host", "alice", "alice")])
    w.close()
    return d


def test_a_fifo_or_a_directory_named_like_a_recording_is_skipped_with_a_warning(datadir, capsys):
    os.mkfifo(datadir.recording("0123-fifo"))
    os.mkdir(datadir.recording("0123-dir"))
    os.symlink("/dev/zero", datadir.recording("0123-link"))
    assert [row["sid"] for row in show.sessions(datadir)] == [SID]
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 3
    assert all(w.startswith("esr: warning: skipping '0123-") for w in warnings)
    # Named on purpose, it is an error, not a hang.
    for sid in ("0123-fifo", "0123-dir"):
        with pytest.raises(RecordingError, match="not a regular file"):
            show.verify(datadir, sid)
        with pytest.raises(RecordingError, match="not a regular file"):
            show.show(datadir, sid, "text", None)


def test_a_name_no_session_id_has_is_skipped(datadir, capsys):
    open(os.path.join(datadir.sessions_dir, "\x1b]0;pwn\x07.esr"), "wb").close()
    assert [row["sid"] for row in show.sessions(datadir)] == [SID]
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b]0;pwn\\x07" in err


def test_server_id_is_readable_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        d = DataDir(str(tmp_path / "data"))
        d.ensure()
        d.server_id()
    finally:
        os.umask(old)
    mode = os.stat(os.path.join(d.path, "server_id")).st_mode
    assert stat.S_IMODE(mode) == 0o644


def test_sessions_marks_a_recording_whose_header_counts_verify_would_reject(datadir):
    w, _summary, _cut = Writer.resume(datadir.recording(SID), SID, 1)
    w.append(KIND_EVENTS, [Disk(1, 2, 42, 7, b"cat", b"/etc/hostname", 0, 3)], records=[0, 1, 0])
    w.append(KIND_END, [SessionEnd(2, 3, "exited", True, False, [0, 1, 0], [0, 0, 0], 0)])
    w.close()
    [row] = show.sessions(datadir)
    assert row["damaged"] is None and row["events"]["disk"] == 1
    frame = list(Reader(datadir.recording(SID), SID))[1]
    with open(datadir.recording(SID), "r+b") as f:
        f.seek(frame.offset + 36)  # the header's disk record count
        f.write(struct.pack("<I", 1000))
    [row] = show.sessions(datadir)
    assert row["events"]["disk"] == 1000
    assert row["damaged"] == "the frame headers' counts disagree with session.end"
