"""`esr daemon`: load the programs once and record every session that PAM or
`esr run` asks for over the control socket, until SIGTERM.

The recorder, its loop and the control socket are their own modules; this
one holds what ties them together: the data dir's lock, taking over or
recovering what a previous daemon left open, the requests' meaning, the
anchors' lifetimes, and signals: SIGTERM ends every session cleanly and
detaches everything; SIGUSR2 (what `systemctl restart` sends, the unit's
RestartKillSignal) hands the sessions over to the next daemon; SIGHUP
reopens the audit log and applies what can change live.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import resource
import signal
import sys

import msgspec

from esr import config as config_mod
from esr import control, fdstore, loader, schema
from esr.config import Config
from esr.datadir import SID_PATTERN, DataDir
from esr.errors import DaemonError, EsrError
from esr.log import counts, log
from esr.loop import RecordingLoop
from esr.recorder import Recorder, recover
from esr.registry import Session
from esr.server import ControlServer, Peer, listening_socket

NICE = -10

# Config keys a SIGHUP can apply; the others size or shape the BPF maps and
# need a restart.
RELOADABLE = (
    "compression_level",
    "flush_interval_ms",
    "seal_interval_ms",
    "audit_disk_events",
    "audit_failed_connects",
    "cluster_name",
    "on_disk_full",
)


def _lock(datadir: DataDir) -> int:
    """Hold data_dir/esr.lock for the daemon's lifetime."""
    path = os.path.join(datadir.path, "esr.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DaemonError(
            f"an esr daemon (pid {owner}) is already recording into {datadir.path}"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _prioritize() -> None:
    # A pidfd per anchored session, and a socket per client.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # The buffers only hold milliseconds of a busy session: on a loaded
    # host the recorder must get the CPU first (the unit sets Nice= too).
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > NICE:
            os.setpriority(os.PRIO_PROCESS, 0, NICE)
    except OSError:
        pass


class Daemon:
    def __init__(self, config: Config, config_path: str | None, data_dir: str | None = None):
        self.config = config
        self.config_path = config_path
        self.data_dir_override = data_dir  # --data-dir or $ESR_DATA_DIR, which beat the file
        self.datadir = DataDir(config.data_dir)
        self.anchors: dict[str, int] = {}  # sid -> pidfd of its anchor
        self.stopped = asyncio.Event()
        self.handing_over = False

    def run(self) -> None:
        _prioritize()
        self.datadir.ensure()
        lock = _lock(self.datadir)
        try:
            self.recorder = Recorder(self.config, self._load(fdstore.handed()), self.datadir, log)
            adopted = self.recorder.adopt()
            done = frozenset(s.sid for s in adopted)
            for sid in recover(self.datadir, self.config.compression_level, log, done):
                log("session.ended_by_restart", sid=sid)
            probe = self.recorder.probe
            if probe is not None:
                fdstore.remove(probe.retired_names())
                fdstore.store(probe.to_store())
            self.loop = RecordingLoop(self.recorder)
            for session in adopted:
                self._watch_holder(session)
            try:
                self.loop.run(self._serve(len(adopted)))
            finally:
                for sid in list(self.anchors):
                    self._forget_anchor(sid)
                if self.handing_over:
                    self.recorder.handover(rings_kept=fdstore.available())
                else:
                    self.recorder.close("recorder stopped")
                self.loop.close()
        finally:
            os.close(lock)
        log(
            "daemon.stop",
            handed_over=self.handing_over,
            records=counts(schema.by_buffer(self.recorder.records)),
            not_written=self.recorder.lost_in_user_space,
        )

    def _load(self, handed: dict[str, int]):
        """The probe: the kernel side a previous daemon left in the pin
        directory taken over, or loaded anew. handed: what the previous one
        stored, which the probe owns (and closes what it does not use)."""
        if not self.config.enhanced_recording.enabled:
            for fd in handed.values():
                os.close(fd)
            return None
        st = os.stat(self.datadir.path)
        probe = loader.load(
            self.config,
            recorder_exe=os.path.realpath(sys.executable),
            pin=True,
            handed=handed,
            owner=(st.st_dev, st.st_ino),
            keep_rings=fdstore.available(),
        )
        if probe is not None and probe.adopted is not None:
            a = probe.adopted
            log(
                "daemon.took_over",
                previous_version=a["version"],
                handed_over=a["handed_over"],
                programs="replaced" if a["replaced"] else "kept",
                rings=a["rings"],
                switch_ms=(a["switch_ns"][1] - a["switch_ns"][0]) // 1_000_000
                if "switch_ns" in a
                else None,
                maps_changed=",".join(a.get("maps_changed", ())) or None,
                reconciled=a.get("reconciled"),
                not_carried=a.get("not_carried"),
            )
        return probe

    def _watch_holder(self, session: Session) -> None:
        """Wait for the anchor (or pty relay) of a session taken over, as
        _open does; gone while no daemon ran, the session's leader left."""
        holder = session.anchor_pid or session.terminal_pid
        if session.leader_gone or not holder:
            return
        try:
            fd = os.pidfd_open(holder)
        except ProcessLookupError:
            fd = -1
        # The kernel forgets a tracked process when it exits: still tracked
        # as the session's anchor, this pid is still the same process.
        probe = self.recorder.probe
        if fd >= 0 and probe is not None and probe.task_session(holder) == (session.cookie, True):
            self.anchors[session.sid] = fd
            self.loop.loop.add_reader(fd, self._anchor_gone, session.sid)
            return
        if fd >= 0:
            os.close(fd)
        log("session.anchor_exited", sid=session.sid, anchor_pid=holder, while_down=True)
        self.recorder.leave(session)

    async def _serve(self, adopted: int) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, sig)
        loop.add_signal_handler(signal.SIGUSR2, self._hand_over)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        server = ControlServer(listening_socket(self.config.control_socket), self._handle, log)
        await server.start()
        probe = self.recorder.probe
        log(
            "daemon.start",
            pid=os.getpid(),
            data_dir=self.datadir.path,
            socket=self.config.control_socket,
            enhanced_recording=probe is not None,
            buffers="/".join(map(str, probe.buffer_pages if probe is not None else ())),
            programs=probe.programs if probe is not None else 0,
            pinned=probe.pin_dir if probe is not None else None,
            adopted=adopted,
        )
        fdstore.notify("READY=1")
        try:
            await self.stopped.wait()
            fdstore.notify("STOPPING=1")
        finally:
            await server.close()
            try:
                os.unlink(self.config.control_socket)
            except OSError:
                pass

    def _stop(self, sig: int) -> None:
        log("daemon.signal", signal=signal.Signals(sig).name)
        self.stopped.set()

    def _hand_over(self) -> None:
        log("daemon.signal", signal="SIGUSR2", sessions="handed over")
        self.handing_over = True
        self.stopped.set()

    def _reload(self) -> None:
        self.recorder.audit.reopen()
        try:
            new = config_mod.load(self.config_path, self.data_dir_override)
        except EsrError as err:
            log("daemon.reload_failed", level="error", error=str(err))
            return
        applied: list[str] = []
        ignored: list[str] = []
        for key in Config.__struct_fields__:
            if getattr(new, key) != getattr(self.config, key):
                (applied if key in RELOADABLE else ignored).append(key)
        if applied:
            self.config = msgspec.structs.replace(
                self.config, **{k: getattr(new, k) for k in applied}
            )
            self.recorder.reconfigure(self.config)
        log(
            "daemon.reload",
            reopened="audit log",
            applied=",".join(applied),
            needs_restart=",".join(ignored),
        )

    # --- requests ---------------------------------------------------------------------

    def _handle(self, request: control.Request, peer: Peer) -> control.Reply:
        if isinstance(request, control.Status):
            return control.Reply(ok=True, status=self.recorder.status())
        if peer.uid != 0:
            return control.Reply(
                ok=False, error=f"permission denied: uid {peer.uid} may not open or close sessions"
            )
        try:
            if isinstance(request, control.Open):
                return self._open(request, peer)
            return self._close(request)
        except EsrError as err:
            return control.Reply(ok=False, error=str(err))
        except Exception as err:  # a request must never take the recorder down
            log("control.failed", level="error", error=repr(err))
            return control.Reply(ok=False, error=f"internal error: {err}")

    def _open(self, req: control.Open, peer: Peer) -> control.Reply:
        pid = req.seed_pid or req.anchor_pid
        if bool(req.seed_pid) == bool(req.anchor_pid) or pid < 1:
            return control.Reply(ok=False, error="open needs exactly one of seed_pid, anchor_pid")
        if req.terminal_pid not in (0, peer.pid):
            # Only the asker's own reads of a pty master can be its session's terminal.
            return control.Reply(ok=False, error="terminal_pid must be the requesting process")
        if not os.path.exists(f"/proc/{pid}"):
            return control.Reply(ok=False, error=f"no process {pid}")
        if req.seed_pid:
            refused = _not_a_seed(req.seed_pid, peer)
            if refused:
                return control.Reply(ok=False, error=refused)
        outer = self.recorder.session_of_task(pid)
        if outer is not None:
            # su or sudo -i inside a recorded session: it stays recorded there.
            log("session.nested", sid=outer.sid, pid=pid, login=req.login, service=req.service)
            return control.Reply(ok=True, sid=outer.sid, nested=True)
        # The process whose exit is the logout, if the session has one: the
        # anchor (sshd killed before PAM could close the session), or the
        # pty relay (esr run killed before it could close it).
        holder = req.anchor_pid or req.terminal_pid
        try:
            anchor = os.pidfd_open(holder) if holder else -1
        except ProcessLookupError:
            return control.Reply(ok=False, error=f"no process {holder}")
        try:
            session = self.recorder.open_session(
                login=req.login,
                user=req.user or req.login,
                seed_pid=req.seed_pid,
                anchor_pid=req.anchor_pid,
                terminal_pid=req.terminal_pid,
                sid=req.sid,
                remote_addr=req.remote_addr,
                service=req.service,
                tty=req.tty,
                command=req.command,
                audit_sessionid=req.audit_sessionid,
                loginuid=req.loginuid,
                interactive=req.interactive,
            )
        except BaseException:
            if anchor >= 0:
                os.close(anchor)
            raise
        if anchor >= 0:
            self.anchors[session.sid] = anchor
            self.loop.loop.add_reader(anchor, self._anchor_gone, session.sid)
        return control.Reply(ok=True, sid=session.sid)

    def _forget_anchor(self, sid: str) -> None:
        fd = self.anchors.pop(sid, -1)
        if fd >= 0:
            self.loop.loop.remove_reader(fd)
            os.close(fd)

    def _anchor_gone(self, sid: str) -> None:
        self._forget_anchor(sid)
        session = self.recorder.registry.by_sid.get(sid)
        if session is not None:
            log(
                "session.anchor_exited",
                sid=sid,
                anchor_pid=session.anchor_pid or None,
                terminal_pid=session.terminal_pid or None,
            )
            self.recorder.leave(session)

    def _close(self, req: control.Close) -> control.Reply:
        session = self.recorder.find_session(req.sid, req.anchor_pid, req.audit_sessionid)
        if session is None:
            if req.anchor_pid:
                # The open was nested, refused, or made while no daemon ran.
                return control.Reply(ok=True)
            if SID_PATTERN.fullmatch(req.sid) and os.path.exists(
                self.recorder.datadir.recording(req.sid)
            ):
                # It ended already: its last task exited before the close came.
                return control.Reply(
                    ok=True, sid=req.sid, unwritten=self.recorder.ended_unwritten.get(req.sid, 0)
                )
            return control.Reply(ok=False, error=f"no open session {req.sid!r}")
        self._forget_anchor(session.sid)
        remaining = self.recorder.leave(session)
        return control.Reply(
            ok=True, sid=session.sid, remaining=remaining, unwritten=sum(session.unwritten)
        )


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name, in parentheses, may hold anything: count from its end.
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def _not_a_seed(pid: int, peer: Peer) -> str | None:
    """Why pid cannot seed a session opened by peer, if it cannot. A seed
    is forked for the session by whoever asks, and held before it runs
    anything: its whole life is recorded, and no running process (init, a
    daemon, someone else's shell) can be claimed as one."""
    try:
        parent = _parent(pid)
    except (OSError, ValueError, IndexError):
        return f"no process {pid}"
    if parent != peer.pid:
        return (
            f"seed_pid {pid} is not a child of the requesting process (pid {peer.pid}): "
            "a seed must be forked for the session"
        )
    try:
        seed, asker = os.stat(f"/proc/{pid}/exe"), os.stat(f"/proc/{peer.pid}/exe")
    except OSError:
        return f"no process {pid}"
    if (seed.st_dev, seed.st_ino) != (asker.st_dev, asker.st_ino):
        return (
            f"seed_pid {pid} already runs another program: a seed must be held before "
            "its first exec"
        )
    return None


def main(config_path: str | None, data_dir: str | None) -> int:
    config = config_mod.load(config_path, data_dir)
    try:
        Daemon(config, config_path, data_dir).run()
    except OSError as err:
        raise DaemonError(f"{err.filename + ': ' if err.filename else ''}{err.strerror}") from None
    return 0
