"""Loads the BPF programs into an esr._fast.probe.Probe, as the config sizes
them, after making sure the kernel side is ready (root, tracefs)."""

from __future__ import annotations

import ctypes
import errno
import os
from importlib import resources

from esr._fast.probe import Probe
from esr.config import Config
from esr.errors import LoadError, ProbeError

TRACEFS = "/sys/kernel/tracing"


def bpf_image(name: str = "esr.bpf.o") -> bytes:
    return resources.files("esr.bpf").joinpath(name).read_bytes()


def kernel_dev(st_dev: int) -> int:
    """A device number as the kernel encodes it internally: major << 20 | minor."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def mount_tracefs() -> bool:
    """Mount tracefs where libbpf looks for tracepoint ids, unless it is
    there already. Returns whether it had to be mounted."""
    if os.path.isdir(os.path.join(TRACEFS, "events")):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tracefs", TRACEFS.encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise LoadError(f"cannot mount tracefs on {TRACEFS}: {os.strerror(err)}")
    return True


def load(config: Config, recorder_exe: str | None = None):
    """The attached probe, or None when enhanced recording is disabled.

    recorder_exe: the esr executable that a session's anchor runs as the
    PAM hook, whose work is not the user's."""
    if not config.enhanced_recording.enabled:
        return None
    if os.geteuid() != 0:
        raise LoadError(
            "recording needs root: loading BPF programs requires CAP_BPF, "
            "CAP_PERFMON and CAP_SYS_ADMIN"
        )
    mount_tracefs()
    exe = os.stat(recorder_exe) if recorder_exe else None
    try:
        return Probe(
            bpf_image(),
            config.buffer_pages(),
            config.max_sessions,
            config.max_tracked_tasks,
            tasks_per_session=config.tasks_per_session(),
            recorder_exe_dev=kernel_dev(exe.st_dev) if exe else 0,
            recorder_exe_ino=exe.st_ino if exe else 0,
            record_input=config.terminal.record_input,
            terminal_rate=config.terminal.max_bytes_per_second,
            terminal_burst=config.terminal.burst_bytes,
        )
    except ProbeError as err:
        reason = str(err)
        if err.errno == errno.EPERM:
            reason += " (missing capabilities, or locked down?)"
        raise LoadError(reason) from None
