"""A session as a reviewer reads it: who exec'd what, and under each process
its files and connections. `esr show --format tree` prints it, `esr ui`
draws it; docs/ui.md states the rules.

A shell's PATH lookup execs every directory in turn until one works, and the
kernel reports each failed try as a command of its own: those fold into the
exec that succeeded. Opens are counted per path, and a directory holding
many of a process's files is one line.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from esr import schema

# A directory holding at least this many of a process's files is shown as
# one group: a loader's probes and a compiler's headers, not one row each.
GROUP_FILES = 4
# Past these, the text view says how many more there were.
SHOW_FILES = 12
SHOW_CONNECTIONS = 12

ACCESS = os.O_ACCMODE | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def error_name(return_code: int) -> str:
    """-2 as ENOENT: how a reviewer knows the errors."""
    return errno.errorcode.get(-return_code, str(return_code))


def command_line(path: bytes, argv: list[bytes]) -> str:
    """A command as a shell would take it back, every unprintable byte escaped."""
    return " ".join(schema.printable(a) for a in [path, *argv])


def destination(addr: str, port: int, version: int) -> str:
    return f"[{addr}]:{port}" if version == 6 else f"{addr}:{port}"


@dataclass
class Exec:
    """One command: a successful exec with the failed tries of the same
    lookup before it, or, when every try failed, the last one."""

    command: schema.Command
    tries: list[schema.Command] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.command.return_code == 0

    def text(self) -> str:
        return command_line(self.command.path, self.command.argv)


def _same_lookup(a: schema.Command, b: schema.Command) -> bool:
    return a.argv == b.argv and os.path.basename(a.path) == os.path.basename(b.path)


class Folder:
    """Folds each process's failed exec tries into the exec that follows them.

    feed() and flush() return the finished Execs; a failed try waits for
    its process's next exec to know whether a later try succeeded."""

    def __init__(self) -> None:
        self.pending: dict[int, list[schema.Command]] = {}

    def feed(self, command: schema.Command) -> list[Exec]:
        tries = self.pending.pop(command.pid, [])
        if tries and not _same_lookup(tries[-1], command):
            done = [Exec(tries[-1], tries[:-1])]
            tries = []
        else:
            done = []
        if command.return_code == 0:
            done.append(Exec(command, tries))
        else:
            self.pending[command.pid] = [*tries, command]
        return done

    def flush(self) -> list[Exec]:
        done = [Exec(tries[-1], tries[:-1]) for tries in self.pending.values()]
        self.pending.clear()
        return done


@dataclass
class FileUse:
    opens: int = 0
    first_ei: int = 0
    flags: int = 0  # access flags of every open, or-ed
    errors: Counter = field(default_factory=Counter)  # return code -> opens

    @property
    def writes(self) -> bool:
        return bool(self.flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))

    def describe(self) -> str:
        parts = [f"x{self.opens}"] if self.opens > 1 else []
        if self.writes:
            parts.append("write")
        return " ".join(parts + _errors(self.errors))


def _errors(errors: Counter) -> list[str]:
    return [f"{error_name(rc)} x{n}" if n > 1 else error_name(rc) for rc, n in errors.items()]


@dataclass
class Connection:
    addr: str
    port: int
    version: int
    attempts: int = 0
    first_ei: int = 0
    errors: Counter = field(default_factory=Counter)

    @property
    def destination(self) -> str:
        return destination(self.addr, self.port, self.version)

    def describe(self) -> str:
        parts = [f"x{self.attempts}"] if self.attempts > 1 else []
        return " ".join(parts + _errors(self.errors))


@dataclass
class FileGroup:
    """Files of one process in one directory, or a single file."""

    directory: bytes
    files: list[tuple[bytes, FileUse]]

    @property
    def opens(self) -> int:
        return sum(use.opens for _, use in self.files)

    @property
    def failed(self) -> int:
        return sum(sum(use.errors.values()) for _, use in self.files)

    @property
    def first_ei(self) -> int:
        return min(use.first_ei for _, use in self.files)

    def title(self) -> str:
        if len(self.files) == 1:
            return schema.printable(self.files[0][0])
        return schema.printable(self.directory + b"/")


