"""Reading recordings back: `esr sessions`, `esr show` and `esr verify`."""

from __future__ import annotations

import sys
from collections.abc import Iterator

from esr import recording, schema, tree
from esr.datadir import DataDir
from esr.errors import RecordingError

# `--type NAME`: the records of a buffer.
TYPES = {
    buffer: tuple(r for r in schema.RECORDS if r.buffer == buffer) for buffer in schema.BUFFERS
}


def _text_line(event: schema.Event) -> str:
    return f"{schema.rfc3339(event.time)} {event.ei:>6} {event.name:<15} {event.describe()}"


def show(datadir: DataDir, sid: str, fmt: str, kind: str | None, out=None) -> None:
    """Print a session's events in order, or its process tree; raise
    RecordingError after printing what precedes the damage."""
    out = out or sys.stdout
    sid = datadir.resolve(sid)
    try:
        chunks = _tree(datadir, sid, kind) if fmt == "tree" else lines(datadir, sid, fmt, kind)
        for chunk in chunks:
            out.write(chunk)
    except RecordingError:
        out.flush()
        raise


def lines(datadir: DataDir, sid: str, fmt: str, kind: str | None) -> Iterator[str]:
    """A session's events as JSON (the audit log's) or text lines, a frame's
    worth at a time; raises RecordingError at damage, after the intact part."""
    wanted = TYPES[kind] if kind else None
    audit = None
    reader = recording.Reader(datadir.recording(sid), sid)
    try:
        for frame in reader:
            text = []
            for event in frame.events():
                if audit is None:
                    audit = schema.AuditFormat(schema.Identity.of(event))
                if wanted is not None and type(event) not in wanted:
                    continue
                if fmt == "json":
                    text.append(audit.line(event).decode("ascii"))
                else:
                    text.append(_text_line(event) + "\n")
            if text:
                yield "".join(text)
    except recording.Damage as err:
        raise RecordingError(f"{sid}: {err}; the events above are intact") from None


def _tree(datadir: DataDir, sid: str, kind: str | None) -> Iterator[str]:
    """The process tree (esr.tree), of one type of record when kind says so."""
    hidden = tuple(r for r in schema.RECORDS if kind and r not in TYPES[kind])
    builder = tree.Builder()
    damage = None
    try:
        for frame in recording.Reader(datadir.recording(sid), sid):
            builder.feed(e for e in frame.events() if not isinstance(e, hidden))
    except recording.Damage as err:
        damage = err
    built = builder.finish()
    for line in tree.lines(built):
        yield line + "\n"
    if damage:
        raise RecordingError(f"{sid}: {damage}; the tree above is of the events before it")


def verify(datadir: DataDir, sid: str) -> str:
    sid = datadir.resolve(sid)
    try:
        s = recording.verify(datadir.recording(sid), sid)
    except recording.Damage as err:
        intact = err.intact
        good = (
            f"frames 0..{err.frame - 1} (events 0..{intact.last_ei}) are intact"
            if err.frame
            else "nothing before it is intact"
        )
        raise RecordingError(
            f"{sid}: damaged at frame {err.frame} (byte {err.offset}): {err.reason}; {good}"
        ) from None
    state = "closed" if s.closed else "not closed: still recording, or the recorder stopped"
    return f"{sid}: intact: {s.frames} frames, events 0..{s.last_ei}, {state}"


def _first_command(path: str, summary: recording.Summary) -> str:
    if summary.first_command_offset is None:
        return ""
    for event in recording.read_frame(path, summary.first_command_offset).events():
        if type(event) is schema.Command and event.return_code == 0:
            return " ".join(schema.text(a) for a in [event.path, *event.argv])
    return ""


def sessions(datadir: DataDir) -> list[dict]:
    rows = []
    for sid in datadir.sids():
        path = datadir.recording(sid)
        summary, damage = recording.scan(path, sid)
        row = {
            "sid": sid,
            "start": None,
            "end": None,
            "login": "",
            "user": "",
            "command": "",
            "events": schema.by_buffer(summary.records),
            "lost": schema.by_buffer(summary.lost),
            "state": "closed" if summary.closed else "open",
            "damaged": str(damage) if damage else None,
        }
        try:
            if summary.frames:
                start = recording.session_start(path)
                row.update(start=schema.rfc3339(start.time), login=start.login, user=start.user)
                row["command"] = " ".join(schema.text(a) for a in start.command) or _first_command(
                    path, summary
                )
            if summary.closed:
                end = recording.read_frame(path, summary.last_offset).events()[0]
                row.update(end=schema.rfc3339(end.time), reason=end.reason)
        except Exception as err:  # a damaged frame must not hide the other sessions
            row["damaged"] = row["damaged"] or f"unreadable: {err}"
        rows.append(row)
    rows.sort(key=lambda r: str(r["start"] or ""))
    return rows


def sessions_text(rows: list[dict]) -> str:
    lines = [
        f"{'SID':36}  {'START':19}  {'END':19}  {'LOGIN/USER':16}  {'CMD':>5} {'DISK':>7} "
        f"{'NET':>5} {'LOST':>5}  COMMAND"
    ]
    for r in rows:
        lost = sum(r["lost"].values())
        end = (r["end"] or r["state"])[:19]
        who = r["login"] if r["login"] == r["user"] else f"{r['login']}/{r['user']}"
        command = schema.printable(r["command"].encode("utf-8", "surrogateescape"))[:60]
        if r["damaged"]:
            command += "  [DAMAGED]"
        lines.append(
            f"{r['sid']:36}  {(r['start'] or '-')[:19]:19}  {end:19}  {who:16}  "
            f"{r['events']['command']:>5} {r['events']['disk']:>7} "
            f"{r['events']['network']:>5} {lost:>5}  {command}"
        )
    return "\n".join(lines)
