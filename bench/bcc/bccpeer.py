#!/usr/bin/python3
"""The bcc peer of `esr bench`: a session recorder written the way bcc tools
are written, to compare esr's consumer cost against.

    /usr/bin/python3 bench/bcc/bccpeer.py --pages C,D,N [--wakeup-events K] [--cpu N]
                                          [--headers auto|running|DIR]

It records what esr's BPF programs record (bpf/*.bpf.c), in bcc's C dialect
(bccpeer.c beside this file), compiled at run time by BPF(src_file=...):
TRACEPOINT_PROBEs, per-thread session membership in a BPF_HASH filled at
sched_process_fork and emptied at sched_process_exit; opens stashed at
sys_enter_* and emitted at sys_exit_*; successful execs at
sched_process_exec with argv from mm->arg_start..arg_end, failed ones at
sys_exit_execve(at) with argv read at entry; TCP connects at
sys_exit_connect (or, for a non-blocking connect, when the socket leaves
SYN_SENT). One BPF_PERF_OUTPUT per record type (command, disk, network),
each with its own page count, each read by a Python callback that decodes
with b[table].event(data) and touches the decoded fields.

The records are flattened copies of those in esr's shared bpf/esr_events.h,
which bccpeer.c includes and checks them against at compile time: a record
that drifted from it fails the build at start.

Protocol (stdin/stdout, one line each):
    -> ready                      compiled and attached
    <- track PID                  PID joins the session; CPU/RSS/counts reset
    -> tracking
    <- stop (or EOF)              drain every buffer, then
    -> {"records": {...}, "lost": {...}, "user_s": .., "sys_s": .., ...}
On failure to compile (no kernel headers, a record layout drift, ...): one
line {"error": ..., "headers": ...} and exit status 3.

Kernel headers: see kernel_headers.py (--headers auto, the default, takes the
running kernel's, else the nearest installed linux-headers-*). Headers of
another kernel are fine for bcc's helpers and uapi types, but not for the
layout of kernel structs (task_struct, mm_struct, file, sock ...): the few
fields the programs read through pointers are located in the running
kernel's BTF (btf_offsets.py) and passed in as -D offsets; without BTF they
fall back to offsetof() in the headers (right only when the headers are the
running kernel's).
"""

import argparse
import collections
import ctypes as ct
import json
import os
import re
import resource
import socket
import sys
import tempfile
import threading

# Run as root from the package, Python would leave a __pycache__ in
# /usr/lib/esr/bench/bcc that dpkg does not own and would not remove.
sys.dont_write_bytecode = True

import btf_offsets  # noqa: E402
from kernel_headers import NoKernelHeaders, find_headers  # noqa: E402

EXIT_NO_BUILD = 3
POLL_MS = 50
TRACEFS = "/sys/kernel/tracing"
# The record types in the order of esr_events.h's buffers, which index the
# lost counters (bccpeer.c asserts the order).
TYPES = ("command", "disk", "network")

HERE = os.path.dirname(os.path.realpath(__file__))
BPF_SOURCE = os.path.join(HERE, "bccpeer.c")
# The directory of esr_events.h: bpf/ of a checkout, and the package
# installs it at the same place relative to this file (/usr/lib/esr/bpf).
SHARED_INCLUDE = os.path.normpath(os.path.join(HERE, "..", "..", "bpf"))

# Session cookie, as esr makes them: generation << 32 | slot.
SESSION_SLOT = 0
SESSION = (1 << 32) | SESSION_SLOT

