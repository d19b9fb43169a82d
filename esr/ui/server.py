"""`esr ui`: the web app on waitress, and the indexer that keeps its index
current while it runs.

The data dir is only read. The index is this process's own cache
(esr.index.default_path), brought up to date in a thread at start and every
few seconds after, so the UI lists a session seconds after it was written.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time

from waitress.server import create_server

from esr.datadir import DataDir
from esr.errors import DataDirError, EsrError, UsageError
from esr.index import Index, readable
from esr.ui.app import create_app

DEFAULT_LISTEN = "127.0.0.1:8470"
REFRESH_S = 2.0
THREADS = 4


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPV6]:PORT or PORT (on loopback); port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        if host != "localhost":
            ipaddress.ip_address(host)
        number = int(port)
        if not 0 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise UsageError(
            f"--listen {text!r}: expected HOST:PORT with an IP address or localhost, "
            f"e.g. {DEFAULT_LISTEN} or [::1]:8470"
        ) from None
    return host, number


def listen(text: str) -> socket.socket:
    host, port = parse_listen(text)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=64)
    except OSError as err:
        raise UsageError(f"cannot listen on {text}: {err.strerror or err}") from None


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class Indexer(threading.Thread):
    """Keeps the index current in the background; says how far it got."""

    def __init__(self, index: Index):
        super().__init__(name="esr-index", daemon=True)
        self.index = index
        self.done = 0
        self.todo = 0
        self.error = ""

    def run(self) -> None:
        while True:
            try:
                unreadable = self.index.refresh(self._progress).unreadable
                self.error = (
                    f"{len(unreadable)} recordings unreadable, the first {unreadable[0]}"
                    if unreadable
                    else ""
                )
            except EsrError as err:
                self.error = str(err)
            except OSError as err:
                self.error = f"{err.filename or 'index'}: {err.strerror}"
            time.sleep(REFRESH_S)

    def _progress(self, done: int, todo: int) -> None:
        self.done, self.todo = done, todo

    def status(self) -> str:
        if self.error:
            return f"index not current: {self.error}"
        if self.done < self.todo:
            return f"indexing: {self.done} of {self.todo} recordings read"
        return ""


def serve(datadir: DataDir, index_path: str, listen_on: str, token_file: str | None) -> int:
    sock = listen(listen_on)
    readable(datadir)
    index = Index(index_path, datadir)
    indexer = Indexer(index)
    token = secrets.token_urlsafe(24)
    app = create_app(datadir, index_path, token, indexer.status)
    url = f"{_address(sock)}?token={token}"
    if token_file:
        _write_private(token_file, url + "\n")
        say = (
            f"serving {datadir.path} at {_address(sock)} "
            f"(its address with the token is in {token_file})"
        )
    else:
        say = f"serving {datadir.path} at {url}"
    if not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
        say += "\nesr ui: warning: not on loopback: the token crosses the network in clear text"
    logging.basicConfig(format="esr ui: %(name)s: %(message)s", level=logging.WARNING)
    indexer.start()
    print(f"esr ui: {say}", file=sys.stderr, flush=True)
    server = create_server(app, sockets=[sock], threads=THREADS, ident="esr")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.run()
    finally:
        server.close()
    return 0


def _write_private(path: str, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
    except OSError as err:
        raise DataDirError(f"cannot write {path}: {err.strerror}") from None
