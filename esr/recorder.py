"""The recorder: drains the probe, routes each batch to its sessions, and
writes their recordings and the audit log.

`esr run` and `esr daemon` both record through this class; they differ only
in who asks for sessions to open and close.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

from esr import __version__, recording, schema
from esr._fast.decode import SessionEvents, decode_batch
from esr.audit import AuditLog
from esr.config import Config
from esr.datadir import DataDir, check_sid
from esr.errors import SessionError
from esr.log import counts
from esr.recording import FLAG_INTERACTIVE, KIND_END, KIND_EVENTS, KIND_START, Writer
from esr.registry import Registry, Session


def _boot_to_epoch_ns() -> int:
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def _noop_log(event: str, **fields) -> None:
    pass


class Recorder:
    def __init__(self, config: Config, probe, datadir: DataDir, log=_noop_log):
        """probe is an esr._fast.probe.Probe, or None when enhanced recording
        is disabled: sessions then get start and end events only."""
        self.config = config
        self.probe = probe
        self.datadir = datadir
        self.log = log
        datadir.ensure()
        self.server_id = datadir.server_id()
        self.hostname = socket.gethostname()
        self.audit = AuditLog(datadir.log_dir, self.server_id)
        self.registry = Registry(config.max_sessions)
        self.started = time.monotonic()
        self.records = [0] * len(schema.BUFFERS)
        self.orphans = 0
        self.closed_bytes = 0
        self._closing = False
        self.write_errors = 0
        self.lost_in_user_space = 0

    # --- sessions ------------------------------------------------------------

    def open_session(
        self,
        *,
        login: str,
        user: str,
        seed_pid: int = 0,
        anchor_pid: int = 0,
        terminal_pid: int = 0,
        sid: str | None = None,
        remote_addr: str = "",
        service: str = "",
        tty: str = "",
        command: list[bytes] | None = None,
        audit_sessionid: int | None = None,
        loginuid: int | None = None,
        interactive: bool = False,
    ) -> Session:
        """Start recording a session seeded with seed_pid (recorded itself,
        with everything it forks) or anchor_pid (only what it forks from now
        on is recorded). terminal_pid relays the session's pty (`esr run` on
        a terminal): what it reads from the master is the session's terminal
        output, and nothing else of it is recorded."""
        sid = check_sid(sid) if sid else str(uuid.uuid4())
        if sid in self.registry.by_sid:
            raise SessionError(f"session {sid} is already being recorded")
        path = self.datadir.recording(sid)
        slot, cookie = self.registry.allocate()
        writer = None
        try:
            writer = Writer.create(path, sid, self.config.compression_level)
            start = schema.SessionStart(
                ei=0,
                time=time.time_ns(),
                sid=sid,
                server_id=self.server_id,
                server_hostname=self.hostname,
                login=login,
                user=user,
                remote_addr=remote_addr,
                service=service,
                tty=tty,
                command=command or [],
                seed_pid=seed_pid or anchor_pid,
                audit_sessionid=audit_sessionid,
                loginuid=loginuid,
                enhanced_recording=self.probe is not None,
                interactive=interactive,
                cluster_name=self.config.cluster_name or self.hostname,
                server_version=__version__,
            )
            session = Session(
                sid=sid,
                slot=slot,
                cookie=cookie,
                start=start,
                audit=schema.AuditFormat(schema.Identity.of(start)),
                writer=writer,
                path=path,
                pending=SessionEvents(interactive=interactive),
                anchor_pid=anchor_pid,
                terminal_pid=terminal_pid,
            )
            self._audit(session.pending)
            writer.append(KIND_START, [start])
            self.audit.write(session.audit.line(start))
            if self.probe is not None:
                self.probe.open_session(slot, cookie)
                if seed_pid:
                    self.probe.track(seed_pid, cookie)
                if anchor_pid:
                    self.probe.track(anchor_pid, cookie, anchor=True)
                if terminal_pid:
                    self.probe.track(terminal_pid, cookie, anchor=True, terminal=True)
        except BaseException as err:
            # Nothing of a refused session stays behind: not its slot, not
            # its tasks, not a recording without an end.
            if self.probe is not None:
                self.probe.close_session(slot, True)
            self.registry.release(slot)
            if writer is not None:
                writer.close()
                os.unlink(path)
            if isinstance(err, FileExistsError):
                raise SessionError(f"session {sid} already exists in {self.datadir.path}") from None
            if isinstance(err, OSError):
                raise SessionError(f"cannot start session {sid}: {err.strerror or err}") from None
            raise
        self.registry.add(session)
        self.log(
            "session.start",
            sid=sid,
            login=login,
            user=user,
            seed_pid=seed_pid,
            anchor_pid=anchor_pid,
            service=service,
            remote=remote_addr,
        )
        return session

    def session_of_task(self, pid: int) -> Session | None:
        """The session recording pid, if any (an anchor is not recorded)."""
        if self.probe is None:
            return None
        tracked = self.probe.task_session(pid)
        if tracked is None or tracked[1]:
            return None
        return self.registry.by_cookie.get(tracked[0])

    def find_session(
        self, sid: str = "", anchor_pid: int = 0, audit_sessionid: int | None = None
    ) -> Session | None:
        if sid:
            return self.registry.by_sid.get(sid)
        for session in self.registry:
            if (
                anchor_pid
                and session.anchor_pid == anchor_pid
                and not session.leader_gone
                and session.start.audit_sessionid == audit_sessionid
            ):
                return session
        return None

    def _audit(self, pending: SessionEvents) -> None:
        """Tell a session which of its records the audit log gets, besides
        the recording."""
        audited = [
            r
            for r in schema.RECORDS
            if r.audited or (r is schema.Disk and self.config.audit_disk_events)
        ]
        # Teleport's UI shows every session.network as a connection made:
        # some would rather not have the failed ones in the log.
        failures = [
            r for r in audited if r is not schema.Network or self.config.audit_failed_connects
        ]
        pending.audit(audited, failures)

    def reconfigure(self, config: Config) -> None:
        """Apply what can change while recording (see daemon.RELOADABLE)."""
        self.config = config
        for session in self.registry:
            session.writer.set_level(config.compression_level)
            self._audit(session.pending)

    def live_tasks(self, session: Session) -> int:
        if self.probe is None:
            return 0
        return max(self.probe.session_counters(session.slot)[0], 0)

    def leave(self, session: Session) -> int:
        """The session's leader is gone (its command exited, or PAM closed it).
        It ends once its last process has exited; returns how many remain."""
        if session.leader_gone:
            return self.live_tasks(session)
        session.leader_gone = True
        if self.probe is not None:
            for pid in (session.anchor_pid, session.terminal_pid):
                if pid:
                    self.probe.untrack(pid)
        # Counted before decoding, as in flush(). Only this session's records
        # are written now: with a thousand logouts at once, the others wait
        # for the next flush.
        remaining = self.live_tasks(session)
        self._decode()
        if remaining == 0:
            self.end(session, "exited")
        else:
            self._flush_session(session)
            leave = schema.SessionLeave(session.pending.next_ei, time.time_ns(), remaining)
            session.pending.next_ei += 1
            self._append(session, [leave], [leave])
        return remaining

    def end(self, session: Session, reason: str) -> None:
        """Write session.end and close the recording."""
        self._flush_session(session)
        end = schema.SessionEnd(
            ei=session.pending.next_ei,
            time=time.time_ns(),
            reason=reason,
            enhanced_recording=self.probe is not None,
            interactive=session.pending.interactive,
            records=session.records,
            lost=session.lost,
            untracked_forks=session.untracked_forks,
            terminal=schema.TerminalBytes(*session.terminal),
        )
        session.pending.next_ei += 1
        if self.probe is not None:
            # Tasks and an anchor still tracked must not outlive the slot,
            # unless the maps themselves are about to go.
            self.probe.close_session(
                session.slot,
                not self._closing
                and (
                    self.live_tasks(session) > 0 or (session.anchor_pid and not session.leader_gone)
                ),
            )
        self.registry.remove(session)
        try:
            session.writer.append(KIND_END, [end], flags=self._flags(session))
        except OSError as err:
            self._write_failed(session, err, 1)
        self._audit_write(session.audit.line(end))
        session.writer.close()
        self.closed_bytes += session.writer.bytes_written
        self.log(
            "session.end",
            sid=session.sid,
            reason=reason,
            records=counts(schema.by_buffer(session.records)),
            lost=sum(session.lost),
            untracked_forks=session.untracked_forks,
        )

    def close(self, reason: str = "recorder stopped") -> None:
        """End every open session, then release the probe."""
        self._closing = True
        self.flush()
        for session in self.registry:
            self.end(session, reason)
        self.audit.close()
        if self.probe is not None:
            self.probe.close()
            self.probe = None

    # --- the data path -------------------------------------------------------

    def flush(self) -> None:
        """Write what the probe has drained into the sessions' recordings and
        the audit log, and end the sessions that are over."""
        if self.probe is None:
            return  # no records; sessions end when their leader leaves
        # Nothing can join a seeded session once its last task is gone, even
        # if whoever started it never says so; an anchored one waits for its
        # anchor, which may not have forked anything yet, and one with a pty
        # relay for the relay, which still reads the last of its output. Read before
        # taking the batch: a task's records are all in the buffers before it
        # exits, and taking it drains the buffers once more.
        over = [
            s
            for s in self.registry
            if (s.leader_gone or not (s.anchor_pid or s.terminal_pid)) and self.live_tasks(s) == 0
        ]
        self._decode()
        for session in self.registry:
            self._flush_session(session)
        for session in over:
            self.end(session, "exited")

    def _decode(self) -> None:
        """Route every record the probe holds to its session's pending events."""
        if self.probe is None:
            return
        batch = self.probe.take_batch()
        try:
            if batch:
                self.orphans += decode_batch(
                    batch, self.registry.pending_by_cookie, _boot_to_epoch_ns()
                )
        finally:
            batch.release()
            self.probe.release_batch()

    def _flush_session(self, session: Session) -> None:
        """Write what the session has pending."""
        pending = session.pending
        newly_lost: list[int] = []
        if self.probe is not None:
            _live, lost, untracked, session.terminal = self.probe.session_counters(session.slot)
            lost = list(lost)
            if lost != session.lost or untracked != session.untracked_forks:
                newly_lost = [now - before for now, before in zip(lost, session.lost)]
                pending.add(
                    schema.Lost(
                        pending.next_ei,
                        time.time_ns(),
                        newly_lost,
                        untracked - session.untracked_forks,
                    )
                )
                session.lost = lost
                session.untracked_forks = untracked
        if not pending.events:
            return
        events, audited, records = pending.take()
        for i, n in enumerate(records):
            session.records[i] += n
            self.records[i] += n
        self._append(session, events, audited, records, newly_lost)

    def _flags(self, session: Session) -> int:
        return FLAG_INTERACTIVE if session.pending.interactive else 0

    def _append(self, session: Session, events: list, audited: list, records=(), lost=()) -> None:
        """Write events as a frame, and those to audit as lines."""
        try:
            session.writer.append(KIND_EVENTS, events, records, lost, self._flags(session))
        except OSError as err:
            self._write_failed(session, err, len(events))
        if audited:
            self._audit_write(b"".join([session.audit.line(e) for e in audited]))

    def _audit_write(self, lines: bytes) -> None:
        try:
            self.audit.write(lines)
        except OSError as err:
            self.write_errors += 1
            self.log("audit.write_failed", level="error", error=err.strerror)

    def _write_failed(self, session: Session, err: OSError, count: int) -> None:
        self.write_errors += 1
        self.lost_in_user_space += count
        session.writer.discard_partial()
        self.log(
            "recording.write_failed",
            level="error",
            sid=session.sid,
            error=err.strerror,
            events=count,
        )

    # --- status ----------------------------------------------------------------

    def status(self) -> dict:
        lost = self.probe.buffer_lost() if self.probe is not None else [0] * len(schema.BUFFERS)
        return {
            "uptime_s": round(time.monotonic() - self.started, 1),
            "enhanced_recording": self.probe is not None,
            "buffer_pages": schema.by_buffer(list(self.config.buffer_pages())),
            "events": schema.by_buffer(self.records),
            "lost": {
                "buffer": schema.by_buffer(list(lost)),
                # The same losses as the perf buffers report them, to cross-check.
                "reported_by_perf": self.probe.lost_notified if self.probe is not None else 0,
                "user_space": self.lost_in_user_space,
                "sessions": {s.sid: schema.by_buffer(s.lost) for s in self.registry},
            },
            "orphan_records": self.orphans,
            "sessions_open": len(self.registry),
            "bytes_written": sum(s.writer.bytes_written for s in self.registry)
            + self.closed_bytes
            + self.audit.bytes_written,
            "write_errors": self.write_errors,
        }


