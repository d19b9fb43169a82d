"""`esr run -- CMD`: record CMD and everything it starts as one session.

The command is forked, held on a pipe until its pid is tracked in the
kernel, then released to exec: its first exec is already recorded. A
running daemon records the session; without one, this process does.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import sys

from esr import control, loader
from esr.config import Config
from esr.datadir import DataDir
from esr.errors import DaemonUnavailable, SessionError, one_line
from esr.loop import RecordingLoop
from esr.pam import audit_id
from esr.recorder import Recorder
from esr.relay import Pty, Relay

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


def _spawn_held(argv: list[str], pty: Pty | None) -> tuple[int, int]:
    """Fork argv (on the pty, if any), held before exec until a byte arrives
    on the returned fd."""
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(release_w)
            if pty is not None:
                pty.child()
            if os.read(release_r, 1) != b"x":
                os._exit(1)
            os.close(release_r)
            os.execvpe(argv[0], argv, _users_environment())
        except OSError as err:
            os.write(2, f"esr: {one_line(f'cannot run {argv[0]}: {err.strerror}')}\n".encode())
            os._exit(127 if isinstance(err, FileNotFoundError) else 126)
        finally:
            os._exit(127)
    os.close(release_r)
    if pty is not None:
        pty.parent()
    return pid, release_w


def _users_environment() -> dict[str, str]:
    """The environment esr was started with. The single binary's loader
    points LD_LIBRARY_PATH at esr's own libraries, which are not the
    command's to use, and keeps the user's own in LD_LIBRARY_PATH_ORIG."""
    env = dict(os.environ)
    if getattr(sys, "frozen", False):
        env.pop("LD_LIBRARY_PATH", None)
        if "LD_LIBRARY_PATH_ORIG" in env:
            env["LD_LIBRARY_PATH"] = env.pop("LD_LIBRARY_PATH_ORIG")
    return env


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
    pty = Pty() if os.isatty(0) else None
    pid, release = _spawn_held(argv, pty)
    try:
        request = control.Open(
            login=login,
            user=user,
            seed_pid=pid,
            sid=sid,
            command=[os.fsencode(a) for a in argv],
            tty=os.ttyname(0) if pty is not None else "",
            interactive=pty is not None,
            terminal_pid=os.getpid() if pty is not None else 0,
            # The command's processes inherit this one's.
            audit_sessionid=audit_id("sessionid"),
        )
        try:
            reply = control.request(config.control_socket, request, timeout=10)
        except DaemonUnavailable:
            reply = None
        if reply is not None and not reply.ok:
            raise SessionError(reply.error)
    except BaseException:
        _kill(pid)
        if pty is not None:
            pty.close()
        raise
    if reply is None:
        return _record(config, pid, release, request, pty)
    loop = asyncio.new_event_loop()
    # Before the sid is printed: whoever reads it may signal us.
    command = Command(loop, pid, pty)
    note = " (inside an already recorded session)" if reply.nested else " by the esr daemon"
    _say(f"recording session {reply.sid}{note}")
    _release(release)
    try:
        status = loop.run_until_complete(command.finished())
    finally:
        command.close()
        loop.close()
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


class Command:
    """The command esr run runs, followed on an asyncio loop: its exit
    status, the signals passed on to it, and its pty relayed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pid: int, pty: Pty | None):
        self.loop = loop
        self.pid = pid
        self.pty = pty
        self.status: int | None = None
        self.exited = loop.create_future()
        # A signal once the command has exited: stop waiting for what it left.
        self.interrupted = loop.create_future()
        self.relay = Relay(loop, pty) if pty is not None else None
        for sig in FORWARDED + IGNORED:
            loop.add_signal_handler(sig, self._signal, sig)
        self.pidfd = os.pidfd_open(pid)
        loop.add_reader(self.pidfd, self._exited)
        if self.relay is not None:
            self.relay.start()

    def _signal(self, sig: int) -> None:
        if self.status is None:
            if sig in FORWARDED:
                os.kill(self.pid, sig)
        elif not self.interrupted.done():
            self.interrupted.set_result(sig)

    def _exited(self) -> None:
        self.loop.remove_reader(self.pidfd)
        self.status = _exit_code(os.waitpid(self.pid, 0)[1])
        if self.relay is not None:
            self.relay.command_exited()
        self.exited.set_result(self.status)

    async def finished(self) -> int:
        """The exit status, once the command has exited and its terminal
        output has been relayed."""
        status = await self.exited
        if self.relay is not None:
            await self.relay.done
        return status

    def close(self) -> None:
        for sig in FORWARDED + IGNORED:
            self.loop.remove_signal_handler(sig)
        if self.status is None:
            self.loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        if self.pty is not None:
            self.pty.close()


def _record(config: Config, pid: int, release: int, request: control.Open, pty: Pty | None) -> int:
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
            terminal_pid=request.terminal_pid,
            sid=request.sid,
            command=request.command,
            tty=request.tty,
            interactive=request.interactive,
            audit_sessionid=request.audit_sessionid,
        )
    except BaseException:
        _kill(pid)
        recorder.close()
        raise
    loop = RecordingLoop(recorder)
    command = Command(loop.loop, pid, pty)

    over = loop.loop.create_future()

    def check_over() -> None:
        if session.sid not in recorder.registry.by_sid and not over.done():
            over.set_result(None)

    async def record() -> int:
        status = await command.finished()
        # The session can end (its last task exited) before the command is reaped.
        remaining = recorder.leave(session) if session.sid in recorder.registry.by_sid else 0
        if remaining:
            _say(
                f"{os.fsdecode(request.command[0])} exited; recording {remaining} tasks "
                "it left running (interrupt to stop)"
            )
            loop.after_flush(check_over)
            await asyncio.wait([over, command.interrupted], return_when=asyncio.FIRST_COMPLETED)
            if session.sid in recorder.registry.by_sid:
                recorder.end(session, "recorder stopped")
        return status

    _say(f"recording session {session.sid}")
    _release(release)
    try:
        status = loop.run(record())
    finally:
        command.close()
        recorder.close()
        loop.close()
    return _not_written(session.sid, sum(session.unwritten), status, recorder.audit_unwritten)
