"""Loads the BPF programs into an esr._fast.probe.Probe, as the config sizes
them, after making sure the kernel side is ready (root, tracefs)."""

from __future__ import annotations

import ctypes
import errno
import os
from importlib import resources

from esr.config import Config

TRACEFS = "/sys/kernel/tracing"


class LoadError(Exception):
    pass


def bpf_image(name: str = "esr.bpf.o") -> bytes:
    return resources.files("esr.bpf").joinpath(name).read_bytes()


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


def load(config: Config):
    """The attached probe, or None when enhanced recording is disabled."""
    if not config.enhanced_recording.enabled:
        return None
    from esr._fast.probe import Probe, ProbeError

    if os.geteuid() != 0:
        raise LoadError(
            "recording needs root: loading BPF programs requires CAP_BPF, "
            "CAP_PERFMON and CAP_SYS_ADMIN"
        )
    mount_tracefs()
    try:
        return Probe(
            bpf_image(), config.buffer_pages(), config.max_sessions, config.max_tracked_tasks
        )
    except ProbeError as err:
        reason = err.strerror or str(err)
        if err.errno == errno.EPERM:
            reason += " (missing capabilities, or locked down?)"
        raise LoadError(f"cannot load the BPF programs: {reason}") from None
