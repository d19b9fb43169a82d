"""One session as its page shows it: the process tree and the timeline of
commands, checked against the hash chain as it is read, and the cast the
player plays."""

from __future__ import annotations

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
