"""The decoder without the kernel: raw records as the BPF programs send
them, sorted and routed to their sessions, written as msgspec would write
their Structs and as AuditFormat renders their lines; damaged batches
refused whole."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import random

import msgspec
import pytest

from esr import schema
from esr._fast.decode import SessionEvents, decode_batch, encode_record
from esr.bench import offline
from esr.errors import BatchError

COOKIE = offline.COOKIE
T0 = offline.T0

EVERY_TYPE = [
    schema.Command(
        0, 10, 42, 1, 7, b"sh", b"/bin/sh", [b"-c", b"\xff odd \x1b[31m"], 0, 1000, 1000, True
    ),
    schema.Command(0, 20, 42, 1, 7, b"sh", b"/no/such", [], -2, 0, 0),
    schema.Disk(0, 30, 42, 7, b"cat", b"/etc/hostname", 0o2000000, 3),
    schema.Network(0, 40, 42, 7, b"curl", 4, "10.0.0.5", 40000, "10.0.0.9", 443, 0),
    schema.Network(0, 50, 42, 7, b"curl", 6, "::1", 40001, "::1", 80, -111),
    schema.TerminalOutput(0, 60, 41, 3, b"\x1b[31mred\x1b[0m \xe2\x82", 5000),
    schema.TerminalInput(0, 70, 41, 3, b"ls\r"),
    schema.TerminalWrite(0, 80, 42, b"bash", 3, 136, 12),
    schema.TerminalResize(0, 90, 3, 40, 120),
    schema.Ptrace(0, 100, 42, 7, b"gdb", "attach", 99, 99, b"victim", 0, followed=True),
    schema.Ptrace(0, 110, 42, 7, b"gdb", "detach", 99, 0, b"", 0, left=True),
    schema.Ptrace(0, 120, 42, 7, b"inj", "process_vm_writev", 98, 0, b"", 16, pid_as_named=True),
    schema.IoUring(0, 130, 42, 7, b"fio", "setup", 0, 5, 42, 8, 0x2),
    schema.IoUring(0, 140, 43, 7, b"iou-sqp-42", "openat", 18, 5, 42),
]


START = schema.SessionStart(0, 1, "sid-1", "srv", "host", "alice", "alice", cluster_name="c")
FORMAT = schema.AuditFormat(schema.Identity.of(START))


def session(audited=schema.RECORDS) -> SessionEvents:
    return SessionEvents(audited_records=audited, format=FORMAT)


def decode(raw: bytes, sessions: dict | None = None) -> tuple[int, SessionEvents]:
    sink = session()
    orphans = decode_batch(memoryview(raw), sessions if sessions is not None else {COOKIE: sink}, 0)
    return orphans, sink


def audited(lines: memoryview) -> list[tuple[str, int]]:
    """(event, return_code) of each audit line."""
    return [
        (j["event"], j.get("return_code", 0))
        for j in map(json.loads, bytes(lines).split(b"\n")[:-1])
    ]


def test_every_record_type_round_trips():
    raw = b"".join(encode_record(r, COOKIE) for r in EVERY_TYPE)
    orphans, sink = decode(raw)
    assert sink.count == len(EVERY_TYPE)
    taken = sink.take()
    assert orphans == 0
    expect = [msgspec.structs.replace(r, ei=i + 1) for i, r in enumerate(EVERY_TYPE)]
    assert schema.decode_events(taken.payload) == expect
    assert (taken.first_ei, taken.last_ei, taken.count) == (1, len(EVERY_TYPE), len(EVERY_TYPE))
    assert taken.lines == b"".join(FORMAT.line(e) for e in expect)
    assert taken.records == [7, 1, 2, 4]
    assert sink.interactive  # a command ran with a terminal
    assert sink.count == 0 and sink.take().payload == b"\x90"


def test_records_are_merged_in_time_and_numbered():
    raw = offline.corpus(5000)
    orphans, sink = decode(raw)
    assert orphans == 0 and sink.count == 5000
    taken = sink.take()
    events = schema.decode_events(taken.payload)
    times = [e.time for e in events]
    assert times == sorted(times)  # the interleaved CPU runs were merged
    assert [e.ei for e in events] == list(range(1, 5001))
    buffers = [r.buffer for r in offline.records(5000)]
    assert taken.records == [buffers.count(b) for b in schema.BUFFERS]
    assert all(taken.records)  # the corpus has every buffer's records


def test_only_the_types_asked_for_are_audited():
    sink = session([schema.Command])
    decode_batch(memoryview(offline.corpus(300)), {COOKIE: sink}, 0)
    assert {event for event, _ in audited(sink.take().lines)} == {"session.command"}


def test_failed_records_are_audited_unless_told_otherwise_and_always_recorded():
    raw = b"".join(encode_record(r, COOKIE) for r in EVERY_TYPE)
    sink = session(())
    sink.audit(schema.RECORDS, failures=[schema.Command])
    decode_batch(memoryview(raw), {COOKIE: sink}, 0)
    taken = sink.take()
    assert taken.count == len(EVERY_TYPE)
    lines = audited(taken.lines)
    assert [rc for event, rc in lines if event == "session.network"] == [0]
    # A file descriptor, not a failure.
    assert [rc for event, rc in lines if event == "session.disk"] == [3]
    assert [rc for event, rc in lines if event == "session.command"] == [0, -2]


def test_auditing_needs_the_sessions_format():
    with pytest.raises(ValueError, match="AuditFormat"):
        SessionEvents(audited_records=[schema.Command])


def test_records_of_unknown_sessions_are_counted_not_decoded():
    sink = SessionEvents()
    assert decode_batch(memoryview(offline.corpus(100)), {12345: sink}, 0) == 100
    assert sink.count == 0


@pytest.mark.parametrize("cut", [8, 9, 20, 63])  # more than an entry's padding
def test_a_short_batch_is_refused_whole(cut):
    raw = offline.corpus(10)
    with pytest.raises(BatchError):
        decode(raw[:-cut])


def test_a_length_past_the_end_is_refused():
    raw = bytearray(encode_record(EVERY_TYPE[0], COOKIE))
    raw[0:4] = (len(raw) + 100).to_bytes(4, "little")
    with pytest.raises(BatchError, match="claims"):
        decode(bytes(raw))


def test_a_record_claiming_more_than_it_holds_is_refused():
    raw = bytearray(encode_record(EVERY_TYPE[2], COOKIE))
    # The entry's length, struct esr_event_header, then flags and return code.
    path_len = 4 + 48 + 4 + 4
    raw[path_len : path_len + 2] = (60000).to_bytes(2, "little")
    with pytest.raises(BatchError, match="claims more"):
        decode(bytes(raw))


def guarded(raw: bytes) -> memoryview:
    """raw at the very end of readable memory: the next page is PROT_NONE,
    so reading one byte past the batch kills the process."""
    page = mmap.PAGESIZE
    size = (len(raw) + page - 1) // page * page
    region = mmap.mmap(-1, size + page)
    start = ctypes.addressof(ctypes.c_char.from_buffer(region)) + size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.mprotect(start, page, 0) != 0:  # PROT_NONE
        raise OSError(ctypes.get_errno(), "mprotect")
    region[size - len(raw) : size] = raw
    return memoryview(region)[size - len(raw) : size]


def test_fuzzed_batches_decode_or_are_refused_never_read_past_their_end():
    """Random bytes changed, tails cut: each batch decodes or raises
    BatchError, and nothing is read past its end (a child process runs them
    against a guard page, and would die of it)."""
    rng = random.Random(8)
    good = b"".join(encode_record(r, COOKIE) for r in EVERY_TYPE * 4)
    batches = []
    for _ in range(3000):
        raw = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        batches.append(bytes(raw[: rng.randint(0, len(raw))] if rng.random() < 0.3 else raw))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        refused = 0
        for raw in batches:
            try:
                decode_batch(guarded(raw), {COOKIE: SessionEvents()}, 0)
            except BatchError:
                refused += 1
        os.write(write, str(refused).encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    refused = int(os.read(read, 64) or b"-1")
    os.close(read)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the decoder died: {status}"
    assert 0 < refused < len(batches)


def patched(event: schema.Record, offset: int, value: bytes) -> bytes:
    """event's batch entry with bytes changed at offset of its record."""
    raw = bytearray(encode_record(event, COOKIE))
    raw[4 + offset : 4 + offset + len(value)] = value
    return bytes(raw)


