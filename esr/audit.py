"""The JSON audit log: one event per line, one file per UTC day, and a
log/events.log symlink to the current day's file, as in the reference."""

from __future__ import annotations

import os
import time


class AuditLog:
    def __init__(self, log_dir: str, server_id: str):
        self.log_dir = log_dir
        self.dir = os.path.join(log_dir, server_id)
        self.fd = -1
        self.day = ""
        self.bytes_written = 0

    def _open(self, day: str) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        name = f"{day}.00:00:00.log"
        fd = os.open(
            os.path.join(self.dir, name),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
            0o600,
        )
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.day = fd, day
        link = os.path.join(self.log_dir, "events.log")
        target = os.path.join(os.path.basename(self.dir), name)
        try:
            if os.readlink(link) == target:
                return
        except OSError:
            pass
        tmp = f"{link}.{os.getpid()}"
        try:
            os.unlink(tmp)  # left by a process that died here with our pid
        except FileNotFoundError:
            pass
        os.symlink(target, tmp)
        os.replace(tmp, link)

    def write(self, lines: bytes) -> None:
        """Append complete lines with one write: writers in other processes
        (esr run without the daemon) never interleave within a line."""
        if not lines:
            return
        day = time.strftime("%Y-%m-%d", time.gmtime())
        if day != self.day or self.fd < 0:
            self._open(day)
        view = memoryview(lines)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.bytes_written += len(lines)

    def reopen(self) -> None:
        """After logrotate moved the file away (SIGHUP)."""
        self.close()
        self.day = ""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
