"""The control socket's protocol: one JSON request per connection, answered
by one JSON reply, each a line of at most MAX_MESSAGE bytes."""

from __future__ import annotations

import socket
import time
from typing import Annotated

import msgspec

from esr.errors import ControlError, DaemonUnavailable

MAX_MESSAGE = 64 * 1024


# The kernel's u32; a larger number could not be recorded.
AuditId = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]


class Open(msgspec.Struct, tag="open", tag_field="op", forbid_unknown_fields=True, kw_only=True):
    """Record a new session seeded with seed_pid, or anchored at anchor_pid."""

    login: str
    user: str = ""
    seed_pid: int = 0
    anchor_pid: int = 0
    sid: str | None = None
    remote_addr: str = ""
    service: str = ""
    tty: str = ""
    command: list[bytes] = []
    audit_sessionid: AuditId | None = None
    loginuid: AuditId | None = None
    interactive: bool = False
    # The process relaying the session's pty (`esr run` on a terminal): its
    # reads of the master are the terminal stream, and its exit the logout.
    terminal_pid: int = 0


class Close(msgspec.Struct, tag="close", tag_field="op", forbid_unknown_fields=True, kw_only=True):
    """The session's leader is gone: by sid, or by the anchor PAM opened it at."""

    sid: str = ""
    anchor_pid: int = 0
    audit_sessionid: AuditId | None = None


class Status(msgspec.Struct, tag="status", tag_field="op", forbid_unknown_fields=True):
    pass


Request = Open | Close | Status


class Reply(msgspec.Struct, omit_defaults=True):
    ok: bool
    error: str = ""
    sid: str = ""
    nested: bool = False  # already inside a recorded session: recorded there
    remaining: int = 0  # tasks of the session still running after a close
    unwritten: int = 0  # records of the session the recorder could not write so far
    status: dict | None = None


_request_decoder = msgspec.json.Decoder(Request)
_reply_decoder = msgspec.json.Decoder(Reply)


def decode_request(line: bytes) -> Request:
    """Raises ValueError with a one-line reason."""
    try:
        return _request_decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise ValueError(f"bad request: {str(err).splitlines()[0]}") from None


def encode(message) -> bytes:
    return msgspec.json.encode(message) + b"\n"


def request(path: str, message, timeout: float) -> Reply:
    """Send one request and wait for its reply, all within timeout seconds."""
    deadline = time.monotonic() + timeout
    data = encode(message)
    if len(data) > MAX_MESSAGE:
        raise ControlError(f"request of {len(data)} bytes exceeds {MAX_MESSAGE}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            raise DaemonUnavailable(f"no esr daemon on {path}: {err.strerror}") from None
        except OSError as err:
            raise ControlError(
                f"cannot reach the esr daemon on {path}: {err.strerror or err}"
            ) from None
        reply = b""
        try:
            sock.sendall(data)
            while not reply.endswith(b"\n") and len(reply) <= MAX_MESSAGE:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except TimeoutError:
            raise ControlError(
                f"the esr daemon on {path} did not answer within {timeout:g} s"
            ) from None
        except OSError as err:
            raise ControlError(
                f"talking to the esr daemon on {path}: {err.strerror or err}"
            ) from None
        try:
            return _reply_decoder.decode(reply)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise ControlError(f"the esr daemon on {path} sent an unreadable reply") from None
    finally:
        sock.close()
