"""The terminal stream, for real: what a user typed and saw in an OpenSSH
session and in `esr run` on a terminal, recorded in the kernel on the
clock of the commands, exported as asciicast that asciinema accepts."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import zstandard

from helpers import ESR, Terminal, only_new, sid_from_stderr

pytestmark = pytest.mark.usefixtures("bpf")

SECRET = "hunter2-xyzzy-0451"
# Colours, a 256-colour escape, and UTF-8 split by nothing in particular.
COLOURED = "\\033[1;31mred\\033[0m \\033[38;5;208morange\\033[0m caf\\303\\251"
COLOURED_BYTES = b"\x1b[1;31mred\x1b[0m \x1b[38;5;208morange\x1b[0m caf\xc3\xa9"


def terminal_events(esr, sid: str) -> list[dict]:
    return esr.events(sid, "terminal")


def stream(events: list[dict], kind: str = "terminal.output") -> bytes:
    return b"".join(
        e["data"].encode("utf-8", "surrogateescape") for e in events if e["event"] == kind
    )


def cast(esr, sid: str, tmp_path: Path) -> tuple[dict, list[list]]:
    path = tmp_path / f"{sid}.cast"
    esr("export", sid, "--format", "asciicast", "-o", str(path))
    header, *events = [json.loads(line) for line in path.read_text().splitlines()]
    return header, events


def asciinema_cat(path: Path) -> bytes:
    """What asciinema's own player prints of a cast; it refuses a bad one.
    It wants a terminal, as a reviewer would have."""
    term = Terminal(["asciinema", "cat", str(path)])
    assert term.wait(timeout=60) == 0, term.output[-2000:]
    return term.output


def everything_recorded(esr, sid: str) -> bytes:
    """Every byte esr keeps about a session: the recording decompressed, the
    audit log, and the export."""
    data = esr.data_dir
    out = b""
    raw = (data / "sessions" / f"{sid}.esr").read_bytes()
    out += raw
    dctx = zstandard.ZstdDecompressor()
    for chunk in raw.split(b"\x28\xb5\x2f\xfd")[1:]:  # every zstd frame
        try:
            out += dctx.decompress(b"\x28\xb5\x2f\xfd" + chunk)
        except zstandard.ZstdError:
            pass
    for log in (data / "log").rglob("*.log"):
        out += log.read_bytes()
    out += esr("export", sid, "--format", "asciicast").stdout
    out += esr("show", sid, "--format", "text", "--raw").stdout
    return out


def type_after_the_prompt(term: Terminal, text: str) -> None:
    """As a person would, not within microseconds of the prompt: bash's
    `read -s` prints its prompt before it turns the terminal's echo off."""
    time.sleep(0.3)
    term.type(text)


# --- ssh -------------------------------------------------------------------------------


@pytest.fixture
def ssh_terminal(daemon, sshd):
    """An interactive ssh session on a pty of 30x90, as a user's terminal."""
    before = daemon.sessions(sshd.user)
    env = dict(os.environ, TERM="xterm", LC_ALL="C.UTF-8")
    term = Terminal(sshd.argv(tty=True), env=env, rows=30, cols=90)
    term.expect(b"$ ")

    def closed_session() -> dict:
        assert term.wait() == 0
        [row] = only_new(before, daemon.wait_closed(sshd.user, len(before) + 1))
        return row

    term.closed_session = closed_session
    return term


