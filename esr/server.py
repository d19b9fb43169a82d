"""The daemon's control socket: one request per connection, one reply.

Requests come from PAM hooks at every login, so the server answers each
within REQUEST_TIMEOUT or drops it, never lets idle connections lock others
out, and tells the handler who is asking (SO_PEERCRED).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from esr import control
from esr.errors import DaemonError

# A client has this long to send its whole request.
REQUEST_TIMEOUT = 2.0
# Connections served at once; the slowest is dropped for a newer one.
MAX_CLIENTS = 64


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int


def _peer(sock: socket.socket) -> Peer:
    pid, uid, _gid = struct.unpack(
        "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    )
    return Peer(pid, uid)


def listening_socket(path: str) -> socket.socket:
    """A Unix socket at path that only root can connect to."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        os.unlink(path)  # a previous daemon's: only the data dir's lock holder gets here
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as err:
        sock.close()
        raise DaemonError(f"cannot listen on {path}: {err.strerror or err}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return sock


class ControlServer:
    def __init__(
        self,
        sock: socket.socket,
        handle: Callable[[control.Request, Peer], control.Reply],
        log: Callable[..., None],
    ):
        """handle answers a well-formed request; it never raises."""
        self.sock = sock
        self.handle = handle
        self.log = log
        self.server: asyncio.AbstractServer | None = None
        # Connections being served: when each connected, and who it is.
        self.clients: dict[asyncio.StreamWriter, tuple[float, Peer]] = {}

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(
            self._serve, sock=self.sock, limit=control.MAX_MESSAGE + 1, backlog=128
        )

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self.clients):
                writer.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer.get_extra_info("socket"))
        if len(self.clients) >= MAX_CLIENTS:
            oldest = min(self.clients, key=lambda w: self.clients[w][0])
            self._reply(
                oldest,
                control.Reply(ok=False, error="incomplete request: dropped for a newer connection"),
            )
        self.clients[writer] = (time.monotonic(), peer)
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), REQUEST_TIMEOUT)
            reply = self._answer(line, peer)
        except TimeoutError:
            reply = control.Reply(ok=False, error="incomplete request: timed out")
        except asyncio.IncompleteReadError:
            reply = control.Reply(
                ok=False, error="incomplete request: connection closed before a newline"
            )
        except asyncio.LimitOverrunError:
            reply = control.Reply(
                ok=False, error=f"request too large: more than {control.MAX_MESSAGE} bytes"
            )
        except ConnectionError:
            reply = None
        if writer in self.clients:
            self._reply(writer, reply)

    def _answer(self, line: bytes, peer: Peer) -> control.Reply:
        try:
            request = control.decode_request(line)
        except ValueError as err:
            return control.Reply(ok=False, error=str(err))
        return self.handle(request, peer)

    def _reply(self, writer: asyncio.StreamWriter, reply: control.Reply | None) -> None:
        _connected, peer = self.clients.pop(writer)
        if reply is not None:
            writer.write(control.encode(reply))
            if not reply.ok:
                self.log(
                    "control.refused",
                    level="warning",
                    peer_pid=peer.pid,
                    peer_uid=peer.uid,
                    error=reply.error,
                )
        writer.close()
