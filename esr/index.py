"""The index `esr ui` lists and searches sessions with: SQLite, with an FTS5
table of what a reviewer searches for (commands, files, destinations and
terminal output), each row pointing at its event in its recording.

The recordings stay the source of truth and are only read: the index is a
cache of them kept by whoever reads it (`esr ui` as it runs, `esr index`),
in the reader's own cache directory, never in the data dir. Recordings only
grow, frame by frame, so a pass reads each one from where the previous pass
stopped, checking its hash chain on the way: the sessions list shows the
same result as `esr verify` without hashing every file again.

A file is one row per session and path, a destination one row per session
and address, not one per open or connect: what matters is that the session
touched it, and the session page shows the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator

from esr import recording, schema, tree
from esr.datadir import DataDir
from esr.errors import DataDirError

# Bumped when the tables change: an index of another version is dropped and
# built again, as any cache.
VERSION = 2

COMMAND, FILE, CONNECT, OUTPUT = range(4)
KINDS = ("command", "file", "connect", "output")

_TABLES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sessions (
    id INTEGER PRIMARY KEY,
    sid TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,       -- the file as last read: its size,
    mtime_ns INTEGER NOT NULL,   -- its modification time,
    state TEXT NOT NULL,         -- and where reading it stopped (JSON)
    start_ns INTEGER,
    last_ns INTEGER,             -- the newest event's time
    end_ns INTEGER,
    login TEXT NOT NULL DEFAULT '',
    user TEXT NOT NULL DEFAULT '',
    remote_addr TEXT NOT NULL DEFAULT '',
    service TEXT NOT NULL DEFAULT '',
    hostname TEXT NOT NULL DEFAULT '',
    command TEXT NOT NULL DEFAULT '',
    commands INTEGER NOT NULL DEFAULT 0,
    files INTEGER NOT NULL DEFAULT 0,
    connections INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    integrity TEXT NOT NULL      -- intact, open, or what `esr verify` says is damaged
);
CREATE INDEX sessions_start ON sessions (start_ns);
CREATE INDEX sessions_login ON sessions (login);
CREATE INDEX sessions_user ON sessions (user);
CREATE TABLE hits (
    id INTEGER PRIMARY KEY,
    session INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    ei INTEGER NOT NULL,
    time INTEGER NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX hits_session ON hits (session);
-- Files and destinations once per session; commands and output every time.
CREATE UNIQUE INDEX hits_once ON hits (session, kind, text) WHERE kind IN (1, 2);
CREATE VIRTUAL TABLE hits_fts USING fts5 (text, content='hits', content_rowid='id');
CREATE TRIGGER hits_added AFTER INSERT ON hits BEGIN
    INSERT INTO hits_fts (rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER hits_removed AFTER DELETE ON hits BEGIN
    INSERT INTO hits_fts (hits_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
"""

SORTS = {
    "start": "start_ns",
    "duration": "coalesce(end_ns, last_ns) - start_ns",
    "login": "login",
    "remote": "remote_addr",
    "commands": "commands",
    "files": "files",
    "connections": "connections",
    "lost": "lost",
    "skipped": "skipped",
    "integrity": "integrity",
}


def default_path(data_dir: str) -> str:
    """The index of data_dir in the cache of whoever runs esr: one file per
    data dir, since a cache directory is shared."""
    if os.geteuid() == 0:
        base = "/var/cache/esr"
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        base = os.path.join(cache, "esr")
    key = hashlib.blake2b(os.path.realpath(data_dir).encode(), digest_size=6).hexdigest()
    return os.path.join(base, f"index-{key}.sqlite")


def readable(datadir: DataDir) -> None:
    """Refuse, in one line, a data dir this user cannot read."""
    if not os.path.isdir(datadir.path):
        raise DataDirError(f"no data dir {datadir.path}")
    for path in (datadir.path, datadir.sessions_dir):
        if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
            raise DataDirError(f"cannot read {path}: permission denied")


def update(datadir: DataDir, path: str, rebuild: bool) -> str:
    """`esr index`: one pass, and what it did as a line."""
    readable(datadir)
    index = Index(path, datadir)
    try:
        done = index.rebuild() if rebuild else index.refresh()
    finally:
        index.close()
    line = (
        f"{path}: {done.sessions} recordings, {done.read} read ({done.events} events), "
        f"{done.removed} gone, in {done.seconds:.1f} s"
    )
    if done.unreadable:
        raise DataDirError(
            f"{line}; {len(done.unreadable)} could not be read, the first {done.unreadable[0]}"
        )
    return line


