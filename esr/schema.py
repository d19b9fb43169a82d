"""The schema of everything esr records, and its two wire formats.

Each event type is one Struct here, and the Struct is all there is to know
about it in Python: its fields, its tag in the recordings, its name and
code in the audit log, its JSON fields and its line in `esr show --format
text`. Records made by the kernel are tagged with their type in
bpf/esr_events.h and name the buffer they come from.

Recordings hold the Structs as msgpack arrays tagged with a small integer
(compact, and fast to encode in bulk). The audit log and `esr show --format
json` render them as Teleport-style JSON objects through `AuditFormat`.

Paths, argv and program names are bytes, exactly as the kernel saw them, and
the recordings keep them so. In JSON they become strict UTF-8 strings, every
control character and non-ASCII character escaped so that none reaches a
terminal raw; bytes that are not UTF-8 become U+FFFD there, and a `_base64`
field beside holds the exact bytes.
"""

from __future__ import annotations

import base64
import json
import shlex
import time as _time
import uuid
from typing import ClassVar

import msgspec


def text(raw: bytes) -> str:
    """Bytes as a str that round-trips: invalid UTF-8 becomes lone surrogates."""
    return raw.decode("utf-8", "surrogateescape")


def put_text(out: dict, key: str, raw: bytes | list[bytes]) -> None:
    """out[key] = raw as text (a list of texts for a list). Strict JSON
    parsers refuse a line with invalid UTF-8 or a lone surrogate in it, so a
    byte that is not UTF-8 becomes U+FFFD, as in Teleport's Go, and
    out[key + "_base64"] then holds the exact bytes."""
    try:
        out[key] = raw.decode() if isinstance(raw, bytes) else [a.decode() for a in raw]
    except UnicodeDecodeError:
        if isinstance(raw, bytes):
            out[key] = raw.decode(errors="replace")
            out[key + "_base64"] = base64.b64encode(raw).decode()
        else:
            out[key] = [a.decode(errors="replace") for a in raw]
            out[key + "_base64"] = [base64.b64encode(a).decode() for a in raw]


def printable(raw: bytes) -> str:
    """Bytes for a terminal, shell-quoted: anything not printable is escaped,
    so recorded escape sequences can't act on the reviewer's terminal."""
    out = []
    for ch in raw.decode("utf-8", "surrogateescape"):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}")
    return shlex.quote("".join(out))


# The kernel's audit session id of a process no login gave one.
AUDIT_SID_UNSET = 0xFFFFFFFF


def printable_str(value: str) -> str:
    """printable() for text: login names, addresses, ttys, reasons."""
    return printable(value.encode("utf-8", "surrogateescape"))


class Identity(msgspec.Struct, frozen=True):
    """What the JSON events of a session take from its start."""

    sid: str
    server_id: str
    server_hostname: str
    login: str
    user: str
    started: int  # ns since the epoch
    audit_session_id: int
    cluster_name: str
    server_version: str

    @classmethod
    def of(cls, start: SessionStart) -> Identity:
        return cls(
            start.sid,
            start.server_id,
            start.server_hostname,
            start.login,
            start.user,
            start.time,
            AUDIT_SID_UNSET if start.audit_sessionid is None else start.audit_sessionid,
            start.cluster_name,
            start.server_version,
        )


class Event(msgspec.Struct, array_like=True, gc=False):
    """What every event has: its index in the session, and when it happened."""

    ei: int
    time: int  # ns since the epoch

    name: ClassVar[str]  # the audit log's "event"
    code: ClassVar[str]  # and "code"
    # What the audit log shortens, in this order, when the line would be
    # longer than MAX_LINE: (attribute, JSON name) of bytes or lists of them.
    cuttable: ClassVar[tuple[tuple[str, str], ...]] = ()

    def fields(self, identity: Identity) -> dict:
        """The JSON fields besides the ones every event has."""
        raise NotImplementedError

    def describe(self) -> str:
        """The text view, after the time, index and name."""
        raise NotImplementedError


