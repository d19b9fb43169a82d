"""Audit log lines: the reference's names and codes, one JSON object per
line, every byte that could act on a terminal escaped."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import msgspec
import pytest

from esr import schema

START = schema.SessionStart(
    0,
    1_700_000_000_123_456_789,
    "sid-1",
    "srv",
    "host",
    "alice",
    "alice",
    remote_addr="10.0.0.1",
    service="sshd",
    tty="ssh",
    audit_sessionid=7,
    cluster_name="prod",
    server_version="0.1.0",
)
EVENTS = [
    START,
    schema.Command(
        1, 1_700_000_001_000_000_000, 42, 1, 7, b"ls", b"/usr/bin/ls", [b"-l"], 0, 1000, 1000
    ),
    schema.Disk(2, 1_700_000_002_000_000_000, 42, 7, b"ls", b"/etc/passwd", 0, 3),
    schema.Network(
        3, 1_700_000_003_000_000_000, 42, 7, b"curl", 4, "10.0.0.1", 4000, "10.0.0.2", 443, -111
    ),
    schema.Lost(4, 1_700_000_004_000_000_000, [0, 5, 0], 2),
    schema.SessionLeave(5, 1_700_000_005_000_000_000, 3),
    schema.SessionEnd(6, 1_700_000_006_000_000_000, "exited", True, True, [1, 1, 1], [0, 5, 0], 2),
]
CODES = {
    "session.start": "T2000I",
    "session.command": "T4000I",
    "session.disk": "T4001I",
    "session.network": "T4002I",
    "session.lost": "E4100W",
    "session.leave": "T2003I",
    "session.end": "T2004I",
}


@pytest.fixture
def lines() -> list[dict]:
    audit = schema.AuditFormat(schema.Identity.of(START))
    out = []
    for event in EVENTS:
        raw = audit.line(event)
        assert raw.endswith(b"\n") and raw.count(b"\n") == 1
        out.append(json.loads(raw))
    return out


def test_every_event_has_its_name_code_and_the_common_fields(lines):
    for line, event in zip(lines, EVENTS):
        assert CODES[line["event"]] == line["code"]
        assert line["ei"] == event.ei and line["sid"] == "sid-1"
        assert (line["login"], line["user"], line["namespace"]) == ("alice", "alice", "default")
        assert line["uid"].endswith(f"{event.ei:012x}")
    assert lines[0]["time"] == "2023-11-14T22:13:20.123456Z"
    assert len({line["uid"] for line in lines}) == len(lines)


@pytest.mark.parametrize(
    "ns, written",
    [
        (1_700_000_000_123_456_789, "2023-11-14T22:13:20.123456Z"),
        (1_700_000_000_120_000_000, "2023-11-14T22:13:20.12Z"),
        (1_700_000_000_000_000_999, "2023-11-14T22:13:20Z"),
        (1_700_000_000_999_999_999, "2023-11-14T22:13:20.999999Z"),  # never the next second
    ],
)
def test_times_have_microseconds_at_most_and_no_trailing_zeros(ns, written):
    assert schema.rfc3339(ns) == written
    parsed = datetime.fromisoformat(written)
    assert parsed.tzinfo == UTC and parsed.timestamp() == pytest.approx(ns / 1e9, abs=1e-6)


def test_every_event_names_the_cluster_the_version_and_the_audit_session(lines):
    for line in lines:
        assert (line["cluster_name"], line["server_version"]) == ("prod", "0.1.0")
        assert line["audit_session_id"] == 7


def test_a_session_no_login_gave_an_audit_session_has_the_kernels_unset_id():
    start = msgspec.structs.replace(START, audit_sessionid=None)
    line = json.loads(schema.AuditFormat(schema.Identity.of(start)).line(start))
    assert line["audit_session_id"] == 4294967295


def test_counts_are_named_by_buffer(lines):
    # Every buffer is named, the terminal's too (this session had none).
    assert lines[4]["lost"] == {"command": 0, "disk": 5, "network": 0, "terminal": 0}
    assert lines[4]["untracked_forks"] == 2
    assert lines[6]["events"] == {"command": 1, "disk": 1, "network": 1, "terminal": 0}
    assert lines[6]["participants"] == ["alice"] and lines[6]["enhanced_recording"] is True


def test_the_end_says_when_the_session_started_and_stopped(lines):
    assert lines[6]["session_start"] == lines[0]["time"] == "2023-11-14T22:13:20.123456Z"
    assert lines[6]["session_stop"] == lines[6]["time"] == "2023-11-14T22:13:26Z"


def test_the_start_names_its_command_as_teleport_does():
    start = msgspec.structs.replace(START, command=[b"sh", b"-c", b"true"])
    line = json.loads(schema.AuditFormat(schema.Identity.of(start)).line(start))
    assert line["initial_command"] == ["sh", "-c", "true"] and "command" not in line


def test_bytes_that_are_not_text_are_replaced_kept_in_base64_and_never_reach_a_terminal():
    argv = [b"\xff\xfe", b"\x1b]0;pwn\x07", "caf\u00e9".encode(), b"\xed\xa0\x80"]
    path = b"/tmp/\xc3\x28"
    command = schema.Command(1, 0, 1, 1, 1, b"x\x80", path, argv, 0, 0, 0)
    raw = schema.AuditFormat(schema.Identity.of(START)).line(command)
    assert raw.isascii() and b"\x1b" not in raw and b"\x07" not in raw
    assert b"\\ud" not in raw  # no surrogate, lone or paired
    line = msgspec.json.decode(raw)  # strict: refuses lone surrogates
    assert line["argv"] == ["\ufffd\ufffd", "\x1b]0;pwn\x07", "caf\u00e9", "\ufffd" * 3]
    assert [base64.b64decode(a) for a in line["argv_base64"]] == argv
    assert (line["path"], base64.b64decode(line["path_base64"])) == ("/tmp/\ufffd(", path)
    assert (line["program"], base64.b64decode(line["program_base64"])) == ("x\ufffd", b"x\x80")


def test_text_that_is_utf8_has_no_base64_field():
    command = schema.Command(1, 0, 1, 1, 1, b"x", "/caf\u00e9".encode(), [b"-l"], 0, 0, 0)
    line = json.loads(schema.AuditFormat(schema.Identity.of(START)).line(command))
    assert line["path"] == "/caf\u00e9"
    assert not [k for k in line if k.endswith("_base64")]


@pytest.mark.parametrize(
    "src, dst, version, written",
    [
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1", 6, ("127.0.0.1", "127.0.0.1", 4)),
        ("::", "::ffff:10.0.0.2", 6, ("0.0.0.0", "10.0.0.2", 4)),  # failed before binding
        ("::1", "::1", 6, ("::1", "::1", 6)),
        ("10.0.0.1", "10.0.0.2", 4, ("10.0.0.1", "10.0.0.2", 4)),
    ],
)
def test_ipv4_mapped_destinations_are_written_as_ipv4(src, dst, version, written):
    net = schema.Network(1, 0, 42, 7, b"curl", version, src, 4000, dst, 443, 0)
    line = json.loads(schema.AuditFormat(schema.Identity.of(START)).line(net))
    assert (line["src_addr"], line["dst_addr"], line["version"]) == written


def _line(event: schema.Event) -> tuple[bytes, dict]:
    raw = schema.AuditFormat(schema.Identity.of(START)).line(event)
    return raw, msgspec.json.decode(raw)


def _exact(line: dict, key: str) -> list[bytes]:
    if f"{key}_base64" in line:
        return [base64.b64decode(a) for a in line[f"{key}_base64"]]
    return [a.encode() for a in line[key]]


@pytest.mark.parametrize(
    "arg, fits",
    [
        pytest.param(b"\xff" * 64, False, id="not-utf8"),
        pytest.param(b"\x1b" * 64, False, id="control"),
        pytest.param("\u00e9".encode() * 100 + b"x", False, id="two-byte-characters"),
        pytest.param(b"y" * 250, False, id="ascii"),
        pytest.param(b"y" * 200, True, id="ascii-that-fits"),
    ],
)
def test_a_line_longer_than_teleport_reads_keeps_as_many_arguments_as_fit(arg, fits):
    argv = [arg] * 300
    command = schema.Command(1, 0, 1, 1, 1, b"x", b"/bin/true", argv, 0, 0, 0)
    raw, line = _line(command)
    if fits:
        assert "argv_truncated" not in line and _exact(line, "argv") == argv
        return
    assert len(raw) <= schema.MAX_LINE and raw.endswith(b"}\n")
    assert len(raw) > schema.MAX_LINE - 400  # cut no more than it must
    kept = _exact(line, "argv")
    assert kept[:-1] == argv[: len(kept) - 1] and arg.startswith(kept[-1])
    assert line["argv_truncated"] is True
    assert line["argv_cut_args"] + len(kept) == 300
    block = 300 * (len(arg) + 1)
    assert line["argv_cut_bytes"] == block - sum(len(a) + 1 for a in kept[:-1]) - len(kept[-1])
    if arg.decode(errors="replace") == arg.decode(errors="ignore"):  # valid UTF-8
        assert "argv_base64" not in line  # the cut split no character


def test_a_cut_adds_to_what_the_kernel_cut():
    argv = [b"\xff" * 1000] * 20
    command = schema.Command(1, 0, 1, 1, 1, b"x", b"/bin/true", argv, 0, 0, 0, False, True, 9, 9000)
    _, line = _line(command)
    kept = _exact(line, "argv")
    assert line["argv_cut_args"] == 9 + 20 - len(kept)
    assert line["argv_cut_bytes"] == 9000 + 20 * 1001 - sum(len(a) + 1 for a in kept) + 1


def test_when_no_argument_is_left_the_path_is_cut():
    path = b"/" + b"\xfe" * 70_000  # longer than the kernel ever sends
    command = schema.Command(1, 0, 1, 1, 1, b"x", path, [b"-a", b"-b"], 0, 0, 0)
    raw, line = _line(command)
    assert len(raw) <= schema.MAX_LINE
    assert line["argv"] == [] and line["argv_cut_args"] == 2 and line["argv_cut_bytes"] == 6
    assert line["path_truncated"] is True
    assert path.startswith(base64.b64decode(line["path_base64"]))


def test_the_command_of_a_session_is_cut_too():
    command = [b"/bin/true", *[b"\x07" * 100] * 300]
    start = msgspec.structs.replace(START, command=command)
    raw, line = _line(start)
    assert len(raw) <= schema.MAX_LINE and line["initial_command_truncated"] is True
    assert line["initial_command"][0] == "/bin/true"
    assert len(line["initial_command"]) + line["initial_command_cut_args"] == 301


def test_the_text_view_escapes_too():
    command = schema.Command(1, 0, 1, 1, 1, b"x", b"/x", [b"\x1b[31mred", b"\xff"], 0, 0, 0)
    text = command.describe()
    assert "\x1b" not in text and "\\x1b[31mred" in text and "\\xff" in text