# struct esr_command_event: the header (48 bytes), ppid, uid, gid, return_code, argc.
ARGC = 48 + 16
ARGV_SIZE = ARGC + 4
LONG = b"\x01" * 10_000  # 60 kB once escaped
EDGES = [
    schema.Command(0, T0, 1, 0, 2**64 - 1, b"a\\b\"c\tq\x01", b"/x\x7f\ny", [b""], -(2**31), 0, 0),
    schema.Command(0, T0 + 120_000_000, 42, 1, 7, b"sixteen-bytes-xx", b"/s", [], 0, 5, 5, True,
                   interpreter=[b"/bin/sh", b"-e"], exe=b"/usr/bin/dash", exe_dev=2049, exe_ino=9),
    schema.Command(0, T0 + 999, 42, 1, 7, b"m", b"/proc/self/fd/3", [b"-v"], 0, 0, 0,
                   exe=b"memfd:payload (deleted)", exe_dev=1, exe_ino=2, memfd=True),
    schema.Command(0, T0 + 1000, 42, 1, 7, b"d", b"/a/b", [b"-v"], 0, 0, 0,
                   exe=b".../deep/dir/bin", exe_dev=1, exe_ino=2, exe_truncated=True),
    schema.Command(0, T0 + 1001, 42, 1, 7, b"big", b"/usr/bin/big", [LONG, LONG], 0, 0, 0),
    schema.Command(0, T0 + 1002, 42, 1, 7, b"ok", "/é".encode(), [b"\xe2\x82"], 0, 0, 0),
    schema.Disk(0, T0 + 2000, 42, 7, b"cat", b"/tmp/\x1b[2J", -1, -13, True),
    schema.Disk(0, T0 + 2001, 42, 7, b"cat", b"/tmp/\xff", 0o100, 3),
    schema.Disk(0, T0 + 2002, 42, 7, "ç".encode(), b"/tmp/" + b"\x1b" * 4000, 0, 3),
    schema.Network(0, T0 + 3000, 42, 7, b"curl", 6, "::ffff:10.0.0.1", 1, "::ffff:10.0.0.2", 2, 0),
    schema.Network(0, T0 + 3001, 42, 7, b"curl", 6, "::", 1, "::ffff:10.0.0.2", 2, -111),
    schema.Network(0, T0 + 3002, 42, 7, b"curl", 6, "fe80::1", 65535, "2001:db8::ffff:1", 0, 0),
    schema.Network(0, T0 + 3003, 42, 7, b"curl", 4, "0.0.0.0", 0, "255.255.255.255", 9, -4),
    schema.TerminalOutput(0, T0 + 4000, 41, 3, b"\x1b]0;\x07\xe2\x82\xac\xff", 2**40),
    schema.TerminalInput(0, T0 + 4001, 41, 3, b"\x03\x04"),
    schema.TerminalWrite(0, T0 + 4002, 42, b"b\xc3sh", 3, 136, -(2**63)),
    schema.TerminalResize(0, T0 + 4003, 3, 65535, 0),
    # Text that is not ASCII: json's escapes, for every string of the line.
    schema.Command(0, T0 + 5000, 42, 1, 7, "é".encode(), b"/x\x7f", ["\u0080\u07ff\u0800".encode(),
                   "\uffff\U00010000\U0010ffff\u2028".encode(), "😀\t\x1b".encode()], 0, 0, 0,
                   interpreter=["/bin/ß".encode()], exe="/usr/bin/ß".encode(), exe_ino=2),
    schema.Network(0, T0 + 5001, 42, 7, "ñ\x7f".encode(), 4, "1.2.3.4", 1, "5.6.7.8", 2, 0),
    schema.Disk(0, T0 + 5002, 42, 7, b"cat", "/tmp/日本".encode(), 0, 3),
    schema.TerminalOutput(0, T0 + 5003, 41, 3, "\x1b[1mgrüße\x7f".encode(), 0),
    schema.TerminalWrite(0, T0 + 5004, 42, "ü".encode(), 3, 136, 1),
    # Not UTF-8: overlong, a surrogate, past U+10FFFF, cut short, a stray continuation.
    *(schema.Command(0, T0 + 6000 + i, 42, 1, 7, b"x", b"/x", [bad], 0, 0, 0)
      for i, bad in enumerate([b"\xc0\x80", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                               b"\xf0\x9f\x98", b"a\x80", b"\xe2\x82\xe2\x82\xac"])),
    # A request and an opcode this version has no name for; a target's name not ASCII.
    schema.Ptrace(0, T0 + 7000, 42, 7, b"gdb", "seize", 99, 99, "vïctim".encode(), -1,
                  followed=True),
    schema.Ptrace(0, T0 + 7001, 42, 7, b"x", "12", 5, 0, b"", -3),
    schema.Ptrace(0, T0 + 7002, 42, 7, "ü".encode(), "process_vm_writev", 5, 0, b"\xff\x01", 4096,
                  left=True, pid_as_named=True),
    schema.IoUring(0, T0 + 7003, 42, 7, b"fio", "opcode_200", 200, 3, 42),
    schema.IoUring(0, T0 + 7004, 42, 7, "ü".encode(), "setup", 0, 3, 42, 2**32 - 1, 2**32 - 1),
]  # fmt: skip


