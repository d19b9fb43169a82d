"""The JSON audit log: one event per line, one file per UTC day, and a
log/events.log symlink to the current day's file, as in the reference."""

from __future__ import annotations

import os
import time

from esr.room import NoRoom, Room

# Room kept past the end of the day's file: every open session's end line
# (with its seal) fits when the disk is full.
RESERVE_BASE = 8192
RESERVE_PER_SESSION = 2048


class AuditLog:
    def __init__(self, log_dir: str, server_id: str):
        self.log_dir = log_dir
        self.dir = os.path.join(log_dir, server_id)
        self.fd = -1
        self.day_bounds = (0, 0)  # the current day's first second, and the next day's
        self.bytes_written = 0
        self.room: Room | None = None
        self.reserve = RESERVE_BASE

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
        self.fd = fd
        # esr run without the daemon appends to the same file.
        self.room = Room(fd, 0, self.reserve, shared=True)
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

    def reserve_for(self, sessions: int) -> None:
        """Keep room for the end lines of this many open sessions."""
        self.reserve = RESERVE_BASE + RESERVE_PER_SESSION * sessions
        if self.room is not None:
            self.room.reserve = self.reserve

    def write(self, lines: bytes | memoryview, reserved: bool = False) -> None:
        """Append complete lines with one write: writers in other processes
        (esr run without the daemon) never interleave within a line. Only
        lines that must be written (a session's end) may use the reserve;
        others raise NoRoom, an OSError, without writing anything."""
        if not lines:
            return
        now = time.time()
        if not self.day_bounds[0] <= now < self.day_bounds[1] or self.fd < 0:
            self._open(time.strftime("%Y-%m-%d", time.gmtime(now)))
            start = int(now) // 86400 * 86400
            self.day_bounds = (start, start + 86400)
        if self.room is not None and not reserved and not self.room.take(len(lines)):
            raise NoRoom()
        view = memoryview(lines)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.bytes_written += len(lines)

    def reopen(self) -> None:
        """After logrotate moved the file away (SIGHUP)."""
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
