"""systemd's side of a restart: the descriptors it keeps for the daemon
(the file descriptor store), and the notifications that go with them.

What the kernel cannot pin (a perf buffer's rings, the perf event array
file they were put in through, perf event attachments before Linux 5.15)
lives only as long as a descriptor to it is open. The daemon hands those to
systemd (sd_notify FDSTORE=1), which keeps them across `systemctl restart`,
an upgrade's restart and a crash with Restart=on-failure, and gives them to
the next daemon in $LISTEN_FDS, by name. `systemctl stop` drops them.

Without $NOTIFY_SOCKET (no systemd) every call here does nothing.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Sequence

# The first descriptor systemd passes (SD_LISTEN_FDS_START).
FIRST = 3


def _notify_address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return None
    # An abstract socket's name starts with a NUL byte.
    return "\0" + address[1:] if address[0] == "@" else address


def available() -> bool:
    """Whether a service manager listens for notifications."""
    return _notify_address() is not None


def handed() -> dict[str, int]:
    """The descriptors the service manager passed to this process, by name
    (systemd's $LISTEN_FDS and $LISTEN_FDNAMES), each close-on-exec. The
    variables are removed, so that no child takes them for its own."""
    names = os.environ.pop("LISTEN_FDNAMES", "")
    count = os.environ.pop("LISTEN_FDS", "")
    pid = os.environ.pop("LISTEN_PID", "")
    os.environ.pop("LISTEN_FDS_FIRST_FD", None)
    if not count.isdigit() or pid != str(os.getpid()):
        return {}
    names_list = names.split(":") if names else []
    out: dict[str, int] = {}
    for i, fd in enumerate(range(FIRST, FIRST + int(count))):
        name = names_list[i] if i < len(names_list) else ""
        if not name or name in out:  # not ours to know, or stored twice
            os.close(fd)
            continue
        os.set_inheritable(fd, False)
        out[name] = fd
    return out


def notify(state: str, fds: Sequence[int] = ()) -> None:
    """Send state (newline-separated assignments) to the service manager."""
    address = _notify_address()
    if address is None:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(address)
        if fds:
            socket.send_fds(s, [state.encode()], list(fds))
        else:
            s.send(state.encode())


def store(named: dict[str, int]) -> None:
    """Keep each descriptor in the store under its name. The store ignores a
    descriptor it holds already, so storing again after a restart is a no-op."""
    for name, fd in named.items():
        notify(f"FDSTORE=1\nFDNAME={name}\nFDPOLL=0", [fd])
    barrier()


def remove(names: list[str]) -> None:
    """Drop the stored descriptors of these names."""
    for name in names:
        notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
    barrier()


def barrier(timeout: float = 5.0) -> None:
    """Wait until the service manager has handled every notification sent
    so far: it closes the pipe sent with BARRIER=1 once it has."""
    if not available():
        return
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        notify("BARRIER=1", [w])
        os.close(w)
        w = -1
        select.select([r], [], [], timeout)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
