"""esr's configuration: YAML decoded into typed Structs.

Any problem is reported as a ConfigError whose message is one line naming
the key, so the CLI can print it as is.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

import msgspec
import yaml  # type: ignore[import-untyped]

from esr.errors import ConfigError
from esr.schema import BUFFERS

DEFAULT_PATH = "/etc/esr/esr.yaml"

Pages = Annotated[int, msgspec.Meta(ge=1, le=65536)]


class EnhancedRecording(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The reference's keys. Buffer sizes are per-CPU pages of each perf
    buffer, and are applied exactly as given."""

    enabled: bool = True
    # The reference's 8 pages hold about 10 ms of an exec or connect storm;
    # a thread woken on a busy 2-CPU host was seen waiting up to 36 ms. The
    # reader is woken a quarter of the way up: at 128 pages an exec storm
    # wakes it 4 times less often than at 32, for a sixth less recorder CPU
    # per command (docs/benchmark.md).
    command_buffer_size: Pages = 128
    disk_buffer_size: Pages = 128
    network_buffer_size: Pages = 128
    # Terminal chunks are up to 4 KiB each: 2 MiB per CPU hold the 15 ms
    # a busy host may keep the drain waiting, at a flat-out cat's 140 MB/s.
    terminal_buffer_size: Pages = 512
    # Where cgroup v2 is mounted; found in /proc/self/mounts when empty.
    cgroup_path: str = ""
    # esr follows sessions by process tree, not by cgroup, and creates no
    # cgroups: the key is accepted so a Teleport block can be pasted as is.
    root_path: str = "/teleport"


Bytes = Annotated[int, msgspec.Meta(ge=0, le=1 << 32)]