# The kernel fields bccpeer.c reads through pointers: its OFF_* macro ->
# (struct, member, size in bytes).
KERNEL_FIELDS = {
    "OFF_TASK_MM": ("task_struct", "mm", 8),
    "OFF_TASK_REAL_PARENT": ("task_struct", "real_parent", 8),
    "OFF_TASK_TGID": ("task_struct", "tgid", 4),
    "OFF_TASK_SIGNAL": ("task_struct", "signal", 8),
    "OFF_TASK_FILES": ("task_struct", "files", 8),
    "OFF_SIGNAL_TTY": ("signal_struct", "tty", 8),
    "OFF_MM_ARG_START": ("mm_struct", "arg_start", 8),
    "OFF_MM_ARG_END": ("mm_struct", "arg_end", 8),
    "OFF_MM_START_STACK": ("mm_struct", "start_stack", 8),
    "OFF_FILES_FDT": ("files_struct", "fdt", 8),
    "OFF_FDT_MAX_FDS": ("fdtable", "max_fds", 4),
    "OFF_FDT_FD": ("fdtable", "fd", 8),
    "OFF_FILE_F_INODE": ("file", "f_inode", 8),
    "OFF_FILE_PRIVATE_DATA": ("file", "private_data", 8),
    "OFF_INODE_I_MODE": ("inode", "i_mode", 2),
    "OFF_SOCKET_SK": ("socket", "sk", 8),
    "OFF_SOCK_SK_TYPE": ("sock", "sk_type", 2),
    "OFF_SOCK_SK_PROTOCOL": ("sock", "sk_protocol", 2),
    "OFF_SOCK_SK_ERR": ("sock", "sk_err", 4),
}


class Unbuildable(Exception):
    """bcc cannot build the programs here; the message says why."""


# ---------------------------------------------------------------- build


class _Captured:
    """fd 1 and 2 into a file while bcc compiles: it prints to stdout too,
    which is the protocol's channel."""

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = (os.dup(1), os.dup(2))
        os.dup2(self.file.fileno(), 1)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.file.seek(0)
        self.text = self.file.read().decode(errors="replace")
        self.file.close()
        return False


def _mount_tracefs():
    if os.path.isdir(os.path.join(TRACEFS, "events")):
        return
    if os.path.isdir("/sys/kernel/debug/tracing/events"):
        return
    libc = ct.CDLL(None, use_errno=True)
    if libc.mount(b"nodev", TRACEFS.encode(), b"tracefs", 0, None) != 0:
        err = ct.get_errno()
        raise Unbuildable(f"cannot mount tracefs on {TRACEFS}: {os.strerror(err)}")


def _summary(log: str) -> str:
    """The lines of bcc's output that say what went wrong."""
    # bcc compiles src_file under another name (the line numbers are the
    # file's); clang spells out the whole condition of a failed
    # _Static_assert, where its message says what drifted.
    log = log.replace("/virtual/main.c", os.path.basename(BPF_SOURCE))
    log = re.sub(
        r"(static_assert failed) due to requirement '.*' (\".*\")$", r"\1: \2", log, flags=re.M
    )
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    keep = [x for x in lines if re.search(r"error|unable|cannot|not found|invalid", x, re.I)]
    return " | ".join((keep or lines)[:4])[:800]


def build(env: dict, cflags: list):
    """The BPF object compiled, loaded and attached, and where the struct
    offsets came from."""
    cflags = [*cflags, f"-I{SHARED_INCLUDE}"]
    try:
        offsets = btf_offsets.field_offsets(KERNEL_FIELDS)
        cflags += [f"-D{k}={v}" for k, v in offsets.items()]
        offsets_from = "BTF " + btf_offsets.BTF_PATH
    except (OSError, ValueError) as err:
        cflags.append("-DOFFSETS_FROM_HEADERS")
        offsets_from = f"headers (no usable BTF: {err})"
    os.environ.update(env)
    _mount_tracefs()
    # Imported here, so that its absence is reported like any other reason
    # bcc cannot build.
    try:
        from bcc import BPF  # noqa: PLC0415
        from bcc.utils import get_possible_cpus  # noqa: PLC0415
    except ImportError as err:
        raise Unbuildable(
            f"bcc's Python module is missing ({err}): apt-get install python3-bpfcc"
        ) from None
    # bpf_get_smp_processor_id() may be any possible CPU, not only an online one.
    cflags.append(f"-DNCPUS={max(get_possible_cpus()) + 1}")
    with _Captured() as out:
        try:
            bpf = BPF(src_file=BPF_SOURCE, cflags=cflags)
            error = None
        except Exception as err:  # bcc raises Exception for compile and load errors
            error = str(err).splitlines()[0] if str(err) else type(err).__name__
    if error:
        raise Unbuildable(f"bcc could not build the programs: {error}: {_summary(out.text)}")
    return bpf, offsets_from


