"""The decoder without the kernel: raw records as the BPF programs send
them, sorted and routed to their sessions; damaged batches refused whole."""

from __future__ import annotations

import ctypes
import mmap
import os
import random

import pytest

from esr import schema
from esr._fast.decode import SessionEvents, decode_batch, encode_record
from esr.bench import offline
from esr.errors import BatchError

COOKIE = offline.COOKIE

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


def decode(raw: bytes, sessions: dict | None = None) -> tuple[int, SessionEvents]:
    sink = SessionEvents(audited_records=schema.RECORDS)
    orphans = decode_batch(memoryview(raw), sessions if sessions is not None else {COOKIE: sink}, 0)
    return orphans, sink


def test_every_record_type_round_trips():
    raw = b"".join(encode_record(r, COOKIE) for r in EVERY_TYPE)
    orphans, sink = decode(raw)
    events, audited, records = sink.take()
    assert orphans == 0
    expect = [schema.Command.__copy__(r) for r in EVERY_TYPE]
    for i, event in enumerate(expect):
        event.ei = i + 1
    assert events == expect and audited == expect
    assert records == [7, 1, 2, 4]
    assert sink.interactive  # a command ran with a terminal


def test_records_are_merged_in_time_and_numbered():
    raw = offline.corpus(5000)
    orphans, sink = decode(raw)
    assert orphans == 0 and len(sink.events) == 5000
    times = [e.time for e in sink.events]
    assert times == sorted(times)  # the interleaved CPU runs were merged
    assert [e.ei for e in sink.events] == list(range(1, 5001))
    assert sink.take()[2] == [50, 4900, 50, 0]


def test_only_the_types_asked_for_are_audited():
    sink = SessionEvents(audited_records=[schema.Command])
    decode_batch(memoryview(offline.corpus(300)), {COOKIE: sink}, 0)
    assert {type(e) for e in sink.audited} == {schema.Command}


def test_failed_records_are_audited_unless_told_otherwise_and_always_recorded():
    raw = b"".join(encode_record(r, COOKIE) for r in EVERY_TYPE)
    sink = SessionEvents()
    sink.audit(schema.RECORDS, failures=[schema.Command])
    decode_batch(memoryview(raw), {COOKIE: sink}, 0)
    assert len(sink.events) == len(EVERY_TYPE)
    [connect] = [e for e in sink.audited if type(e) is schema.Network]
    assert connect.return_code == 0
    [opened] = [e for e in sink.audited if type(e) is schema.Disk]
    assert opened.return_code == 3  # a file descriptor, not a failure
    assert [e.return_code for e in sink.audited if type(e) is schema.Command] == [0, -2]


def test_records_of_unknown_sessions_are_counted_not_decoded():
    sink = SessionEvents()
    assert decode_batch(memoryview(offline.corpus(100)), {12345: sink}, 0) == 100
    assert sink.events == []


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
