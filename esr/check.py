"""`esr check`: what this kernel offers esr, one line each, and when it
cannot record, what it lacks, in one line."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from esr import loader, schema
from esr._fast.probe import map_type_supported, missing_helper, tracepoints, try_hook
from esr.config import Config
from esr.errors import LoadError

BTF = "/sys/kernel/btf/vmlinux"
# Debian 11's; the oldest kernel esr is tested on.
MINIMUM = (5, 10)


def cgroup2_mount() -> str:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return fields[1]
    return ""


def release_version(release: str) -> tuple[int, int] | None:
    """(major, minor) of a kernel release string such as 5.10.0-35-amd64."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check(config: Config) -> Iterator[tuple[str, str | None]]:
    """Yield (line, lacks): lacks is None for what is there or optional, or
    what the kernel lacks that recording cannot do without, in a few words."""
    release = os.uname().release
    version = release_version(release)
    old = version is not None and version < MINIMUM
    minimum = ".".join(map(str, MINIMUM))
    yield (
        f"kernel: {release}" + (f" (esr needs {minimum} or later)" if old else ""),
        f"Linux {release} is too old: esr needs {minimum} or later" if old else None,
    )
    btf = os.path.exists(BTF)
    yield (
        f"BTF: {'yes' if btf else 'missing'} ({BTF})",
        None if btf else f"no BTF ({BTF}): the kernel is built without CONFIG_DEBUG_INFO_BTF",
    )

    try:
        mounted = loader.mount_tracefs()
        yield f"tracefs: {loader.TRACEFS} ({'mounted it' if mounted else 'already mounted'})", None
        tracefs = True
    except LoadError as err:
        yield f"tracefs: {err}", f"no tracefs: {err}"
        tracefs = False
    image = loader.bpf_image()
    raw_refused = loader.raw_tracepoints()
    raw = raw_refused is None
    for tp in tracepoints(image, raw):
        present = tracefs and os.path.exists(os.path.join(loader.TRACEFS, "events", tp, "id"))
        yield (
            f"tracepoint {tp}: {'yes' if present else 'missing'}",
            None if present or not tracefs else f"no tracepoint {tp}",
        )

    perf = map_type_supported("perf")
    yield f"perf buffer: {'yes' if perf else 'no'}", None if perf else "no perf event array maps"
    yield f"ring buffer: {'yes' if map_type_supported('ringbuf') else 'no'} (not used)", None

    helper = missing_helper(image, raw)
    yield (
        f"BPF helpers: {'all there' if helper is None else f'missing {helper}'}",
        None if helper is None else f"no BPF helper {helper}",
    )

    probes = loader.bpf_image("feature_probe.bpf.o")
    for hook in ("kprobe", "fentry"):
        why = try_hook(probes, hook)
        yield f"{hook}: {'available' if why is None else f'unavailable ({why})'} (optional)", None
    yield (
        "raw tracepoints: available, fork, exec and exit hooked through them"
        if raw
        else f"raw tracepoints: unavailable ({raw_refused}), fork, exec and exit hooked "
        "through tracepoints (optional)",
        None,
    )

    cgroup = config.enhanced_recording.cgroup_path or cgroup2_mount()
    yield f"cgroup v2: {cgroup or 'not mounted'} (cgroup ids only; sessions follow processes)", None
    audit = os.path.exists("/proc/self/sessionid")
    yield f"audit sessionid/loginuid: {'yes' if audit else 'no'}", None

    try:
        probe = loader.load(config)
    except LoadError as err:
        yield f"recorder programs: {err}", f"its programs do not load: {err}"
        return
    if probe is None:
        yield "recorder programs: not loaded (enhanced_recording.enabled is false)", None
        return
    pages = schema.by_buffer(list(probe.buffer_pages))
    yield (
        f"recorder programs: {probe.programs} loaded and attached (those on syscalls "
        "only while a session is recorded); buffers per CPU "
        f"(pages): {pages}",
        None,
    )
    hook = probe.io_uring_hook
    yield (
        f"io_uring: rings and the kinds of operation they run, through {hook}"
        if hook
        else "io_uring: not in this kernel",
        None,
    )
    probe.close()
