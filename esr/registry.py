"""The session registry: which sessions are open, and the kernel slot and
cookie each one is known by.

A cookie is generation << 32 | slot. Records carry it, so a record still in
flight for a session that has ended (and whose slot was reused) never lands
in the next one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from esr import schema
from esr._fast.decode import SessionEvents
from esr.errors import RegistryFull
from esr.recording import Writer
from esr.seal import Sealer


@dataclass
class Gap:
    """Events not written since the last frame that was, until a frame
    written says so."""

    first_ei: int
    last_ei: int
    records: list[int]  # per buffer
    reason: str  # "disk_full" or "write_error"


@dataclass
class Session:
    sid: str
    slot: int
    cookie: int
    start: schema.SessionStart
    audit: schema.AuditFormat
    writer: Writer
    sealer: Sealer
    path: str
    pending: SessionEvents = field(default_factory=SessionEvents)
    anchor_pid: int = 0  # 0 for a seeded session
    terminal_pid: int = 0  # the process relaying its pty; the session waits for it
    records: list[int] = field(default_factory=lambda: [0] * len(schema.BUFFERS))
    # Kernel counters already written into the recording as Lost records.
    lost: list[int] = field(default_factory=lambda: [0] * len(schema.BUFFERS))
    untracked_forks: int = 0
    # Terminal bytes recorded, skipped, lost, and keystrokes, as the kernel counts them.
    terminal: tuple[int, int, int, int] = (0, 0, 0, 0)
    leader_gone: bool = False
    # Records the recorder could not write, per buffer, and the events not
    # written since the last frame that was.
    unwritten: list[int] = field(default_factory=lambda: [0] * len(schema.BUFFERS))
    gap: Gap | None = None
    seal_failing: bool = False  # its last seal could not be written


class Registry:
    def __init__(self, max_sessions: int, generation: int = 0):
        """generation: the last one a previous recorder handed out, whose
        records may still come."""
        self.max_sessions = max_sessions
        self.by_sid: dict[str, Session] = {}
        self.by_cookie: dict[int, Session] = {}
        # What the decoder routes records with: cookie -> pending events.
        self.pending_by_cookie: dict[int, SessionEvents] = {}
        self._free = list(range(max_sessions - 1, -1, -1))
        self._generation = generation

    def allocate(self) -> tuple[int, int]:
        """A free slot and a cookie never used before."""
        if not self._free:
            raise RegistryFull(f"all {self.max_sessions} session slots are in use")
        slot = self._free.pop()
        self._generation = (self._generation + 1) & 0xFFFFFFFF or 1
        return slot, (self._generation << 32) | slot

    def adopt(self, session: Session) -> None:
        """A session a previous recorder opened, in the slot it had."""
        self._free.remove(session.slot)
        self.add(session)

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def add(self, session: Session) -> None:
        self.by_sid[session.sid] = session
        self.by_cookie[session.cookie] = session
        self.pending_by_cookie[session.cookie] = session.pending

    def remove(self, session: Session) -> None:
        del self.by_sid[session.sid]
        del self.by_cookie[session.cookie]
        del self.pending_by_cookie[session.cookie]
        self.release(session.slot)

    def __iter__(self):
        return iter(list(self.by_sid.values()))

    def __len__(self) -> int:
        return len(self.by_sid)
