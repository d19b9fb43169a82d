"""`esr run -- CMD`: record CMD and everything it starts as one session.

The command is forked, held on a pipe until its pid is tracked in the
kernel, then released to exec: its first exec is already recorded. A
running daemon records the session; without one, this process does.
"""

from __future__ import annotations

import os
import pwd
import selectors
import signal
import sys
import time

from esr import control, loader
from esr.config import Config
from esr.datadir import DataDir
from esr.recorder import Recorder, SessionError


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def identity(login: str | None) -> tuple[str, str]:
    """(login, user): the account recorded, and the person behind it."""
    user = os.environ.get("SUDO_USER") or _user_name(os.getuid())
    return login or _user_name(os.getuid()), user


def _spawn_held(argv: list[str]) -> tuple[int, int]:
    """Fork argv, held before exec until a byte arrives on the returned fd."""
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(release_w)
            if os.read(release_r, 1) != b"x":
                os._exit(1)
            os.close(release_r)
            os.execvp(argv[0], argv)
        except OSError as err:
            os.write(2, f"esr: cannot run {argv[0]}: {err.strerror}\n".encode())
            os._exit(127 if isinstance(err, FileNotFoundError) else 126)
        finally:
            os._exit(127)
    os.close(release_r)
    return pid, release_w


def _kill(pid: int) -> None:
    """Kill and reap a child still held before exec."""
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


class _Signals:
    """Signals delivered as readable bytes, so the loop can select on them."""

    CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

    def __init__(self):
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.w)
        for sig in self.CAUGHT:
            signal.signal(sig, lambda *_: None)

    def read(self) -> list[int]:
        try:
            return list(os.read(self.r, 64))
        except BlockingIOError:
            return []


def run(config: Config, argv: list[str], sid: str | None, login: str | None) -> int:
    """Record argv as a session; returns its exit status. A running daemon
    records it; otherwise this process loads the programs and records."""
    login, user = identity(login)
    pid, release = _spawn_held(argv)
    try:
        tty = os.ttyname(0) if os.isatty(0) else ""
        request = control.Open(
            login=login,
            user=user,
            seed_pid=pid,
            sid=sid,
            command=[os.fsencode(a) for a in argv],
            tty=tty,
            interactive=bool(tty),
        )
        try:
            reply = control.request(config.control_socket, request, timeout=10)
        except control.DaemonUnavailable:
            reply = None
        if reply is not None and not reply.ok:
            raise SessionError(reply.error)
    except BaseException:
        _kill(pid)
        raise
    if reply is None:
        return _record(config, pid, release, request)
    signals = _Signals()  # before the sid is printed: whoever reads it may signal us
    note = " (inside an already recorded session)" if reply.nested else " by the esr daemon"
    print(f"esr: recording session {reply.sid}{note}", file=sys.stderr, flush=True)
    os.write(release, b"x")
    os.close(release)
    status = _wait_forwarding(pid, signals)
    if not reply.nested:
        try:
            closed = control.request(
                config.control_socket, control.Close(sid=reply.sid), timeout=10
            )
            if not closed.ok:
                print(f"esr: warning: {closed.error}", file=sys.stderr, flush=True)
            elif closed.remaining:
                print(
                    f"esr: {argv[0]} exited; the daemon keeps recording the {closed.remaining} "
                    "tasks it left running",
                    file=sys.stderr,
                    flush=True,
                )
        except control.ControlError as err:
            print(f"esr: warning: {err}", file=sys.stderr, flush=True)
    return status


def _wait_forwarding(pid: int, signals: _Signals) -> int:
    """Wait for pid, passing SIGTERM and SIGHUP on to it; its exit status."""
    pidfd = os.pidfd_open(pid)
    selector = selectors.DefaultSelector()
    selector.register(pidfd, selectors.EVENT_READ, "child")
    selector.register(signals.r, selectors.EVENT_READ, "signal")
    try:
        while True:
            for key, _ in selector.select():
                if key.data == "child":
                    return _exit_code(os.waitpid(pid, 0)[1])
                for sig in signals.read():
                    if sig in (signal.SIGTERM, signal.SIGHUP):
                        os.kill(pid, sig)  # not reaped yet: still our child
    finally:
        selector.close()
        os.close(pidfd)


def _record(config: Config, pid: int, release: int, request: control.Open) -> int:
    """No daemon: load the programs here, and record until the command and
    every task it left running have exited (or an interrupt after it exited)."""
    try:
        probe = loader.load(config)
        recorder = Recorder(config, probe, DataDir(config.data_dir))
    except BaseException:
        _kill(pid)
        raise
    try:
        session = recorder.open_session(
            login=request.login,
            user=request.user,
            seed_pid=pid,
            sid=request.sid,
            command=request.command,
            tty=request.tty,
            interactive=request.interactive,
        )
    except BaseException:
        _kill(pid)
        recorder.close()
        raise
    signals = _Signals()
    print(f"esr: recording session {session.sid}", file=sys.stderr, flush=True)
    os.write(release, b"x")
    os.close(release)

    argv0 = os.fsdecode(request.command[0])
    status = None
    pidfd = os.pidfd_open(pid)
    selector = selectors.DefaultSelector()
    selector.register(pidfd, selectors.EVENT_READ, "child")
    selector.register(signals.r, selectors.EVENT_READ, "signal")
    if probe is not None:
        selector.register(probe.fileno(), selectors.EVENT_READ, "probe")
    interval = config.flush_interval_ms / 1000
    next_flush = time.monotonic() + interval
    try:
        # The session can end (its last task exited) just before the pidfd
        # says so: the command is still reaped, for its status.
        while status is None or session.sid in recorder.registry.by_sid:
            for key, _ in selector.select(max(0.0, next_flush - time.monotonic())):
                if key.data == "child":
                    _, wait_status = os.waitpid(pid, 0)
                    status = _exit_code(wait_status)
                    selector.unregister(pidfd)
                    os.close(pidfd)
                    ended = session.sid not in recorder.registry.by_sid
                    remaining = 0 if ended else recorder.leave(session)
                    if remaining:
                        print(
                            f"esr: {argv0} exited; recording {remaining} tasks it left "
                            f"running (interrupt to stop)",
                            file=sys.stderr,
                            flush=True,
                        )
                elif key.data == "signal":
                    for sig in signals.read():
                        if status is None and sig in (signal.SIGTERM, signal.SIGHUP):
                            os.kill(pid, sig)
                        elif status is not None:
                            recorder.end(session, "recorder stopped")
                            break
                else:
                    recorder.flush()
            if time.monotonic() >= next_flush:
                recorder.flush()
                next_flush = time.monotonic() + interval
    finally:
        recorder.close()
    return status if status is not None else 1
