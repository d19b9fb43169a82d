"""The user-space hot path without the kernel: corpora of raw records (the
bytes the perf buffers deliver) through decode (msgpack and audit lines
included) → zstd → frame write → audit log write, timed per stage. One
corpus mixes the types as a busy session does; one per record type gives
each type's cost. Needs no root."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

from esr import recording, schema
from esr._fast.decode import SessionEvents, decode_batch, encode_record
from esr.audit import AuditLog

COOKIE = (1 << 32) | 7
T0 = 1_700_000_000_000_000_000  # the corpora's clock, ns since the epoch
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
COMMANDS = [
    (b"grep", b"/usr/bin/grep", [b"-r", b"--include=*.c", b"needle", b"src"]),
    (b"ls", b"/usr/bin/ls", [b"-la", b"--color=auto"]),
    (b"git", b"/usr/bin/git", [b"log", b"--oneline", b"-n", b"20"]),
    (b"cc", b"/usr/bin/cc", [b"-O2", b"-c", b"main.c", b"-o", b"main.o"]),
]
OUTPUT = b"\x1b[01;34msrc\x1b[0m  Makefile  README.md  \x1b[01;32mbuild.sh\x1b[0m\r\n"


def command(i: int, ts: int, pid: int) -> schema.Command:
    program, path, argv = COMMANDS[i % len(COMMANDS)]
    if i % 10 == 0:  # a script: run by its interpreter
        return schema.Command(
            0,
            ts,
            pid,
            999,
            4242,
            b"deploy.sh",
            b"/home/alice/bin/deploy.sh",
            [b"--dry-run"],
            0,
            1000,
            1000,
            True,
            interpreter=[b"/bin/sh"],
            exe=b"/usr/bin/dash",
            exe_dev=2049,
            exe_ino=1311,
        )
    if i % 25 == 1:  # a PATH lookup that failed
        return schema.Command(
            0, ts, pid, 999, 4242, program, b"/usr/local/bin/" + program, argv, -2, 1000, 1000, True
        )
    if i % 50 == 2:  # an argument that is not ASCII: AuditFormat renders its line
        argv = [*argv, "café".encode()]
    return schema.Command(
        0,
        ts,
        pid,
        999,
        4242,
        program,
        path,
        argv,
        0,
        1000,
        1000,
        True,
        exe=path,
        exe_dev=2049,
        exe_ino=1000 + i % 7,
    )


def network(i: int, ts: int, pid: int) -> schema.Network:
    if i % 10 == 0:
        return schema.Network(
            0, ts, pid, 4242, b"curl", 6, "2001:db8::5", 40000 + i % 1000, "2001:db8::9", 443, 0
        )
    return schema.Network(
        0,
        ts,
        pid,
        4242,
        b"curl",
        4,
        "10.0.0.5",
        40000 + i % 1000,
        "10.0.0.9",
        443,
        -111 if i % 20 == 1 else 0,
    )


def ptrace(i: int, ts: int, pid: int) -> schema.Ptrace:
    """A debugger's session: attach, write, detach, over and over."""
    target = 5000 + i // 3
    if i % 3 == 0:
        return schema.Ptrace(
            0, ts, pid, 4242, b"gdb", "attach", target, target, b"server", 0, followed=True
        )
    if i % 3 == 1:
        return schema.Ptrace(0, ts, pid, 4242, b"gdb", "process_vm_writev", target, 0, b"", 64)
    return schema.Ptrace(0, ts, pid, 4242, b"gdb", "detach", target, 0, b"", 0, left=True)


# Opcodes a ring takes first: openat, read, write, connect, close.
IO_URING_OPCODES = (18, 22, 23, 16, 19)