# What a terminal acts on rather than shows: CSI and OSC sequences, other
# escapes, and control characters but line ends and tabs.
_TERMINAL_CONTROLS = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?|[\x00-\x08\x0b-\x1f\x7f]"
)


def terminal_output(events: list) -> Iterator[tuple[int, int, str]]:
    """(ei, time, text) of what the session's terminal showed, to search:
    each chunk of output as text, what acts on the terminal taken out."""
    for event in events:
        if type(event) is schema.TerminalOutput:
            text = _TERMINAL_CONTROLS.sub("", event.data.decode("utf-8", "replace")).strip()
            if text:
                yield event.ei, event.time, text


def match_expression(query: str) -> str:
    """A query as FTS5 takes it: every word must match, each as a phrase
    whose last token may be a prefix, so `/etc/pass` finds /etc/passwd and
    no character of the query is FTS5 syntax."""
    printable = "".join(c if c.isprintable() else " " for c in query)
    words = [w for w in printable.split() if any(c.isalnum() for c in w)]
    return " AND ".join('"' + w.replace('"', '""') + '"*' for w in words)


def _summary_state(summary: recording.Summary, **extra) -> str:
    state = dataclasses.asdict(summary)
    state["digest"] = summary.digest.hex()
    return json.dumps({"summary": state, **extra})


def _load_state(text: str) -> tuple[recording.Summary, dict]:
    state = json.loads(text)
    fields = state.pop("summary")
    fields["digest"] = bytes.fromhex(fields["digest"])
    return recording.Summary(**fields), state


@dataclasses.dataclass
class Pass:
    """What one refresh did."""

    sessions: int = 0  # recordings in the data dir
    read: int = 0  # recordings read, in part or whole
    events: int = 0
    removed: int = 0
    seconds: float = 0.0
    unreadable: list[str] = dataclasses.field(default_factory=list)  # "sid: why"