class Record(Event):
    """An event made by the BPF programs. Its msgspec tag is its type in
    bpf/esr_events.h (enum esr_event_type)."""

    buffer: ClassVar[str]  # the perf buffer it comes from (esr_events.h ESR_BUFFERS)
    audited: ClassVar[bool]  # in the JSON audit log by default


# --- records made in the kernel ------------------------------------------------------


class Command(Record, tag=1):
    pid: int
    ppid: int
    cgroup_id: int
    program: bytes
    path: bytes
    argv: list[bytes]  # after argv[0]
    return_code: int
    unix_uid: int
    unix_gid: int
    has_tty: bool = False  # ran with a controlling terminal
    argv_truncated: bool = False
    argv_cut_args: int = 0
    argv_cut_bytes: int = 0
    # A script's interpreter, as the kernel found it in its #! line (and its
    # argument): it runs the script, argv is what the script's caller passed.
    interpreter: list[bytes] = []
    # The binary that runs, as the kernel found it: the target of a symlink,
    # a script's interpreter; a memfd's name for a memfd.
    exe: bytes = b""
    exe_dev: int = 0  # as the kernel encodes it: major << 20 | minor
    exe_ino: int = 0
    memfd: bool = False
    # Deeper or longer than the kernel side keeps: exe is its tail after "...".
    exe_truncated: bool = False

    name = "session.command"
    code = "T4000I"
    cuttable = (("argv", "argv"), ("path", "path"))
    buffer = "command"
    audited = True

    def fields(self, identity: Identity) -> dict:
        out = {"pid": self.pid, "ppid": self.ppid, "cgroup_id": self.cgroup_id}
        put_text(out, "program", self.program)
        put_text(out, "path", self.path)
        put_text(out, "argv", self.argv)
        out.update(return_code=self.return_code, unix_uid=self.unix_uid, unix_gid=self.unix_gid)
        if self.interpreter:
            put_text(out, "interpreter", self.interpreter)
        if self.exe:
            put_text(out, "exe", self.exe)
            out.update(exe_dev=self.exe_dev, exe_ino=self.exe_ino)
            if self.memfd:
                out["memfd"] = True
            if self.exe_truncated:
                out["exe_truncated"] = True
        if self.argv_truncated:
            out.update(
                argv_truncated=True,
                argv_cut_args=self.argv_cut_args,
                argv_cut_bytes=self.argv_cut_bytes,
            )
        return out

    def describe(self) -> str:
        argv = " ".join(printable(a) for a in self.argv)
        cut = (
            f" [argv truncated: {self.argv_cut_args} args, {self.argv_cut_bytes} bytes cut]"
            if self.argv_truncated
            else ""
        )
        runs = ""
        if self.interpreter:
            runs = f" [run by {' '.join(printable(a) for a in self.interpreter)}]"
        elif self.memfd:
            runs = f" [memfd {printable(self.exe)}]"
        elif self.exe and self.exe != self.path:
            runs = f" [{printable(self.exe)}]"
        return (
            f"pid={self.pid} ppid={self.ppid} uid={self.unix_uid} rc={self.return_code} "
            f"{printable(self.path)} {argv}{cut}{runs}"
        )


class Disk(Record, tag=2):
    pid: int
    cgroup_id: int
    program: bytes
    path: bytes
    flags: int
    return_code: int
    path_truncated: bool = False

    name = "session.disk"
    code = "T4001I"
    cuttable = (("path", "path"),)
    buffer = "disk"
    # They outnumber everything else by orders of magnitude: in the audit
    # log only with audit_disk_events, as Teleport's default role.
    audited = False

    def fields(self, identity: Identity) -> dict:
        out = {"pid": self.pid, "cgroup_id": self.cgroup_id}
        put_text(out, "program", self.program)
        put_text(out, "path", self.path)
        out.update(flags=self.flags, return_code=self.return_code)
        if self.path_truncated:
            out["path_truncated"] = True
        return out

    def describe(self) -> str:
        return (
            f"pid={self.pid} {printable(self.program)} flags={self.flags:#o} "
            f"rc={self.return_code} {printable(self.path)}"
        )


_V4_MAPPED = "::ffff:"  # how inet_ntop writes an IPv4-mapped IPv6 address


