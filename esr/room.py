"""Room on disk that a full disk cannot take away.

Every file esr appends to keeps a reserve allocated past its end
(fallocate with FALLOC_FL_KEEP_SIZE): an ordinary write that would eat into
it is refused before anything is written, so what must always reach the
disk (a session's end, its seal, its audit line) still fits when nothing
else does, whoever filled the disk. Where the filesystem cannot preallocate,
free space is checked instead, which a concurrent writer can race.

Truncating a file drops what was allocated past its end (ext4 and tmpfs
do, even to the same size), which is also how the reserve is given back.
"""

from __future__ import annotations

import ctypes
import errno
import os

_KEEP_SIZE = 0x01  # FALLOC_FL_KEEP_SIZE
# Errors that mean "no room", as opposed to a failing disk.
FULL = (errno.ENOSPC, errno.EDQUOT)
# A file grows its allocation ahead of what it needs: by an eighth of its
# size, or by room for _WRITES_AHEAD more writes like the one that needs it
# if that is more, up to _AHEAD. A busy session then calls fallocate once
# every few frames and the audit log once every few flushes, not each time:
# in a command storm, allocating each flush's lines alone cost ~50 ns a
# line, mostly in the write into blocks just allocated. An idle session's
# few small frames take no more than they need.
_AHEAD = 4 << 20
_WRITES_AHEAD = 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.syncfs.argtypes = [ctypes.c_int]


class NoRoom(OSError):
    """The write was not tried: it would have taken the reserve."""

    def __init__(self) -> None:
        super().__init__(errno.ENOSPC, "no room left beyond the reserve")


def _fallocate(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, _KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def syncfs(fd: int) -> None:
    """Write back everything dirty on fd's filesystem."""
    if _libc.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class Room:
    """The allocation past the end of one append-only file."""

    def __init__(self, fd: int, size: int, reserve: int, shared: bool = False):
        self.fd = fd
        self.size = size  # where the next append lands
        self.reserve = reserve
        # Other processes append too (the audit log): the size is read back.
        self.shared = shared
        self.allocated = size

    def take(self, n: int) -> bool:
        """Whether n bytes can be appended and still leave the reserve."""
        size = os.fstat(self.fd).st_size if self.shared else self.size
        need = size + n + self.reserve
        if need <= self.allocated:
            return True
        ahead = min(max(size // 8, _WRITES_AHEAD * n), _AHEAD)
        for end in dict.fromkeys((need + ahead, need)):
            try:
                _fallocate(self.fd, size, end - size)
            except OSError as err:
                if err.errno in FULL:
                    continue
                if err.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                    st = os.fstatvfs(self.fd)
                    return st.f_bavail * st.f_frsize >= n + self.reserve
                raise
            self.allocated = end
            return True
        return False

    def wrote(self, n: int) -> None:
        self.size += n

    def cut(self, size: int) -> None:
        """The file was truncated to size: its allocation went with it."""
        self.size = self.allocated = size

    def release(self) -> None:
        """Give the reserve back: the file will not grow any more. A shared
        file keeps it, and what was allocated ahead (at most _AHEAD):
        truncating could cut another writer's append."""
        if not self.shared and self.allocated > self.size:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass
            self.allocated = self.size
