"""The per-session recording file: append-only, hash-chained frames.

A frame is a header and a payload, the zstd-compressed msgpack batch of
schema events. The header's digest is BLAKE2b-128 over the previous frame's
digest, the header itself and the payload; the first frame chains from a
digest of the session id. So a crash leaves every complete frame readable,
and truncation, reordering, removal or any edit shows up as the first frame
whose digest or sequence does not follow.

The first frame holds session.start, the last one session.end; a file
without an end frame was not closed (yet). Events the recorder could not
write (a full disk) leave a hole in the sequence that the next frame written
declares (FLAG_GAP) and accounts for with a session.lost event, so a hole
the recorder made reads differently from a frame someone removed. What
vouches for the recording from outside it is its seal file (esr/seal.py).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import stat
import struct
from dataclasses import dataclass, field

import zstandard

from esr import schema
from esr.errors import RecordingError
from esr.room import NoRoom, Room

MAGIC = b"ESRF"
VERSION = 2
# Per-buffer counts in every header: room for this many buffers, so that
# adding one does not change the format.
SLOTS = 8
# By format version; version 1 (esr 0.1) counted three buffers.
HEADERS = {
    1: struct.Struct("<4sBBHIIQQ3I3I16s"),
    2: struct.Struct(f"<4sBBHIIQQ{SLOTS}I{SLOTS}I16s"),
}
HEADER = HEADERS[VERSION]
PREFIX = 8  # magic, version, kind, flags: enough to know the header's size
DIGEST_SIZE = 16

KIND_EVENTS = 0
KIND_START = 1
KIND_END = 2
KINDS = (KIND_EVENTS, KIND_START, KIND_END)

# Header flags.
FLAG_INTERACTIVE = 0x1  # a command of the session has run on a terminal by now
FLAG_GAP = 0x2  # events since the previous frame were not written; a session.lost here says which
FLAG_SEALED = 0x4  # the recorder seals this recording in <sid>.seal
FLAG_RESUMED = 0x8  # a session.resume here: another recorder took the session over

# Bytes kept allocated past the end of a recording being written: its end
# frame, with a session.lost for what a full disk kept out, always fits.
RESERVE = 8192

# What a file without even its session.start frame is.
EMPTY = "the file is empty"

# A frame larger than this is damage, not data: nothing writes one.
MAX_PAYLOAD = 1 << 30


def chain_seed(sid: str) -> bytes:
    return hashlib.blake2b(b"esr recording\0" + sid.encode(), digest_size=DIGEST_SIZE).digest()


def _digest(prev: bytes, head: bytes, payload: bytes) -> bytes:
    h = hashlib.blake2b(prev, digest_size=DIGEST_SIZE)
    h.update(head)
    h.update(payload)
    return h.digest()


def _slots(counts, names: tuple[str, ...]) -> tuple[int, ...]:
    """One count per name."""
    counts = tuple(counts)[: len(names)]
    return counts + (0,) * (len(names) - len(counts))


@dataclass(frozen=True)
class Frame:
    index: int
    offset: int
    version: int
    kind: int
    flags: int
    header_size: int
    length: int  # payload bytes
    count: int
    first_ei: int
    last_ei: int
    records: tuple[int, ...]  # kernel records in the payload, per buffer
    lost: tuple[int, ...]  # what its Lost events report lost, per schema.LOST_KINDS
    digest: bytes
    payload: bytes | None  # None when only headers were read

    @classmethod
    def parse(cls, index: int, offset: int, head: bytes, payload: bytes | None = None) -> Frame:
        layout = HEADERS[head[4]]
        _magic, version, kind, flags, length, count, first_ei, last_ei, *rest = layout.unpack(head)
        slots = (len(rest) - 1) // 2
        return cls(
            index,
            offset,
            version,
            kind,
            flags,
            layout.size,
            length,
            count,
            first_ei,
            last_ei,
            _slots(rest[:slots], schema.BUFFERS),
            _slots(rest[slots : 2 * slots], schema.LOST_KINDS),
            rest[-1],
            payload,
        )

    @property
    def end(self) -> int:
        return self.offset + self.header_size + self.length

    def events(self) -> list:
        if self.payload is None:
            raise ValueError("only the frame's header was read")
        events = schema.decode_events(zstandard.ZstdDecompressor().decompress(self.payload))
        if self.version == 1:
            return [schema.upgrade_v1(e) for e in events]
        return events


@dataclass
class Summary:
    """What the intact part of a recording holds."""

    frames: int = 0
    last_ei: int = -1
    records: list[int] = field(default_factory=lambda: [0] * len(schema.BUFFERS))
    lost: list[int] = field(default_factory=lambda: [0] * len(schema.LOST_KINDS))
    closed: bool = False
    interactive: bool = False
    sealed: bool = False  # frames say a seal file vouches for them
    # Holes the recorder declared: (first_ei, last_ei, reason); the reason
    # is read from the payload, so it is "" in a headers-only scan.
    gaps: list[tuple[int, int, str]] = field(default_factory=list)
    # Of lost, per buffer: records a recorder read and did not write (the
    # holes', and those a session.resume counts); read from the payloads too.
    unwritten: list[int] = field(default_factory=lambda: [0] * len(schema.BUFFERS))
    end_offset: int = 0  # bytes of intact frames
    digest: bytes = b""
    last_offset: int = 0
    first_command_offset: int | None = None  # of the first frame with commands

    def add(self, frame: Frame) -> None:
        self.frames += 1
        self.last_ei = frame.last_ei
        for i, n in enumerate(frame.records):
            self.records[i] += n
        for i, n in enumerate(frame.lost):
            self.lost[i] += n
        self.closed = frame.kind == KIND_END
        self.interactive = self.interactive or bool(frame.flags & FLAG_INTERACTIVE)
        self.sealed = self.sealed or bool(frame.flags & FLAG_SEALED)
        self.end_offset = frame.end
        self.digest = frame.digest
        self.last_offset = frame.offset
        if frame.records[schema.BUFFERS.index("command")] and self.first_command_offset is None:
            self.first_command_offset = frame.offset


class Damage(RecordingError):
    """The recording stops being valid at a frame; everything before it is intact."""

    def __init__(
        self, frame: int, offset: int, reason: str, intact: Summary, truncated: bool = False
    ):
        super().__init__(f"frame {frame} at byte {offset}: {reason}")
        self.frame = frame
        self.offset = offset
        self.reason = reason
        self.intact = intact
        self.truncated = truncated  # an incomplete last frame: what a crash mid-write leaves


def open_regular(path: str):
    """path opened for reading, if it is a regular file: a FIFO or a device
    named like a recording must neither hang nor be read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RecordingError(f"{path}: not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _unwritten(frame: Frame, hole: list[int] | None) -> tuple[str, list[int]] | None:
    """What frame says the recorder read and did not write: the reason and
    records its session.lost gives for the hole before it (events
    hole[0]..hole[1]), if any, and the records its session.resume counts.
    None when no session.lost accounts for exactly the hole."""
    try:
        events = frame.events()
    except (zstandard.ZstdError, ValueError):  # msgspec's DecodeError is a ValueError
        return None
    reason, records = None if hole else "", [0] * len(schema.BUFFERS)
    for event in events:
        if hole and type(event) is schema.Lost and event.missing == hole:
            reason = event.reason
            records = [a + b for a, b in zip(records, _slots(event.lost, schema.BUFFERS))]
        elif type(event) is schema.Resume:
            records = [a + b for a, b in zip(records, _slots(event.unwritten, schema.BUFFERS))]
    return None if reason is None else (reason, records)


class Reader:
    """The frames of a recording in order, each checked as it is read.

    With payloads=False only headers are read (fast, for listings) and
    digests are not checked. Iteration raises Damage at the first bad frame,
    after yielding every good one; summary describes what was read.

    after, the summary of an earlier reading of the same file, resumes where
    that one stopped, chained to its last digest: a file that only grew is
    read and checked once.
    """

    def __init__(self, path: str, sid: str, payloads: bool = True, after: Summary | None = None):
        self.path = path
        self.sid = sid
        self.payloads = payloads
        self.summary = copy.deepcopy(after) if after else Summary()

    def __iter__(self):
        summary = self.summary
        prev = summary.digest if summary.frames else chain_seed(self.sid)
        expect_ei = summary.last_ei + 1
        with open_regular(self.path) as f:
            size = os.fstat(f.fileno()).st_size
            if not size:
                raise Damage(0, 0, EMPTY, summary, truncated=True)
            offset, index = summary.end_offset, summary.frames
            f.seek(offset)
            while offset < size:
                damage = functools.partial(Damage, index, offset, intact=summary)
                head = f.read(PREFIX)
                if len(head) < PREFIX:
                    raise damage(f"truncated: {len(head)} header bytes", truncated=True)
                if head[:4] != MAGIC:
                    raise damage("not an esr frame (bad magic)")
                layout = HEADERS.get(head[4])
                if layout is None:
                    raise damage(f"unsupported frame version {head[4]}")
                head += f.read(layout.size - PREFIX)
                if len(head) < layout.size:
                    raise damage(
                        f"truncated: {len(head)} of {layout.size} header bytes", truncated=True
                    )
                frame = Frame.parse(index, offset, head)
                if frame.kind not in KINDS or frame.length > MAX_PAYLOAD:
                    raise damage("corrupt header")
                if (index == 0) != (frame.kind == KIND_START):
                    raise damage("session.start must be the first frame, and only the first")
                if summary.closed:
                    raise damage("frame after session.end")
                gap = bool(frame.flags & FLAG_GAP) and frame.first_ei > expect_ei
                if (
                    (frame.first_ei != expect_ei and not gap)
                    or frame.count == 0
                    or frame.last_ei - frame.first_ei + 1 != frame.count
                ):
                    raise damage(
                        f"sequence break: events {frame.first_ei}..{frame.last_ei} "
                        f"(x{frame.count}), expected to start at {expect_ei}"
                    )
                if frame.end > size:
                    raise damage(
                        f"truncated: {size - offset - layout.size} of {frame.length} payload bytes",
                        truncated=True,
                    )
                if self.payloads:
                    payload = f.read(frame.length)
                    if _digest(prev, head[:-DIGEST_SIZE], payload) != frame.digest:
                        raise damage("checksum mismatch: the frame was altered")
                    frame = Frame.parse(index, offset, head, payload)
                    reason = ""
                    if gap or frame.flags & FLAG_RESUMED:
                        declared = _unwritten(
                            frame, [expect_ei, frame.first_ei - 1] if gap else None
                        )
                        if declared is None:
                            raise damage(
                                f"events {expect_ei}..{frame.first_ei - 1} are missing and no "
                                "session.lost of the frame accounts for them"
                            )
                        reason, records = declared
                        for i, n in enumerate(records):
                            summary.unwritten[i] += n
                else:
                    f.seek(frame.length, os.SEEK_CUR)
                    reason = ""
                summary.add(frame)
                if gap:
                    summary.gaps.append((expect_ei, frame.first_ei - 1, reason))
                yield frame
                prev = frame.digest
                expect_ei = frame.last_ei + 1
                offset = frame.end
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
    with open_regular(path) as f:
        f.seek(offset)
        head = f.read(PREFIX)
        head += f.read(HEADERS[head[4]].size - PREFIX)
        frame = Frame.parse(-1, offset, head)
        return Frame.parse(-1, offset, head, f.read(frame.length))


class Writer:
    """Appends frames to one session's recording."""

    def __init__(
        self,
        fd: int,
        digest: bytes,
        size: int,
        level: int,
        frames: int = 0,
        last_ei: int = -1,
        sealed: bool = False,
    ):
        self.fd = fd
        self.digest = digest
        self.size = size  # bytes of complete frames
        self.frames = frames
        self.last_ei = last_ei
        self.bytes_written = 0
        self.room = Room(fd, size, RESERVE)
        self._flags = FLAG_SEALED if sealed else 0
        self._zstd = zstandard.ZstdCompressor(level=level)
        # Reused from frame to frame: a busy session's batches are megabytes.
        self._encoded = bytearray()

    @classmethod
    def create(cls, path: str, sid: str, level: int, sealed: bool = False) -> Writer:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o640)
        return cls(fd, chain_seed(sid), 0, level, sealed=sealed)

    @classmethod
    def resume(cls, path: str, sid: str, level: int) -> tuple[Writer, Summary, int]:
        """Reopen an unclosed recording, to end it or to go on with it: an
        incomplete last frame (a crash mid-write) is cut off, and its size
        returned. Raises Damage for anything else, which must not be written
        after."""
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
        writer = cls(
            fd,
            summary.digest,
            summary.end_offset,
            level,
            summary.frames,
            summary.last_ei,
            summary.sealed,
        )
        return writer, summary, cut

    def append(
        self, kind: int, events: list, records=(), lost=(), flags: int = 0, reserved: bool = False
    ) -> int:
        """Write events (consecutive ei) as one frame. records: how many of
        them each buffer delivered; lost: what their Lost events report lost,
        per schema.LOST_KINDS. Only a frame that must be written (reserved: a
        session's end) may use the reserve; any other raises NoRoom, an
        OSError, without writing anything. Returns bytes written."""
        schema.encode_events_into(events, self._encoded)
        return self.append_encoded(
            kind, self._encoded, events[0].ei, events[-1].ei, records, lost, flags, reserved
        )

    def append_encoded(
        self,
        kind: int,
        payload,
        first_ei: int,
        last_ei: int,
        records=(),
        lost=(),
        flags: int = 0,
        reserved: bool = False,
    ) -> int:
        """append(), for events already encoded as their msgpack list."""
        return self.append_compressed(
            kind, self.compress(payload), first_ei, last_ei, records, lost, flags, reserved
        )

    def compress(self, payload) -> bytes:
        return self._zstd.compress(payload)

    def append_compressed(
        self,
        kind: int,
        payload: bytes,
        first_ei: int,
        last_ei: int,
        records=(),
        lost=(),
        flags: int = 0,
        reserved: bool = False,
    ) -> int:
        slots = [0] * (2 * SLOTS)
        slots[: len(records)] = records
        slots[SLOTS : SLOTS + len(lost)] = lost
        head = HEADER.pack(
            MAGIC,
            VERSION,
            kind,
            flags | self._flags,
            len(payload),
            last_ei - first_ei + 1,
            first_ei,
            last_ei,
            *slots,
            b"",
        )[:-DIGEST_SIZE]
        digest = _digest(self.digest, head, payload)
        data = head + digest + payload
        if not reserved and not self.room.take(len(data)):
            raise NoRoom()
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.digest = digest
        self.size += len(data)
        self.room.wrote(len(data))
        self.frames += 1
        self.last_ei = last_ei
        self.bytes_written += len(data)
        return len(data)

    def set_level(self, level: int) -> None:
        self._zstd = zstandard.ZstdCompressor(level=level)

    def discard_partial(self) -> None:
        """After a failed write: cut what part of the frame made it, so the
        recording stays valid and later frames can follow."""
        try:
            os.ftruncate(self.fd, self.size)
            self.room.cut(self.size)
        except OSError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.room.release()
                os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1