def test_an_ssh_session_records_what_the_user_typed_and_saw(daemon, ssh_terminal, tmp_path):
    term = ssh_terminal
    term.type("echo $((6*7))\n")
    term.expect(b"42")
    term.type(f"printf '{COLOURED}\\n'\n")
    term.expect(b"orange")
    term.type("exit\n")
    sid = term.closed_session()["sid"]

    events = terminal_events(daemon.esr, sid)
    seen = stream(events)
    # The echo of what was typed, and what only running it could print.
    assert b"echo $((6*7))\r\n" in seen and b"\r42\r\n" in seen
    assert COLOURED_BYTES in seen  # byte for byte
    # Who printed what: the shell's own writes to its terminal.
    assert any(e["event"] == "terminal.write" and e["program"] == "bash" for e in events)
    # On the clock of the commands: the output comes after session.start and
    # before session.end, in the same event sequence.
    all_events = daemon.esr.events(sid)
    eis = [e["ei"] for e in all_events]
    assert eis == sorted(eis) and all_events[-1]["event"] == "session.end"
    end = all_events[-1]
    assert end["terminal"]["recorded_bytes"] == len(seen)
    assert end["terminal"]["skipped_bytes"] == end["terminal"]["lost_bytes"] == 0
    assert "data" not in (daemon.data_dir / "log" / "events.log").read_text()

    header, cast_events = cast(daemon.esr, sid, tmp_path)
    assert (header["width"], header["height"]) == (90, 30)
    output = "".join(e[2] for e in cast_events if e[1] == "o")
    assert "42" in output and COLOURED_BYTES.decode() in output
    assert asciinema_cat(tmp_path / f"{sid}.cast").count(b"42") >= 1


def test_a_full_screen_program_and_resizes_are_recorded(daemon, ssh_terminal, tmp_path):
    term = ssh_terminal
    term.resize(rows=40, cols=120)  # the window: ssh passes it on, the shell gets SIGWINCH
    term.type("stty size\n")
    term.expect(b"40 120")
    term.type("stty cols 100\n")
    term.type("less /etc/services\n")
    term.expect(b"Network services")
    term.type("q")
    term.type("exit\n")
    sid = term.closed_session()["sid"]

    events = terminal_events(daemon.esr, sid)
    sizes = [(e["cols"], e["rows"]) for e in events if e["event"] == "terminal.resize"]
    assert sizes[0] == (90, 30) and (120, 40) in sizes and (100, 40) in sizes
    # less switched to the alternate screen, and back.
    assert b"\x1b[?1049h" in stream(events) and b"\x1b[?1049l" in stream(events)
    assert any(e["event"] == "terminal.write" and e["program"] == "less" for e in events)
    header, cast_events = cast(daemon.esr, sid, tmp_path)
    assert (header["width"], header["height"]) == (90, 30)
    resizes = [e[2] for e in cast_events if e[1] == "r"]
    assert "120x40" in resizes and "100x40" in resizes
    asciinema_cat(tmp_path / f"{sid}.cast")


def test_a_secret_typed_at_read_s_over_ssh_is_nowhere(daemon, ssh_terminal):
    term = ssh_terminal
    term.type("read -s -p 'password: ' SECRET; echo; echo got ${#SECRET} chars\n")
    term.expect(b"password: ")
    type_after_the_prompt(term, SECRET + "\n")
    term.expect(f"got {len(SECRET)} chars".encode())
    term.type("exit\n")
    sid = term.closed_session()["sid"]
    assert SECRET.encode() not in everything_recorded(daemon.esr, sid)


# --- esr run on a terminal ----------------------------------------------------------------


def esr_run_terminal(esr, *argv: str, config: Path | None = None) -> Terminal:
    """esr run on a terminal, once the command's prompt is up: from then on
    esr relays every key, and only the command echoes them."""
    args = [ESR, "run", *(["--config", str(config)] if config else []), "--", *argv]
    term = Terminal(args, env=dict(esr.env, TERM="xterm", PS1="ps1> "), rows=24, cols=80)
    term.expect(b"ps1> ")
    return term


def test_esr_run_gives_its_command_a_pty_and_records_it(esr, tmp_path):
    term = esr_run_terminal(esr, "bash", "--norc", "--noprofile", "-i")
    term.type(f"echo $((6*7)); printf '{COLOURED}\\n'; exit\n")
    assert term.wait() == 0
    sid = sid_from_stderr(term.output.replace(b"\r\n", b"\n"))
    events = terminal_events(esr, sid)
    seen = stream(events)
    assert b"\r42\r\n" in seen and COLOURED_BYTES in seen
    first_size = next((e["cols"], e["rows"]) for e in events if e["event"] == "terminal.resize")
    assert first_size == (80, 24)
    # What the user saw is what esr relayed.
    assert COLOURED_BYTES in term.output
    header, _ = cast(esr, sid, tmp_path)
    assert (header["width"], header["height"]) == (80, 24)
    assert b"42" in asciinema_cat(tmp_path / f"{sid}.cast")
    # esr play replays the same bytes.
    played = esr("play", sid, "--speed", "1000").stdout
    assert COLOURED_BYTES in played and b"42" in played
    # The text view escapes them, unless asked.
    text = esr("show", sid, "--format", "text", "--type", "terminal").stdout
    assert b"\x1b" not in text and b"\\x1b[1;31mred" in text
    raw = esr("show", sid, "--format", "text", "--type", "terminal", "--raw").stdout
    assert COLOURED_BYTES in raw


