"""The schema of everything esr records, and its two wire formats.

Recordings hold these Structs as msgpack arrays tagged with a small integer
(compact, and fast to encode in bulk). The audit log and `esr show --format
json` render the same Structs as Teleport-style JSON objects: `AuditFormat`
is the only place that knows those names and codes.

Paths, argv and program names are bytes, exactly as the kernel saw them. In
JSON they become strings with every byte that is not valid UTF-8 escaped as a
lone surrogate (\\udcXX), and every control character escaped, so they
round-trip exactly and never reach a terminal raw.
"""

from __future__ import annotations

import json
import time as _time
import uuid
from typing import Union

import msgspec


class Command(msgspec.Struct, tag=1, array_like=True, gc=False):
    ei: int
    time: int  # ns since the epoch
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


class Disk(msgspec.Struct, tag=2, array_like=True, gc=False):
    ei: int
    time: int
    pid: int
    cgroup_id: int
    program: bytes
    path: bytes
    flags: int
    return_code: int
    path_truncated: bool = False


class Network(msgspec.Struct, tag=3, array_like=True, gc=False):
    ei: int
    time: int
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


class Lost(msgspec.Struct, tag=4, array_like=True, gc=False):
    """Records the kernel could not deliver since the previous report."""

    ei: int
    time: int
    command: int
    disk: int
    network: int
    untracked_forks: int = 0


class SessionStart(msgspec.Struct, tag=10, array_like=True, gc=False):
    ei: int
    time: int
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


class SessionLeave(msgspec.Struct, tag=11, array_like=True, gc=False):
    """The session's leader is gone while some of its processes still run."""

    ei: int
    time: int
    live_tasks: int


class SessionEnd(msgspec.Struct, tag=12, array_like=True, gc=False):
    ei: int
    time: int
    reason: str  # "exited" or "recorder stopped"
    enhanced_recording: bool
    interactive: bool
    commands: int
    disks: int
    networks: int
    lost_command: int
    lost_disk: int
    lost_network: int
    untracked_forks: int


Event = Union[Command, Disk, Network, Lost, SessionStart, SessionLeave, SessionEnd]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[Event])


def encode_events_into(events: list, buffer: bytearray) -> None:
    _encoder.encode_into(events, buffer)


def decode_events(payload: bytes) -> list:
    return _decoder.decode(payload)


# --- JSON rendering (audit log and `esr show`) ---------------------------------

_NAMES = {
    Command: ("session.command", "T4000I"),
    Disk: ("session.disk", "T4001I"),
    Network: ("session.network", "T4002I"),
    Lost: ("session.lost", "E4100W"),
    SessionStart: ("session.start", "T2000I"),
    SessionLeave: ("session.leave", "T2003I"),
    SessionEnd: ("session.end", "T2004I"),
}

_UID_NAMESPACE = uuid.UUID("6f1d3a52-8e0b-4c6a-9d1e-3b7c2a5e4f10")


def event_name(event) -> str:
    return _NAMES[type(event)][0]


def text(raw: bytes) -> str:
    """Bytes as a str that round-trips: invalid UTF-8 becomes lone surrogates."""
    return raw.decode("utf-8", "surrogateescape")


_second = (-1, "")


def rfc3339(ns: int) -> str:
    global _second
    seconds, frac = divmod(ns, 1_000_000_000)
    if _second[0] != seconds:  # events come in bursts within the same second
        _second = (seconds, _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(seconds)))
    return f"{_second[1]}.{frac:09d}Z"


class Identity(msgspec.Struct, frozen=True):
    """The fields every JSON event of a session repeats."""

    sid: str
    server_id: str
    server_hostname: str
    login: str
    user: str

    @classmethod
    def of(cls, start: SessionStart) -> "Identity":
        return cls(start.sid, start.server_id, start.server_hostname, start.login, start.user)


def _fields(event, identity: Identity) -> dict:
    """The fields of an event besides the ones every event has."""
    kind = type(event)
    if kind is Command:
        out = {
            "pid": event.pid,
            "ppid": event.ppid,
            "cgroup_id": event.cgroup_id,
            "program": text(event.program),
            "path": text(event.path),
            "argv": [text(a) for a in event.argv],
            "return_code": event.return_code,
            "unix_uid": event.unix_uid,
            "unix_gid": event.unix_gid,
        }
        if event.argv_truncated:
            out.update(
                argv_truncated=True,
                argv_cut_args=event.argv_cut_args,
                argv_cut_bytes=event.argv_cut_bytes,
            )
        return out
    if kind is Disk:
        out = {
            "pid": event.pid,
            "cgroup_id": event.cgroup_id,
            "program": text(event.program),
            "path": text(event.path),
            "flags": event.flags,
            "return_code": event.return_code,
        }
        if event.path_truncated:
            out["path_truncated"] = True
        return out
    if kind is Network:
        return {
            "pid": event.pid,
            "cgroup_id": event.cgroup_id,
            "program": text(event.program),
            "src_addr": event.src_addr,
            "src_port": event.src_port,
            "dst_addr": event.dst_addr,
            "dst_port": event.dst_port,
            "version": event.version,
            "operation": event.operation,
            "action": event.action,
            "return_code": event.return_code,
        }
    if kind is Lost:
        out = {"lost": {"command": event.command, "disk": event.disk, "network": event.network}}
        if event.untracked_forks:
            out["untracked_forks"] = event.untracked_forks
        return out
    if kind is SessionStart:
        out = {
            "addr.remote": event.remote_addr,
            "service": event.service,
            "tty": event.tty,
            "command": [text(a) for a in event.command],
            "seed_pid": event.seed_pid,
        }
        if event.audit_sessionid is not None:
            out["audit_sessionid"] = event.audit_sessionid
        if event.loginuid is not None:
            out["loginuid"] = event.loginuid
        return out
    if kind is SessionLeave:
        return {"live_tasks": event.live_tasks}
    return {
        "enhanced_recording": event.enhanced_recording,
        "interactive": event.interactive,
        "participants": [identity.user],
        "reason": event.reason,
        "events": {"command": event.commands, "disk": event.disks, "network": event.networks},
        "lost": {
            "command": event.lost_command,
            "disk": event.lost_disk,
            "network": event.lost_network,
        },
        "untracked_forks": event.untracked_forks,
    }


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

    def line(self, event) -> bytes:
        name, code = _NAMES[type(event)]
        head = (
            f'{{"event":"{name}","code":"{code}","ei":{event.ei},'
            f'"uid":"{self.uid_prefix}{event.ei:012x}","time":"{rfc3339(event.time)}",'
        )
        return (
            head.encode()
            + self._common
            + b","
            + _ascii_json(_fields(event, self.identity))[1:]
            + b"\n"
        )
