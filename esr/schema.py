"""The schema of everything esr records, and its two wire formats.

Each event type is one Struct here, and the Struct is all there is to know
about it in Python: its fields, its tag in the recordings, its name and
code in the audit log, its JSON fields and its line in `esr show --format
text`. Records made by the kernel are tagged with their type in
bpf/esr_events.h and name the buffer they come from.

Recordings hold the Structs as msgpack arrays tagged with a small integer
(compact, and fast to encode in bulk). The audit log and `esr show --format
json` render them as Teleport-style JSON objects through `AuditFormat`.

Paths, argv and program names are bytes, exactly as the kernel saw them. In
JSON they become strings with every byte that is not valid UTF-8 escaped as a
lone surrogate (\\udcXX), and every control character escaped, so they
round-trip exactly and never reach a terminal raw.
"""

from __future__ import annotations

import json
import shlex
import time as _time
import uuid
from typing import ClassVar

import msgspec


def text(raw: bytes) -> str:
    """Bytes as a str that round-trips: invalid UTF-8 becomes lone surrogates."""
    return raw.decode("utf-8", "surrogateescape")


def printable(raw: bytes) -> str:
    """Bytes for a terminal, shell-quoted: anything not printable is escaped,
    so recorded escape sequences can't act on the reviewer's terminal."""
    out = []
    for ch in raw.decode("utf-8", "surrogateescape"):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}")
    return shlex.quote("".join(out))


def printable_str(value: str) -> str:
    """printable() for text: login names, addresses, ttys, reasons."""
    return printable(value.encode("utf-8", "surrogateescape"))


class Identity(msgspec.Struct, frozen=True):
    """The fields every JSON event of a session repeats."""

    sid: str
    server_id: str
    server_hostname: str
    login: str
    user: str

    @classmethod
    def of(cls, start: SessionStart) -> Identity:
        return cls(start.sid, start.server_id, start.server_hostname, start.login, start.user)


class Event(msgspec.Struct, array_like=True, gc=False):
    """What every event has: its index in the session, and when it happened."""

    ei: int
    time: int  # ns since the epoch

    name: ClassVar[str]  # the audit log's "event"
    code: ClassVar[str]  # and "code"

    def fields(self, identity: Identity) -> dict:
        """The JSON fields besides the ones every event has."""
        raise NotImplementedError

    def describe(self) -> str:
        """The text view, after the time, index and name."""
        raise NotImplementedError


class Record(Event):
    """An event made by the BPF programs. Its msgspec tag is its type in
    bpf/esr_events.h (enum esr_event_type)."""

    buffer: ClassVar[str]  # the perf buffer it comes from (esr_events.h ESR_BUFFERS)
    audited: ClassVar[bool]  # in the JSON audit log by default


# --- records made in the kernel ------------------------------------------------------


class Command(Record, tag=1):
    pid: int
    ppid: int
    cgroup_id: int
    program: bytes
    path: bytes
    argv: list[bytes]  # after argv[0]
    return_code: int
    unix_uid: int
    unix_gid: int
    has_tty: bool = False  # ran with a controlling terminal
    argv_truncated: bool = False
    argv_cut_args: int = 0
    argv_cut_bytes: int = 0

    name = "session.command"
    code = "T4000I"
    buffer = "command"
    audited = True

    def fields(self, identity: Identity) -> dict:
        out = {
            "pid": self.pid,
            "ppid": self.ppid,
            "cgroup_id": self.cgroup_id,
            "program": text(self.program),
            "path": text(self.path),
            "argv": [text(a) for a in self.argv],
            "return_code": self.return_code,
            "unix_uid": self.unix_uid,
            "unix_gid": self.unix_gid,
        }
        if self.argv_truncated:
            out.update(
                argv_truncated=True,
                argv_cut_args=self.argv_cut_args,
                argv_cut_bytes=self.argv_cut_bytes,
            )
        return out

    def describe(self) -> str:
        argv = " ".join(printable(a) for a in self.argv)
        cut = (
            f" [argv truncated: {self.argv_cut_args} args, {self.argv_cut_bytes} bytes cut]"
            if self.argv_truncated
            else ""
        )
        return (
            f"pid={self.pid} ppid={self.ppid} uid={self.unix_uid} rc={self.return_code} "
            f"{printable(self.path)} {argv}{cut}"
        )


class Disk(Record, tag=2):
    pid: int
    cgroup_id: int
    program: bytes
    path: bytes
    flags: int
    return_code: int
    path_truncated: bool = False

    name = "session.disk"
    code = "T4001I"
    buffer = "disk"
    # They outnumber everything else by orders of magnitude: in the audit
    # log only with audit_disk_events, as Teleport's default role.
    audited = False

    def fields(self, identity: Identity) -> dict:
        out = {
            "pid": self.pid,
            "cgroup_id": self.cgroup_id,
            "program": text(self.program),
            "path": text(self.path),
            "flags": self.flags,
            "return_code": self.return_code,
        }
        if self.path_truncated:
            out["path_truncated"] = True
        return out

    def describe(self) -> str:
        return (
            f"pid={self.pid} {printable(self.program)} flags={self.flags:#o} "
            f"rc={self.return_code} {printable(self.path)}"
        )


