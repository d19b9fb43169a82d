"""esr._fast.decode.decode_batch in pure Python (struct.unpack), for the
benchmark only: the same Structs from the same records, to show what the
Cython decoder buys. tests/test_offline.py checks the two agree."""

from __future__ import annotations

import socket
import struct

from esr.schema import Command, Disk, Network

HEADER = struct.Struct("<QQQIHH16s")
COMMAND = struct.Struct("<IIIiIIIHH")
DISK = struct.Struct("<iiHH")
NETWORK = struct.Struct("<iHHH")
COMMAND_DATA = HEADER.size + COMMAND.size
DISK_PATH = 64
NETWORK_ADDRS = 64
ARGV_MAX = 20480
AF_INET = 2
ARGV_INCOMPLETE, ARGV_UNREADABLE, COMMAND_TTY = 0x2, 0x4, 0x8
EVENT_COMMAND, EVENT_DISK, EVENT_NETWORK = 1, 2, 3


def _cstr(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


def _command(buf, off, time, ei, pid, cgroup, comm):
    ppid, uid, gid, ret, argc, argv_size, argv_len, path_len, flags = COMMAND.unpack_from(
        buf, off + HEADER.size
    )
    argv_len = min(argv_len, ARGV_MAX)
    data = off + COMMAND_DATA
    block = bytes(buf[data : data + argv_len])
    strings = block.split(b"\0") if block else []
    if block.endswith(b"\0"):
        strings.pop()
    path = _cstr(bytes(buf[data + argv_len : data + argv_len + path_len]))
    cut_args = max(argc - len(strings), 0)
    cut_bytes = max(argv_size - argv_len, 0)
    truncated = cut_args > 0 or cut_bytes > 0 or bool(flags & (ARGV_INCOMPLETE | ARGV_UNREADABLE))
    return Command(
        ei,
        time,
        pid,
        ppid,
        cgroup,
        comm,
        path,
        strings[1:],
        ret,
        uid,
        gid,
        bool(flags & COMMAND_TTY),
        truncated,
        cut_args,
        cut_bytes,
    )


def _disk(buf, off, time, ei, pid, cgroup, comm):
    flags, ret, path_len, truncated = DISK.unpack_from(buf, off + HEADER.size)
    path = _cstr(bytes(buf[off + DISK_PATH : off + DISK_PATH + path_len]))
    return Disk(ei, time, pid, cgroup, comm, path, flags, ret, truncated != 0)


def _network(buf, off, time, ei, pid, cgroup, comm):
    ret, family, sport, dport = NETWORK.unpack_from(buf, off + HEADER.size)
    af, size = (socket.AF_INET, 4) if family == AF_INET else (socket.AF_INET6, 16)
    src = socket.inet_ntop(af, bytes(buf[off + NETWORK_ADDRS : off + NETWORK_ADDRS + size]))
    dst = socket.inet_ntop(
        af, bytes(buf[off + NETWORK_ADDRS + 16 : off + NETWORK_ADDRS + 16 + size])
    )
    return Network(
        ei, time, pid, cgroup, comm, 4 if af == socket.AF_INET else 6, src, sport, dst, dport, ret
    )


_DECODERS = {
    EVENT_COMMAND: (_command, "commands"),
    EVENT_DISK: (_disk, "disks"),
    EVENT_NETWORK: (_network, "networks"),
}


def decode_batch(batch, sessions: dict, time_offset_ns: int) -> int:
    buf = memoryview(batch)
    entries = []
    pos = 0
    while pos + 4 <= len(buf):
        (length,) = struct.unpack_from("<I", buf, pos)
        entries.append((struct.unpack_from("<Q", buf, pos + 4)[0], pos + 4))
        pos += (4 + length + 7) & ~7
    entries.sort(key=lambda e: e[0])
    orphans = 0
    for ts, off in entries:
        _ts, cookie, cgroup, pid, kind, _r, comm = HEADER.unpack_from(buf, off)
        target = sessions.get(cookie)
        if target is None or kind not in _DECODERS:
            orphans += 1
            continue
        decode, counter = _DECODERS[kind]
        event = decode(buf, off, ts + time_offset_ns, target.next_ei, pid, cgroup, _cstr(comm))
        target.events.append(event)
        if kind != EVENT_DISK or target.audit_disks:
            target.audited.append(event)
        if kind == EVENT_COMMAND and event.has_tty:
            target.interactive = True
        target.next_ei += 1
        setattr(target, counter, getattr(target, counter) + 1)
    return orphans