class Network(Record, tag=3):
    pid: int
    cgroup_id: int
    program: bytes
    version: int
    src_addr: str
    src_port: int
    dst_addr: str
    dst_port: int
    return_code: int
    operation: int = 0  # connect
    action: int = 0  # observed

    name = "session.network"
    code = "T4002I"
    buffer = "network"
    audited = True

    def fields(self, identity: Identity) -> dict:
        src, dst, version = self.src_addr, self.dst_addr, self.version
        if version == 6 and dst.startswith(_V4_MAPPED) and "." in dst:
            # An AF_INET6 socket connecting to an IPv4 address: IPv4 on the
            # wire, and in Teleport's log.
            src = src[len(_V4_MAPPED) :] if src.startswith(_V4_MAPPED) else "0.0.0.0"
            dst, version = dst[len(_V4_MAPPED) :], 4
        out: dict = {"pid": self.pid, "cgroup_id": self.cgroup_id}
        put_text(out, "program", self.program)
        out.update(
            src_addr=src,
            src_port=self.src_port,
            dst_addr=dst,
            dst_port=self.dst_port,
            version=version,
            operation=self.operation,
            action=self.action,
            return_code=self.return_code,
        )
        return out

    def describe(self) -> str:
        src = f"[{self.src_addr}]" if self.version == 6 else self.src_addr
        dst = f"[{self.dst_addr}]" if self.version == 6 else self.dst_addr
        return (
            f"pid={self.pid} {printable(self.program)} {src}:{self.src_port} -> "
            f"{dst}:{self.dst_port} rc={self.return_code}"
        )


class Ptrace(Record, tag=9):
    """A session process reached into another one: attached to it with
    ptrace (as a debugger does, to read or change it), detached, or wrote
    its memory with process_vm_writev."""

    pid: int
    cgroup_id: int
    program: bytes
    request: str  # "attach", "seize", "detach" or "process_vm_writev"
    target_pid: int  # the thread attached to or detached from, or the process written
    target_tgid: int  # its process, after an attach; else 0
    target_program: bytes  # its name, after an attach; else b""
    return_code: int  # 0 or -errno; bytes written for process_vm_writev
    followed: bool = False  # the target is recorded in this session from now on
    left: bool = False  # the detach took it out of this session again
    # target_pid is the number the caller passed, in its own pid namespace.
    pid_as_named: bool = False

    name = "session.ptrace"
    code = "E4400W"
    buffer = "command"
    audited = True

    def fields(self, identity: Identity) -> dict:
        out: dict = {"pid": self.pid, "cgroup_id": self.cgroup_id}
        put_text(out, "program", self.program)
        out.update(request=self.request, target_pid=self.target_pid)
        if self.target_tgid:
            out["target_tgid"] = self.target_tgid
        if self.target_program:
            put_text(out, "target_program", self.target_program)
        out["return_code"] = self.return_code
        if self.followed:
            out["followed"] = True
        if self.left:
            out["left"] = True
        if self.pid_as_named:
            out["pid_as_named"] = True
        return out

    def action(self) -> str:
        """What was done to whom, without who did it."""
        target = f"{self.target_pid}"
        if self.target_program:
            target += f" ({printable(self.target_program)})"
        then = ""
        if self.followed:
            then = " [now recorded here]"
        elif self.left:
            then = " [left the session]"
        return f"{self.request} {target} rc={self.return_code}{then}"

    def describe(self) -> str:
        return f"pid={self.pid} {printable(self.program)} {self.action()}"


