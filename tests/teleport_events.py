"""Teleport's session events as a strict reader takes them, written from the
JSON tags of Teleport's events.proto (api/proto/teleport/legacy/types/events):
a field Teleport always writes (its tag has no omitempty) is required, every
type is checked without coercion, strings must be valid UTF-8 (msgspec
refuses invalid bytes and lone surrogates), and fields Teleport does not
know are let through, as its own reader does.

Only the fields of the embedded metadata that a session event can carry are
listed; the nested ones (trusted_device, user_traits, ...) esr never writes.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Int32 = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]
Uint32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
# msgspec bounds nothing past int64: the Structs check the top in __post_init__.
Uint64 = Annotated[int, msgspec.Meta(ge=0)]
# RFC 3339 in UTC, as Go writes a time.Time, and with no more than the
# microseconds Python's datetime and SIEM parsers take.
Time = Annotated[str, msgspec.Meta(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{0,5}[1-9])?Z$")]


def _uint64(*values: int) -> None:
    if any(v >= 2**64 for v in values):
        raise ValueError("more than a uint64 holds")


# EventAction and SessionNetwork.NetworkOperation, written as numbers.
Action = Literal[0, 1]  # observed, denied
Operation = Literal[0, 1]  # connect, send


class Event(msgspec.Struct, kw_only=True, tag_field="event"):
    # Metadata ("event" is the tag)
    ei: Int64
    uid: str = ""
    code: str = ""
    time: Time
    cluster_name: str = ""
    # SessionMetadata
    sid: str
    with_mfa: str = ""
    private_key_policy: str = ""
    # UserMetadata
    user: str = ""
    login: str = ""
    impersonator: str = ""
    access_requests: list[str] = []
    # ServerMetadata
    namespace: str = ""
    server_id: str
    server_hostname: str = ""
    server_addr: str = ""
    server_labels: dict[str, str] = {}
    forwarded_by: str = ""
    server_sub_kind: str = ""
    server_version: str = ""


class ConnectionEvent(Event, kw_only=True):
    # ConnectionMetadata
    addr_local: str = msgspec.field(default="", name="addr.local")
    addr_remote: str = msgspec.field(default="", name="addr.remote")
    proto: str = ""


class BPFEvent(Event, kw_only=True):
    # BPFMetadata
    pid: Uint64
    cgroup_id: Uint64
    program: str
    audit_session_id: Uint32

    def __post_init__(self):
        _uint64(self.pid, self.cgroup_id)


class SessionStart(ConnectionEvent, tag="session.start", kw_only=True):
    size: str = ""
    initial_command: list[str] = []
    session_recording: str = ""
    invited: list[str] = []
    reason: str = ""


class SessionEnd(ConnectionEvent, tag="session.end", kw_only=True):
    enhanced_recording: bool
    interactive: bool
    participants: list[str]
    # Tagged omitempty, but a time.Time is a struct, which Go always writes.
    session_start: Time
    session_stop: Time
    initial_command: list[str] = []
    session_recording: str = ""


class SessionLeave(ConnectionEvent, tag="session.leave", kw_only=True):
    pass


class SessionCommand(BPFEvent, tag="session.command", kw_only=True):
    ppid: Uint64
    path: str
    argv: list[str]
    return_code: Int32

    def __post_init__(self):
        super().__post_init__()
        _uint64(self.ppid)


class SessionDisk(BPFEvent, tag="session.disk", kw_only=True):
    path: str
    flags: Int32
    return_code: Int32


class SessionNetwork(BPFEvent, tag="session.network", kw_only=True):
    src_addr: str
    dst_addr: str
    dst_port: Int32
    version: Literal[4, 6]
    operation: Operation
    action: Action


class SessionLost(Event, tag="session.lost", kw_only=True):
    """esr's own (E4100W, docs/audit-log.md): Teleport's reader keeps an
    event type it does not know as its metadata alone."""

    lost: dict[str, Uint64]

    def __post_init__(self):
        _uint64(*self.lost.values())


AnyEvent = (
    SessionStart
    | SessionEnd
    | SessionLeave
    | SessionCommand
    | SessionDisk
    | SessionNetwork
    | SessionLost
)
decoder = msgspec.json.Decoder(AnyEvent)
