"""Bad input of every kind: one line on stderr, a non-zero exit, no traceback,
and nothing already recorded is lost."""

from __future__ import annotations

import os

import pytest


def one_line_error(r) -> str:
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("esr: ")
    return lines[0]


@pytest.mark.parametrize(
    "text, mentions",
    [
        ("enhanced_recording: [unclosed\n", "malformed YAML"),
        (
            "enhanced_recording:\n  disk_bufer_size: 64\n",
            "enhanced_recording.disk_bufer_size: unknown key",
        ),
        ("enhanced_recording:\n  disk_buffer_size: -8\n", "enhanced_recording.disk_buffer_size"),
        ("enhanced_recording:\n  command_buffer_size: 12\n", "not a power of two"),
        ("enhanced_recording:\n  enabled: sometimes\n", "enhanced_recording.enabled"),
        ("data_dir: relative/dir\n", "data_dir: must be an absolute path"),
        ("- a list\n", "mapping"),
        ("max_sessions: 0\n", "max_sessions"),
        ('data_dir: "/var/lib/esr\\0x"\n', "data_dir: contains a NUL byte"),
        ("max_sessions: 8\nmax_sessions: 9\n", "max_sessions: given twice"),
        ("control_socket: /run/" + "x" * 120 + "\n", "too long for a Unix socket"),
    ],
)
def test_bad_config(esr, tmp_path, text, mentions):
    config = tmp_path / "esr.yaml"
    config.write_text(text)
    for args in (
        ["--config", str(config), "sessions"],
        ["run", "--config", str(config), "--", "true"],
    ):
        line = one_line_error(esr(*args, check=False))
        assert mentions in line and str(config) in line


def test_missing_config_file(esr, tmp_path):
    line = one_line_error(esr("--config", str(tmp_path / "absent.yaml"), "sessions", check=False))
    assert "no such file" in line


@pytest.mark.parametrize(
    "args, mentions",
    [
        (["show", "0123-no-such-session"], "no session"),
        (["verify", "0123-no-such-session"], "no session"),
        (["show"], "required"),
        (["frobnicate"], "invalid choice"),
        (["run"], "no command given"),
        (["run", "--sid", "../../etc/passwd", "--", "true"], "invalid session id"),
        (["show", "x", "--type", "everything"], "no type 'everything'"),
    ],
)
def test_bad_arguments(esr, args, mentions):
    assert mentions in one_line_error(esr(*args, check=False))


@pytest.fixture
def recorded(esr, bpf):
    sid = esr.record("sh", "-c", "for i in 1 2 3; do cat /etc/hostname; sleep 0.15; done")
    path = esr.data_dir / "sessions" / f"{sid}.esr"
    assert os.path.getsize(path) > 200
    return sid, path


def test_truncated_recording(esr, recorded):
    sid, path = recorded
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    for cmd in ("verify", "show"):
        line = one_line_error(esr(cmd, sid, check=False))
        assert "truncated" in line and sid in line
    # What precedes the cut is still shown.
    shown = esr("show", sid, check=False).stdout.splitlines()
    assert len(shown) > 3


def _frame_starts(path, sid) -> list[int]:
    from esr import recording

    return [frame.offset for frame in recording.Reader(str(path), sid)]


@pytest.mark.parametrize("cut", ["before the end frame", "to nothing"])
def test_recording_cut_at_a_frame_boundary_or_emptied(esr, recorded, cut):
    sid, path = recorded
    starts = _frame_starts(path, sid)
    last = len(starts) - 1
    os.truncate(path, starts[last] if cut == "before the end frame" else 0)
    line = one_line_error(esr("verify", sid, check=False))
    assert line.startswith(f"esr: {sid}: sealed through its end at frame {last} (events 0..")
    if cut == "to nothing":
        assert line.endswith(" but the file is empty")
    else:
        assert f" but the file ends after frame {last - 1} (events 0.." in line
    [row] = [r for r in esr.sessions() if r["sid"] == sid]
    assert row["damaged"].startswith("sealed through its end")


def test_bit_flipped_recording(esr, recorded):
    sid, path = recorded
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    line = one_line_error(esr("verify", sid, check=False))
    assert "frame" in line and ("checksum" in line or "corrupt" in line or "sequence" in line)
    one_line_error(esr("show", sid, check=False))


def test_renamed_recording_is_detected(esr, recorded):
    _sid, path = recorded
    other = "11111111-2222-3333-4444-555555555555"
    path.rename(path.with_name(f"{other}.esr"))
    line = one_line_error(esr("verify", other, check=False))
    assert "frame 0" in line


def test_sid_that_exists_already(esr, recorded):
    sid, _ = recorded
    assert "already exists" in one_line_error(esr("run", "--sid", sid, "--", "true", check=False))


def test_not_root(esr):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    r = esr(
        "run", "--", "true", check=False, preexec_fn=lambda: (os.setgid(65534), os.setuid(65534))
    )
    assert "needs root" in one_line_error(r) or "Permission denied" in r.stderr.decode()
