"""The process tree a reviewer reads (`esr show --format tree`, `esr ui`):
PATH lookups folded, processes under their parents, opens grouped."""

from __future__ import annotations

import errno
import io

import pytest

from esr import schema, show, tree
from esr.datadir import DataDir
from esr.errors import RecordingError
from helpers import Session

START = schema.SessionStart(0, 0, "sid", "srv", "host", "alice", "alice", seed_pid=100)
ENOENT = -errno.ENOENT


class Events:
    def __init__(self):
        self.events: list[schema.Event] = [START]

    def add(self, cls, *fields):
        ei = len(self.events)
        self.events.append(cls(ei, ei * 1_000_000, *fields))
        return self

    def command(self, pid, ppid, path: bytes, *argv: bytes, rc=0):
        return self.add(schema.Command, pid, ppid, 7, b"x", path, list(argv), rc, 1000, 1000)

    def open(self, pid, path: bytes, rc=3, flags=0):
        return self.add(schema.Disk, pid, 7, b"prog", path, flags, rc)

    def connect(self, pid, addr, port, rc=0):
        return self.add(schema.Network, pid, 7, b"curl", 4, "10.0.0.1", 4000, addr, port, rc)

    def tree(self, focus=None) -> tree.Tree:
        return tree.build(self.events, focus)


def lookup(events: Events, pid: int, ppid: int, name: bytes, *argv: bytes, found=True):
    for d in (b"/usr/local/sbin", b"/usr/local/bin", b"/usr/sbin"):
        events.command(pid, ppid, d + b"/" + name, *argv, rc=ENOENT)
    if found:
        events.command(pid, ppid, b"/usr/bin/" + name, *argv)


def test_a_path_lookup_is_one_command_with_its_failed_tries():
    e = Events()
    e.command(100, 1, b"/usr/bin/bash", b"-c", b"id -u")
    lookup(e, 101, 100, b"id", b"-u")
    t = e.tree()
    assert [x.text() for x in t.execs] == ["/usr/bin/bash -c 'id -u'", "/usr/bin/id -u"]
    [_, ident] = t.execs
    assert ident.ok and [c.path for c in ident.tries] == [
        b"/usr/local/sbin/id",
        b"/usr/local/bin/id",
        b"/usr/sbin/id",
    ]
    assert "[3 failed tries folded]" in "\n".join(tree.lines(t))


def test_a_lookup_that_finds_nothing_is_one_failed_command():
    e = Events()
    e.command(100, 1, b"/usr/bin/bash")
    lookup(e, 101, 100, b"nosuch", b"--flag", found=False)
    [_, failed] = e.tree().execs
    assert not failed.ok and failed.command.return_code == ENOENT
    assert failed.command.path == b"/usr/sbin/nosuch" and len(failed.tries) == 2


def test_a_failed_exec_of_another_program_stays_apart():
    e = Events()
    e.command(100, 1, b"/no/such/program", b"--flag", rc=ENOENT)
    e.command(100, 1, b"/usr/bin/true")
    [failed, ok] = e.tree().execs
    assert failed.command.path == b"/no/such/program" and not failed.tries
    assert ok.ok and not ok.tries


def test_children_under_parents_exec_in_place_and_forked_subshells():
    e = Events()
    e.command(100, 1, b"/usr/bin/bash")  # the seed: its parent is not recorded
    e.command(101, 100, b"/usr/bin/setpriv", b"--reuid=65534", b"id")
    e.command(101, 100, b"/usr/bin/id")  # setpriv execs id in place
    e.open(102, b"/tmp/out")  # a subshell, forked, that never execs itself
    e.command(103, 102, b"/usr/bin/ls")
    t = e.tree()
    # The subshell's own parent is unknown: no record names it.
    [bash, subshell] = t.roots
    assert bash.pid == 100 and [c.pid for c in bash.children] == [101]
    [setpriv] = bash.children
    assert [x.command.path for x in setpriv.execs] == [b"/usr/bin/setpriv", b"/usr/bin/id"]
    assert subshell.pid == 102 and not subshell.execs and subshell.program == b"prog"
    assert [c.pid for c in subshell.children] == [103]


