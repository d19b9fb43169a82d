"""The per-session recording file: append-only, hash-chained frames.

A frame is a 72-byte header and a payload, the zstd-compressed msgpack batch
of schema events. The header's digest is BLAKE2b-128 over the previous
frame's digest, the header itself and the payload; the first frame chains
from a digest of the session id. So a crash leaves every complete frame
readable, and truncation, reordering, removal or any edit shows up as the
first frame whose digest or sequence does not follow.

The first frame holds session.start, the last one session.end; a file
without an end frame was not closed (yet).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field

import zstandard

from esr import schema

MAGIC = b"ESRF"
VERSION = 1
HEADER = struct.Struct("<4sBBHIIQQIIIIII16s")
DIGEST_SIZE = 16

KIND_EVENTS = 0
KIND_START = 1
KIND_END = 2
KINDS = (KIND_EVENTS, KIND_START, KIND_END)

# A frame larger than this is damage, not data: nothing writes one.
MAX_PAYLOAD = 1 << 30


def chain_seed(sid: str) -> bytes:
    return hashlib.blake2b(b"esr recording\0" + sid.encode(), digest_size=DIGEST_SIZE).digest()


def _digest(prev: bytes, head: bytes, payload: bytes) -> bytes:
    h = hashlib.blake2b(prev, digest_size=DIGEST_SIZE)
    h.update(head)
    h.update(payload)
    return h.digest()


@dataclass(frozen=True)
class Frame:
    index: int
    offset: int
    kind: int
    length: int  # payload bytes
    count: int
    first_ei: int
    last_ei: int
    commands: int
    disks: int
    networks: int
    lost: tuple[int, int, int]  # events lost per type, as reported in this frame
    digest: bytes
    payload: bytes | None  # None when only headers were read

    def events(self) -> list:
        return schema.decode_events(zstandard.ZstdDecompressor().decompress(self.payload))


@dataclass
class Summary:
    """What the intact part of a recording holds."""

    frames: int = 0
    last_ei: int = -1
    commands: int = 0
    disks: int = 0
    networks: int = 0
    lost: list[int] = field(default_factory=lambda: [0, 0, 0])
    closed: bool = False
    end_offset: int = 0  # bytes of intact frames
    digest: bytes = b""
    last_offset: int = 0
    first_command_offset: int | None = None  # of the first frame with commands

    def add(self, frame: Frame) -> None:
        self.frames += 1
        self.last_ei = frame.last_ei
        self.commands += frame.commands
        self.disks += frame.disks
        self.networks += frame.networks
        for i, n in enumerate(frame.lost):
            self.lost[i] += n
        self.closed = frame.kind == KIND_END
        self.end_offset = frame.offset + HEADER.size + frame.length
        self.digest = frame.digest
        self.last_offset = frame.offset
        if frame.commands and self.first_command_offset is None:
            self.first_command_offset = frame.offset


class Damage(Exception):
    """The recording stops being valid at a frame; everything before it is intact."""

    def __init__(self, frame: int, offset: int, reason: str, intact: Summary, truncated: bool):
        super().__init__(f"frame {frame} at byte {offset}: {reason}")
        self.frame = frame
        self.offset = offset
        self.reason = reason
        self.intact = intact
        self.truncated = truncated  # an incomplete last frame: what a crash mid-write leaves


class Reader:
    """The frames of a recording in order, each checked as it is read.

    With payloads=False only headers are read (fast, for listings) and
    digests are not checked. Iteration raises Damage at the first bad frame,
    after yielding every good one; summary describes what was read.
    """

    def __init__(self, path: str, sid: str, payloads: bool = True):
        self.path = path
        self.sid = sid
        self.payloads = payloads
        self.summary = Summary()

    def __iter__(self):
        summary = self.summary
        prev = chain_seed(self.sid)
        expect_ei = 0
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = index = 0
            while offset < size:

                def damage(reason, truncated=False):
                    return Damage(index, offset, reason, summary, truncated)

                head = f.read(HEADER.size)
                if len(head) < HEADER.size:
                    raise damage(f"truncated: {len(head)} of {HEADER.size} header bytes", True)
                (
                    magic,
                    version,
                    kind,
                    _flags,
                    length,
                    count,
                    first_ei,
                    last_ei,
                    commands,
                    disks,
                    networks,
                    *lost,
                    digest,
                ) = HEADER.unpack(head)
                if magic != MAGIC:
                    raise damage("not an esr frame (bad magic)")
                if version != VERSION:
                    raise damage(f"unsupported frame version {version}")
                if kind not in KINDS or length > MAX_PAYLOAD:
                    raise damage("corrupt header")
                if (index == 0) != (kind == KIND_START):
                    raise damage("session.start must be the first frame, and only the first")
                if summary.closed:
                    raise damage("frame after session.end")
                if first_ei != expect_ei or last_ei - first_ei + 1 != count or count == 0:
                    raise damage(
                        f"sequence break: events {first_ei}..{last_ei} (x{count}), "
                        f"expected to start at {expect_ei}"
                    )
                if offset + HEADER.size + length > size:
                    raise damage(
                        f"truncated: {size - offset - HEADER.size} of {length} payload bytes", True
                    )
                if self.payloads:
                    payload = f.read(length)
                    if _digest(prev, head[:-DIGEST_SIZE], payload) != digest:
                        raise damage("checksum mismatch: the frame was altered")
                else:
                    payload = None
                    f.seek(length, os.SEEK_CUR)
                frame = Frame(
                    index,
                    offset,
                    kind,
                    length,
                    count,
                    first_ei,
                    last_ei,
                    commands,
                    disks,
                    networks,
                    tuple(lost),
                    digest,
                    payload,
                )
                summary.add(frame)
                yield frame
                prev = digest
                expect_ei = last_ei + 1
                offset += HEADER.size + length
                index += 1


def verify(path: str, sid: str) -> Summary:
    """Check every frame and the chain. Raises Damage with the intact part."""
    reader = Reader(path, sid)
    for _ in reader:
        pass
    return reader.summary


def scan(path: str, sid: str) -> tuple[Summary, Damage | None]:
    """Headers only: counts and boundaries, for listings."""
    reader = Reader(path, sid, payloads=False)
    try:
        for _ in reader:
            pass
    except Damage as err:
        return reader.summary, err
    return reader.summary, None


def session_start(path: str) -> schema.SessionStart:
    """The session.start event: the first frame's, of a recording with one."""
    return read_frame(path, 0).events()[0]