def check_as_schema_writes_it(raw: bytes, next_ei: int = 1) -> list:
    """Decode raw; its msgpack and audit lines are exactly what msgspec and
    AuditFormat make of the events it holds."""
    sink = SessionEvents(next_ei, schema.RECORDS, format=FORMAT)
    decode_batch(memoryview(raw), {COOKIE: sink}, 0)
    taken = sink.take()
    events = schema.decode_events(taken.payload)
    assert msgspec.msgpack.encode(events) == taken.payload
    assert taken.lines == b"".join(FORMAT.line(e) for e in events)
    return events


def test_msgpack_and_audit_lines_are_what_the_schema_makes_of_every_case():
    raw = b"".join(encode_record(r, COOKIE) for r in EDGES)
    events = check_as_schema_writes_it(raw, next_ei=2**48 - 3)  # the uid's ei outgrows 12 digits
    in_time = sorted(EDGES, key=lambda r: r.time)
    assert events == [msgspec.structs.replace(r, ei=2**48 - 3 + i) for i, r in enumerate(in_time)]
    [big] = [e for e in events if getattr(e, "program", b"") == b"big"]
    # Longer than a line may be: cut as AuditFormat cuts.
    assert json.loads(FORMAT.line(big))["argv_truncated"]


@pytest.mark.parametrize("kind", schema.RECORDS, ids=lambda r: r.name)
def test_the_offline_benchmark_has_a_corpus_of_every_type_as_the_schema_writes_it(kind):
    events = check_as_schema_writes_it(offline.corpus(300, kind))
    assert len(events) == 300 and {type(e) for e in events} == {kind}