# ---------------------------------------------------------------- consumer


def _peak_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _addr(family, raw):
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, bytes(raw[:4]))
    return socket.inet_ntop(socket.AF_INET6, bytes(raw))


def run(args) -> int:
    pages = [int(p) for p in args.pages.split(",")]
    if len(pages) != 3 or any(p <= 0 or p & (p - 1) for p in pages):
        print(
            json.dumps(
                {"error": f"--pages {args.pages}: three powers of two, command,disk,network"}
            ),
            flush=True,
        )
        return 2
    os.sched_setaffinity(0, {args.cpu})
    headers = "none"
    try:
        env, cflags, headers = find_headers(args.headers)
        b, offsets_from = build(env, cflags)
    except (NoKernelHeaders, Unbuildable) as err:
        print(json.dumps({"error": str(err), "headers": headers}), flush=True)
        return EXIT_NO_BUILD

    records = [0, 0, 0]
    lost_cb = [0, 0, 0]
    last = [None]
    command_table, disk_table, network_table = (
        b["command_events"],
        b["disk_events"],
        b["network_events"],
    )
    data_offset = []  # offset of command_event.data, known after the first decode

    def on_command(cpu, data, size):
        e = command_table.event(data)
        if not data_offset:
            data_offset.append(type(e).data.offset)
        base = ct.addressof(e) + data_offset[0]
        raw = ct.string_at(base, e.argv_len)
        argv = raw.split(b"\0")
        if raw.endswith(b"\0"):
            argv.pop()
        path = ct.string_at(base + e.argv_len, max(e.path_len - 1, 0))
        last[0] = (
            e.ts_boot_ns,
            e.session,
            e.cgroup_id,
            e.pid,
            e.comm.decode(errors="replace"),
            e.ppid,
            e.uid,
            e.gid,
            e.return_code,
            e.argc,
            e.argv_size,
            e.flags,
            [a.decode(errors="surrogateescape") for a in argv],
            path.decode(errors="surrogateescape"),
        )
        records[0] += 1

    def on_disk(cpu, data, size):
        e = disk_table.event(data)
        last[0] = (
            e.ts_boot_ns,
            e.session,
            e.cgroup_id,
            e.pid,
            e.comm.decode(errors="replace"),
            e.flags,
            e.return_code,
            e.path_truncated,
            e.path.decode(errors="surrogateescape"),
        )
        records[1] += 1

    def on_network(cpu, data, size):
        e = network_table.event(data)
        last[0] = (
            e.ts_boot_ns,
            e.session,
            e.cgroup_id,
            e.pid,
            e.comm.decode(errors="replace"),
            e.return_code,
            e.family,
            _addr(e.family, e.src_addr),
            e.src_port,
            _addr(e.family, e.dst_addr),
            e.dst_port,
        )
        records[2] += 1

    def lost_into(i):
        def lost(count):
            lost_cb[i] += count

        return lost

    for i, (table, cb) in enumerate(
        ((command_table, on_command), (disk_table, on_disk), (network_table, on_network))
    ):
        table.open_perf_buffer(
            cb, page_cnt=pages[i], lost_cb=lost_into(i), wakeup_events=args.wakeup_events
        )

    tracked = b["tracked_tasks"]
    states = b["session_states"]
    buffer_lost = b["buffer_lost"]

    # Commands arrive on a thread of their own, so the main loop is the one
    # a bcc tool has: perf_buffer_poll, over and over.
    commands = collections.deque()

    def read_commands():
        for line in sys.stdin:
            commands.append(line)
        commands.append("")

    threading.Thread(target=read_commands, daemon=True).start()
    print("ready", flush=True)

    start = resource.getrusage(resource.RUSAGE_SELF)
    while True:
        b.perf_buffer_poll(timeout=POLL_MS)
        while commands:
            words = commands.popleft().split()
            if words[:1] == ["track"] and len(words) == 2:
                state = states.Leaf()
                state.session = SESSION
                states[ct.c_int(SESSION_SLOT)] = state
                task = tracked.Leaf()
                task.session = SESSION
                tracked[tracked.Key(int(words[1]))] = task
                records[:] = [0, 0, 0]
                lost_cb[:] = [0, 0, 0]
                _reset_peak_rss()
                start = resource.getrusage(resource.RUSAGE_SELF)
                print("tracking", flush=True)
            elif words[:1] == ["stop"] or not words:
                return stop(
                    b, args, headers, offsets_from, start, records, lost_cb, states, buffer_lost
                )