def read_frame(path: str, offset: int) -> Frame:
    """One frame at an offset found by scan(), unchecked."""
    with open(path, "rb") as f:
        f.seek(offset)
        (
            _m,
            _v,
            kind,
            _fl,
            length,
            count,
            first_ei,
            last_ei,
            commands,
            disks,
            networks,
            *lost,
            digest,
        ) = HEADER.unpack(f.read(HEADER.size))
        payload = f.read(length)
    return Frame(
        -1,
        offset,
        kind,
        length,
        count,
        first_ei,
        last_ei,
        commands,
        disks,
        networks,
        tuple(lost),
        digest,
        payload,
    )


class Writer:
    """Appends frames to one session's recording."""

    def __init__(self, fd: int, digest: bytes, size: int, level: int):
        self.fd = fd
        self.digest = digest
        self.size = size  # bytes of complete frames
        self.bytes_written = 0
        self._zstd = zstandard.ZstdCompressor(level=level)
        # Reused from frame to frame: a busy session's batches are megabytes.
        self._encoded = bytearray()

    @classmethod
    def create(cls, path: str, sid: str, level: int) -> "Writer":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o640)
        return cls(fd, chain_seed(sid), 0, level)

    @classmethod
    def resume(cls, path: str, sid: str, level: int) -> tuple["Writer", Summary, int]:
        """Reopen an unclosed recording to end it: an incomplete last frame
        (a crash mid-write) is cut off, and its size returned. Raises Damage
        for anything else, which must not be written after."""
        try:
            summary = verify(path, sid)
            cut = 0
        except Damage as err:
            if not err.truncated:
                raise
            summary = err.intact
            cut = os.path.getsize(path) - summary.end_offset
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        if cut:
            os.ftruncate(fd, summary.end_offset)
        return cls(fd, summary.digest, summary.end_offset, level), summary, cut

    def append(self, kind: int, events: list, counts: tuple = (0, 0, 0, 0, 0, 0)) -> int:
        """Write events (consecutive ei) as one frame. counts: the commands,
        disks and networks among them, and the command, disk and network
        events their Lost records report. Returns bytes written."""
        schema.encode_events_into(events, self._encoded)
        return self.append_compressed(
            kind, self.compress(self._encoded), events[0].ei, events[-1].ei, counts
        )

    def compress(self, payload) -> bytes:
        return self._zstd.compress(payload)

    def append_compressed(
        self, kind: int, payload: bytes, first_ei: int, last_ei: int, counts: tuple
    ) -> int:
        head = HEADER.pack(
            MAGIC,
            VERSION,
            kind,
            0,
            len(payload),
            last_ei - first_ei + 1,
            first_ei,
            last_ei,
            *counts,
            b"",
        )[:-DIGEST_SIZE]
        digest = _digest(self.digest, head, payload)
        data = head + digest + payload
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.digest = digest
        self.size += len(data)
        self.bytes_written += len(data)
        return len(data)

    def set_level(self, level: int) -> None:
        self._zstd = zstandard.ZstdCompressor(level=level)

    def discard_partial(self) -> None:
        """After a failed write (disk full): cut what part of the frame made
        it, so the recording stays valid and later frames can follow."""
        try:
            os.ftruncate(self.fd, self.size)
        except OSError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1