class Network(Record, tag=3):
    pid: int
    cgroup_id: int
    program: bytes
    version: int
    src_addr: str
    src_port: int
    dst_addr: str
    dst_port: int
    return_code: int
    operation: int = 0  # connect
    action: int = 0  # observed

    name = "session.network"
    code = "T4002I"
    buffer = "network"
    audited = True

    def fields(self, identity: Identity) -> dict:
        return {
            "pid": self.pid,
            "cgroup_id": self.cgroup_id,
            "program": text(self.program),
            "src_addr": self.src_addr,
            "src_port": self.src_port,
            "dst_addr": self.dst_addr,
            "dst_port": self.dst_port,
            "version": self.version,
            "operation": self.operation,
            "action": self.action,
            "return_code": self.return_code,
        }

    def describe(self) -> str:
        src = f"[{self.src_addr}]" if self.version == 6 else self.src_addr
        dst = f"[{self.dst_addr}]" if self.version == 6 else self.dst_addr
        return (
            f"pid={self.pid} {printable(self.program)} {src}:{self.src_port} -> "
            f"{dst}:{self.dst_port} rc={self.return_code}"
        )


# --- events of the recorder's own ----------------------------------------------------


class Lost(Event, tag=5):
    """Records lost since the previous report, per buffer
    (esr._fast.decode.BUFFERS order): those the kernel could not deliver, or,
    with a reason, those the recorder could not write (events missing[0]
    to missing[1] of the session)."""

    lost: list[int]
    untracked_forks: int = 0
    reason: str = ""  # "disk_full" or "write_error"; "" for the kernel's losses
    missing: list[int] = []

    name = "session.lost"
    code = "E4100W"

    def fields(self, identity: Identity) -> dict:
        out: dict = {"lost": by_buffer(self.lost)}
        if self.untracked_forks:
            out["untracked_forks"] = self.untracked_forks
        if self.reason:
            out["reason"] = self.reason
            out["missing"] = {"first_ei": self.missing[0], "last_ei": self.missing[1]}
        return out

    def describe(self) -> str:
        lost = " ".join(f"{k}={v}" for k, v in by_buffer(self.lost).items())
        forks = f" untracked_forks={self.untracked_forks}" if self.untracked_forks else ""
        if self.reason:
            first, last = self.missing
            return (
                f"NOT WRITTEN ({printable_str(self.reason)}) events {first}..{last}, records {lost}"
            )
        return f"LOST {lost}{forks}"


class SessionStart(Event, tag=10):
    sid: str
    server_id: str
    server_hostname: str
    login: str
    user: str
    remote_addr: str = ""
    service: str = ""
    tty: str = ""
    command: list[bytes] = []  # what `esr run` was asked to run
    seed_pid: int = 0
    audit_sessionid: int | None = None
    loginuid: int | None = None
    # What a recorder taking the session over after a crash needs to know.
    enhanced_recording: bool = True
    interactive: bool = False  # started on a terminal

    name = "session.start"
    code = "T2000I"

    def fields(self, identity: Identity) -> dict:
        out: dict = {
            "addr.remote": self.remote_addr,
            "service": self.service,
            "tty": self.tty,
            "command": [text(a) for a in self.command],
            "seed_pid": self.seed_pid,
        }
        if self.audit_sessionid is not None:
            out["audit_sessionid"] = self.audit_sessionid
        if self.loginuid is not None:
            out["loginuid"] = self.loginuid
        return out

    def describe(self) -> str:
        return (
            f"sid={printable_str(self.sid)} login={printable_str(self.login)} "
            f"user={printable_str(self.user)} "
            f"remote={printable_str(self.remote_addr) if self.remote_addr else '-'} "
            f"service={printable_str(self.service) if self.service else '-'} "
            f"tty={printable_str(self.tty) if self.tty else '-'}"
        )


class SessionLeave(Event, tag=11):
    """The session's leader is gone while some of its processes still run."""

    live_tasks: int

    name = "session.leave"
    code = "T2003I"

    def fields(self, identity: Identity) -> dict:
        return {"live_tasks": self.live_tasks}

    def describe(self) -> str:
        return f"leader gone, {self.live_tasks} tasks still running"


