"""`esr run -- CMD`: record CMD and everything it starts as one session.

The command is forked, held on a pipe until its pid is tracked in the
kernel, then released to exec: its first exec is already recorded. A
running daemon records the session; without one, this process does.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import selectors
import signal
import sys

from esr import control, loader
from esr.config import Config
from esr.datadir import DataDir
from esr.errors import DaemonUnavailable, SessionError, one_line
from esr.loop import RecordingLoop
from esr.recorder import Recorder

# Signals passed on to the command while it runs. A terminal's SIGINT and
# SIGQUIT reach the command through its process group; esr run waits on.
FORWARDED = (signal.SIGTERM, signal.SIGHUP)
IGNORED = (signal.SIGINT, signal.SIGQUIT)


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
            os.write(2, f"esr: {one_line(f'cannot run {argv[0]}: {err.strerror}')}\n".encode())
            os._exit(127 if isinstance(err, FileNotFoundError) else 126)
        finally:
            os._exit(127)
    os.close(release_r)
    return pid, release_w


def _kill(pid: int) -> None:
    """Kill and reap a child still held before exec."""
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _release(release: int) -> None:
    os.write(release, b"x")
    os.close(release)


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def _say(message: str) -> None:
    print(f"esr: {one_line(message)}", file=sys.stderr, flush=True)


def _not_written(sid: str, records: int, status: int, audit_lines: int = 0) -> int:
    """Say that the recording has holes, loudly; the exit status says it too
    when the command's would not."""
    if not records and not audit_lines:
        return status
    audit = f", nor {audit_lines} lines of the audit log" if audit_lines else ""
    _say(
        f"warning: {records} records of session {sid} could not be written{audit} (the "
        f"data dir is full or failing); the recording says which events are missing "
        f"(esr verify {sid})"
    )
    return status or 1


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
        except DaemonUnavailable:
            reply = None
        if reply is not None and not reply.ok:
            raise SessionError(reply.error)
    except BaseException:
        _kill(pid)
        raise
    if reply is None:
        return _record(config, pid, release, request)
    # Before the sid is printed: whoever reads it may signal us.
    for sig in FORWARDED:
        signal.signal(sig, lambda sig, _frame: os.kill(pid, sig))
    for sig in IGNORED:
        signal.signal(sig, lambda *_: None)
    note = " (inside an already recorded session)" if reply.nested else " by the esr daemon"
    _say(f"recording session {reply.sid}{note}")
    _release(release)
    status = _wait(pid)
    if not reply.nested:
        try:
            closed = control.request(
                config.control_socket, control.Close(sid=reply.sid), timeout=10
            )
            if not closed.ok:
                _say(f"warning: {closed.error}")
            elif closed.remaining:
                _say(
                    f"{argv[0]} exited; the daemon keeps recording the {closed.remaining} "
                    "tasks it left running"
                )
            status = _not_written(reply.sid, closed.unwritten, status)
        except control.ControlError as err:
            _say(f"warning: {err}")
    return status


def _wait(pid: int) -> int:
    """pid's exit status, however many signals arrive meanwhile."""
    pidfd = os.pidfd_open(pid)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(pidfd, selectors.EVENT_READ)
            while not selector.select():
                pass
    finally:
        os.close(pidfd)
    return _exit_code(os.waitpid(pid, 0)[1])


def _record(config: Config, pid: int, release: int, request: control.Open) -> int:
    """No daemon: load the programs here, and record until the command and
    every task it left running have exited (or an interrupt after it exited)."""
    try:
        recorder = Recorder(config, loader.load(config), DataDir(config.data_dir))
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
    loop = RecordingLoop(recorder)
    over = asyncio.Event()
    status: list[int] = []

    def command_exited() -> None:
        loop.loop.remove_reader(pidfd)
        os.close(pidfd)
        status.append(_exit_code(os.waitpid(pid, 0)[1]))
        # The session can end (its last task exited) before the pidfd says so.
        if session.sid in recorder.registry.by_sid:
            remaining = recorder.leave(session)
            if remaining:
                _say(
                    f"{os.fsdecode(request.command[0])} exited; recording {remaining} tasks "
                    "it left running (interrupt to stop)"
                )
        session_over()

    def session_over() -> None:
        if status and session.sid not in recorder.registry.by_sid:
            over.set()

    def interrupted(sig: int) -> None:
        if not status:
            if sig in FORWARDED:
                os.kill(pid, sig)
        elif session.sid in recorder.registry.by_sid:
            recorder.end(session, "recorder stopped")
            over.set()

    for sig in FORWARDED + IGNORED:
        loop.loop.add_signal_handler(sig, interrupted, sig)
    loop.after_flush(session_over)
    _say(f"recording session {session.sid}")
    _release(release)
    pidfd = os.pidfd_open(pid)
    loop.loop.add_reader(pidfd, command_exited)
    try:
        loop.run(over.wait())
    finally:
        recorder.close()
        loop.close()
    return _not_written(
        session.sid,
        sum(session.unwritten),
        status[0] if status else 1,
        recorder.audit_unwritten,
    )
