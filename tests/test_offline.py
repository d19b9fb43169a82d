"""The user-space hot path without the kernel (no root needed): both
decoders agree record for record, and the micro-benchmark yields figures."""

from __future__ import annotations

import json
import subprocess

from esr import schema
from esr._fast.decode import SessionEvents, decode_batch
from esr.bench import offline, pydecode

from conftest import ESR


def test_cython_and_pure_python_decoders_agree():
    raw = offline.corpus(5000)
    fast, slow = SessionEvents(), SessionEvents()
    assert decode_batch(memoryview(raw), {offline.COOKIE: fast}, 10) == 0
    assert pydecode.decode_batch(memoryview(raw), {offline.COOKIE: slow}, 10) == 0
    assert fast.events == slow.events and len(fast.events) == 5000
    assert (fast.commands, fast.disks, fast.networks) == (50, 4900, 50)
    times = [e.time for e in fast.events]
    assert times == sorted(times)  # the interleaved CPU runs were merged
    assert [e.ei for e in fast.events] == list(range(1, 5001))
    [grep] = [e for e in fast.events[:100] if type(e) is schema.Command]
    assert grep.argv == [b"-r", b"--include=*.c", b"needle", b"src"] and grep.has_tty


def test_records_of_unknown_sessions_are_counted_not_decoded():
    sink = SessionEvents()
    assert decode_batch(memoryview(offline.corpus(100)), {12345: sink}, 0) == 100
    assert sink.events == []


def test_offline_benchmark_reports_every_stage():
    r = subprocess.run([ESR, "bench", "--offline"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    stages = report["ns_per_event"]
    assert set(stages) == {"decode", "decode_pure_python", "msgpack", "zstd", "write", "total"}
    assert all(v > 0 for v in stages.values())
    assert 0 < report["bytes_per_event_on_disk"] < report["raw_bytes_per_event"]