class SessionEnd(Event, tag=13):
    reason: str  # "exited" or "recorder stopped"
    enhanced_recording: bool
    interactive: bool
    records: list[int]  # per buffer, in the recording
    lost: list[int]  # per buffer, for any reason
    untracked_forks: int
    unwritten: list[int] = []  # per buffer, of lost: those the recorder could not write

    name = "session.end"
    code = "T2004I"

    def fields(self, identity: Identity) -> dict:
        return {
            "enhanced_recording": self.enhanced_recording,
            "interactive": self.interactive,
            "participants": [identity.user],
            "reason": self.reason,
            "events": by_buffer(self.records),
            "lost": by_buffer(self.lost),
            "untracked_forks": self.untracked_forks,
        } | ({"unwritten": by_buffer(self.unwritten)} if any(self.unwritten) else {})

    def describe(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in by_buffer(self.records).items())
        unwritten = f" not_written={sum(self.unwritten)}" if any(self.unwritten) else ""
        return f"reason={printable_str(self.reason)} {counts} lost={sum(self.lost)}{unwritten}"


# --- version 1 recordings (esr 0.1), counted three buffers by name -------------------


class LostV1(Event, tag=4):
    command: int
    disk: int
    network: int
    untracked_forks: int = 0


class SessionEndV1(Event, tag=12):
    reason: str
    enhanced_recording: bool
    interactive: bool
    commands: int
    disks: int
    networks: int
    lost_command: int
    lost_disk: int
    lost_network: int
    untracked_forks: int


def upgrade_v1(event: Event) -> Event:
    """An event of a version 1 recording, as this version records it."""
    if type(event) is LostV1:
        return Lost(
            event.ei, event.time, [event.command, event.disk, event.network], event.untracked_forks
        )
    if type(event) is SessionEndV1:
        return SessionEnd(
            event.ei,
            event.time,
            event.reason,
            event.enhanced_recording,
            event.interactive,
            [event.commands, event.disks, event.networks],
            [event.lost_command, event.lost_disk, event.lost_network],
            event.untracked_forks,
        )
    return event


Events = (
    Command
    | Disk
    | Network
    | Lost
    | SessionStart
    | SessionLeave
    | SessionEnd
    | LostV1
    | SessionEndV1
)
RECORDS: tuple[type[Record], ...] = (Command, Disk, Network)
# The buffers in index order, as bpf/esr_events.h names them (esr._fast.decode
# refuses to load if the two disagree).
BUFFERS: tuple[str, ...] = tuple(dict.fromkeys(r.buffer for r in RECORDS))


def by_buffer(counts: list[int]) -> dict[str, int]:
    return dict(zip(BUFFERS, counts))


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[Events])


def encode_events_into(events: list, buffer: bytearray) -> None:
    _encoder.encode_into(events, buffer)


def decode_events(payload: bytes) -> list:
    return _decoder.decode(payload)


# --- JSON rendering (audit log and `esr show`) ---------------------------------

_UID_NAMESPACE = uuid.UUID("6f1d3a52-8e0b-4c6a-9d1e-3b7c2a5e4f10")
_second = (-1, "")


def rfc3339(ns: int) -> str:
    global _second
    seconds, frac = divmod(ns, 1_000_000_000)
    if _second[0] != seconds:  # events come in bursts within the same second
        _second = (seconds, _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(seconds)))
    return f"{_second[1]}.{frac:09d}Z"


def _ascii_json(value) -> bytes:
    """JSON with every non-ASCII character and control character escaped, and
    invalid UTF-8 (lone surrogates) as \\udcXX: never a raw byte that could
    act on a terminal. msgspec does the common, all-ASCII case fast."""
    try:
        out = _json.encode(value)
        if out.isascii():
            return out
    except UnicodeEncodeError:
        pass
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii")


_json = msgspec.json.Encoder()


class AuditFormat:
    """Renders the events of one session as audit log lines (the reference's
    field names and codes)."""

    def __init__(self, identity: Identity):
        self.identity = identity
        # Event ids are the session's own id space: a UUID derived from the
        # sid, its last 48 bits replaced by the event index.
        self.uid_prefix = str(uuid.uuid5(_UID_NAMESPACE, identity.sid))[:24]
        self._common = _ascii_json(
            {
                "sid": identity.sid,
                "namespace": "default",
                "server_id": identity.server_id,
                "server_hostname": identity.server_hostname,
                "login": identity.login,
                "user": identity.user,
            }
        )[1:-1]

    def line(self, event: Event, extra: dict | None = None) -> bytes:
        """extra: fields the event does not hold (the seal of session.end)."""
        head = (
            f'{{"event":"{event.name}","code":"{event.code}","ei":{event.ei},'
            f'"uid":"{self.uid_prefix}{event.ei:012x}","time":"{rfc3339(event.time)}",'
        )
        return (
            head.encode()
            + self._common
            + b","
            + _ascii_json(event.fields(self.identity) | (extra or {}))[1:]
            + b"\n"
        )
