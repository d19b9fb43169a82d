"""Loads the BPF programs into an esr._fast.probe.Probe, as the config sizes
them, after making sure the kernel side is ready (root, tracefs)."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from importlib import resources

from esr import __version__
from esr._fast.probe import Probe, try_hook
from esr.config import Config
from esr.errors import LoadError, ProbeError

TRACEFS = "/sys/kernel/tracing"
BPFFS = "/sys/fs/bpf"


def bpf_image(name: str = "esr.bpf.o") -> bytes:
    return resources.files("esr.bpf").joinpath(name).read_bytes()


@functools.cache
def raw_tracepoints() -> str | None:
    """None where this kernel loads and attaches a raw tracepoint program,
    which fork, exec and exit are then hooked through (session.bpf.c), or
    why not. Asked once per process: the kernel's answer does not change."""
    return try_hook(bpf_image("feature_probe.bpf.o"), "raw_tp")


def kernel_dev(st_dev: int) -> int:
    """A device number as the kernel encodes it internally: major << 20 | minor."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def mount_tracefs() -> bool:
    """Mount tracefs where libbpf looks for tracepoint ids, unless it is
    there already. Returns whether it had to be mounted."""
    if os.path.isdir(os.path.join(TRACEFS, "events")):
        return False
    _mount("tracefs", TRACEFS, "tracefs")
    return True


def _mount(source: str, target: str, fstype: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        err = ctypes.get_errno()
        raise LoadError(f"cannot mount {fstype} on {target}: {os.strerror(err)}")


def _bpffs_under(path: str) -> str | None:
    """The mount point of the bpf filesystem path is on, if it is on one."""
    best = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point, fstype = fields[4], fields[fields.index("-") + 1]
            on = (path + "/").startswith(point.rstrip("/") + "/")
            if fstype == "bpf" and on and (best is None or len(point) > len(best)):
                best = point
    return best


def pin_dir(config: Config) -> str | None:
    """The daemon's pin directory, its bpf filesystem mounted (systemd
    mounts /sys/fs/bpf at boot; without it, it is mounted here), or None
    when pinning is off."""
    path = config.pin_dir
    if not path:
        return None
    if _bpffs_under(path) is None:
        if not (path + "/").startswith(BPFFS + "/"):
            raise LoadError(f"pin_dir: {path} is not on a bpf filesystem")
        _mount("bpf", BPFFS, "bpf")
    return path


def load(
    config: Config,
    recorder_exe: str | None = None,
    pin: bool = False,
    handed: dict[str, int] | None = None,
    owner: tuple[int, int] = (0, 0),
    keep_rings: bool = False,
    raw: bool | None = None,
):
    """The attached probe, or None when enhanced recording is disabled.

    recorder_exe: the esr executable that a session's anchor runs as the
    PAM hook, whose work is not the user's. pin: pin the kernel side into
    the config's pin_dir, where it stays after this process and where a
    previous one's is taken over (the daemon); handed: what that one left in
    systemd's descriptor store; owner: the data dir's (st_dev, st_ino);
    keep_rings: the rings go to that store, and what they hold is kept for
    the next recorder. raw: whether fork, exec and exit go through raw
    tracepoints; by default, wherever the kernel allows it."""
    if not config.enhanced_recording.enabled:
        return None
    if os.geteuid() != 0:
        for fd in (handed or {}).values():
            os.close(fd)
        raise LoadError(
            "recording needs root: loading BPF programs requires CAP_BPF, "
            "CAP_PERFMON and CAP_SYS_ADMIN"
        )
    mount_tracefs()
    pins = pin_dir(config) if pin else None
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
            pin_dir=pins,
            handed=handed,
            owner=owner,
            version=__version__,
            keep_rings=keep_rings,
            raw_tracepoints=raw_tracepoints() is None if raw is None else raw,
        )
    except ProbeError as err:
        reason = str(err)
        if err.errno == errno.EPERM:
            reason += " (missing capabilities, or locked down?)"
        raise LoadError(reason) from None