class Index:
    def __init__(self, path: str, datadir: DataDir):
        self.path = path
        self.datadir = datadir
        self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        directory = os.path.dirname(self.path) or "."
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            # The index holds what the recordings hold: it is as private as
            # they are (SQLite gives its -wal and -shm files the same mode).
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            # Made here, used by esr ui's indexer thread from then on.
            db = sqlite3.connect(
                self.path, timeout=60, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            self._check(db)
        except OSError as err:
            raise DataDirError(f"cannot open the index {self.path}: {err.strerror}") from None
        except sqlite3.DatabaseError as err:
            raise DataDirError(f"cannot use the index {self.path}: {err}") from None
        return db

    def _check(self, db: sqlite3.Connection) -> None:
        """Create the tables, or start over when they are another version's
        or another data dir's."""
        if db.execute("PRAGMA user_version").fetchone()[0] == VERSION:
            row = db.execute("SELECT value FROM meta WHERE key = 'data_dir'").fetchone()
            if row and row[0] == os.path.realpath(self.datadir.path):
                return
        self._create(db)

    def _create(self, db: sqlite3.Connection) -> None:
        """Empty tables, in one transaction: readers see the old ones until then."""
        data_dir = os.path.realpath(self.datadir.path)
        old = db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name NOT LIKE 'sqlite_%' AND name NOT LIKE 'hits_fts_%'"
        ).fetchall()
        quoted = data_dir.replace("'", "''")
        db.executescript(
            "BEGIN IMMEDIATE;"
            + "".join(f"DROP TABLE IF EXISTS {name};" for (name,) in old)
            + _TABLES
            + f"INSERT INTO meta VALUES ('data_dir', '{quoted}');"
            + f"PRAGMA user_version = {VERSION};"
            + "COMMIT;"
        )

    def close(self) -> None:
        self.db.close()

    # --- keeping it current ----------------------------------------------------------

    def rebuild(self) -> Pass:
        """Forget everything and read every recording again."""
        self._create(self.db)
        return self.refresh()

    def refresh(self, progress: Callable[[int, int], None] | None = None) -> Pass:
        """Read what was written since the last pass: new recordings, what
        the others grew by; forget the ones that are gone. progress hears
        (read, to read) as it goes."""
        started = time.monotonic()
        done = Pass()
        on_disk = []
        for sid in self.datadir.sids():
            try:
                st = os.stat(self.datadir.recording(sid))
            except FileNotFoundError:
                continue
            on_disk.append((st.st_mtime_ns, sid, st))
        done.sessions = len(on_disk)
        known = {
            sid: (size, mtime)
            for sid, size, mtime in self.db.execute("SELECT sid, size, mtime_ns FROM sessions")
        }
        # Oldest first, so that newer sessions get higher row ids: search
        # answers newest first by walking them down.
        stale = [
            (sid, st)
            for _mtime, sid, st in sorted(on_disk)
            if known.pop(sid, None) != (st.st_size, st.st_mtime_ns)
        ]
        for i, (sid, st) in enumerate(stale):
            if progress:
                progress(i, len(stale))
            try:
                done.events += self._read(sid, st)
            except FileNotFoundError:
                continue  # removed meanwhile: the next pass forgets it
            except OSError as err:
                done.unreadable.append(f"{sid}: {err.strerror}")
                continue
            done.read += 1
        if progress:
            progress(len(stale), len(stale))
        for sid in known:
            self.db.execute("BEGIN IMMEDIATE")
            self._forget(sid)
            self.db.execute("COMMIT")
            done.removed += 1
        done.seconds = time.monotonic() - started
        return done

    def _forget(self, sid: str) -> None:
        row = self.db.execute("SELECT id FROM sessions WHERE sid = ?", (sid,)).fetchone()
        if row:
            self.db.execute("DELETE FROM hits WHERE session = ?", row)
            self.db.execute("DELETE FROM sessions WHERE id = ?", row)

    def _read(self, sid: str, st: os.stat_result) -> int:
        """Index what one recording holds beyond what was read of it before.
        Returns the events read."""
        db = self.db
        # Whoever holds the write lock reads the file: two indexers never
        # add the same frames.
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT id, size, mtime_ns, state, integrity FROM sessions WHERE sid = ?", (sid,)
            ).fetchone()
            after = None
            extra: dict = {"skipped": 0, "command": ""}
            if row:
                session_id, size, mtime_ns, state, integrity = row
                if (size, mtime_ns) == (st.st_size, st.st_mtime_ns):
                    db.execute("COMMIT")
                    return 0
                after, extra = _load_state(state)
                # Only a file that grew, and was read without damage, is
                # read on from where the last pass stopped; one changed in
                # any other way is read again from the start.
                if integrity.startswith("damaged") or st.st_size <= size:
                    self._forget(sid)
                    row = after = None
                    extra = {"skipped": 0, "command": ""}
            if row is None:
                session_id = db.execute(
                    "INSERT INTO sessions (sid, size, mtime_ns, state, integrity) "
                    "VALUES (?, -1, 0, '', 'open')",
                    (sid,),
                ).lastrowid
            events = self._frames(session_id, sid, st, after, extra)
            db.execute("COMMIT")
            return events
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _frames(self, session_id: int, sid: str, st: os.stat_result, after, extra: dict) -> int:
        db = self.db
        reader = recording.Reader(self.datadir.recording(sid), sid, after=after)
        folder = tree.Folder()
        session: dict = {}
        hits: list[tuple] = []
        seen: set[tuple[int, str]] = set()
        events_read = 0
        integrity = "open"

        def add_exec(done: tree.Exec) -> None:
            cmd = done.command
            hits.append((session_id, COMMAND, cmd.ei, cmd.time, done.text()))
            if not extra["command"] and done.ok:
                extra["command"] = done.text()
                session["command"] = extra["command"]

        try:
            for frame in reader:
                events = frame.events()
                events_read += len(events)
                for event in events:
                    kind = type(event)
                    if kind is schema.Disk:
                        text = schema.printable(event.path)
                        if (FILE, text) not in seen:
                            seen.add((FILE, text))
                            hits.append((session_id, FILE, event.ei, event.time, text))
                    elif kind is schema.Command:
                        for done in folder.feed(event):
                            add_exec(done)
                    elif kind is schema.Network:
                        dest = tree.destination(event.dst_addr, event.dst_port, event.version)
                        if (CONNECT, dest) not in seen:
                            seen.add((CONNECT, dest))
                            hits.append((session_id, CONNECT, event.ei, event.time, dest))
                    elif kind is schema.Lost:
                        extra["skipped"] += event.untracked_forks
                    elif kind is schema.SessionStart:
                        session.update(
                            start_ns=event.time,
                            login=event.login,
                            user=event.user,
                            remote_addr=event.remote_addr,
                            service=event.service,
                            hostname=event.server_hostname,
                        )
                        if event.command:
                            extra["command"] = " ".join(schema.printable(a) for a in event.command)
                            session["command"] = extra["command"]
                    elif kind is schema.SessionEnd:
                        session.update(end_ns=event.time, reason=event.reason)
                        extra["skipped"] = max(extra["skipped"], event.untracked_forks)
                for ei, at, text in terminal_output(events):
                    hits.append((session_id, OUTPUT, ei, at, text))
                if events:
                    session["last_ns"] = events[-1].time
                if len(hits) > 10_000:
                    self._add_hits(hits)
        except recording.Damage as err:
            if not err.truncated:
                integrity = f"damaged: {err}"
        for done in folder.flush():
            add_exec(done)
        self._add_hits(hits)
        summary = reader.summary
        if summary.closed and integrity == "open":
            integrity = "intact"
        session.update(
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            state=_summary_state(summary, **extra),
            commands=summary.records[schema.BUFFERS.index("command")],
            files=summary.records[schema.BUFFERS.index("disk")],
            connections=summary.records[schema.BUFFERS.index("network")],
            lost=sum(summary.lost[: len(schema.BUFFERS)]),  # processes are "skipped"
            skipped=extra["skipped"],
            integrity=integrity,
        )
        names = ", ".join(f"{k} = :{k}" for k in session)
        db.execute(f"UPDATE sessions SET {names} WHERE id = :id", {**session, "id": session_id})
        return events_read

    def _add_hits(self, hits: list[tuple]) -> None:
        self.db.executemany(
            "INSERT OR IGNORE INTO hits (session, kind, ei, time, text) VALUES (?, ?, ?, ?, ?)",
            hits,
        )
        hits.clear()


