"""The recorder: drains the probe, routes each batch to its sessions, and
writes their recordings and the audit log.

`esr run` and `esr daemon` both record through this class; they differ only
in who asks for sessions to open and close.

What cannot be written (a full disk) is counted per session and declared by
the next frame that is; each file keeps a reserve (esr/room.py), so a
session's end always is. Once the frames of a flush are on disk, each
session's chain head is sealed (esr/seal.py).

A recorder may leave its sessions open to the next one (handover), which
goes on with them where the kernel kept them (adopt); recover() ends what
no recorder can go on with.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable

from esr import __version__, recording, schema, seal
from esr._fast.decode import SessionEvents, Taken, decode_batch
from esr.audit import AuditLog
from esr.config import Config
from esr.datadir import SID_PATTERN, DataDir, check_sid
from esr.errors import EsrError, SessionError
from esr.log import counts
from esr.recording import (
    FLAG_GAP,
    FLAG_INTERACTIVE,
    FLAG_RESUMED,
    KIND_END,
    KIND_EVENTS,
    KIND_START,
    Writer,
)
from esr.registry import Gap, Registry, Session
from esr.room import FULL, NoRoom, syncfs
from esr.seal import HostKey, Sealer

# Up to this many recordings to seal, one fdatasync each makes them durable
# (about 0.2 ms each on ext4); beyond, one syncfs for all (about 1.6 ms).
_SYNC_EACH = 4
# Free space below which the data dir counts as full: a busy session writes
# this much in a few seconds.
_FULL_BELOW = 1 << 20
# Ended sessions whose holes a late close can still be told of.
_ENDED_KEPT = 1024


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
        if probe is not None:
            self.registry = Registry(probe.max_sessions, probe.generation)
            self._count_lines()
        else:
            self.registry = Registry(config.max_sessions)
        self.started = time.monotonic()
        self.records = [0] * len(schema.BUFFERS)
        self.orphans = 0
        self.closed_bytes = 0
        self._closing = False
        self.write_errors = 0
        self.lost_in_user_space = 0  # records not written, every session's
        self.audit_unwritten = 0  # audit log lines not written
        # Records not written of sessions that ended with holes, by sid: an
        # `esr run` whose close comes after its session ended still hears.
        self.ended_unwritten: dict[str, int] = {}
        self._audit_failing = False
        self.key = HostKey.load(datadir.seal_key())  # None: seals without a key
        self.seal_errors = 0
        self._sealed_at = 0.0
        # Called when a session opens: the loop that flushes is woken.
        self.on_open: list[Callable[[], None]] = []

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
        if self.config.on_disk_full == "refuse_new_sessions" and self.disk_full():
            raise SessionError(
                f"{self.datadir.path} is full or failing: new sessions are refused until "
                "what is recorded can be written again (on_disk_full: refuse_new_sessions)"
            )
        sid = check_sid(sid) if sid else str(uuid.uuid4())
        if sid in self.registry.by_sid:
            raise SessionError(f"session {sid} is already being recorded")
        path = self.datadir.recording(sid)
        seal_path = self.datadir.seal(sid)
        slot, cookie = self.registry.allocate()
        writer = sealer = None
        try:
            writer = Writer.create(path, sid, self.config.compression_level, sealed=True)
            sealer = Sealer.create(seal_path, sid)
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
            audit = schema.AuditFormat(schema.Identity.of(start))
            session = Session(
                sid=sid,
                slot=slot,
                cookie=cookie,
                start=start,
                audit=audit,
                writer=writer,
                sealer=sealer,
                path=path,
                pending=SessionEvents(interactive=interactive, format=audit),
                anchor_pid=anchor_pid,
                terminal_pid=terminal_pid,
            )
            self._audit(session.pending)
            writer.append(KIND_START, [start])
            self.audit.write(session.audit.line(start))
            if self.probe is not None:
                self.probe.open_session(slot, cookie, sid, anchor_pid, terminal_pid)
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
            if sealer is not None:
                sealer.close()
                os.unlink(seal_path)
            if isinstance(err, FileExistsError):
                raise SessionError(f"session {sid} already exists in {self.datadir.path}") from None
            if isinstance(err, OSError) and err.errno in FULL:
                raise SessionError(
                    f"cannot start session {sid}: {self.datadir.path} is full"
                ) from None
            if isinstance(err, OSError):
                raise SessionError(f"cannot start session {sid}: {err.strerror or err}") from None
            raise
        self.registry.add(session)
        self.audit.reserve_for(len(self.registry))
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
        if self.probe is not None:
            # An idle recorder did not beat: a crash before its next flush
            # must not date the session's gap from before it began.
            self.probe.heartbeat()
        for callback in self.on_open:
            callback()
        return session

    def next_flush_s(self) -> float | None:
        """Seconds until a flush is due: the flush interval while a session
        is open. With none open, a flush has nothing to write, and a recorder
        that wakes anyway takes CPU time from every other process (see
        docs/benchmark.md); only the sealing key must still move on when an
        epoch begins. None: not until a session opens (on_open)."""
        interval = self.config.flush_interval_ms / 1000
        if len(self.registry):
            return interval
        if self.key is None:
            return None
        return max(interval, self.key.next_epoch_s(time.time_ns()) - time.time())

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

    def _audited(self) -> list[type[schema.Record]]:
        """The records the audit log gets, besides the recording."""
        return [
            r
            for r in schema.RECORDS
            if r.audited or (r is schema.Disk and self.config.audit_disk_events)
        ]

    def _count_lines(self) -> None:
        """Have the drain count the audited records, so that a flush comes
        before their lines outgrow the cache."""
        self.probe.line_buffers({schema.BUFFERS.index(r.buffer) for r in self._audited()})

    def _audit(self, pending: SessionEvents) -> None:
        """Tell a session which of its records the audit log gets, besides
        the recording."""
        audited = self._audited()
        # Teleport's UI shows every session.network as a connection made:
        # some would rather not have the failed ones in the log.
        failures = [
            r for r in audited if r is not schema.Network or self.config.audit_failed_connects
        ]
        pending.audit(audited, failures)

    def reconfigure(self, config: Config) -> None:
        """Apply what can change while recording (see daemon.RELOADABLE)."""
        self.config = config
        if self.probe is not None:
            self._count_lines()
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
            self.probe.session_left(session.slot)
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
            session.pending.add(leave)
            self._append(session, KIND_EVENTS, session.pending.take(), [leave])
        return remaining

    def end(self, session: Session, reason: str) -> None:
        """Write session.end and close the recording: with the reserve, so
        a full disk cannot keep a session from ending."""
        self._flush_session(session)
        lost, gap, reports = self._reports(session)
        pending = session.pending
        end = schema.SessionEnd(
            ei=pending.next_ei,
            time=time.time_ns(),
            reason=reason,
            enhanced_recording=self.probe is not None,
            interactive=pending.interactive,
            records=session.records,
            lost=[k + u for k, u in zip(session.lost, session.unwritten)],
            untracked_forks=session.untracked_forks,
            terminal=schema.TerminalBytes(*session.terminal),
            unwritten=list(session.unwritten),
        )
        pending.add(end)
        taken = pending.take()
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
        self.audit.reserve_for(len(self.registry))
        written = self._append(session, KIND_END, taken, reports, lost, gap, reserved=True)
        extra = None
        try:
            session.writer.close()  # on disk before the seal that vouches for it
        except OSError as err:
            written = False
            self.log("recording.close_failed", level="error", sid=session.sid, error=err.strerror)
        if written:
            prev = session.sealer.prev
            sealed = self._seal_session(session, seal.KIND_END, reserved=True)
            if sealed is not None:
                extra = {"seal": session.sealer.audit_field(sealed, prev)}
        try:
            session.sealer.close(sync=True)
        except OSError as err:
            self.log("seal.close_failed", level="error", sid=session.sid, error=err.strerror)
        self._audit_write(session.audit.line(end, extra), reserved=True)
        self.closed_bytes += session.writer.bytes_written
        if any(session.unwritten):
            self.ended_unwritten[session.sid] = sum(session.unwritten)
            if len(self.ended_unwritten) > _ENDED_KEPT:
                del self.ended_unwritten[next(iter(self.ended_unwritten))]
        self.log(
            "session.end",
            sid=session.sid,
            reason=reason,
            records=counts(schema.by_buffer(session.records)),
            lost=sum(session.lost),
            not_written=sum(session.unwritten),
            untracked_forks=session.untracked_forks,
        )

    def close(self, reason: str = "recorder stopped") -> None:
        """End every open session, then release the probe."""
        self._closing = True
        self.flush()
        for session in self.registry:
            self.end(session, reason)
        self.audit.close()
        if self.key is not None:
            self.key.close()
        if self.probe is not None:
            self.probe.close()
            self.probe = None

    def handover(self, rings_kept: bool) -> None:
        """Leave every open session to the next recorder: write and seal all
        that was read, close the files without an end, and leave the kernel
        side as it is (Probe.release), which goes on following the sessions
        meanwhile. rings_kept: the buffers' rings are in systemd's store, and
        go on filling for the next recorder; otherwise they go with this
        process, and the programs count what they can no longer send."""
        if self.probe is not None:
            if not rings_kept:
                self.probe.unplug()
            # What the last flush takes is all that is read: the rest stays
            # in the rings, unread and uncounted, for the next recorder.
            self.probe.stop_draining()
        self.flush()
        self._sealed_at = 0.0
        self._seal()
        for session in self.registry:
            try:
                session.writer.close()
            except OSError as err:
                self.log(
                    "recording.close_failed", level="error", sid=session.sid, error=err.strerror
                )
            try:
                session.sealer.close(sync=True)
            except OSError as err:
                self.log("seal.close_failed", level="error", sid=session.sid, error=err.strerror)
        self.audit.close()
        if self.key is not None:
            self.key.close()
        if self.probe is not None:
            self.probe.release()
            self.probe = None

    def adopt(self) -> list[Session]:
        """Go on recording the sessions a previous recorder left in the
        kernel, in the same recordings: each gets a session.resume saying
        how long no recorder ran and what was lost meanwhile. A session whose
        recording cannot be continued is let go of in the kernel, and its
        recording left to recover()."""
        if self.probe is None or self.probe.adopted is None:
            return []
        adopted = []
        for (
            slot,
            cookie,
            sid,
            anchor_pid,
            terminal_pid,
            leader_gone,
            drained,
        ) in self.probe.pinned_sessions():
            try:
                adopted.append(
                    self._adopt(slot, cookie, sid, anchor_pid, terminal_pid, leader_gone, drained)
                )
            except (OSError, EsrError) as err:
                error = err.strerror if isinstance(err, OSError) else str(err)
                self.log("session.not_adopted", level="error", sid=sid, error=error)
                self.probe.close_session(slot, True)
        self.audit.reserve_for(len(self.registry))
        return adopted

    def _adopt(
        self,
        slot: int,
        cookie: int,
        sid: str,
        anchor_pid: int,
        terminal_pid: int,
        leader_gone: bool,
        drained: tuple[int, ...],
    ) -> Session:
        if not SID_PATTERN.fullmatch(sid):
            raise SessionError(f"the kernel holds a session id that is not one: {sid!r}")
        path, seal_path = self.datadir.recording(sid), self.datadir.seal(sid)
        summary, damage = recording.scan(path, sid)
        if summary.closed or not summary.sealed or (damage and not damage.truncated):
            raise SessionError("its recording is closed, unsealed or damaged")
        problem = seal.unlike(summary, seal.last(seal_path))
        if problem:
            raise SessionError(f"its recording and its seals disagree: {problem}")
        writer, summary, cut = Writer.resume(path, sid, self.config.compression_level)
        try:
            sealer = Sealer.resume(seal_path, sid)[0]
        except BaseException:
            writer.close()
            raise
        start = recording.session_start(path)
        adopted = self.probe.adopted
        _live, kernel, untracked, terminal = self.probe.session_counters(slot)
        # The kernel's losses the recording reports already, and the records
        # it holds or says were not written: the rest of what was read
        # (drained) never reached it.
        reported = [lost - unwritten for lost, unwritten in zip(summary.lost, summary.unwritten)]
        dropped = [
            max(d - r - u, 0) for d, r, u in zip(drained, summary.records, summary.unwritten)
        ]
        resume = schema.Resume(
            ei=summary.last_ei + 1,
            time=adopted["reading_ns"],
            stopped=adopted["alive_ns"],
            cause="restart" if adopted["handed_over"] else "crash",
            programs="replaced" if adopted["replaced"] else "kept",
            previous_version=adopted["version"],
            version=__version__,
            lost=[k - r + d for k, r, d in zip(kernel, reported, dropped)],
            unwritten=dropped,
            untracked_forks=untracked,
        )
        interactive = start.interactive or summary.interactive
        audit = schema.AuditFormat(schema.Identity.of(start))
        session = Session(
            sid=sid,
            slot=slot,
            cookie=cookie,
            start=start,
            audit=audit,
            writer=writer,
            sealer=sealer,
            path=path,
            pending=SessionEvents(summary.last_ei + 1, interactive=interactive, format=audit),
            anchor_pid=anchor_pid,
            terminal_pid=terminal_pid,
            records=list(summary.records),
            lost=list(kernel),
            untracked_forks=untracked,
            terminal=terminal,
            leader_gone=leader_gone,
            unwritten=[u + d for u, d in zip(summary.unwritten, dropped)],
        )
        self._audit(session.pending)
        self.registry.adopt(session)
        session.pending.add(resume)
        self._append(
            session, KIND_EVENTS, session.pending.take(), [resume], resume.lost, FLAG_RESUMED
        )
        self.log(
            "session.adopted",
            sid=sid,
            gap_ms=(resume.time - resume.stopped) // 1_000_000,
            cause=resume.cause,
            programs=resume.programs,
            lost=sum(resume.lost),
            not_written=sum(dropped),
            cut_bytes=cut,
        )
        return session

    # --- the data path -------------------------------------------------------

    def flush(self) -> None:
        """Write what the probe has drained into the sessions' recordings and
        the audit log, and end the sessions that are over."""
        if self.probe is None:
            self._seal()
            return  # no records; sessions end when their leader leaves
        self.probe.heartbeat()
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
        self._seal()
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

    def _reports(self, session: Session) -> tuple[list[int], int, list[schema.Event]]:
        """Add to the session's pending events a session.lost for each kind
        of loss since the last report: records the kernel could not deliver
        and processes it could not follow, and events the recorder could not
        write. Returns what they report lost (schema.LOST_KINDS), the frame
        flag that declares a gap, and the session.lost events, for the audit
        log."""
        pending = session.pending
        lost = [0] * len(schema.LOST_KINDS)
        reports: list[schema.Event] = []
        if self.probe is not None:
            _live, kernel, untracked, session.terminal = self.probe.session_counters(session.slot)
            kernel = list(kernel)
            if kernel != session.lost or untracked != session.untracked_forks:
                records = [now - before for now, before in zip(kernel, session.lost)]
                forks = untracked - session.untracked_forks
                reports.append(schema.Lost(pending.next_ei, time.time_ns(), records, forks))
                pending.add(reports[-1])
                lost = [*records, forks]
                session.lost = kernel
                session.untracked_forks = untracked
        gap = session.gap
        if gap is None:
            return lost, 0, reports
        reports.append(
            schema.Lost(
                pending.next_ei,
                time.time_ns(),
                gap.records,
                0,
                gap.reason,
                [gap.first_ei, gap.last_ei],
            )
        )
        pending.add(reports[-1])
        return [a + b for a, b in zip(lost, [*gap.records, 0])], FLAG_GAP, reports

    def _flush_session(self, session: Session) -> None:
        """Write what the session has pending."""
        reported = session.lost, session.untracked_forks
        lost, gap, reports = self._reports(session)
        if not session.pending.count:
            return
        if not self._append(session, KIND_EVENTS, session.pending.take(), reports, lost, gap):
            # The kernel's losses are reported again with the next frame.
            session.lost, session.untracked_forks = reported

    def _flags(self, session: Session) -> int:
        return FLAG_INTERACTIVE if session.pending.interactive else 0

    def _append(
        self,
        session: Session,
        kind: int,
        taken: Taken,
        audited: list,
        lost=(),
        flags: int = 0,
        reserved: bool = False,
    ) -> bool:
        """Write taken events as a frame, and the audit lines of its records
        and of the recorder's own events among them, audited. Returns
        whether the frame was written; if not, it is counted, and the next
        frame written says so."""
        records = taken.records
        try:
            session.writer.append_encoded(
                kind,
                taken.payload,
                taken.first_ei,
                taken.last_ei,
                records,
                lost,
                flags | self._flags(session),
                reserved,
            )
        except OSError as err:
            self._not_written(session, taken, err)
            # What its session.lost events reported is reported again.
            audited = [e for e in audited if type(e) is not schema.Lost]
            written = False
        else:
            for i, n in enumerate(records):
                session.records[i] += n
                self.records[i] += n
            if flags & FLAG_GAP and session.gap is not None:
                gap, session.gap = session.gap, None
                self.log(
                    "recording.resumed",
                    sid=session.sid,
                    missing=f"{gap.first_ei}..{gap.last_ei}",
                    not_written=counts(schema.by_buffer(gap.records)),
                    reason=gap.reason,
                )
            written = True
        lines: bytes | memoryview = taken.lines
        if audited:
            lines = b"".join([lines, *(session.audit.line(e) for e in audited)])
        if lines:
            self._audit_write(lines)
        return written

    def _not_written(self, session: Session, taken: Taken, err: OSError) -> None:
        self.write_errors += 1
        if not isinstance(err, NoRoom):
            session.writer.discard_partial()
        reason = "disk_full" if err.errno in FULL else "write_error"
        records = taken.records
        for i, n in enumerate(records):
            session.unwritten[i] += n
        self.lost_in_user_space += sum(records)
        gap = session.gap
        if gap is None:
            session.gap = Gap(taken.first_ei, taken.last_ei, records, reason)
            self.log(
                "recording.not_written",
                level="error",
                sid=session.sid,
                reason=reason,
                error=err.strerror,
                first_ei=taken.first_ei,
            )
        else:
            gap.last_ei = taken.last_ei
            gap.records = [a + b for a, b in zip(gap.records, records)]

    def _audit_write(self, lines: bytes | memoryview, reserved: bool = False) -> None:
        try:
            self.audit.write(lines, reserved)
        except OSError as err:
            self.write_errors += 1
            self.audit_unwritten += bytes(lines).count(b"\n")
            if not self._audit_failing:
                self.log("audit.not_written", level="error", error=err.strerror)
            self._audit_failing = True
        else:
            if self._audit_failing:
                self.log("audit.resumed", not_written=self.audit_unwritten)
            self._audit_failing = False

    def disk_full(self) -> bool:
        """Whether the data dir is full (less than _FULL_BELOW free), or what
        is recorded cannot all be written now: a session's latest frames,
        or the audit log's latest lines."""
        if self._audit_failing or any(s.gap is not None for s in self.registry):
            return True
        try:
            st = os.statvfs(self.datadir.sessions_dir)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < _FULL_BELOW

    # --- seals -----------------------------------------------------------------------

    def _seal(self) -> None:
        """Seal the sessions whose recording moved since their last seal,
        and every open session once per epoch; at most once per seal
        interval, since what a seal vouches for must be on disk first. A
        recording not sealed yet is at the next flush, so that no crash
        leaves one without a seal that a new recorder could take over."""
        now = time.monotonic()
        due = now - self._sealed_at >= self.config.seal_interval_ms / 1000
        sessions = list(self.registry) if due else [s for s in self.registry if not s.sealer.frames]
        if not due and not sessions:
            return
        if due:
            self._sealed_at = now
        try:
            # Moves the key on when an epoch begins, sessions or not.
            epoch = self.key.current(time.time_ns())[0] if self.key is not None else 0
        except OSError as err:
            self.seal_errors += 1
            self.log("seal.key_failed", level="error", error=err.strerror)
            return
        moved = [s for s in sessions if s.sealer.frames != s.writer.frames]
        idle = [
            s for s in sessions if s.sealer.frames == s.writer.frames and s.sealer.epoch < epoch
        ]
        if moved:
            try:
                if len(moved) <= _SYNC_EACH:
                    for s in moved:
                        os.fdatasync(s.writer.fd)
                else:
                    syncfs(moved[0].writer.fd)
            except OSError as err:
                self.seal_errors += 1
                self.log("seal.sync_failed", level="error", error=err.strerror)
                return
        for s in moved:
            self._seal_session(s, seal.KIND_FLUSH)
        for s in idle:
            self._seal_session(s, seal.KIND_EPOCH)

    def _seal_session(
        self, session: Session, kind: int, flags: int = 0, reserved: bool = False
    ) -> seal.Seal | None:
        try:
            sealed = session.sealer.seal(kind, session.writer, self.key, flags, reserved)
            error = "no room left beyond the reserve"
        except OSError as err:
            sealed, error = None, err.strerror or str(err)
        if sealed is None:
            self.seal_errors += 1
            if not session.seal_failing:
                self.log("seal.not_written", level="error", sid=session.sid, error=error)
            session.seal_failing = True
        elif session.seal_failing:
            session.seal_failing = False
            self.log("seal.resumed", sid=session.sid)
        return sealed

    # --- status ----------------------------------------------------------------

    def status(self) -> dict:
        lost = self.probe.buffer_lost() if self.probe is not None else [0] * len(schema.BUFFERS)
        return {
            "uptime_s": round(time.monotonic() - self.started, 1),
            "enhanced_recording": self.probe is not None,
            # Only while a session is recorded: see docs/design.md.
            "session_hooks_attached": self.probe is not None and self.probe.session_hooks_attached,
            "buffer_pages": schema.by_buffer(list(self.config.buffer_pages())),
            "events": schema.by_buffer(self.records),
            "lost": {
                "buffer": schema.by_buffer(list(lost)),
                # The same losses as the perf buffers report them, to cross-check.
                "reported_by_perf": self.probe.lost_notified if self.probe is not None else 0,
                "user_space": self.lost_in_user_space,
                "sessions": {s.sid: schema.by_buffer(s.lost) for s in self.registry},
                # Records the recorder could not write, by session, and why
                # it cannot write now (None once it can again).
                "not_written": {
                    s.sid: {
                        "records": schema.by_buffer(s.unwritten),
                        "failing": s.gap.reason if s.gap is not None else None,
                    }
                    for s in self.registry
                    if any(s.unwritten)
                },
                "audit_lines": self.audit_unwritten,
            },
            "disk_full": self.disk_full(),
            "orphan_records": self.orphans,
            "sessions_open": len(self.registry),
            "bytes_written": sum(s.writer.bytes_written for s in self.registry)
            + self.closed_bytes
            + self.audit.bytes_written,
            "write_errors": self.write_errors,
            "seal": {
                "key": self.key.id.hex() if self.key is not None else None,
                "epoch": self.key.epoch if self.key is not None else None,
                "errors": self.seal_errors,
            },
        }