def test_a_reused_pid_of_another_parent_is_another_process():
    e = Events()
    e.command(100, 1, b"/usr/bin/bash")
    e.command(200, 100, b"/usr/bin/sleep")
    e.command(300, 100, b"/usr/bin/bash")
    e.command(200, 300, b"/usr/bin/cat")
    t = e.tree()
    [first, second] = [p for p in t.processes if p.pid == 200]
    assert first.execs[0].command.path == b"/usr/bin/sleep"
    assert second.execs[0].command.path == b"/usr/bin/cat"
    assert second in next(p for p in t.processes if p.pid == 300).children


def test_opens_grouped_by_path_and_by_directory():
    e = Events()
    e.command(100, 1, b"/usr/bin/python3")
    for _ in range(3):
        e.open(100, b"/etc/ld.so.cache")
    for name in (b"a", b"b", b"c", b"d", b"e"):
        e.open(100, b"/usr/lib/x/" + name, rc=ENOENT)
    e.open(100, b"/tmp/new", flags=0o1101)
    [proc] = e.tree().roots
    groups = proc.file_groups()
    assert [g.title() for g in groups] == ["/etc/ld.so.cache", "/usr/lib/x/", "/tmp/new"]
    assert groups[0].files[0][1].describe() == "x3"
    assert (len(groups[1].files), groups[1].opens, groups[1].failed) == (5, 5, 5)
    assert groups[2].files[0][1].describe() == "write"
    text = "\n".join(tree.lines(e.tree()))
    assert "opens: 9 of 7 files" in text and "/usr/lib/x/  (5 files, 5 opens, 5 failed)" in text


def test_connections_per_destination_with_their_errors():
    e = Events()
    e.command(100, 1, b"/usr/bin/curl")
    e.connect(100, "10.0.0.9", 443)
    e.connect(100, "10.0.0.9", 443, rc=-errno.ECONNREFUSED)
    [proc] = e.tree().roots
    [conn] = proc.connections.values()
    assert conn.destination == "10.0.0.9:443" and conn.describe() == "x2 ECONNREFUSED"


def test_a_process_a_debugger_brought_in_says_who_did():
    e = Events()
    e.command(100, 1, b"/usr/bin/gdb", b"-p", b"4000")
    e.add(schema.Ptrace, 100, 7, b"gdb", "attach", 4000, 4000, b"nginx", 0, True)
    e.command(4100, 4000, b"/bin/sh", b"-c", b"id")
    text = "\n".join(tree.lines(e.tree()))
    assert "    attach 4000 (nginx) rc=0 [now recorded here]" in text
    assert "pid 4000  (nginx, outside the session until attached to by pid 100 gdb)" in text
    assert "\n    pid 4100" in text  # what it was made to run, under it


def test_the_focus_is_the_process_of_the_event_asked_for():
    e = Events()
    e.command(100, 1, b"/usr/bin/bash")
    lookup(e, 101, 100, b"cat", b"/etc/passwd")
    e.open(101, b"/etc/passwd")
    t = e.tree(focus=len(e.events) - 1)
    assert t.focus is not None and t.focus[1].pid == 101
    t = e.tree(focus=3)  # a folded failed try
    assert t.focus is not None and t.focus[1].pid == 101


def test_text_escapes_what_could_act_on_a_terminal():
    e = Events()
    e.command(100, 1, b"/usr/bin/printf", b"\x1b[31mred\x1b[0m", b"<script>")
    e.open(100, b"/tmp/\x1b]0;title\x07")
    text = "\n".join(tree.lines(e.tree()))
    assert "\x1b" not in text and "\x07" not in text
    assert "'\\x1b[31mred\\x1b[0m'" in text and "'<script>'" in text


def test_esr_show_prints_the_tree_and_then_the_damage(tmp_path):
    s = Session(tmp_path, "t1")
    s.command(100, 1, b"/usr/bin/bash")
    s.command(101, 100, b"/usr/local/bin/id", b"-u", rc=ENOENT)
    s.command(101, 100, b"/usr/bin/id", b"-u")
    path = s.end()
    out = io.BytesIO()
    show.show(DataDir(str(tmp_path)), "t1", "tree", None, out=out)
    assert out.getvalue().decode().splitlines() == [
        "pid 100  +0.500s  /usr/bin/bash",
        "    pid 101  +1.500s  /usr/bin/id -u  [1 failed try folded]",
    ]
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    out = io.BytesIO()
    with pytest.raises(RecordingError, match=r"frame 2 .* the tree above is of the events before"):
        show.show(DataDir(str(tmp_path)), "t1", "tree", "command", out=out)
    assert b"/usr/bin/id -u" in out.getvalue()