# --- reading it -------------------------------------------------------------------


def connect(path: str) -> sqlite3.Connection:
    """A connection that only reads, for one of the UI's threads."""
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
    db = sqlite3.connect(uri, uri=True, timeout=10, check_same_thread=False)
    db.row_factory = sqlite3.Row
    return db


@dataclasses.dataclass
class Hit:
    id: int
    kind: str
    ei: int
    time: int
    snippet: str  # the matched words between \x02 and \x03
    sid: str
    login: str
    user: str
    start_ns: int | None
    remote_addr: str


def search(
    db: sqlite3.Connection, query: str, before: int | None = None, limit: int = 50
) -> list[Hit]:
    """Rows matching every word of the query, newest first; before pages on
    from the last id of the previous page."""
    expr = match_expression(query)
    if not expr:
        return []
    rows = db.execute(
        """
        SELECT m.rowid, h.kind, h.ei, h.time, m.snip, s.sid, s.login, s.user, s.start_ns,
               s.remote_addr
        FROM (SELECT rowid, snippet(hits_fts, 0, char(2), char(3), '…', 24) AS snip
              FROM hits_fts WHERE hits_fts MATCH ? AND rowid < ?
              ORDER BY rowid DESC LIMIT ?) AS m
        JOIN hits h ON h.id = m.rowid
        JOIN sessions s ON s.id = h.session
        ORDER BY m.rowid DESC
        """,
        (expr, (1 << 63) - 1 if before is None else before, limit),
    )
    return [Hit(r[0], KINDS[r[1]], *r[2:]) for r in rows]


def sessions(
    db: sqlite3.Connection,
    *,
    user: str = "",
    since: int | None = None,
    until: int | None = None,
    command: str = "",
    sort: str = "start",
    descending: bool = True,
    offset: int = 0,
    limit: int = 50,
) -> tuple[list[sqlite3.Row], int]:
    """One page of sessions, and how many match in all. user is a login or
    a user name; since and until bound the start (ns); command is a search
    among the session's commands."""
    where: list[str] = []
    args: list[object] = []
    if user:
        where.append("(login = ? OR user = ?)")
        args += [user, user]
    if since is not None:
        where.append("start_ns >= ?")
        args.append(since)
    if until is not None:
        where.append("start_ns < ?")
        args.append(until)
    if command:
        where.append(
            "id IN (SELECT h.session FROM hits_fts JOIN hits h ON h.id = hits_fts.rowid "
            "WHERE hits_fts MATCH ? AND h.kind = 0)"
        )
        args.append(match_expression(command) or '""')
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    total = db.execute(f"SELECT count(*) FROM sessions{clause}", args).fetchone()[0]
    order = f"{SORTS[sort]} {'DESC' if descending else 'ASC'}, id DESC"
    rows = db.execute(
        f"SELECT * FROM sessions{clause} ORDER BY {order} LIMIT ? OFFSET ?", [*args, limit, offset]
    ).fetchall()
    return rows, total


def session(db: sqlite3.Connection, sid: str) -> sqlite3.Row | None:
    return db.execute("SELECT * FROM sessions WHERE sid = ?", (sid,)).fetchone()
