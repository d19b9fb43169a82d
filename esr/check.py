"""`esr check`: what this kernel offers esr, one line each."""

from __future__ import annotations

import os

from esr import loader, schema
from esr._fast.probe import map_type_supported, try_hook
from esr.config import Config
from esr.errors import LoadError

BTF = "/sys/kernel/btf/vmlinux"
TRACEPOINTS = [
    "syscalls/sys_enter_execve",
    "syscalls/sys_exit_execve",
    "syscalls/sys_enter_execveat",
    "syscalls/sys_exit_execveat",
    "syscalls/sys_enter_open",
    "syscalls/sys_exit_open",
    "syscalls/sys_enter_openat",
    "syscalls/sys_exit_openat",
    "syscalls/sys_enter_openat2",
    "syscalls/sys_exit_openat2",
    "syscalls/sys_enter_creat",
    "syscalls/sys_exit_creat",
    "syscalls/sys_enter_connect",
    "syscalls/sys_exit_connect",
    "sched/sched_process_fork",
    "sched/sched_process_exec",
    "sched/sched_process_exit",
    "sock/inet_sock_set_state",
]


def cgroup2_mount() -> str:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return fields[1]
    return ""


def check(config: Config):
    """Yield (line, ok); ok is False only for what recording cannot do without."""
    yield f"kernel: {os.uname().release}", True
    btf = os.path.exists(BTF)
    yield f"BTF: {'yes' if btf else 'missing'} ({BTF})", btf

    try:
        mounted = loader.mount_tracefs()
        yield f"tracefs: {loader.TRACEFS} ({'mounted it' if mounted else 'already mounted'})", True
        tracefs = True
    except LoadError as err:
        yield f"tracefs: {err}", False
        tracefs = False
    for tp in TRACEPOINTS:
        present = tracefs and os.path.exists(os.path.join(loader.TRACEFS, "events", tp, "id"))
        yield f"tracepoint {tp}: {'yes' if present else 'missing'}", present

    perf = map_type_supported("perf")
    yield f"perf buffer: {'yes' if perf else 'no'}", perf
    yield f"ring buffer: {'yes' if map_type_supported('ringbuf') else 'no'} (not used)", True

    probes = loader.bpf_image("feature_probe.bpf.o")
    for hook in ("kprobe", "fentry"):
        why = try_hook(probes, hook)
        yield f"{hook}: {'available' if why is None else f'unavailable ({why})'} (optional)", True

    cgroup = config.enhanced_recording.cgroup_path or cgroup2_mount()
    yield f"cgroup v2: {cgroup or 'not mounted'} (cgroup ids only; sessions follow processes)", True
    audit = os.path.exists("/proc/self/sessionid")
    yield f"audit sessionid/loginuid: {'yes' if audit else 'no'}", True

    try:
        probe = loader.load(config)
    except LoadError as err:
        yield f"recorder programs: {err}", False
        return
    if probe is None:
        yield "recorder programs: not loaded (enhanced_recording.enabled is false)", True
        return
    pages = schema.by_buffer(list(probe.buffer_pages))
    yield (
        f"recorder programs: {probe.programs} loaded and attached; buffers per CPU "
        f"(pages): {pages}",
        True,
    )
    hook = probe.io_uring_hook
    yield (
        f"io_uring: rings and the kinds of operation they run, through {hook}"
        if hook
        else "io_uring: not in this kernel",
        True,
    )
    probe.close()