# enum io_uring_op, by value (include/uapi/linux/io_uring.h); a newer
# kernel's opcodes beyond it are named by number.
IO_URING_OPERATIONS: tuple[str, ...] = (
    "nop", "readv", "writev", "fsync", "read_fixed", "write_fixed", "poll_add", "poll_remove",
    "sync_file_range", "sendmsg", "recvmsg", "timeout", "timeout_remove", "accept",
    "async_cancel", "link_timeout", "connect", "fallocate", "openat", "close", "files_update",
    "statx", "read", "write", "fadvise", "madvise", "send", "recv", "openat2", "epoll_ctl",
    "splice", "provide_buffers", "remove_buffers", "tee", "shutdown", "renameat", "unlinkat",
    "mkdirat", "symlinkat", "linkat", "msg_ring", "fsetxattr", "setxattr", "fgetxattr",
    "getxattr", "socket", "uring_cmd", "send_zc", "sendmsg_zc", "read_multishot", "waitid",
    "futex_wait", "futex_wake", "futex_waitv", "fixed_fd_install", "ftruncate", "bind", "listen",
    "recv_zc", "epoll_wait", "readv_fixed", "writev_fixed", "pipe",
)  # fmt: skip


def io_uring_operation(opcode: int) -> str:
    if opcode < len(IO_URING_OPERATIONS):
        return IO_URING_OPERATIONS[opcode]
    return f"opcode_{opcode}"


class IoUring(Record, tag=15):
    """A session process set up an io_uring, or one of its rings took a kind
    of operation for the first time. What the operations act on (the files
    an openat opens, the addresses a connect reaches) is not recorded: they
    bypass the syscalls the other records come from."""

    pid: int  # the process that set the ring up, or submitted to it
    cgroup_id: int
    program: bytes
    operation: str  # "setup", or the kind submitted ("openat", "connect", ...)
    opcode: int  # IORING_OP_*; 0 for setup
    ring_fd: int  # the ring, as io_uring_setup returned it to...
    ring_pid: int  # ...this process
    sq_entries: int = 0  # setup: the ring's size
    setup_flags: int = 0  # setup: IORING_SETUP_*

    name = "session.io_uring"
    code = "E4401I"
    buffer = "command"
    audited = True

    def fields(self, identity: Identity) -> dict:
        out: dict = {"pid": self.pid, "cgroup_id": self.cgroup_id}
        put_text(out, "program", self.program)
        out.update(operation=self.operation, ring_fd=self.ring_fd, ring_pid=self.ring_pid)
        if self.operation == "setup":
            out.update(sq_entries=self.sq_entries, setup_flags=self.setup_flags)
        else:
            out["opcode"] = self.opcode
        return out

    def describe(self) -> str:
        ring = f"ring fd {self.ring_fd} of pid {self.ring_pid}"
        if self.operation == "setup":
            return f"pid={self.pid} {printable(self.program)} io_uring setup: {ring}"
        return f"pid={self.pid} {printable(self.program)} io_uring {self.operation} on {ring}"


class TerminalOutput(Record, tag=5):
    """What the terminal showed: bytes the pty master's owner read from it,
    echo included."""

    pid: int
    tty: int  # /dev/pts/<tty>
    data: bytes
    skipped: int  # output bytes the budget left out of the session so far

    name = "terminal.output"
    code = "E4200I"
    buffer = "terminal"
    audited = False  # the audit log only counts terminal bytes, in session.end

    def fields(self, identity: Identity) -> dict:
        return {"pid": self.pid, "tty": self.tty, "data": text(self.data), "skipped": self.skipped}

    def describe(self) -> str:
        return f"pid={self.pid} pts/{self.tty} {printable(self.data)}"


class TerminalInput(Record, tag=6):
    """Keystrokes: bytes the pty master's owner wrote to it, recorded only
    with terminal.record_input and while the terminal echoes them."""

    pid: int
    tty: int
    data: bytes

    name = "terminal.input"
    code = "E4201I"
    buffer = "terminal"
    audited = False

    def fields(self, identity: Identity) -> dict:
        return {"pid": self.pid, "tty": self.tty, "data": text(self.data)}

    def describe(self) -> str:
        return f"pid={self.pid} pts/{self.tty} {printable(self.data)}"