def recover(
    datadir: DataDir, level: int, log=_noop_log, adopted: frozenset[str] = frozenset()
) -> list[str]:
    """End every recording a previous recorder left open (it was stopped or
    crashed) with an explicit "recorder stopped" session.end, sealed as
    recovered, but those of sessions adopted. A recording its seals say was
    longer is evidence of a cut, and is left as it is."""
    ended = []
    key = HostKey.load(datadir.seal_key())
    audit = AuditLog(datadir.log_dir, datadir.server_id())
    try:
        for sid in datadir.sids(lambda m: log("datadir.skipped", level="warning", error=m)):
            if sid in adopted:
                continue
            try:
                if _recover(datadir, sid, level, key, audit, log):
                    ended.append(sid)
            except (OSError, EsrError) as err:
                # Left open: the next start tries again.
                error = err.strerror if isinstance(err, OSError) else str(err)
                log("session.not_recovered", level="error", sid=sid, error=error)
    finally:
        audit.close()
        if key is not None:
            key.close()
    return ended


def _recover(
    datadir: DataDir, sid: str, level: int, key: HostKey | None, audit: AuditLog, log
) -> bool:
    path = datadir.recording(sid)
    summary, damage = recording.scan(path, sid)
    if summary.closed or not summary.frames or (damage and not damage.truncated):
        return False
    last = seal.last(datadir.seal(sid))
    # An empty seal file is a crash before the first seal; a missing one is not.
    crashed_early = last is None and os.path.exists(datadir.seal(sid))
    problem = None if crashed_early else seal.unlike(summary, last)
    if problem:
        log("recording.damaged", level="warning", sid=sid, error=problem)
        return False
    try:
        writer, summary, cut = Writer.resume(path, sid, level)
    except recording.Damage as err:
        log("recording.damaged", level="warning", sid=sid, error=str(err))
        return False
    sealer = Sealer.resume(datadir.seal(sid), sid)[0] if summary.sealed else None
    start = recording.session_start(path)
    interactive = start.interactive or summary.interactive
    end = schema.SessionEnd(
        ei=summary.last_ei + 1,
        time=time.time_ns(),
        reason="recorder stopped",
        enhanced_recording=start.enhanced_recording,
        interactive=interactive,
        records=summary.records,
        lost=summary.lost[: len(schema.BUFFERS)],
        untracked_forks=summary.lost[len(schema.BUFFERS)],
    )
    try:
        writer.append(KIND_END, [end], flags=FLAG_INTERACTIVE if interactive else 0, reserved=True)
    finally:
        writer.close()
    extra = None
    if sealer is not None:
        prev = sealer.prev
        try:
            sealed = sealer.seal(seal.KIND_END, writer, key, seal.FLAG_RECOVERED, reserved=True)
        finally:
            sealer.close(sync=True)
        if sealed is not None:
            extra = {"seal": sealer.audit_field(sealed, prev)}
    audit.write(schema.AuditFormat(schema.Identity.of(start)).line(end, extra), reserved=True)
    log("session.recovered", sid=sid, cut_bytes=cut)
    return True
