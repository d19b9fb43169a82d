"""Reading recordings back: `esr sessions`, `esr show` and `esr verify`."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import zstandard

from esr import recording, schema, seal, tree
from esr.datadir import DataDir
from esr.errors import RecordingError, UsageError

# `--type NAME`: the records of a buffer.
TYPES = {
    buffer: tuple(r for r in schema.RECORDS if r.buffer == buffer) for buffer in schema.BUFFERS
}


# Events whose bytes `--raw` lets through to the terminal as they were.
_TERMINAL_BYTES = (schema.TerminalOutput, schema.TerminalInput)


def _text_line(event: schema.Event, raw: bool) -> bytes:
    head = f"{schema.rfc3339(event.time)} {event.ei:>6} {event.name:<15} "
    if raw and isinstance(event, _TERMINAL_BYTES):
        return head.encode() + event.data + b"\n"
    return (head + event.describe() + "\n").encode("utf-8", "surrogateescape")


def show(
    datadir: DataDir, sid: str, fmt: str, kind: str | None, raw: bool = False, out=None
) -> None:
    """Print a session's events in order, or its process tree; raise
    RecordingError after printing what precedes the damage. Recorded terminal
    bytes are escaped, unless raw."""
    out = out or sys.stdout.buffer
    if kind is not None and kind not in TYPES:
        raise UsageError(f"show: no type {kind!r} (choose from {', '.join(TYPES)})")
    sid = datadir.resolve(sid)
    try:
        chunks = _tree(datadir, sid, kind) if fmt == "tree" else lines(datadir, sid, fmt, kind, raw)
        for chunk in chunks:
            out.write(chunk)
    except RecordingError:
        out.flush()
        raise


def lines(
    datadir: DataDir, sid: str, fmt: str, kind: str | None, raw: bool = False
) -> Iterator[bytes]:
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
                    text.append(audit.line(event))
                else:
                    text.append(_text_line(event, raw))
            if text:
                yield b"".join(text)
    except recording.Damage as err:
        raise RecordingError(f"{sid}: {err}; the events above are intact") from None


def _tree(datadir: DataDir, sid: str, kind: str | None) -> Iterator[bytes]:
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
        yield (line + "\n").encode()
    if damage:
        raise RecordingError(f"{sid}: {damage}; the tree above is of the events before it")


def verify(datadir: DataDir, sid: str, key: seal.VerificationKey | None = None) -> str:
    """Check a recording's frames and chain, then its seals: what its seal
    file and the audit log's session.end say it held. Works on a copy
    (sessions/<sid>.esr and .seal, and the log/ files for the end seal)."""
    sid = datadir.resolve(sid)
    path = datadir.recording(sid)
    reader = recording.Reader(path, sid)
    chain = []
    damage = None
    ended = None
    started: int | None = None
    since = ""  # without a readable session.start, the audit log's every day
    try:
        for frame in reader:
            closed = frame.kind == recording.KIND_END
            chain.append(seal.Head(frame.last_ei, frame.end, frame.digest, closed))
            if frame.index == 0:
                started = frame.events()[0].time
                since = time.strftime("%Y-%m-%d", time.gmtime(started // 1_000_000_000))
            if closed:
                ended = frame.events()[-1].time
    except recording.Damage as err:
        damage = err
    except (zstandard.ZstdError, ValueError) as err:  # msgspec's DecodeError is a ValueError
        raise RecordingError(
            f"{sid}: frame {len(chain) - 1} chains, but its events cannot be read: {err}"
        ) from None
    if damage is not None and not damage.truncated:
        raise RecordingError(_damaged(sid, damage)) from None
    try:
        vouched = seal.check(
            sid,
            chain,
            damage.reason if damage is not None else "",
            seal.read(datadir.seal(sid)),
            reader.summary.sealed,
            key,
            seal.audit_seal(datadir.log_dir, sid, since),
            time.time_ns(),
            (started, ended),
        )
    except seal.SealError as err:
        raise RecordingError(f"{sid}: {err}") from None
    if damage is not None:
        raise RecordingError(_damaged(sid, damage)) from None
    s = reader.summary
    state = "closed" if s.closed else "not closed: still recording, or the recorder stopped"
    return f"{sid}: intact: {s.frames} frames, events 0..{s.last_ei}, {state}{_gaps(s)}; {vouched}"


def _gaps(summary: recording.Summary) -> str:
    """The holes the recorder declared, as a clause."""
    if not summary.gaps:
        return ""
    reasons = ", ".join(sorted({reason for _first, _last, reason in summary.gaps}))
    missing = sum(last - first + 1 for first, last, _reason in summary.gaps)
    first, last = summary.gaps[0][0], summary.gaps[-1][1]
    where = (
        f"events {first}..{last}"
        if len(summary.gaps) == 1
        else f"{len(summary.gaps)} runs of events between {first} and {last}"
    )
    return f"; {where} ({missing} events) not written, counted by the recorder ({reasons})"


def _damaged(sid: str, err: recording.Damage) -> str:
    good = (
        f"frames 0..{err.frame - 1} (events 0..{err.intact.last_ei}) are intact"
        if err.frame
        else "nothing before it is intact"
    )
    return f"{sid}: damaged at frame {err.frame} (byte {err.offset}): {err.reason}; {good}"


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
        lost = schema.by_lost_kind(summary.lost)
        row = {
            "sid": sid,
            "start": None,
            "end": None,
            "login": "",
            "user": "",
            "command": "",
            "events": schema.by_buffer(summary.records),
            "lost": lost,
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
                last = recording.read_frame(path, summary.last_offset)
                end = last.events()[-1]
                row.update(end=schema.rfc3339(end.time), reason=end.reason)
                if last.version == 1:  # its headers have no slot for processes
                    lost["processes"] = end.untracked_forks
                # What verify would find, without reading every frame: the
                # headers summed must say what the end says.
                if (
                    schema.by_buffer(end.records) != row["events"]
                    or schema.by_lost_kind([*end.lost, end.untracked_forks]) != row["lost"]
                ):
                    row["damaged"] = row["damaged"] or (
                        "the frame headers' counts disagree with session.end"
                    )
            # A cut its seals show says more than where the scan stopped.
            row["damaged"] = seal.unlike(summary, seal.last(datadir.seal(sid))) or row["damaged"]
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
        login, user = (schema.printable_str(r[k]) if r[k] else "" for k in ("login", "user"))
        who = login if login == user else f"{login}/{user}"
        command = schema.printable(r["command"].encode("utf-8", "surrogateescape"))[:60]
        if r["damaged"]:
            command += "  [DAMAGED]"
        lines.append(
            f"{r['sid']:36}  {(r['start'] or '-')[:19]:19}  {end:19}  {who:16}  "
            f"{r['events']['command']:>5} {r['events']['disk']:>7} "
            f"{r['events']['network']:>5} {lost:>5}  {command}"
        )
    return "\n".join(lines)
