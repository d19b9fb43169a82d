"""The index of `esr ui`: built from recordings it only reads, kept current
frame by frame, with `esr verify`'s result for each session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from esr import index
from esr.datadir import DataDir
from helpers import Session


def snapshot(path: Path) -> dict:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
        for p in [path, *path.rglob("*")]
    }


@pytest.fixture
def data(tmp_path) -> Path:
    data = tmp_path / "data"
    s = Session(data, "s-alice", "alice", remote_addr="10.1.1.1", service="sshd")
    s.command(100, 1, b"/usr/bin/bash")
    for d in (b"/usr/local/bin", b"/usr/sbin"):
        s.command(101, 100, d + b"/deploy-tool", b"--env=staging", rc=-2)
    s.command(101, 100, b"/usr/bin/deploy-tool", b"--env=staging")
    for _ in range(50):
        s.open(101, b"/etc/passwd")
    s.connect(101, "192.168.7.7", 5432)
    s.end()
    s = Session(data, "s-bob", "bob", start_ns=Session.START_NS + 86_400 * 10**9)
    s.command(200, 1, b"/usr/bin/curl", b"https://example.org/payload")
    s.open(200, b"/home/bob/.netrc", rc=-2)
    s.end()
    return data


def build(data: Path, tmp_path: Path) -> tuple[index.Index, object]:
    ix = index.Index(str(tmp_path / "cache" / "index.sqlite"), DataDir(str(data)))
    ix.refresh()
    return ix, index.connect(ix.path)


def texts(hits) -> list[tuple[str, str, str]]:
    return [(h.sid, h.kind, h.snippet.replace("\x02", "").replace("\x03", "")) for h in hits]


def test_search_finds_commands_files_and_destinations(data, tmp_path):
    _, db = build(data, tmp_path)
    assert texts(index.search(db, "deploy-tool")) == [
        ("s-alice", "command", "/usr/bin/deploy-tool --env=staging")
    ]
    assert texts(index.search(db, "/etc/passw")) == [("s-alice", "file", "/etc/passwd")]
    assert texts(index.search(db, "192.168.7.7")) == [("s-alice", "connect", "192.168.7.7:5432")]
    assert texts(index.search(db, "netrc")) == [("s-bob", "file", "/home/bob/.netrc")]
    assert index.search(db, "staging nowhere") == []
    [hit] = index.search(db, "example payload")
    assert hit.snippet == "/usr/bin/curl https://\x02example\x03.org/\x02payload\x03"


def test_a_hit_points_at_its_event(data, tmp_path):
    _, db = build(data, tmp_path)
    [cmd] = index.search(db, "deploy-tool")
    assert cmd.ei == 4  # the exec that succeeded, not the failed tries before it
    [passwd] = index.search(db, "passwd")
    assert passwd.ei == 5  # the first of the fifty opens


@pytest.mark.parametrize(
    "query", ['"', "*", "AND", "NEAR(x y)", "^x", "col:x", "' OR 1=1 --", "-", "a\x00b"]
)
def test_any_query_is_words_never_syntax(data, tmp_path, query):
    _, db = build(data, tmp_path)
    index.search(db, query)  # no error: every word is quoted


def test_the_list_has_counts_integrity_and_filters(data, tmp_path):
    _, db = build(data, tmp_path)
    rows, total = index.sessions(db)
    assert total == 2 and [r["sid"] for r in rows] == ["s-bob", "s-alice"]
    alice = rows[1]
    assert (alice["login"], alice["remote_addr"], alice["integrity"]) == (
        "alice",
        "10.1.1.1",
        "intact",
    )
    assert (alice["commands"], alice["files"], alice["connections"]) == (4, 50, 1)
    assert alice["command"] == "/usr/bin/bash"
    assert index.sessions(db, user="bob")[1] == 1
    assert index.sessions(db, command="deploy-tool")[0][0]["sid"] == "s-alice"
    assert index.sessions(db, command="passwd")[1] == 0  # a file, not a command
    day = 86_400 * 10**9
    assert index.sessions(db, since=Session.START_NS + day // 2)[1] == 1
    assert index.sessions(db, until=Session.START_NS + day // 2)[1] == 1
    assert [r["sid"] for r in index.sessions(db, sort="files", descending=False)[0]] == [
        "s-bob",
        "s-alice",
    ]
    assert [r["sid"] for r in index.sessions(db, offset=1, limit=1)[0]] == ["s-alice"]


def test_a_growing_recording_is_read_on_from_where_it_stopped(tmp_path):
    data = tmp_path / "data"
    s = Session(data, "live")
    s.command(100, 1, b"/usr/bin/bash")
    s.flush()
    ix, db = build(data, tmp_path)
    assert index.session(db, "live")["integrity"] == "open"
    assert ix.refresh().read == 0  # unchanged: not read again
    s.command(101, 100, b"/usr/bin/later-command")
    s.flush()
    done = ix.refresh()
    assert (done.read, done.events) == (1, 1)  # only the new frame
    assert texts(index.search(db, "later-command")) == [
        ("live", "command", "/usr/bin/later-command")
    ]
    s.end()
    ix.refresh()
    row = index.session(db, "live")
    assert (row["integrity"], row["commands"], row["end_ns"] is not None) == ("intact", 2, True)


def test_damage_shows_and_gone_recordings_go(data, tmp_path):
    ix, db = build(data, tmp_path)
    path = data / "sessions" / "s-alice.esr"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    ix.refresh()
    assert index.session(db, "s-alice")["integrity"].startswith("damaged: frame 2")
    os.unlink(data / "sessions" / "s-bob.esr")
    assert ix.refresh().removed == 1
    assert index.session(db, "s-bob") is None and index.search(db, "netrc") == []


def test_the_data_dir_is_only_read(data, tmp_path):
    before = snapshot(data)
    ix, _ = build(data, tmp_path)
    ix.rebuild()
    assert snapshot(data) == before
    assert oct(os.stat(ix.path).st_mode & 0o777) == "0o600"
    assert oct(os.stat(os.path.dirname(ix.path)).st_mode & 0o777) == "0o700"


def test_rebuild_reads_everything_again_and_an_old_index_starts_over(data, tmp_path):
    ix, db = build(data, tmp_path)
    assert ix.rebuild().read == 2
    assert len(index.search(db, "passwd")) == 1
    ix.db.execute("PRAGMA user_version = 0")
    ix.close()
    again = index.Index(ix.path, DataDir(str(data)))
    assert again.db.execute("SELECT count(*) FROM sessions").fetchone()[0] == 0
    assert again.refresh().read == 2


def test_one_index_per_data_dir_by_default(tmp_path):
    a, b = index.default_path("/var/lib/esr"), index.default_path(str(tmp_path))
    assert a != b and a == index.default_path("/var/lib/esr/")


def test_what_is_not_a_recording_is_passed_over_and_the_others_indexed(data, tmp_path):
    (data / "sessions" / "broken.esr").mkdir()  # the data dir skips it, with a warning
    ix = index.Index(str(tmp_path / "index.sqlite"), DataDir(str(data)))
    done = ix.refresh()
    assert (done.read, done.unreadable) == (2, [])