@dataclass
class Process:
    """A pid from its first sign of life: its execs in order (one after the
    other when it execs in place), what it opened and connected to, and the
    processes it started. A process seen only through its opens has no exec."""

    pid: int
    ppid: int | None
    number: int  # in the order processes appeared: a stable id for the page
    program: bytes = b""  # its name as its opens report it
    execs: list[Exec] = field(default_factory=list)
    children: list[Process] = field(default_factory=list)
    files: dict[bytes, FileUse] = field(default_factory=dict)
    connections: dict[tuple[str, int, int], Connection] = field(default_factory=dict)
    # Its ptrace attaches and memory writes into other processes, and the
    # one that brought it into the session, if one did.
    reached: list[schema.Ptrace] = field(default_factory=list)
    reached_by: schema.Ptrace | None = None
    has_parent: bool = False

    def title(self) -> str:
        done = [e for e in self.execs if e.ok]
        if done:
            return done[0].text()
        if self.execs:
            return self.execs[0].text()
        return schema.printable(self.program) if self.program else "?"

    @property
    def opens(self) -> int:
        return sum(use.opens for use in self.files.values())

    def file_groups(self) -> list[FileGroup]:
        """Files by directory, in the order they were first opened; a
        directory with fewer than GROUP_FILES of them lists each on its own."""
        by_dir: dict[bytes, list[tuple[bytes, FileUse]]] = {}
        for path, use in sorted(self.files.items(), key=lambda item: item[1].first_ei):
            by_dir.setdefault(os.path.dirname(path) or b".", []).append((path, use))
        groups = []
        for directory, files in by_dir.items():
            if len(files) >= GROUP_FILES:
                groups.append(FileGroup(directory, files))
            else:
                groups.extend(FileGroup(directory, [f]) for f in files)
        groups.sort(key=lambda g: g.first_ei)
        return groups


@dataclass
class Tree:
    start: schema.SessionStart | None = None
    processes: list[Process] = field(default_factory=list)  # in the order they appeared
    execs: list[Exec] = field(default_factory=list)  # every command, in order
    notes: list[schema.Event] = field(default_factory=list)  # lost records, leave, end
    focus: tuple[int, Process | None] | None = None  # time and process of the event asked for

    @property
    def roots(self) -> list[Process]:
        return [p for p in self.processes if not p.has_parent]

    def offset(self, time_ns: int) -> float:
        """Seconds since the session started."""
        return (time_ns - self.start.time) / 1e9 if self.start else 0.0


class Builder:
    """Events in, a Tree out: feed every frame's events in order, then
    finish(). focus names an event whose time and process the caller wants."""

    def __init__(self, focus: int | None = None):
        self.tree = Tree()
        self.folder = Folder()
        self.current: dict[int, Process] = {}  # pid -> its process now
        self.focus = focus

    def _process(self, pid: int, ppid: int | None = None) -> Process:
        node = Process(pid, ppid, len(self.tree.processes))
        self.tree.processes.append(node)
        self.current[pid] = node
        return node

    def _of(self, pid: int, program: bytes) -> Process:
        node = self.current.get(pid) or self._process(pid)
        if not node.program:
            node.program = program
        return node

    def feed(self, events: Iterable[schema.Event]) -> None:
        for event in events:
            if type(event) is schema.Disk:
                node = self._of(event.pid, event.program)
                use = node.files.get(event.path)
                if use is None:
                    use = node.files[event.path] = FileUse(first_ei=event.ei)
                use.opens += 1
                use.flags |= event.flags & ACCESS
                if event.return_code < 0:
                    use.errors[event.return_code] += 1
                self._focus(event, node)
            elif type(event) is schema.Command:
                self._focus(event, None)  # its process is known once it is folded
                for done in self.folder.feed(event):
                    self._exec(done)
            elif type(event) is schema.Network:
                node = self._of(event.pid, event.program)
                key = (event.dst_addr, event.dst_port, event.version)
                conn = node.connections.get(key)
                if conn is None:
                    conn = node.connections[key] = Connection(*key, first_ei=event.ei)
                conn.attempts += 1
                if event.return_code < 0:
                    conn.errors[event.return_code] += 1
                self._focus(event, node)
            elif type(event) is schema.Ptrace:
                self._of(event.pid, event.program).reached.append(event)
                if event.followed:
                    target = event.target_tgid or event.target_pid
                    self._of(target, event.target_program).reached_by = event
                self._focus(event, self.current[event.pid])
            elif type(event) is schema.SessionStart:
                self.tree.start = event
            else:
                self.tree.notes.append(event)
                self._focus(event, None)

    def _focus(self, event: schema.Event, node: Process | None) -> None:
        if event.ei == self.focus:
            self.tree.focus = (event.time, node)

    def _exec(self, done: Exec) -> None:
        cmd = done.command
        node = self.current.get(cmd.pid)
        if node is None or (node.ppid is not None and node.ppid != cmd.ppid):
            # New, or a pid used again by another parent's child.
            node = self._process(cmd.pid, cmd.ppid)
        node.ppid = cmd.ppid
        if not node.has_parent:
            parent = self.current.get(cmd.ppid)
            seed = self.tree.start.seed_pid if self.tree.start else 0
            # The session's seed was started, and an anchor's children were
            # forked, by a process that is not recorded: those are roots.
            # Any other unknown parent forked without exec'ing (a subshell).
            if parent is None and seed not in (cmd.ppid, cmd.pid):
                parent = self._process(cmd.ppid)
            if parent is not None:
                parent.children.append(node)
                node.has_parent = True
        node.execs.append(done)
        self.tree.execs.append(done)
        focus = self.tree.focus
        if focus and focus[1] is None and self.focus in [c.ei for c in [cmd, *done.tries]]:
            self.tree.focus = (focus[0], node)

    def finish(self) -> Tree:
        for done in self.folder.flush():
            self._exec(done)
        self.tree.execs.sort(key=lambda e: e.command.ei)
        for node in self.tree.processes:
            node.execs.sort(key=lambda e: e.command.ei)
        return self.tree


