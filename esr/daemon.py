"""`esr daemon`: load the programs once, record every session that PAM or
`esr run` asks for, and serve the control socket.

One loop in the main thread: the probe (readable when a batch is worth
writing), the control socket and signals are all selected on, and batches
are written at least every flush_interval_ms, however many requests arrive.
The probe's drain thread keeps the kernel buffers empty meanwhile.
"""

from __future__ import annotations

import fcntl
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import time

from esr import config as config_mod
from esr import control, loader
from esr.config import Config
from esr.datadir import SID_PATTERN, DataDir
from esr.log import log
from esr.recorder import Recorder, SessionError, recover
from esr.sessions import RegistryFull

# A client has this long to send its whole request.
REQUEST_TIMEOUT = 2.0
MAX_CLIENTS = 64
# Connections accepted per loop turn: a flood waits in the listen backlog
# while batches keep being written.
ACCEPTS_PER_TURN = 16

NICE = -10

# Config keys a SIGHUP can apply; the others size or shape the BPF maps and
# need a restart.
RELOADABLE = ("compression_level", "flush_interval_ms", "audit_disk_events")


class DaemonError(Exception):
    pass


def _kernel_dev(st_dev: int) -> int:
    return (os.major(st_dev) << 20) | os.minor(st_dev)


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


class _Client:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""
        self.deadline = time.monotonic() + REQUEST_TIMEOUT
        pid, uid, _gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        )
        self.pid, self.uid = pid, uid


