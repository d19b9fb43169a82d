"""Room allocated past the end of an append-only file: enough ahead that a
busy writer seldom asks for more, never much more than its writes need,
and given back when the file is done."""

from __future__ import annotations

import os

from esr.room import Room

RESERVE = 8192


def _past_end(fd: int) -> int:
    st = os.fstat(fd)
    return st.st_blocks * 512 - st.st_size


def _append(room: Room, fd: int, n: int) -> None:
    assert room.take(n)
    os.write(fd, b"x" * n)
    room.wrote(n)


def test_a_file_allocates_for_writes_ahead_within_bounds_and_gives_it_back(tmp_path):
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    room = Room(fd, 0, RESERVE)
    try:
        allocations = 0
        for n in [200] * 20 + [8192] * 60:
            before = room.allocated
            _append(room, fd, n)
            allocations += room.allocated != before
            size = os.fstat(fd).st_size
            # The reserve, and at most four more writes like this one or an
            # eighth of the file (blocks round it up).
            assert RESERVE <= _past_end(fd) <= RESERVE + max(4 * n, size // 8) + 8192
        assert allocations <= 20  # not one per write
        room.release()
        assert _past_end(fd) < RESERVE  # block rounding and extent blocks only
    finally:
        os.close(fd)