def build(events: Iterable[schema.Event], focus: int | None = None) -> Tree:
    builder = Builder(focus)
    builder.feed(events)
    return builder.finish()


# --- text ----------------------------------------------------------------------------


def describe_exec(done: Exec) -> str:
    """The command, its failure if it failed, and the tries folded into it."""
    out = done.text()
    if not done.ok:
        out += f"  => {error_name(done.command.return_code)}"
    if done.command.argv_truncated:
        out += f"  [argv cut: {done.command.argv_cut_args} args]"
    if done.tries:
        out += f"  [{len(done.tries)} failed {'try' if len(done.tries) == 1 else 'tries'} folded]"
    return out


def lines(tree: Tree) -> Iterator[str]:
    """The tree as text, a process and its details indented under its parent."""
    for root in tree.roots:
        yield from _lines(tree, root, "")


def _lines(tree: Tree, node: Process, pad: str) -> Iterator[str]:
    head = f"{pad}pid {node.pid}"
    by = node.reached_by
    if by is not None:
        how = "attached to" if by.request in ("attach", "seize") else "written to"
        yield (
            f"{head}  ({schema.printable(node.program) or '?'}, outside the session until "
            f"{how} by pid {by.pid} {schema.printable(by.program)})"
        )
    elif not node.execs:
        yield f"{head}  ({schema.printable(node.program) or '?'}, no exec recorded)"
    for i, done in enumerate(node.execs):
        at = f"+{tree.offset(done.command.time):.3f}s"
        yield f"{head if i == 0 else ' ' * len(head)}  {at}  {describe_exec(done)}"
    detail = pad + "    "
    if node.files:
        yield f"{detail}opens: {node.opens} of {len(node.files)} files"
        groups = node.file_groups()
        for group in groups[:SHOW_FILES]:
            if len(group.files) == 1:
                yield f"{detail}  {group.title()} {group.files[0][1].describe()}".rstrip()
            else:
                failed = f", {group.failed} failed" if group.failed else ""
                yield (
                    f"{detail}  {group.title()}  ({len(group.files)} files, "
                    f"{group.opens} opens{failed})"
                )
        if len(groups) > SHOW_FILES:
            yield f"{detail}  ... {len(groups) - SHOW_FILES} more"
    for reach in node.reached:
        yield f"{detail}{reach.action()}"
    conns = sorted(node.connections.values(), key=lambda c: c.first_ei)
    for conn in conns[:SHOW_CONNECTIONS]:
        yield f"{detail}connect {conn.destination} {conn.describe()}".rstrip()
    if len(conns) > SHOW_CONNECTIONS:
        yield f"{detail}... {len(conns) - SHOW_CONNECTIONS} more destinations"
    for child in node.children:
        yield from _lines(tree, child, detail)
