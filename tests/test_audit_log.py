"""The audit log of a real session, read as Teleport's own reader and strict
SIEM parsers read it: every line decoded strictly against Teleport's field
set (teleport_events.py)."""

from __future__ import annotations

import base64
import json
import os
import socket
from datetime import datetime

import pytest

import teleport_events
from esr import __version__
from helpers import commands, free_port, listener, sid_from_stderr

pytestmark = pytest.mark.usefixtures("bpf")

PY = "/usr/bin/python3"
MAX_LINE = 65535  # Teleport's file log reader stops at 64 KiB, the newline included
ODD = b"caf\xe9"  # Latin-1, not UTF-8

# What the session does, in one process that leaves a grandchild behind.
SESSION = r"""
import os, socket, subprocess, sys
work, v4, v6, refused = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
os.environ["PATH"] = "/usr/bin:/bin"
subprocess.run(["/usr/bin/id", "-u"], stdout=subprocess.DEVNULL, check=True)
subprocess.run([os.path.join(work, "deploy.sh"), "--prod"], check=True)
subprocess.run(["/bin/true", *[b"\xff" * 60 + b"-%03d" % i for i in range(300)]], check=True)
odd = os.path.join(os.fsencode(work), b"caf\xe9")
open(odd, "w").close()
os.symlink("/bin/true", odd + b"-true")
subprocess.run([odd + b"-true"], check=True)
for family, host, port in [
    (socket.AF_INET, "127.0.0.1", v4),
    (socket.AF_INET6, "::1", v6),
    (socket.AF_INET6, "::ffff:127.0.0.1", v4),
    (socket.AF_INET, "127.0.0.1", refused),
]:
    with socket.socket(family) as s:
        s.connect_ex((host, port))
subprocess.Popen(
    ["/usr/bin/setsid", "/bin/sh", "-c", "sleep 0.5; exec head -c1 /etc/hostname"],
    stdout=subprocess.DEVNULL,
)
"""


def _script(tmp_path) -> str:
    script = tmp_path / "deploy.sh"
    script.write_text("#!/usr/bin/env bash\n/usr/bin/id -un >/dev/null\n")
    script.chmod(0o755)
    return str(script)


def _audit_log(esr) -> list[bytes]:
    return (esr.data_dir / "log" / "events.log").read_bytes().splitlines(keepends=True)


def _exact(line: dict, key: str):
    """A text field's bytes: from its _base64 twin when some were not UTF-8."""
    if f"{key}_base64" not in line:
        value = line[key]
        return value.encode() if isinstance(value, str) else [a.encode() for a in value]
    value = line[f"{key}_base64"]
    return base64.b64decode(value) if isinstance(value, str) else list(map(base64.b64decode, value))