def io_uring(i: int, ts: int, pid: int) -> schema.IoUring:
    """Rings set up, each then taking a few kinds of operation."""
    ring = 3 + (i // 6) % 50
    if i % 6 == 0:
        return schema.IoUring(0, ts, pid, 4242, b"fio", "setup", 0, ring, pid, 256, 0)
    opcode = IO_URING_OPCODES[i % 6 - 1]
    return schema.IoUring(
        0, ts, pid, 4242, b"fio", schema.io_uring_operation(opcode), opcode, ring, pid
    )


# How a record of each type is made for the corpora, from its index,
# timestamp and pid.
MAKERS: dict[type[schema.Record], Callable[[int, int, int], schema.Record]] = {
    schema.Command: command,
    schema.Disk: lambda i, ts, pid: schema.Disk(
        0, ts, pid, 4242, b"make", PATHS[(i // 3) % len(PATHS)], 0o2000000, -2 if i % 9 else 3
    ),
    schema.Network: network,
    schema.TerminalOutput: lambda i, ts, pid: schema.TerminalOutput(
        0, ts, pid, 3, OUTPUT * (1 + i % 50), 0
    ),
    schema.TerminalInput: lambda i, ts, pid: schema.TerminalInput(0, ts, pid, 3, b"ls -la\r"),
    schema.TerminalWrite: lambda i, ts, pid: schema.TerminalWrite(
        0, ts, pid, b"ls", 3, 136, 64 + i % 512
    ),
    schema.TerminalResize: lambda i, ts, pid: schema.TerminalResize(
        0, ts, 3, 24 + i % 20, 80 + i % 40
    ),
    schema.Ptrace: ptrace,
    schema.IoUring: io_uring,
}


# In every hundred records of the mixed corpus; opens otherwise.
MIX: dict[int, type[schema.Record]] = {
    99: schema.Command,
    98: schema.Network,
    97: schema.TerminalOutput,
    96: schema.TerminalInput,
    95: schema.TerminalWrite,
    94: schema.TerminalResize,
}


def records(events: int, kind: type[schema.Record] | None = None) -> list[schema.Record]:
    """Records like a busy session's: mostly opens, one in a hundred each
    command and connect, and the terminal's; or only records of one kind."""
    out: list[schema.Record] = []
    ts = T0
    for i in range(events):
        ts += 3000
        pid = 1000 + (i // 500) % 7
        which = kind or MIX.get(i % 100, schema.Disk)
        out.append(MAKERS[which](i if kind else i // 100, ts, pid))
    return out


def corpus(events: int, kind: type[schema.Record] | None = None) -> bytes:
    """The raw batch the perf buffers would deliver for records(events): two
    CPUs' runs, interleaved in time, which the decoder has to merge."""
    raw = [encode_record(r, COOKIE) for r in records(events, kind)]
    return b"".join(raw[0::2] + raw[1::2])


def _batches(events: int, kind: type[schema.Record] | None, batch: int) -> list[bytes]:
    raw = [encode_record(r, COOKIE) for r in records(events, kind)]
    out = []
    for i in range(0, len(raw), batch):
        part = raw[i : i + batch]
        out.append(b"".join(part[0::2] + part[1::2]))
    return out


def _run(batches: list[bytes], events: int, level: int) -> dict:
    """ns per record of each stage, as a recorder's flush runs them: the
    types audited by default get their audit lines."""
    start = schema.SessionStart(0, T0, "bench", "bench", "bench", "bench", "bench")
    audit_format = schema.AuditFormat(schema.Identity.of(start))
    stages: dict[str, int] = dict.fromkeys(("decode", "zstd", "write", "audit"), 0)
    with tempfile.TemporaryDirectory() as tmp:
        writer = recording.Writer.create(os.path.join(tmp, "bench.esr"), "bench", level)
        log = AuditLog(os.path.join(tmp, "log"), "bench")
        sink = SessionEvents(
            audited_records=[r for r in schema.RECORDS if r.audited], format=audit_format
        )
        # Its buffers grown once, as a session's are after its first flushes.
        decode_batch(memoryview(batches[0]), {COOKIE: sink}, 0)
        sink.take()
        for raw in batches:
            t0 = time.perf_counter_ns()
            decode_batch(memoryview(raw), {COOKIE: sink}, 0)
            taken = sink.take()
            t1 = time.perf_counter_ns()
            compressed = writer.compress(taken.payload)
            t2 = time.perf_counter_ns()
            writer.append_compressed(
                recording.KIND_EVENTS, compressed, taken.first_ei, taken.last_ei, taken.records
            )
            t3 = time.perf_counter_ns()
            log.write(taken.lines)
            t4 = time.perf_counter_ns()
            for stage, spent in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                stages[stage] += spent
        written = writer.bytes_written
        audit_bytes = log.bytes_written
        writer.close()
        log.close()
    ns: dict[str, float] = {k: round(v / events, 1) for k, v in stages.items()}
    ns["total"] = round(sum(ns.values()), 1)
    return {
        "raw_bytes_per_event": round(sum(map(len, batches)) / events, 1),
        "bytes_per_event_on_disk": round(written / events, 2),
        "audit_bytes_per_event": round(audit_bytes / events, 1),
        "ns_per_event": ns,
    }


def measure(events: int = 200_000, level: int = 1, batch: int = 20_000) -> dict:
    """The mixed corpus, then each record type alone (a tenth as many
    records), over batches of `batch` records (what one flush of a busy
    session holds)."""
    report: dict = {"events": events, "zstd_level": level}
    report.update(_run(_batches(events, None, batch), events, level))
    per_type = {}
    for kind in schema.RECORDS:
        n = max(events // 10, 100)
        per_type[kind.name] = _run(_batches(n, kind, batch), n, level)
    report["per_type"] = per_type
    return report
