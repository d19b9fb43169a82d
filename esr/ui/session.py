"""One session as its page shows it: the process tree and the timeline of
commands, checked against the hash chain as it is read, and the cast the
player plays."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from esr import recording, schema, tree
from esr.datadir import DataDir

# Past these the page says what it left out; the downloads hold everything.
MAX_PROCESSES = 2000
MAX_TIMELINE = 5000
MAX_FILE_GROUPS = 200


@dataclass
class Session:
    sid: str
    tree: tree.Tree
    summary: recording.Summary
    damage: recording.Damage | None  # where `esr verify` would fail
    untracked: int  # processes the kernel could not follow
    shown: set[int]  # the processes drawn, by number

    @property
    def start(self) -> schema.SessionStart | None:
        return self.tree.start

    @property
    def end(self) -> schema.SessionEnd | None:
        ends = [e for e in self.tree.notes if type(e) is schema.SessionEnd]
        return ends[-1] if ends else None

    def lost(self) -> dict[str, int]:
        return {k: v for k, v in schema.by_buffer(self.summary.lost).items() if v}


def load(datadir: DataDir, sid: str, focus: int | None = None) -> Session:
    """Read the whole recording, checking every frame as `esr verify` does."""
    reader = recording.Reader(datadir.recording(sid), sid)
    builder = tree.Builder(focus)
    damage = None
    try:
        for frame in reader:
            builder.feed(frame.events())
    except recording.Damage as err:
        damage = err
    built = builder.finish()
    untracked = sum(e.untracked_forks for e in built.notes if type(e) is schema.Lost)
    for e in built.notes:
        if type(e) is schema.SessionEnd:
            untracked = max(untracked, e.untracked_forks)
    return Session(sid, built, reader.summary, damage, untracked, _shown(built.roots))


def _shown(roots: list[tree.Process]) -> set[int]:
    """The first MAX_PROCESSES processes, depth first, as the page draws them."""
    shown: set[int] = set()
    stack = list(reversed(roots))
    while stack and len(shown) < MAX_PROCESSES:
        node = stack.pop()
        shown.add(node.number)
        stack.extend(reversed(node.children))
    return shown


def asciicast(datadir: DataDir, sid: str) -> Iterator[str]:
    """The lines of the session's asciicast v2 file, for the player.

    Recordings do not hold the terminal stream yet: until they do, this is
    an 80x24 screen that stays empty, with a marker at each command when it
    ran (the time base of the timeline: seconds since session.start) and an
    empty output at the end, so that the cast lasts as long as the session.
    This is the one function to replace with esr.terminal.asciicast."""
    start = None
    folder = tree.Folder()
    execs: list[tree.Exec] = []
    last = 0
    try:
        for frame in recording.Reader(datadir.recording(sid), sid):
            for event in frame.events():
                if start is None:
                    start = event
                elif type(event) is schema.Command:
                    execs += folder.feed(event)
                last = event.time
    except recording.Damage:
        pass  # the intact part plays; the page says where the damage is
    if start is None:
        return
    execs += folder.flush()
    yield json.dumps({"version": 2, "width": 80, "height": 24, "timestamp": start.time // 10**9})
    for done in sorted(execs, key=lambda e: e.command.ei):
        yield json.dumps([(done.command.time - start.time) / 1e9, "m", done.text()])
    yield json.dumps([(last - start.time) / 1e9, "o", ""])
