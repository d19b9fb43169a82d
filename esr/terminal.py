"""A session's terminal read back: `esr export --format asciicast` and
`esr play`.

Both follow the session's timeline: the terminal's output, its keystrokes
when they were recorded, its size, and a marker at each command, all on
the clock of the recording (ns since the epoch, as every event). What the
output budget left out is marked where it happened:
"[esr: N bytes not recorded]".

A session normally has one terminal. Should its pty owner have read
several (multiplexed ssh channels), the first one seen is the session's.
"""

from __future__ import annotations

import codecs
import itertools
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from esr import recording, schema, tree
from esr.datadir import DataDir

# The size when the recording has none (a terminal that reported 0x0).
DEFAULT_SIZE = (80, 24)


@dataclass(frozen=True)
class Moment:
    """One thing on the terminal's timeline, seconds from the session's start."""

    t: float
    code: str  # asciicast's: o output, i input, r resize, m marker
    data: bytes | str  # bytes for o and i; "COLSxROWS" for r; a label for m


def _skip_note(skipped: int) -> bytes:
    return f"\r\n[esr: {skipped} bytes not recorded]\r\n".encode()


class Timeline:
    """The terminal events of one recording, read in order."""

    def __init__(self, datadir: DataDir, sid: str):
        self.sid = datadir.resolve(sid)
        self.path = datadir.recording(self.sid)
        self.start: schema.SessionStart | None = None
        self.size: tuple[int, int] | None = None  # (cols, rows) when it started

    def events(self) -> Iterator[schema.Event]:
        for frame in recording.Reader(self.path, self.sid):
            yield from frame.events()

    def moments(self) -> Iterator[Moment]:
        tty = None
        skipped = 0  # the budget's running total, as of the last chunk
        t = 0.0
        for event in self.events():
            if isinstance(event, schema.SessionStart):
                self.start = event
                continue
            if self.start is None:
                continue
            t = max(0.0, (event.time - self.start.time) / 1e9)
            if isinstance(event, schema.Command) and event.return_code == 0:
                yield Moment(t, "m", tree.command_line(event.path, event.argv))
            elif isinstance(event, (schema.TerminalOutput, schema.TerminalResize)):
                tty = event.tty if tty is None else tty
                if event.tty != tty:
                    continue
                if isinstance(event, schema.TerminalResize):
                    size = (event.cols, event.rows) if event.cols and event.rows else None
                    if self.size is None:
                        self.size = size or DEFAULT_SIZE
                    elif size is not None:
                        yield Moment(t, "r", f"{size[0]}x{size[1]}")
                    continue
                if event.skipped > skipped:
                    yield Moment(t, "o", _skip_note(event.skipped - skipped))
                    skipped = event.skipped
                yield Moment(t, "o", event.data)
            elif isinstance(event, schema.TerminalInput) and event.tty == tty:
                yield Moment(t, "i", event.data)
            elif isinstance(event, schema.SessionEnd):
                # Nothing more to show, but the cast lasts as long as the session.
                gap = event.terminal.skipped - skipped
                yield Moment(t, "o", _skip_note(gap) if gap > 0 else b"")


def asciicast(datadir: DataDir, sid: str) -> Iterator[str]:
    """The session as asciicast v2: a header line, then one line per event."""
    timeline = Timeline(datadir, sid)
    moments = timeline.moments()
    # The header needs the size, which the first resize gives: read ahead
    # to it (it comes with the first output).
    ahead = []
    for moment in moments:
        ahead.append(moment)
        if timeline.size is not None:
            break
    start = timeline.start
    cols, rows = timeline.size or DEFAULT_SIZE
    header: dict = {"version": 2, "width": cols, "height": rows}
    if start is not None:
        header["timestamp"] = start.time // 1_000_000_000
        header["title"] = f"{start.login}@{start.server_hostname} {timeline.sid}"
    yield json.dumps(header) + "\n"
    # Output and input are text in asciicast: decode each stream on its own,
    # so that a character split across two reads stays whole.
    decoders = {code: codecs.getincrementaldecoder("utf-8")("replace") for code in "oi"}
    for moment in itertools.chain(ahead, moments):
        data = moment.data
        if isinstance(data, bytes):
            # b"" is the session's end: the cast lasts till then.
            text = decoders[moment.code].decode(data, final=not data)
            if not text and data:
                continue  # a character begun, to end in the next read
            data = text
        yield json.dumps([round(moment.t, 6), moment.code, data]) + "\n"


def play(
    datadir: DataDir, sid: str, speed: float = 1.0, idle_limit: float | None = None, out=None
) -> None:
    """Replay the session's output on this terminal, with its timing."""
    out = out or sys.stdout.buffer
    last = 0.0
    for moment in Timeline(datadir, sid).moments():
        if not isinstance(moment.data, bytes) or moment.code != "o":
            continue
        wait = (moment.t - last) / speed
        if idle_limit is not None:
            wait = min(wait, idle_limit)
        if wait > 0:
            out.flush()
            time.sleep(wait)
        last = moment.t
        out.write(moment.data)
    out.flush()