def recover(datadir: DataDir, level: int, log=_noop_log) -> list[str]:
    """End every recording a previous recorder left open (it was stopped or
    crashed) with an explicit "recorder stopped" session.end."""
    ended = []
    audit = AuditLog(datadir.log_dir, datadir.server_id())
    for sid in datadir.sids():
        path = datadir.recording(sid)
        summary, damage = recording.scan(path, sid)
        if summary.closed or not summary.frames or (damage and not damage.truncated):
            continue
        try:
            writer, summary, cut = Writer.resume(path, sid, level)
        except recording.Damage as err:
            log("recording.damaged", level="warning", sid=sid, error=str(err))
            continue
        start = recording.session_start(path)
        interactive = start.interactive or summary.interactive
        end = schema.SessionEnd(
            ei=summary.last_ei + 1,
            time=time.time_ns(),
            reason="recorder stopped",
            enhanced_recording=start.enhanced_recording,
            interactive=interactive,
            records=summary.records,
            lost=summary.lost,
            untracked_forks=0,
        )
        writer.append(KIND_END, [end], flags=FLAG_INTERACTIVE if interactive else 0)
        writer.close()
        audit.write(schema.AuditFormat(schema.Identity.of(start)).line(end))
        log("session.recovered", sid=sid, cut_bytes=cut)
        ended.append(sid)
    audit.close()
    return ended