class TerminalWrite(Record, tag=7):
    """A session process wrote to a terminal: who printed what (the bytes
    themselves are in the output stream)."""

    pid: int
    program: bytes
    tty: int
    major: int  # the terminal driver's: 136..143 for a pty
    written: int  # bytes

    name = "terminal.write"
    code = "E4202I"
    buffer = "terminal"
    audited = False

    def fields(self, identity: Identity) -> dict:
        return {
            "pid": self.pid,
            "program": text(self.program),
            "tty": self.tty,
            "major": self.major,
            "bytes": self.written,
        }

    def describe(self) -> str:
        return (
            f"pid={self.pid} {printable(self.program)} wrote {self.written} bytes to tty {self.tty}"
        )


class TerminalResize(Record, tag=8):
    """The terminal's size, when first seen and at every change."""

    tty: int
    rows: int
    cols: int

    name = "terminal.resize"
    code = "E4203I"
    buffer = "terminal"
    audited = False

    def fields(self, identity: Identity) -> dict:
        return {"tty": self.tty, "rows": self.rows, "cols": self.cols}

    def describe(self) -> str:
        return f"pts/{self.tty} {self.cols}x{self.rows}"


# --- events of the recorder's own ----------------------------------------------------


class Lost(Event, tag=14):
    """Records lost since the previous report, per buffer
    (esr._fast.decode.BUFFERS order): those the kernel could not deliver, or,
    with a reason, those the recorder could not write (events missing[0]
    to missing[1] of the session)."""

    lost: list[int]
    untracked_forks: int = 0
    reason: str = ""  # "disk_full" or "write_error"; "" for the kernel's losses
    missing: list[int] = []

    name = "session.lost"
    code = "E4100W"

    def fields(self, identity: Identity) -> dict:
        out: dict = {"lost": by_buffer(self.lost)}
        if self.untracked_forks:
            out["untracked_forks"] = self.untracked_forks
        if self.reason:
            out["reason"] = self.reason
            out["missing"] = {"first_ei": self.missing[0], "last_ei": self.missing[1]}
        return out

    def describe(self) -> str:
        lost = " ".join(f"{k}={v}" for k, v in by_buffer(self.lost).items())
        forks = f" untracked_forks={self.untracked_forks}" if self.untracked_forks else ""
        if self.reason:
            first, last = self.missing
            return (
                f"NOT WRITTEN ({printable_str(self.reason)}) events {first}..{last}, records {lost}"
            )
        return f"LOST {lost}{forks}"


class Resume(Event, tag=17):
    """A recorder took the session over from the one before it, which was
    restarted, upgraded or crashed: the same recording goes on. Its time is
    when this recorder began to read (the end of the gap). The kernel
    followed the session all along and its records of the gap follow;
    what it could not deliver meanwhile, and what the previous recorder
    read and never wrote (a crash), is counted here."""

    stopped: int  # ns since the epoch: the previous recorder's last flush
    cause: str  # "restart": it handed over; "crash": it did not
    programs: str  # "kept" attached, or "replaced" by this recorder's
    previous_version: str
    version: str
    lost: list[int]  # per buffer, since the last report, for any reason
    unwritten: list[int]  # per buffer, of lost: read by the previous recorder, never written
    untracked_forks: int  # in the session so far, as the kernel counts them

    name = "session.resume"
    code = "E4101W"

    def fields(self, identity: Identity) -> dict:
        out: dict = {
            "stopped": rfc3339(self.stopped),
            "gap_ms": max(self.time - self.stopped, 0) // 1_000_000,
            "cause": self.cause,
            "programs": self.programs,
            "previous_version": self.previous_version,
            "lost": by_buffer(self.lost),
        }
        if any(self.unwritten):
            out["unwritten"] = by_buffer(self.unwritten)
        if self.untracked_forks:
            out["untracked_forks"] = self.untracked_forks
        return out

    def describe(self) -> str:
        gap = max(self.time - self.stopped, 0) / 1e9
        lost = " ".join(f"{k}={v}" for k, v in by_buffer(self.lost).items())
        unwritten = f" not_written={sum(self.unwritten)}" if any(self.unwritten) else ""
        return (
            f"RESUMED after {gap:.3f} s ({printable_str(self.cause)}, programs "
            f"{printable_str(self.programs)}, esr {printable_str(self.previous_version)} -> "
            f"{printable_str(self.version)}) lost {lost}{unwritten}"
        )


