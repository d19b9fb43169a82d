"""The user-space hot path without the kernel: a corpus of raw records
(the bytes the perf buffers deliver) through decode → msgpack → zstd →
write, timed per stage. Needs no root."""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import time

from esr import recording, schema
from esr._fast.decode import SessionEvents, decode_batch
from esr.bench import pydecode

COOKIE = (1 << 32) | 7
PATHS = [
    b"/etc/hostname",
    b"/etc/ld.so.cache",
    b"/lib/x86_64-linux-gnu/libc.so.6",
    b"/usr/lib/locale/C.utf8/LC_CTYPE",
    b"/proc/self/status",
    b"/etc/passwd",
    b"/home/alice/project/src/main.c",
    b"/tmp/tmp.x8Yk2Q",
]


def _entry(record: bytes) -> bytes:
    padded = (4 + len(record) + 7) & ~7
    return struct.pack("<I", padded - 4) + record + b"\0" * (padded - 4 - len(record))


def _header(ts: int, kind: int, pid: int, comm: bytes) -> bytes:
    return pydecode.HEADER.pack(ts, COOKIE, 4242, pid, kind, 0, comm)


def corpus(events: int) -> bytes:
    """A batch like a busy session's: mostly opens, some execs and connects,
    in a few per-CPU runs."""
    out = []
    ts = 1_000_000_000
    for i in range(events):
        ts += 3000
        pid = 1000 + (i // 500) % 7
        if i % 100 == 99:
            argv = (
                b"\0".join([b"/usr/bin/grep", b"-r", b"--include=*.c", b"needle", b"src"]) + b"\0"
            )
            path = b"/usr/bin/grep\0"
            head = pydecode.COMMAND.pack(999, 1000, 1000, 0, 5, len(argv), len(argv), len(path), 8)
            out.append(
                _entry(
                    _header(ts, pydecode.EVENT_COMMAND, pid, b"grep".ljust(16, b"\0"))
                    + head
                    + argv
                    + path
                )
            )
        elif i % 100 == 98:
            addrs = socket.inet_pton(socket.AF_INET, "10.0.0.5").ljust(
                16, b"\0"
            ) + socket.inet_pton(socket.AF_INET, "10.0.0.9").ljust(16, b"\0")
            out.append(
                _entry(
                    _header(ts, pydecode.EVENT_NETWORK, pid, b"curl".ljust(16, b"\0"))
                    + pydecode.NETWORK.pack(0, socket.AF_INET, 40000 + i % 1000, 443)
                    + b"\0" * 6
                    + addrs
                )
            )
        else:
            path = PATHS[(i // 3) % len(PATHS)] + b"\0"
            out.append(
                _entry(
                    _header(ts, pydecode.EVENT_DISK, pid, b"make".ljust(16, b"\0"))
                    + pydecode.DISK.pack(0o2000000, 3, len(path), 0)
                    + b"\0" * 4
                    + path
                )
            )
    # Two CPUs' runs, interleaved in time: the decoder has to merge them.
    return b"".join(out[0::2] + out[1::2])


def _timed(fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


def measure(events: int = 200_000, level: int = 1, batch: int = 20_000) -> dict:
    """ns per event of each stage, over batches of `batch` events (what one
    flush of a busy session holds)."""
    raw = corpus(events)
    stages = {"decode": 0.0, "decode_pure_python": 0.0, "msgpack": 0.0, "zstd": 0.0, "write": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        writer = recording.Writer.create(os.path.join(tmp, "bench.esr"), "bench", level)
        sink = SessionEvents()
        _, t = _timed(decode_batch, memoryview(raw), {COOKIE: sink}, 0)
        stages["decode"] = t
        python_sink = SessionEvents()
        _, t = _timed(pydecode.decode_batch, memoryview(raw), {COOKIE: python_sink}, 0)
        stages["decode_pure_python"] = t
        assert sink.events == python_sink.events, "the two decoders disagree"
        decoded, _audited, _counts = sink.take()
        payload = bytearray()  # reused from frame to frame, as Writer.append does
        for i in range(0, len(decoded), batch):
            chunk = decoded[i : i + batch]
            _, t = _timed(schema.encode_events_into, chunk, payload)
            stages["msgpack"] += t
            compressed, t = _timed(writer.compress, payload)
            stages["zstd"] += t
            _, t = _timed(
                writer.append_compressed,
                recording.KIND_EVENTS,
                compressed,
                chunk[0].ei,
                chunk[-1].ei,
                (0, len(chunk), 0, 0, 0, 0),
            )
            stages["write"] += t
        written = writer.bytes_written
        writer.close()
    ns = {k: round(v / events * 1e9, 1) for k, v in stages.items()}
    ns["total"] = round(sum(v for k, v in ns.items() if k != "decode_pure_python"), 1)
    return {
        "events": events,
        "raw_bytes_per_event": round(len(raw) / events, 1),
        "bytes_per_event_on_disk": round(written / events, 2),
        "zstd_level": level,
        "ns_per_event": ns,
    }