def stop(b, args, headers, offsets_from, start, records, lost_cb, states, buffer_lost) -> int:
    # Drain: read every ring whatever its wakeup count, until a pass finds
    # nothing more.
    while True:
        seen = sum(records) + sum(lost_cb)
        b.perf_buffer_consume()
        if sum(records) + sum(lost_cb) == seen:
            break
    end = resource.getrusage(resource.RUSAGE_SELF)
    state = states[ct.c_int(SESSION_SLOT)]
    lost_bpf = [int(state.lost[i]) for i in range(3)] if state.session == SESSION else [0, 0, 0]
    per_buffer = [sum(buffer_lost[ct.c_int(i)]) for i in range(3)]
    # A record the ring had no room for fails perf_submit (counted in BPF)
    # and is reported to the lost callback too: take the larger, not the sum.
    lost = [max(a, c) for a, c in zip(lost_bpf, lost_cb)]
    result = {
        "records": dict(zip(TYPES, records)),
        "lost": dict(zip(TYPES, lost)),
        "lost_callback": dict(zip(TYPES, lost_cb)),
        "lost_bpf": dict(zip(TYPES, lost_bpf)),
        "lost_bpf_all_sessions": dict(zip(TYPES, per_buffer)),
        "untracked_forks": int(state.untracked_forks),
        "user_s": end.ru_utime - start.ru_utime,
        "sys_s": end.ru_stime - start.ru_stime,
        "max_rss_kb": _peak_rss_kb(),
        "wakeup_events": args.wakeup_events,
        "pages": dict(zip(TYPES, (int(p) for p in args.pages.split(",")))),
        "headers": headers,
        "struct_offsets": offsets_from,
    }
    print(json.dumps(result), flush=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pages",
        required=True,
        metavar="C,D,N",
        help="perf buffer pages per CPU: command,disk,network",
    )
    parser.add_argument(
        "--wakeup-events",
        type=int,
        default=1,
        metavar="K",
        help="records per wakeup (bcc's default: 1)",
    )
    parser.add_argument("--cpu", type=int, default=0, help="CPU to run on (default 0)")
    parser.add_argument(
        "--headers",
        default="auto",
        metavar="auto|running|DIR",
        help="kernel headers for bcc: auto (running kernel's, else the "
        "nearest installed linux-headers-*), running, or a tree",
    )
    args = parser.parse_args()
    try:
        status = run(args)
    except Exception as err:  # one line the harness can show, whatever happened
        print(json.dumps({"error": f"{type(err).__name__}: {err}"}), flush=True)
        status = 1
    sys.stdout.flush()
    os._exit(status)  # skip bcc's noisy destructors


if __name__ == "__main__":
    main()