class SessionStart(Event, tag=10):
    sid: str
    server_id: str
    server_hostname: str
    login: str
    user: str
    remote_addr: str = ""
    service: str = ""
    tty: str = ""
    command: list[bytes] = []  # what `esr run` was asked to run
    seed_pid: int = 0
    audit_sessionid: int | None = None
    loginuid: int | None = None
    # What a recorder taking the session over after a crash needs to know.
    enhanced_recording: bool = True
    interactive: bool = False  # started on a terminal
    cluster_name: str = ""
    server_version: str = ""  # esr's

    name = "session.start"
    code = "T2000I"
    cuttable = (("command", "initial_command"),)

    def fields(self, identity: Identity) -> dict:
        out: dict = {"addr.remote": self.remote_addr, "service": self.service, "tty": self.tty}
        put_text(out, "initial_command", self.command)
        out["seed_pid"] = self.seed_pid
        if self.loginuid is not None:
            out["loginuid"] = self.loginuid
        return out

    def describe(self) -> str:
        return (
            f"sid={printable_str(self.sid)} login={printable_str(self.login)} "
            f"user={printable_str(self.user)} "
            f"remote={printable_str(self.remote_addr) if self.remote_addr else '-'} "
            f"service={printable_str(self.service) if self.service else '-'} "
            f"tty={printable_str(self.tty) if self.tty else '-'}"
        )


class SessionLeave(Event, tag=11):
    """The session's leader is gone while some of its processes still run."""

    live_tasks: int

    name = "session.leave"
    code = "T2003I"

    def fields(self, identity: Identity) -> dict:
        return {"live_tasks": self.live_tasks}

    def describe(self) -> str:
        return f"leader gone, {self.live_tasks} tasks still running"


class TerminalBytes(msgspec.Struct, array_like=True, gc=False):
    """A session's terminal, in bytes: its programs' output is recorded +
    skipped (beyond the budget) + lost (the buffer was full)."""

    recorded: int = 0
    skipped: int = 0
    lost: int = 0
    input: int = 0  # keystrokes recorded


class SessionEnd(Event, tag=13):
    reason: str  # "exited" or "recorder stopped"
    enhanced_recording: bool
    interactive: bool
    records: list[int]  # per buffer, in the recording
    lost: list[int]  # per buffer, for any reason
    untracked_forks: int
    terminal: TerminalBytes = msgspec.field(default_factory=TerminalBytes)
    unwritten: list[int] = []  # per buffer, of lost: those the recorder could not write

    name = "session.end"
    code = "T2004I"

    def fields(self, identity: Identity) -> dict:
        return {
            "enhanced_recording": self.enhanced_recording,
            "interactive": self.interactive,
            "participants": [identity.user],
            # Teleport's list of recordings takes a session's duration from these.
            "session_start": rfc3339(identity.started),
            "session_stop": rfc3339(self.time),
            "reason": self.reason,
            "events": by_buffer(self.records),
            "lost": by_buffer(self.lost),
            "untracked_forks": self.untracked_forks,
            "terminal": {f"{k}_bytes": v for k, v in msgspec.structs.asdict(self.terminal).items()},
        } | ({"unwritten": by_buffer(self.unwritten)} if any(self.unwritten) else {})

    def describe(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in by_buffer(self.records).items())
        unwritten = f" not_written={sum(self.unwritten)}" if any(self.unwritten) else ""
        return f"reason={printable_str(self.reason)} {counts} lost={sum(self.lost)}{unwritten}"


# --- version 1 recordings (esr 0.1), counted three buffers by name -------------------


class LostV1(Event, tag=4):
    command: int
    disk: int
    network: int
    untracked_forks: int = 0


class SessionEndV1(Event, tag=12):
    reason: str
    enhanced_recording: bool
    interactive: bool
    commands: int
    disks: int
    networks: int
    lost_command: int
    lost_disk: int
    lost_network: int
    untracked_forks: int


