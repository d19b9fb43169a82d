"""The terminal read back from a recording, without the kernel: asciicast v2
as asciinema reads it, and the replay's bytes."""

from __future__ import annotations

import io
import json

from esr import schema
from esr.datadir import DataDir
from esr.recording import KIND_END, KIND_EVENTS, KIND_START, Writer
from esr.terminal import asciicast, play

SID = "terminal-session"
T0 = 1_700_000_000_000_000_000
MS = 1_000_000


def recorded(tmp_path, events: list[schema.Event], skipped_at_end: int = 0) -> DataDir:
    datadir = DataDir(str(tmp_path))
    datadir.ensure()
    w = Writer.create(datadir.recording(SID), SID, 1)
    w.append(KIND_START, [schema.SessionStart(0, T0, SID, "srv", "host", "alice", "alice")])
    for i, event in enumerate(events, 1):
        event.ei = i
    w.append(KIND_EVENTS, events)
    end = schema.SessionEnd(
        len(events) + 1,
        T0 + 9000 * MS,
        "exited",
        True,
        True,
        [0] * 4,
        [0] * 4,
        0,
        schema.TerminalBytes(skipped=skipped_at_end),
    )
    w.append(KIND_END, [end])
    w.close()
    return datadir


def output(pid: int, t_ms: int, data: bytes, skipped: int = 0) -> schema.TerminalOutput:
    return schema.TerminalOutput(0, T0 + t_ms * MS, pid, 3, data, skipped)


def test_a_session_exports_as_asciicast_v2(tmp_path):
    euro = "€".encode()  # three bytes, split across two reads below
    datadir = recorded(
        tmp_path,
        [
            schema.TerminalResize(0, T0 + 1 * MS, 3, 30, 100),
            output(7, 2, b"$ "),
            schema.Command(0, T0 + 3 * MS, 9, 7, 1, b"ls", b"/usr/bin/ls", [b"-l"], 0, 0, 0),
            schema.Command(0, T0 + 3 * MS, 9, 7, 1, b"sh", b"/no/such", [], -2, 0, 0),
            output(7, 4, b"\x1b[31mred\x1b[0m " + euro[:1]),
            output(7, 5, euro[1:] + b"\r\n"),
            schema.TerminalInput(0, T0 + 6 * MS, 7, 3, b"q"),
            schema.TerminalResize(0, T0 + 7 * MS, 3, 40, 120),
            output(7, 8, b"tail", skipped=5000),
        ],
        skipped_at_end=7000,
    )
    header, *events = [json.loads(line) for line in asciicast(datadir, SID)]
    assert header == {
        "version": 2,
        "width": 100,
        "height": 30,
        "timestamp": T0 // 10**9,
        "title": f"alice@host {SID}",
    }
    assert [e[1] for e in events] == ["o", "m", "o", "o", "i", "r", "o", "o", "o"]
    assert events[1] == [0.003, "m", "/usr/bin/ls -l"]  # markers for commands that ran
    assert events[2][2] == "\x1b[31mred\x1b[0m " and events[3][2] == "€\r\n"
    assert events[4] == [0.006, "i", "q"] and events[5] == [0.007, "r", "120x40"]
    assert events[6][2] == "\r\n[esr: 5000 bytes not recorded]\r\n"
    assert events[8][2] == "\r\n[esr: 2000 bytes not recorded]\r\n"  # skipped after the last
    times = [e[0] for e in events]
    assert times == sorted(times)


def test_a_terminal_that_reported_no_size_gets_80_by_24(tmp_path):
    datadir = recorded(tmp_path, [schema.TerminalResize(0, T0, 3, 0, 0), output(7, 1, b"x")])
    header = json.loads(next(asciicast(datadir, SID)))
    assert (header["width"], header["height"]) == (80, 24)


def test_play_writes_the_output_as_it_was(tmp_path):
    datadir = recorded(tmp_path, [output(7, 1, b"\x1b[1mbold"), output(7, 2, b"\xff\r\n")])
    out = io.BytesIO()
    play(datadir, SID, speed=1000, out=out)
    assert out.getvalue() == b"\x1b[1mbold\xff\r\n"