@pytest.mark.parametrize("record_input", [False, True])
def test_a_secret_typed_at_read_s_is_nowhere_whether_input_is_recorded_or_not(
    esr, tmp_path, record_input
):
    config = tmp_path / "esr.yaml"
    config.write_text(f"terminal:\n  record_input: {str(record_input).lower()}\n")
    term = esr_run_terminal(esr, "bash", "--norc", "--noprofile", "-i", config=config)
    # cat reads with the terminal echoing; bash's line editing echoes itself.
    # Once "ready" is printed, bash has given the terminal back its echo.
    term.type("echo ready; cat\n")
    term.expect(b"ready\r\n")
    term.type("typed-in-the-open\n")
    term.expect(b"typed-in-the-open\r\ntyped-in-the-open\r\n")
    term.type(b"\x04")
    term.expect(b"ps1> ")
    # Typed at the prompt, as a user would: typed ahead of it, the terminal
    # would still echo it.
    term.type("read -s -p 'password: ' SECRET; echo; echo got ${#SECRET}\n")
    term.expect(b"password: ")
    type_after_the_prompt(term, SECRET + "\n")
    term.expect(f"got {len(SECRET)}".encode())
    term.type("exit\n")
    assert term.wait() == 0
    sid = sid_from_stderr(term.output.replace(b"\r\n", b"\n"))
    assert SECRET.encode() not in everything_recorded(esr, sid)
    keys = stream(terminal_events(esr, sid), "terminal.input")
    if record_input:
        assert b"typed-in-the-open\n" in keys  # keys the terminal echoed
    else:
        assert keys == b""


def test_a_50_mb_flood_is_recorded_or_counted_exactly_and_nothing_else_is_lost(esr, tmp_path):
    flood = 50_000_000
    master, slave = os.openpty()
    script = (
        f"head -c {flood} /dev/zero | tr '\\0' x & "
        "for i in $(seq 1 300); do head -c1 /etc/hostname >/dev/null; done; wait"
    )
    proc = subprocess.Popen(
        [ESR, "run", "--", "sh", "-c", script],
        stdin=slave,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=esr.env,
        start_new_session=True,
    )
    os.close(slave)
    _, err = proc.communicate(timeout=300)
    os.close(master)
    assert proc.returncode == 0, err
    sid = sid_from_stderr(err)
    events = esr.events(sid)
    end = events[-1]
    t = end["terminal"]
    assert t["recorded_bytes"] + t["skipped_bytes"] + t["lost_bytes"] == flood
    assert t["skipped_bytes"] > 0  # the default budget: 16 MiB, then 1 MiB/s
    output = [e for e in events if e["event"] == "terminal.output"]
    assert sum(len(e["data"]) for e in output) == t["recorded_bytes"]
    assert set("".join(e["data"] for e in output)) == {"x"}
    # The other buffers lost nothing meanwhile.
    assert end["lost"]["command"] == end["lost"]["disk"] == 0
    opens = [e for e in esr.events(sid, "disk") if e["path"] == "/etc/hostname"]
    assert len([e for e in opens if e["program"] == "head"]) >= 300
    _header, cast_events = cast(esr, sid, tmp_path)
    notes = [e[2] for e in cast_events if e[1] == "o" and "[esr: " in e[2]]
    skipped = sum(int(n.split("[esr: ")[1].split()[0]) for n in notes)
    assert skipped == t["skipped_bytes"]