def upgrade_v1(event: Event) -> Event:
    """An event of a version 1 recording, as this version records it."""
    if type(event) is LostV1:
        return Lost(
            event.ei, event.time, [event.command, event.disk, event.network], event.untracked_forks
        )
    if type(event) is SessionEndV1:
        return SessionEnd(
            event.ei,
            event.time,
            event.reason,
            event.enhanced_recording,
            event.interactive,
            [event.commands, event.disks, event.networks],
            [event.lost_command, event.lost_disk, event.lost_network],
            event.untracked_forks,
        )
    return event


Events = (
    Command
    | Disk
    | Network
    | TerminalOutput
    | TerminalInput
    | TerminalWrite
    | TerminalResize
    | Ptrace
    | IoUring
    | Lost
    | Resume
    | SessionStart
    | SessionLeave
    | SessionEnd
    | LostV1
    | SessionEndV1
)
RECORDS: tuple[type[Record], ...] = (
    Command,
    Disk,
    Network,
    TerminalOutput,
    TerminalInput,
    TerminalWrite,
    TerminalResize,
    Ptrace,
    IoUring,
)
# The buffers in index order, as bpf/esr_events.h names them (esr._fast.decode
# refuses to load if the two disagree).
BUFFERS: tuple[str, ...] = tuple(dict.fromkeys(r.buffer for r in RECORDS))


# What a session can lose, as its frame headers count it: each buffer's
# records, then the processes it could not follow (forks beyond its share
# of the task table, which session.lost reports as untracked_forks).
LOST_KINDS: tuple[str, ...] = (*BUFFERS, "processes")


def by_buffer(counts: list[int]) -> dict[str, int]:
    """Counts by buffer name; a buffer a recording predates counted 0."""
    return {name: counts[i] if i < len(counts) else 0 for i, name in enumerate(BUFFERS)}


def by_lost_kind(counts: list[int]) -> dict[str, int]:
    """Losses by LOST_KINDS name; a kind a recording predates counted 0."""
    return {name: counts[i] if i < len(counts) else 0 for i, name in enumerate(LOST_KINDS)}


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[Events])


def encode_events_into(events: list, buffer: bytearray) -> None:
    _encoder.encode_into(events, buffer)


def encode_event(event: Event) -> bytes:
    """One event's msgpack: a list of events is its items after the list's header."""
    return _encoder.encode(event)


def decode_events(payload: bytes) -> list:
    return _decoder.decode(payload)


# --- JSON rendering (audit log and `esr show`) ---------------------------------

_UID_NAMESPACE = uuid.UUID("6f1d3a52-8e0b-4c6a-9d1e-3b7c2a5e4f10")
_second = (-1, "")


def rfc3339(ns: int) -> str:
    """UTC, to the microsecond at most and without trailing zeros, as Go
    writes Teleport's times: Python's datetime and many SIEM parsers refuse
    more digits. Truncated, never rounded up: ei keeps the order, and the
    recordings the nanoseconds."""
    global _second
    seconds, frac = divmod(ns, 1_000_000_000)
    if _second[0] != seconds:  # events come in bursts within the same second
        _second = (seconds, _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(seconds)))
    micros = frac // 1000
    if not micros:
        return f"{_second[1]}Z"
    return f"{_second[1]}.{micros:06d}".rstrip("0") + "Z"


def _ascii_json(value) -> bytes:
    """JSON with every non-ASCII character and control character escaped:
    never a raw byte that could act on a terminal. msgspec does the common,
    all-ASCII case fast."""
    try:
        out = _json.encode(value)
        if out.isascii():
            return out
    except UnicodeEncodeError:
        pass
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii")


_json = msgspec.json.Encoder()

# Teleport's file log reader stops at the first line longer than 64 KiB
# (bufio.Scanner's limit), losing the rest of the day's file with it.
MAX_LINE = 65535  # bytes, the newline included


def _boundary(raw: bytes, n: int) -> int:
    """n, or up to 3 less, so that raw[:n] does not end within a UTF-8
    character: a cut never makes U+FFFD of valid text."""
    for i in range(n, max(n - 4, -1), -1):
        if i >= len(raw) or raw[i] & 0xC0 != 0x80:
            return i
    return n