class Daemon:
    def __init__(self, config: Config, config_path: str | None, data_dir: str | None = None):
        self.config = config
        self.config_path = config_path
        self.data_dir_override = data_dir  # --data-dir or $ESR_DATA_DIR, which beat the file
        self.datadir = DataDir(config.data_dir)
        self.selector = selectors.DefaultSelector()
        self.clients: dict[int, _Client] = {}
        self.anchors: dict[str, int] = {}  # sid -> pidfd of its anchor
        self.stopping = False

    # --- start and stop ----------------------------------------------------------

    def start(self) -> None:
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
        self.datadir.ensure()
        self.lock_fd = _lock(self.datadir)
        for sid in recover(self.datadir, self.config.compression_level, log):
            log("session.ended_by_restart", sid=sid)
        try:
            probe = loader.load(self.config)
        except loader.LoadError as err:
            raise DaemonError(str(err)) from None
        if probe is not None:
            exe = os.stat(os.path.realpath(sys.executable))
            probe.set_recorder_exe(_kernel_dev(exe.st_dev), exe.st_ino)
        self.recorder = Recorder(self.config, probe, self.datadir, log)
        self.listener = self._listen(self.config.control_socket)
        self.sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(sig_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self.selector.register(self.sig_r, selectors.EVENT_READ, self._signals)
        if probe is not None:
            self.selector.register(
                probe.fileno(), selectors.EVENT_READ, lambda _fd: self.recorder.flush()
            )
        r = self.config.enhanced_recording
        log(
            "daemon.start",
            pid=os.getpid(),
            data_dir=self.datadir.path,
            socket=self.config.control_socket,
            enhanced_recording=probe is not None,
            buffers=f"{r.command_buffer_size}/{r.disk_buffer_size}/{r.network_buffer_size}",
            programs=len(probe.programs) if probe is not None else 0,
        )

    def _listen(self, path: str) -> socket.socket:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        try:
            os.unlink(path)  # ours: only the lock holder gets here
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as err:
            raise DaemonError(f"cannot listen on {path}: {err.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(128)
        sock.setblocking(False)
        return sock

    def stop(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client)
        for sid in list(self.anchors):
            self._forget_anchor(sid)
        self.recorder.close("recorder stopped")
        self.selector.close()
        self.listener.close()
        try:
            os.unlink(self.config.control_socket)
        except OSError:
            pass
        os.close(self.lock_fd)
        log(
            "daemon.stop",
            events=self.recorder.events,
            lost_in_user_space=self.recorder.lost_in_user_space,
        )

    # --- the loop -----------------------------------------------------------------

    def run(self) -> None:
        interval = self.config.flush_interval_ms / 1000
        next_flush = time.monotonic() + interval
        while not self.stopping:
            now = time.monotonic()
            deadlines = [next_flush] + [c.deadline for c in self.clients.values()]
            for key, _ in self.selector.select(max(0.0, min(deadlines) - now)):
                # A callback earlier in this turn may have dropped this one's
                # client (to make room) or anchor.
                if self.selector.get_map().get(key.fd) is key:
                    key.data(key.fileobj)
            now = time.monotonic()
            for client in [c for c in self.clients.values() if c.deadline <= now]:
                self._reply(client, control.Reply(ok=False, error="incomplete request: timed out"))
            if now >= next_flush:
                self.recorder.flush()
                interval = self.config.flush_interval_ms / 1000
                next_flush = time.monotonic() + interval

    def _signals(self, _fd) -> None:
        try:
            received = os.read(self.sig_r, 64)
        except BlockingIOError:
            return
        for sig in received:
            if sig in (signal.SIGTERM, signal.SIGINT):
                log("daemon.signal", signal=signal.Signals(sig).name)
                self.stopping = True
            elif sig == signal.SIGHUP:
                self._reload()

    def _reload(self) -> None:
        self.recorder.audit.reopen()
        try:
            new = config_mod.load(self.config_path, self.data_dir_override)
        except config_mod.ConfigError as err:
            log("daemon.reload_failed", level="error", error=str(err))
            return
        applied, ignored = [], []
        for key in Config.__struct_fields__:
            if getattr(new, key) != getattr(self.config, key):
                (applied if key in RELOADABLE else ignored).append(key)
        if applied:
            import msgspec

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

    # --- control socket ---------------------------------------------------------

    def _accept(self, listener) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                log("control.accept_failed", level="error", error=err.strerror)
                return
            sock.setblocking(False)
            if len(self.clients) >= MAX_CLIENTS:
                # Make room by dropping the slowest sender, so that idle
                # connections can't lock the PAM hook out.
                oldest = min(self.clients.values(), key=lambda c: c.deadline)
                self._reply(
                    oldest,
                    control.Reply(
                        ok=False, error="incomplete request: dropped for a newer connection"
                    ),
                )
            client = _Client(sock)
            self.clients[sock.fileno()] = client
            self.selector.register(sock, selectors.EVENT_READ, self._read)

    def _read(self, sock) -> None:
        client = self.clients[sock.fileno()]
        try:
            chunk = sock.recv(control.MAX_MESSAGE + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        client.buffer += chunk
        if len(client.buffer) > control.MAX_MESSAGE:
            self._reply(
                client,
                control.Reply(
                    ok=False, error=f"request too large: more than {control.MAX_MESSAGE} bytes"
                ),
            )
        elif b"\n" in client.buffer:
            line, _, rest = client.buffer.partition(b"\n")
            if rest.strip():
                self._reply(client, control.Reply(ok=False, error="one request per connection"))
            else:
                self._reply(client, self._handle(client, line))
        elif not chunk:
            self._reply(
                client,
                control.Reply(
                    ok=False, error="incomplete request: connection closed before a newline"
                ),
            )

    def _reply(self, client: _Client, reply: control.Reply) -> None:
        try:
            client.sock.send(control.encode(reply))
        except OSError:
            pass
        if not reply.ok:
            log(
                "control.refused",
                level="warning",
                peer_pid=client.pid,
                peer_uid=client.uid,
                error=reply.error,
            )
        self._drop(client)

    def _drop(self, client: _Client) -> None:
        self.selector.unregister(client.sock)
        del self.clients[client.sock.fileno()]
        client.sock.close()

    def _handle(self, client: _Client, line: bytes) -> control.Reply:
        try:
            request = control.decode_request(line)
        except ValueError as err:
            return control.Reply(ok=False, error=str(err))
        if isinstance(request, control.Status):
            return control.Reply(ok=True, status=self.recorder.status())
        if client.uid != 0:
            return control.Reply(
                ok=False,
                error=f"permission denied: uid {client.uid} may not open or close sessions",
            )
        try:
            if isinstance(request, control.Open):
                return self._open(request)
            return self._close(request)
        except (SessionError, RegistryFull) as err:
            return control.Reply(ok=False, error=str(err))
        except Exception as err:  # a request must never take the recorder down
            log("control.failed", level="error", error=repr(err))
            return control.Reply(ok=False, error=f"internal error: {err}")

    def _open(self, req: control.Open) -> control.Reply:
        pid = req.seed_pid or req.anchor_pid
        if bool(req.seed_pid) == bool(req.anchor_pid) or pid < 1:
            return control.Reply(ok=False, error="open needs exactly one of seed_pid, anchor_pid")
        if not os.path.exists(f"/proc/{pid}"):
            return control.Reply(ok=False, error=f"no process {pid}")
        outer = self.recorder.session_of_task(pid)
        if outer is not None:
            # su or sudo -i inside a recorded session: it stays recorded there.
            log("session.nested", sid=outer.sid, pid=pid, login=req.login, service=req.service)
            return control.Reply(ok=True, sid=outer.sid, nested=True)
        try:
            anchor = os.pidfd_open(req.anchor_pid) if req.anchor_pid else -1
        except ProcessLookupError:
            return control.Reply(ok=False, error=f"no process {pid}")
        try:
            session = self.recorder.open_session(
                login=req.login,
                user=req.user or req.login,
                seed_pid=req.seed_pid,
                anchor_pid=req.anchor_pid,
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
            # sshd killed before PAM could close the session: the anchor's
            # exit is the logout.
            self.anchors[session.sid] = anchor
            self.selector.register(
                anchor, selectors.EVENT_READ, lambda _fd, sid=session.sid: self._anchor_gone(sid)
            )
        return control.Reply(ok=True, sid=session.sid)

    def _forget_anchor(self, sid: str) -> None:
        fd = self.anchors.pop(sid, -1)
        if fd >= 0:
            self.selector.unregister(fd)
            os.close(fd)

    def _anchor_gone(self, sid: str) -> None:
        self._forget_anchor(sid)
        session = self.recorder.registry.by_sid.get(sid)
        if session is not None:
            log("session.anchor_exited", sid=sid, anchor_pid=session.anchor_pid)
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
                return control.Reply(ok=True, sid=req.sid)
            return control.Reply(ok=False, error=f"no open session {req.sid!r}")
        self._forget_anchor(session.sid)
        return control.Reply(ok=True, sid=session.sid, remaining=self.recorder.leave(session))


def main(config_path: str | None, data_dir: str | None) -> int:
    config = config_mod.load(config_path, data_dir)
    daemon = Daemon(config, config_path, data_dir)
    try:
        daemon.start()
    except OSError as err:
        raise DaemonError(f"{err.filename + ': ' if err.filename else ''}{err.strerror}") from None
    try:
        daemon.run()
    finally:
        daemon.stop()
    return 0