def test_every_line_of_a_real_session_decodes_strictly_as_teleports_events(esr, tmp_path):
    script = _script(tmp_path)
    v4, v6 = listener(socket.AF_INET, "127.0.0.1"), listener(socket.AF_INET6, "::1")
    v4_port, v6_port = v4.getsockname()[1], v6.getsockname()[1]
    refused = free_port()
    driver = tmp_path / "session.py"
    driver.write_text(SESSION)
    config = tmp_path / "esr.yaml"
    config.write_text("audit_disk_events: true\ncluster_name: esr-test-cluster\n")
    argv = [PY, str(driver), str(tmp_path), str(v4_port), str(v6_port), str(refused)]
    r = esr("run", "--config", str(config), "--", *argv)
    v4.close()
    v6.close()
    sid = sid_from_stderr(r.stderr)

    raw_lines = _audit_log(esr)
    events = []
    for raw in raw_lines:
        assert len(raw) <= MAX_LINE and raw.endswith(b"\n")
        raw.decode("utf-8")  # strict
        event = teleport_events.decoder.decode(raw)  # times included
        assert datetime.fromisoformat(event.time).utcoffset().total_seconds() == 0
        events.append(json.loads(raw))
    by_type: dict[str, list[dict]] = {}
    for e in events:
        by_type.setdefault(e["event"], []).append(e)
    assert set(by_type) >= {
        "session.start",
        "session.command",
        "session.disk",
        "session.network",
        "session.leave",
        "session.end",
    }
    assert all(e["sid"] == sid for e in events)
    assert {e["cluster_name"] for e in events} == {"esr-test-cluster"}
    assert {e["server_version"] for e in events} == {__version__}
    assert len({e["audit_session_id"] for e in events}) == 1
    [start], [end] = by_type["session.start"], by_type["session.end"]
    assert start["initial_command"] == argv
    assert (end["session_start"], end["session_stop"]) == (start["time"], end["time"])
    # The grandchild outlived the leader: the session ended after it.
    [leave] = by_type["session.leave"]
    assert leave["live_tasks"] >= 1 and leave["ei"] < end["ei"]
    lasted = datetime.fromisoformat(end["session_stop"]) - datetime.fromisoformat(
        end["session_start"]
    )
    assert lasted.total_seconds() >= 0.5
    assert [c for c in commands(events) if c["path"] == "/usr/bin/head" and c["ei"] > leave["ei"]]

    # The 300-argument exec: cut to fit, what is kept exact, what is cut counted.
    [big] = [c for c in commands(events) if c["path"] == "/bin/true" and c["argv"]]
    sent = [b"\xff" * 60 + b"-%03d" % i for i in range(300)]
    [big_line] = [raw for raw in raw_lines if f'"ei":{big["ei"]},'.encode() in raw]
    assert MAX_LINE - 400 < len(big_line) <= MAX_LINE
    kept = _exact(big, "argv")
    assert kept[:-1] == sent[: len(kept) - 1] and sent[len(kept) - 1].startswith(kept[-1])
    assert big["argv_truncated"] is True and big["argv_cut_args"] + len(kept) == 300
    assert big["argv"][0] == "\ufffd" * 60 + "-000"

    # A path that is not UTF-8: U+FFFD in the field, the bytes beside it.
    odd = os.path.join(os.fsencode(tmp_path), ODD)
    [exec_odd] = [c for c in commands(events) if _exact(c, "path") == odd + b"-true"]
    assert exec_odd["path"] == f"{tmp_path}/caf\ufffd-true"
    assert exec_odd["return_code"] == 0
    assert [d for d in by_type["session.disk"] if _exact(d, "path") == odd]
    # The recording keeps the exact bytes.
    text = esr("show", sid, "--format", "text").stdout
    assert b"caf\\xe9-true" in text

    # Connects: IPv4, IPv6, IPv4-mapped (as Teleport writes it: IPv4), refused.
    net = [
        (n["dst_addr"], n["dst_port"], n["version"], n["return_code"])
        for n in by_type["session.network"]
    ]
    assert sorted(net) == sorted(
        [
            ("127.0.0.1", v4_port, 4, 0),
            ("::1", v6_port, 6, 0),
            ("127.0.0.1", v4_port, 4, 0),  # ::ffff:127.0.0.1 on an AF_INET6 socket
            ("127.0.0.1", refused, 4, -111),
        ]
    )

    # The script: recorded as its caller ran it, its interpreter apart.
    [run] = [c for c in commands(events) if c["path"] == script]
    assert run["return_code"] == 0 and run["argv"] == ["--prod"]
    assert run["interpreter"] == ["/usr/bin/env", "bash"]
    assert [c for c in commands(events) if c["path"] == "/usr/bin/id" and c["argv"] == ["-un"]]


def test_a_scripts_argv_is_what_its_caller_passed(esr, tmp_path):
    script = _script(tmp_path)
    sid = esr.record(PY, "-c", f"import subprocess; subprocess.run([{script!r}, '--prod'])")
    [run] = [c for c in commands(esr.events(sid)) if c["path"] == script]
    # As Teleport logs it: ./deploy.sh --prod is ["--prod"]. The interpreter
    # (/usr/bin/env bash) goes in a field of its own, and the binary the
    # kernel ran is named too.
    assert run["argv"] == ["--prod"]
    assert run["interpreter"] == ["/usr/bin/env", "bash"]
    assert run["exe"] == os.path.realpath("/usr/bin/env") and run["exe_ino"] > 0


def test_failed_connects_stay_out_of_the_audit_log_when_asked(esr, tmp_path):
    config = tmp_path / "esr.yaml"
    config.write_text("audit_failed_connects: false\n")
    srv = listener()
    connect = (
        "import socket, sys\n"
        "for port in sys.argv[1:]:\n"
        "    socket.socket().connect_ex(('127.0.0.1', int(port)))\n"
    )
    ok, refused = srv.getsockname()[1], free_port()
    r = esr("run", "--config", str(config), "--", PY, "-c", connect, str(ok), str(refused))
    srv.close()
    sid = sid_from_stderr(r.stderr)
    logged = [json.loads(raw) for raw in _audit_log(esr)]
    assert [
        (n["dst_port"], n["return_code"]) for n in logged if n["event"] == "session.network"
    ] == [(ok, 0)]
    # Always in the recording.
    recorded = esr.events(sid, "network")
    assert sorted((n["dst_port"], n["return_code"]) for n in recorded) == sorted(
        [(ok, 0), (refused, -111)]
    )