def _keep(value: bytes | list[bytes], n: int) -> tuple[bytes | list[bytes], int, int]:
    """The first n bytes of value, arguments cut as the kernel cuts argv:
    whole ones (each with its NUL), then part of one. Returns them, and the
    arguments and bytes left out."""
    if isinstance(value, bytes):
        kept = value[: _boundary(value, n)]
        return kept, 0, len(value) - len(kept)
    args: list[bytes] = []
    left = n
    for arg in value:
        if len(arg) < left:
            args.append(arg)
            left -= len(arg) + 1
            continue
        part = arg[: _boundary(arg, left)]
        if part:
            args.append(part)
        left -= len(part)
        break
    return args, len(value) - len(args), sum(len(a) + 1 for a in value) - (n - left)


class AuditFormat:
    """Renders the events of one session as audit log lines (the reference's
    field names and codes)."""

    def __init__(self, identity: Identity):
        self.identity = identity
        # Event ids are the session's own id space: a UUID derived from the
        # sid, its last 48 bits replaced by the event index.
        self.uid_prefix = str(uuid.uuid5(_UID_NAMESPACE, identity.sid))[:24]
        common = {
            "sid": identity.sid,
            "namespace": "default",
            "server_id": identity.server_id,
            "server_hostname": identity.server_hostname,
            "login": identity.login,
            "user": identity.user,
            "audit_session_id": identity.audit_session_id,
        }
        # Recordings of esr 0.1 do not know them.
        if identity.cluster_name:
            common["cluster_name"] = identity.cluster_name
        if identity.server_version:
            common["server_version"] = identity.server_version
        self.common = _ascii_json(common)[1:-1]

    def line(self, event: Event, extra: dict | None = None) -> bytes:
        """extra: fields the event does not hold (the seal of session.end)."""
        line = self._render(event, event.fields(self.identity) | (extra or {}))
        return line if len(line) <= MAX_LINE else self._fit(event, line)

    def _render(self, event: Event, fields: dict) -> bytes:
        head = (
            f'{{"event":"{event.name}","code":"{event.code}","ei":{event.ei},'
            f'"uid":"{self.uid_prefix}{event.ei:012x}","time":"{rfc3339(event.time)}",'
        )
        return head.encode() + self.common + b"," + _ascii_json(fields)[1:] + b"\n"

    def _fit(self, event: Event, line: bytes) -> bytes:
        """The line of an event with as much of its cuttable fields, in
        order, as fits in MAX_LINE, saying what was cut as the kernel does
        (argv_truncated, argv_cut_args, argv_cut_bytes; path_truncated)."""
        cuts: dict[str, tuple[int, int]] = {}  # JSON name: arguments, bytes

        def cut(attr: str, key: str, whole: bytes | list[bytes], n: int):
            kept, args, nbytes = _keep(whole, n)
            return msgspec.structs.replace(event, **{attr: kept}), {**cuts, key: (args, nbytes)}

        for attr, key in event.cuttable:
            whole = getattr(event, attr)
            event, cuts = cut(attr, key, whole, 0)
            line = self._render_cut(event, cuts)
            if len(line) > MAX_LINE:
                continue  # all of it goes, and some of the next
            # The most of it that fits. Longer lines are longer but for a
            # few bytes (digits of the counts), so a bisection finds it.
            lo, hi = 0, len(whole) if isinstance(whole, bytes) else sum(len(a) + 1 for a in whole)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                attempt = self._render_cut(*cut(attr, key, whole, mid))
                if len(attempt) <= MAX_LINE:
                    lo, line = mid, attempt
                else:
                    hi = mid - 1
            break
        return line

    def _render_cut(self, event: Event, cuts: dict[str, tuple[int, int]]) -> bytes:
        fields = event.fields(self.identity)
        for key, (args, nbytes) in cuts.items():
            fields[f"{key}_truncated"] = True
            if isinstance(fields[key], list):
                fields[f"{key}_cut_args"] = fields.get(f"{key}_cut_args", 0) + args
                fields[f"{key}_cut_bytes"] = fields.get(f"{key}_cut_bytes", 0) + nbytes
        return self._render(event, fields)
