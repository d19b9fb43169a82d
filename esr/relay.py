"""The pty `esr run` gives its command when run on a terminal, the way
script(1) does: the command gets a terminal of its own, and esr relays it
to the user's. What esr reads from the pty's master is the session's
terminal stream, recorded in the kernel like sshd's (terminal.bpf.c).

The user's terminal is put in raw mode meanwhile, so that every key reaches
the command (^C included) and the command's terminal does the line editing;
its size is passed on at start and at every SIGWINCH.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import signal
import termios
import tty

# A master read returns at most a few KiB; ask for more in one go anyway.
READ_SIZE = 65536
# After the command exits, what it wrote is still read out of the pty, but
# not for longer than this: processes it left running may hold it open.
DRAIN_SECONDS = 0.5


class Pty:
    """The command's pty, made to the measure of the user's terminal (fd)."""

    def __init__(self, fd: int = 0):
        self.fd = fd
        self.master, self.slave = os.openpty()
        os.set_inheritable(self.slave, False)
        self.copy_size()
        self._saved: list | None = None

    def copy_size(self) -> None:
        size = fcntl.ioctl(self.fd, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)

    def child(self) -> None:
        """In the forked command: the pty becomes its controlling terminal."""
        os.setsid()
        fcntl.ioctl(self.slave, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(self.slave, fd)
        os.close(self.slave)
        os.close(self.master)

    def parent(self) -> None:
        """In esr, once the command is forked: the slave is the command's."""
        os.close(self.slave)

    def raw(self) -> None:
        self._saved = termios.tcgetattr(self.fd)
        tty.setraw(self.fd, termios.TCSANOW)

    def restore(self) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def close(self) -> None:
        self.restore()
        os.close(self.master)


class Relay:
    """Copies the user's keys to the pty and the pty's output to the user,
    on an asyncio loop, until the command has exited and its output is
    read."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pty: Pty, out: int = 1):
        self.loop = loop
        self.pty = pty
        self.out = out
        self.pending = b""  # keys the pty could not take yet
        self.done = loop.create_future()
        self._drain_timer: asyncio.TimerHandle | None = None
        os.set_blocking(pty.master, False)

    def start(self) -> None:
        self.pty.raw()
        self.loop.add_reader(self.pty.fd, self._keys)
        self.loop.add_reader(self.pty.master, self._output)
        self.loop.add_signal_handler(signal.SIGWINCH, self.pty.copy_size)

    def command_exited(self) -> None:
        """Read what is left, then stop."""
        self.loop.remove_reader(self.pty.fd)
        self._drain_timer = self.loop.call_later(DRAIN_SECONDS, self._stop)

    def _keys(self) -> None:
        data = os.read(self.pty.fd, READ_SIZE)
        if not data:
            self.loop.remove_reader(self.pty.fd)
            return
        self.pending += data
        self._write_keys()

    def _write_keys(self) -> None:
        try:
            n = os.write(self.pty.master, self.pending)
        except BlockingIOError:
            n = 0
        self.pending = self.pending[n:]
        if self.pending:
            self.loop.add_writer(self.pty.master, self._write_keys)
        else:
            self.loop.remove_writer(self.pty.master)

    def _output(self) -> None:
        try:
            data = os.read(self.pty.master, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as err:
            if err.errno != errno.EIO:  # every slave fd closed: nothing more to read
                raise
            data = b""
        if not data:
            self._stop()
            return
        view = memoryview(data)
        while view:  # the user's terminal sets the pace
            try:
                view = view[os.write(self.out, view) :]
            except BlockingIOError:
                pass

    def _stop(self) -> None:
        if self.done.done():
            return
        for fd in (self.pty.fd, self.pty.master):
            self.loop.remove_reader(fd)
        self.loop.remove_writer(self.pty.master)
        self.loop.remove_signal_handler(signal.SIGWINCH)
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self.pty.restore()
        self.done.set_result(None)