class Terminal(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The terminal stream of sessions that have one."""

    # Keystrokes, as the reference: off, so that what is typed at a prompt
    # that does not echo is never recorded. When on, still never while the
    # terminal's ECHO is off.
    record_input: bool = False
    # A session's output budget: a flood (`yes`, a 10 GB cat) is recorded
    # up to the burst, then at this rate; the rest is counted, not kept.
    # 0 records everything.
    max_bytes_per_second: Bytes = 1 << 20
    burst_bytes: Annotated[int, msgspec.Meta(ge=4096, le=1 << 32)] = 16 << 20


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enhanced_recording: EnhancedRecording = msgspec.field(default_factory=EnhancedRecording)
    terminal: Terminal = msgspec.field(default_factory=Terminal)
    data_dir: str = "/var/lib/esr"
    control_socket: str = "/run/esr/esr.sock"
    # Where the daemon pins its programs and maps in bpffs, so that recording
    # goes on across a restart; "": a restart ends the sessions.
    pin_dir: str = "/sys/fs/bpf/esr"
    # Sessions recorded at once, and threads they may have alive at once.
    max_sessions: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 4096
    max_tracked_tasks: Annotated[int, msgspec.Meta(ge=64, le=4194304)] = 65536
    # The share of them one session may hold, so that a session forking
    # without end cannot keep the others' children from being recorded; an
    # eighth of max_tracked_tasks when not set.
    max_tasks_per_session: Annotated[int, msgspec.Meta(ge=16, le=4194304)] | None = None
    # zstd level of the recordings' frames. -1, zstd's first fast level, is
    # a twentieth larger than 1 for these batches at four fifths of the CPU
    # (an eighth less recorder CPU in an open storm); 1 is as small as 3.
    compression_level: Annotated[int, msgspec.Meta(ge=-7, le=19)] = -1
    # How often buffers are drained to disk, at the latest: each flush has a
    # fixed cost, which 200 ms halves against 100 (docs/design.md).
    flush_interval_ms: Annotated[int, msgspec.Meta(ge=10, le=200)] = 200
    # How often the recordings that moved are made durable and sealed, at
    # most: each seal waits for an fdatasync of its recording, whose fixed
    # cost (a journal commit) outweighs the rest at a flush's scale.
    seal_interval_ms: Annotated[int, msgspec.Meta(ge=100, le=60000)] = 1000
    # session.disk events are in every recording; in the JSON audit log only
    # when asked, as they outnumber everything else by orders of magnitude.
    audit_disk_events: bool = False
    # Failed connects (return_code < 0) in the JSON audit log too; always in
    # the recordings.
    audit_failed_connects: bool = True
    # The audit log's cluster_name, as Teleport's; this host's name when empty.
    cluster_name: str = ""
    # While the data dir is full: keep recording what fits and count the
    # rest, or also refuse to open new sessions (with `esr pam
    # --fail-closed`, no login then goes unrecorded).
    on_disk_full: Literal["keep_running", "refuse_new_sessions"] = "keep_running"

    def tasks_per_session(self) -> int:
        return self.max_tasks_per_session or max(self.max_tracked_tasks // 8, 16)

    def buffer_pages(self) -> tuple[int, ...]:
        """Pages per CPU of each buffer, in esr_events.h's order."""
        r = self.enhanced_recording
        return tuple(getattr(r, f"{name}_buffer_size") for name in BUFFERS)


# The largest record of each buffer must fit in it, or it could never be sent.
_MIN_PAGES = {"command": 8, "disk": 2, "network": 1, "terminal": 2}
# sun_path holds 108 bytes, its NUL included.
_MAX_SOCKET_PATH = 107


def _check(config: Config) -> None:
    r = config.enhanced_recording
    for name in BUFFERS:
        key, least = f"{name}_buffer_size", _MIN_PAGES[name]
        pages = getattr(r, key)
        if pages & (pages - 1):
            raise ConfigError(
                f"enhanced_recording.{key}: {pages} is not a power of two "
                "(perf buffers are 2^n pages)"
            )
        if pages < least:
            raise ConfigError(
                f"enhanced_recording.{key}: {pages} pages is too small: "
                f"the largest record needs {least}"
            )
    paths = {
        "data_dir": config.data_dir,
        "control_socket": config.control_socket,
        "pin_dir": config.pin_dir,
        "enhanced_recording.cgroup_path": r.cgroup_path,
        "enhanced_recording.root_path": r.root_path,
    }
    for key, path in paths.items():
        if "\0" in path:
            raise ConfigError(f"{key}: contains a NUL byte")
    for key in ("data_dir", "control_socket"):
        if not os.path.isabs(getattr(config, key)):
            raise ConfigError(f"{key}: must be an absolute path")
    if config.pin_dir and not os.path.isabs(config.pin_dir):
        raise ConfigError("pin_dir: must be an absolute path (or empty)")
    if r.cgroup_path and not os.path.isabs(r.cgroup_path):
        raise ConfigError("enhanced_recording.cgroup_path: must be an absolute path")
    if (config.max_tasks_per_session or 0) > config.max_tracked_tasks:
        raise ConfigError(
            f"max_tasks_per_session: {config.max_tasks_per_session} is more than "
            f"max_tracked_tasks ({config.max_tracked_tasks})"
        )
    size = len(os.fsencode(config.control_socket))
    if size > _MAX_SOCKET_PATH:
        raise ConfigError(
            f"control_socket: {size} bytes is too long for a Unix socket "
            f"(at most {_MAX_SOCKET_PATH})"
        )


def _where(message: str) -> str:
    """'... - at `$.a.b`' -> 'a.b'."""
    m = re.search(r" - at `\$\.?([^`]*)`", message)
    return m.group(1) if m else ""


def _explain(err: msgspec.ValidationError) -> str:
    message = str(err)
    where = _where(message)
    what = message.split(" - at ", maxsplit=1)[0]
    unknown = re.match(r"Object contains unknown field `([^`]*)`", what)
    if unknown:
        key = f"{where}.{unknown.group(1)}" if where else unknown.group(1)
        return f"{key}: unknown key"
    what = re.sub(r"`([^`]*)`", r"\1", what)
    return f"{where}: {what[0].lower()}{what[1:]}" if where else what


class _Duplicate(yaml.YAMLError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML that refuses a key given twice, which would silently win. The
    pure-Python loader: the binary leaves libyaml out, and a config file is
    small."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _Duplicate(f"{key}: given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse(raw: bytes, source: str) -> Config:
    try:
        data = yaml.load(raw, _Loader)
    except _Duplicate as err:
        raise ConfigError(f"{source}: {err}") from None
    except (yaml.YAMLError, ValueError) as err:
        detail = " ".join(str(err).replace('in "<byte string>", ', "").split())
        raise ConfigError(f"{source}: malformed YAML: {detail}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as err:
        raise ConfigError(f"{source}: {_explain(err)}") from None
    try:
        _check(config)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return config


def load(path: str | None = None, data_dir: str | None = None) -> Config:
    """The config at path (default /etc/esr/esr.yaml, which may be absent),
    with data_dir overridden when given."""
    source = path or DEFAULT_PATH
    try:
        with open(source, "rb") as f:
            config = parse(f.read(), source)
    except FileNotFoundError:
        if path:
            raise ConfigError(f"{source}: no such file") from None
        config = Config()
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory") from None
    except PermissionError:
        raise ConfigError(f"{source}: permission denied") from None
    if data_dir:
        config = msgspec.structs.replace(config, data_dir=os.path.abspath(data_dir))
    return config
