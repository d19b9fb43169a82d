"""Where esr keeps its files, under data_dir:

server_id                 this host's stable id
seal.key                  the current sealing key, when `esr keygen` made one
sessions/<sid>.esr        one recording per session
sessions/<sid>.seal       what vouches for it (esr/seal.py)
log/<server_id>/<day>.00:00:00.log   the JSON audit log, one file per UTC day
log/events.log            symlink to the current day's file
esr.lock                  held by the running daemon
"""

from __future__ import annotations

import os
import re
import stat
import sys
import uuid
from collections.abc import Callable

from esr.errors import DataDirError

SID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def _warn(message: str) -> None:
    print(f"esr: warning: {message}", file=sys.stderr)


def check_sid(sid: str) -> str:
    if not SID_PATTERN.fullmatch(sid):
        raise DataDirError(
            f"invalid session id {sid!r}: use letters, digits and . _ : - (at most 128)"
        )
    return sid


class DataDir:
    def __init__(self, path: str):
        self.path = path
        self.sessions_dir = os.path.join(path, "sessions")
        self.log_dir = os.path.join(path, "log")

    def ensure(self) -> None:
        for d in (self.path, self.sessions_dir, self.log_dir):
            try:
                os.makedirs(d, mode=0o700, exist_ok=True)
            except OSError as err:
                raise DataDirError(f"cannot create {d}: {err.strerror}") from None

    def recording(self, sid: str) -> str:
        return os.path.join(self.sessions_dir, f"{sid}.esr")

    def seal(self, sid: str) -> str:
        return os.path.join(self.sessions_dir, f"{sid}.seal")

    def seal_key(self) -> str:
        return os.path.join(self.path, "seal.key")

    def server_id(self) -> str:
        """A UUID made once per data_dir, so it survives restarts and upgrades."""
        path = os.path.join(self.path, "server_id")
        try:
            with open(path) as f:
                value = f.read().strip()
            return str(uuid.UUID(value))
        except (FileNotFoundError, ValueError):
            pass
        value = str(uuid.uuid4())
        tmp = f"{path}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(fd, 0o644)  # readable whatever the caller's umask
            os.write(fd, f"{value}\n".encode())
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # first writer wins
        except FileExistsError:
            with open(path) as f:
                value = f.read().strip()
        finally:
            os.unlink(tmp)
        return value

    def sids(self, warn: Callable[[str], None] = _warn) -> list[str]:
        """The sessions recorded here. Anything else named like a recording
        (a directory, a FIFO, a symlink, a name no sid has) is skipped with
        a warning: reading it could hang or mislead."""
        try:
            entries = list(os.scandir(self.sessions_dir))
        except FileNotFoundError:
            return []
        sids = []
        for entry in entries:
            if not entry.name.endswith(".esr"):
                continue
            sid = entry.name[:-4]
            try:
                regular = stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode)
            except FileNotFoundError:
                continue
            if not regular or not SID_PATTERN.fullmatch(sid):
                warn(f"skipping {entry.name!r} in {self.sessions_dir}: not a recording")
                continue
            sids.append(sid)
        return sids

    def resolve(self, sid: str) -> str:
        """A session id, or the one session whose id starts with it."""
        if SID_PATTERN.fullmatch(sid) and os.path.exists(self.recording(sid)):
            return sid
        matches = [s for s in self.sids() if s.startswith(sid)] if sid else []
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise DataDirError(f"session id {sid!r} is ambiguous: {len(matches)} sessions match")
        raise DataDirError(f"no session {sid!r} in {self.path}")