def test_cut_arguments_and_unreadable_argv_are_flagged_as_the_schema_flags_them():
    command = EDGES[1]
    raw = patched(command, ARGC, (9).to_bytes(4, "little"))  # 3 strings of 9 kept
    raw += patched(command, ARGV_SIZE, (40_000).to_bytes(4, "little"))  # bytes cut
    flags = 48 + 4 * 7 + 2  # after argv_len and path_len
    raw += patched(command, flags, (0x1 | 0x2).to_bytes(2, "little"))  # incomplete, unreadable
    events = check_as_schema_writes_it(raw)
    assert [(e.argv_truncated, e.argv_cut_args) for e in events] == [
        (True, 6),
        (True, 0),
        (True, 0),
    ]
    assert events[1].argv_cut_bytes == 40_000 - len(b"/bin/sh\0-e\0/s\0")


def test_each_command_has_its_own_binarys_path_whatever_ran_before():
    def run(exe: bytes, **kw) -> schema.Command:
        return schema.Command(0, T0, 42, 1, 7, b"x", b"/x", [], 0, 0, 0, exe=exe, exe_ino=3, **kw)

    commands = [
        run(b"/usr/bin/dash"),
        run(b"/usr/bin/dash"),
        run(b".../usr/bin/dash", exe_truncated=True),
        run(b"/usr/bin/dash"),
        run(b"/usr/bin/dash (deleted)", memfd=True),
        run(b"/usr/bin/ls"),
    ]
    for i, command in enumerate(commands):
        command.time += i
    # Twice: the batches after the first see the same binaries again.
    for _ in range(2):
        events = check_as_schema_writes_it(b"".join(encode_record(c, COOKIE) for c in commands))
        assert [e.exe for e in events] == [c.exe for c in commands]


def test_fuzzed_records_decode_as_the_schema_writes_them():
    rng = random.Random(11)
    good = b"".join(encode_record(r, COOKIE) for r in EVERY_TYPE + EDGES[:4] + EDGES[6:8])
    decoded = 0
    for _ in range(400):
        raw = bytearray(good)
        for _ in range(rng.randint(1, 12)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        try:
            decoded += len(check_as_schema_writes_it(bytes(raw)))
        except BatchError:
            pass
    assert decoded > 1000


def test_text_of_any_bytes_is_escaped_as_the_schema_escapes_it():
    rng = random.Random(5)
    alphabet = ["a", "\x7f", "\x01", '"', "\\", "é", "ß", "€", "\u2028", "😀", "\U0010ffff"]
    raws = [b"\x80", b"\xc3", b"\xed\xa0\x80", b"\xf5", b"\xe2\x82"]
    records = []
    for i in range(300):
        args = []
        for _ in range(rng.randint(1, 4)):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))).encode()
            if rng.random() < 0.2:
                text += rng.choice(raws)
            args.append(text)
        records.append(schema.Command(0, T0 + i, 42, 1, 7, args[0][:16], b"/p", args, 0, 0, 0))
    events = check_as_schema_writes_it(b"".join(encode_record(r, COOKIE) for r in records))
    assert len(events) == len(records)
