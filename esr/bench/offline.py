"""The user-space hot path without the kernel: a corpus of raw records
(the bytes the perf buffers deliver) through decode → msgpack → zstd →
write, timed per stage. Needs no root."""

from __future__ import annotations

import os
import tempfile
import time

from esr import recording, schema
from esr._fast.decode import SessionEvents, decode_batch, encode_record

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


def records(events: int) -> list[schema.Record]:
    """Records like a busy session's: mostly opens, some execs and connects."""
    out: list[schema.Record] = []
    ts = 1_000_000_000
    for i in range(events):
        ts += 3000
        pid = 1000 + (i // 500) % 7
        if i % 100 == 99:
            out.append(
                schema.Command(
                    0,
                    ts,
                    pid,
                    999,
                    4242,
                    b"grep",
                    b"/usr/bin/grep",
                    [b"-r", b"--include=*.c", b"needle", b"src"],
                    0,
                    1000,
                    1000,
                    has_tty=True,
                )
            )
        elif i % 100 == 98:
            out.append(
                schema.Network(
                    0, ts, pid, 4242, b"curl", 4, "10.0.0.5", 40000 + i % 1000, "10.0.0.9", 443, 0
                )
            )
        else:
            out.append(
                schema.Disk(0, ts, pid, 4242, b"make", PATHS[(i // 3) % len(PATHS)], 0o2000000, 3)
            )
    return out


def corpus(events: int) -> bytes:
    """The raw batch the perf buffers would deliver for records(events): two
    CPUs' runs, interleaved in time, which the decoder has to merge."""
    raw = [encode_record(r, COOKIE) for r in records(events)]
    return b"".join(raw[0::2] + raw[1::2])


def _timed(fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


def measure(events: int = 200_000, level: int = 1, batch: int = 20_000) -> dict:
    """ns per event of each stage, over batches of `batch` events (what one
    flush of a busy session holds)."""
    raw = corpus(events)
    stages = {"decode": 0.0, "msgpack": 0.0, "zstd": 0.0, "write": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        writer = recording.Writer.create(os.path.join(tmp, "bench.esr"), "bench", level)
        sink = SessionEvents()
        _, t = _timed(decode_batch, memoryview(raw), {COOKIE: sink}, 0)
        stages["decode"] = t
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
            )
            stages["write"] += t
        written = writer.bytes_written
        writer.close()
    ns = {k: round(v / events * 1e9, 1) for k, v in stages.items()}
    ns["total"] = round(sum(ns.values()), 1)
    return {
        "events": events,
        "raw_bytes_per_event": round(len(raw) / events, 1),
        "bytes_per_event_on_disk": round(written / events, 2),
        "zstd_level": level,
        "ns_per_event": ns,
    }
