# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Decode a batch of raw BPF records into esr.schema Structs, per session.

A batch is what esr._fast.probe collects from the perf buffers, or a corpus
saved from it: entries of [u32 length][record], each padded to 8 bytes.
Records are put in timestamp order, given their session's next event index,
and appended to that session's SessionEvents.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, int32_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcmp, memcpy, memchr

cdef extern from "<string.h>":
    size_t strnlen(const char *s, size_t maxlen)

from esr._fast.events cimport *

from esr.schema import Command, Disk, Network

cdef extern from "<arpa/inet.h>":
    const char *inet_ntop(int af, const void *src, char *dst, uint32_t size)
    enum:
        AF_INET
        AF_INET6

cdef object _Command = Command
cdef object _Disk = Disk
cdef object _Network = Network

# Consecutive records mostly share their program, pid, cgroup, flags and
# path: reuse the objects made for the previous record instead of allocating
# new ones.
cdef class LastInt:
    cdef int64_t value
    cdef object obj

    cdef inline object get(self, int64_t value):
        if self.obj is None or value != self.value:
            self.value = value
            self.obj = value
        return self.obj


cdef LastInt _pid = LastInt()
cdef LastInt _cgroup = LastInt()
cdef LastInt _flags = LastInt()
cdef char _last_comm[16]
cdef object _last_comm_obj = None
cdef object _last_path_obj = None


cdef class SessionEvents:
    """Events decoded for one session and not yet written, and apart, those
    of them the audit log gets: sorted here, as they are decoded, so that an
    open storm is never scanned again in Python."""
    cdef public list events
    cdef public list audited
    cdef public uint64_t next_ei
    cdef public uint64_t commands
    cdef public uint64_t disks
    cdef public uint64_t networks
    cdef public bint audit_disks
    # Set once a command runs with a controlling terminal; never cleared.
    cdef public bint interactive

    def __init__(self, uint64_t next_ei=1, bint audit_disks=False, bint interactive=False):
        self.events = []
        self.audited = []
        self.next_ei = next_ei
        self.commands = self.disks = self.networks = 0
        self.audit_disks = audit_disks
        self.interactive = interactive

    def add(self, event):
        """An event of the recorder's own (session.lost): recorded and audited."""
        self.events.append(event)
        self.audited.append(event)
        self.next_ei += 1

    def take(self):
        """The pending events, those of them to audit, and their counts per
        type; pending is emptied."""
        events, self.events = self.events, []
        audited, self.audited = self.audited, []
        counts = (self.commands, self.disks, self.networks)
        self.commands = self.disks = self.networks = 0
        return events, audited, counts


cdef struct entry:
    uint64_t ts
    uint64_t offset


cdef inline object comm_obj(const char *comm):
    global _last_comm_obj
    if _last_comm_obj is None or memcmp(comm, _last_comm, 16) != 0:
        memcpy(_last_comm, comm, 16)
        _last_comm_obj = PyBytes_FromStringAndSize(comm, strnlen(comm, 16))
    return _last_comm_obj


cdef inline object path_obj(const char *path, Py_ssize_t n):
    global _last_path_obj
    if _last_path_obj is not None and len(<bytes>_last_path_obj) == n and \
            memcmp(<const char *><bytes>_last_path_obj, path, n) == 0:
        return _last_path_obj
    _last_path_obj = PyBytes_FromStringAndSize(path, n)
    return _last_path_obj


cdef inline Py_ssize_t cstr_len(const char *s, Py_ssize_t n_with_nul):
    """Length of a string copied with its NUL, as the BPF side reports it."""
    if n_with_nul <= 0:
        return 0
    return strnlen(s, n_with_nul)


cdef object split_argv(const char *block, uint32_t n, uint32_t *strings):
    """The arguments after argv[0] in a NUL-separated block."""
    cdef const char *p = block
    cdef const char *end = block + n
    cdef const char *nul
    cdef list args = []
    cdef bint first = True
    strings[0] = 0
    while p < end:
        nul = <const char *>memchr(p, 0, end - p)
        if nul == NULL:
            nul = end
        if not first:
            args.append(PyBytes_FromStringAndSize(p, nul - p))
        first = False
        strings[0] += 1
        p = nul + 1
    return args


cdef object decode_command(const esr_command_event *e, int64_t time, uint64_t ei):
    cdef uint32_t strings = 0
    cdef uint32_t argv_len = e.argv_len if e.argv_len <= ESR_ARGV_MAX else ESR_ARGV_MAX
    cdef object argv = split_argv(e.data, argv_len, &strings)
    cdef const char *path = e.data + argv_len
    cdef int64_t cut_args = <int64_t>e.argc - strings
    cdef int64_t cut_bytes = <int64_t>e.argv_size - argv_len
    if cut_args < 0:
        cut_args = 0
    if cut_bytes < 0:
        cut_bytes = 0
    truncated = cut_args > 0 or cut_bytes > 0 or (e.flags & (ESR_ARGV_INCOMPLETE | ESR_ARGV_UNREADABLE)) != 0
    return _Command(
        ei, time, _pid.get(e.hdr.pid), e.ppid, _cgroup.get(e.hdr.cgroup_id),
        comm_obj(e.hdr.comm),
        PyBytes_FromStringAndSize(path, cstr_len(path, e.path_len)),
        argv, e.return_code, e.uid, e.gid, (e.flags & ESR_COMMAND_TTY) != 0,
        truncated, cut_args, cut_bytes)


cdef object decode_disk(const esr_disk_event *e, int64_t time, uint64_t ei):
    return _Disk(
        ei, time, _pid.get(e.hdr.pid), _cgroup.get(e.hdr.cgroup_id),
        comm_obj(e.hdr.comm),
        path_obj(e.path, cstr_len(e.path, e.path_len)),
        _flags.get(e.flags), e.return_code, e.path_truncated != 0)


cdef object address(int family, const uint8_t *raw):
    cdef char text[64]
    if inet_ntop(family, raw, text, sizeof(text)) == NULL:
        return ""
    return text.decode("ascii")


cdef object decode_network(const esr_network_event *e, int64_t time, uint64_t ei):
    cdef int family = AF_INET if e.family == AF_INET else AF_INET6
    return _Network(
        ei, time, _pid.get(e.hdr.pid), _cgroup.get(e.hdr.cgroup_id),
        comm_obj(e.hdr.comm),
        4 if family == AF_INET else 6,
        address(family, e.src_addr), e.src_port,
        address(family, e.dst_addr), e.dst_port,
        e.return_code)


cdef void merge_runs(entry *items, entry *tmp, Py_ssize_t n):
    """Sort by timestamp: a batch is a few sorted runs (one per CPU buffer),
    so merge neighbouring runs until one is left."""
    cdef Py_ssize_t start, mid, stop, i, j, k
    cdef bint merged = True
    while merged:
        merged = False
        start = 0
        while start < n:
            mid = start + 1
            while mid < n and items[mid - 1].ts <= items[mid].ts:
                mid += 1
            if mid >= n:
                break
            stop = mid + 1
            while stop < n and items[stop - 1].ts <= items[stop].ts:
                stop += 1
            i, j, k = start, mid, start
            while i < mid and j < stop:
                if items[j].ts < items[i].ts:
                    tmp[k] = items[j]
                    j += 1
                else:
                    tmp[k] = items[i]
                    i += 1
                k += 1
            while i < mid:
                tmp[k] = items[i]
                i += 1
                k += 1
            while j < stop:
                tmp[k] = items[j]
                j += 1
                k += 1
            memcpy(&items[start], &tmp[start], (stop - start) * sizeof(entry))
            merged = True
            start = stop


def decode_batch(const uint8_t[::1] batch not None, dict sessions not None, int64_t time_offset_ns):
    """Decode every record of a batch into its session's SessionEvents.

    sessions maps a session cookie to its SessionEvents; time_offset_ns turns
    the kernel's boot-time clock into nanoseconds since the epoch. Returns the
    number of records that belong to no known session.
    """
    cdef Py_ssize_t size = batch.shape[0]
    cdef const uint8_t *base = &batch[0] if size else NULL
    cdef Py_ssize_t pos = 0, n = 0, i
    cdef uint32_t length
    cdef const esr_event_header *hdr
    cdef entry *items
    cdef entry *tmp
    cdef uint64_t orphans = 0, cookie, last_cookie = 0
    cdef SessionEvents target = None
    cdef int64_t time
    cdef object event
    cdef bint audit

    while pos + 4 <= size:
        length = (<const uint32_t *>(base + pos))[0]
        pos += (4 + length + 7) & ~7
        n += 1
    if n == 0:
        return 0
    items = <entry *>malloc(2 * n * sizeof(entry))
    if items == NULL:
        raise MemoryError()
    tmp = items + n
    try:
        pos = 0
        for i in range(n):
            length = (<const uint32_t *>(base + pos))[0]
            items[i].offset = pos + 4
            items[i].ts = (<const esr_event_header *>(base + pos + 4)).ts_boot_ns
            pos += (4 + length + 7) & ~7
        merge_runs(items, tmp, n)

        for i in range(n):
            hdr = <const esr_event_header *>(base + items[i].offset)
            cookie = hdr.session
            if target is None or cookie != last_cookie:
                target = sessions.get(cookie)
                last_cookie = cookie
                if target is None:
                    orphans += 1
                    continue
            time = <int64_t>hdr.ts_boot_ns + time_offset_ns
            if hdr.type == ESR_EVENT_DISK:
                event = decode_disk(<const esr_disk_event *>hdr, time, target.next_ei)
                target.disks += 1
                audit = target.audit_disks
            elif hdr.type == ESR_EVENT_COMMAND:
                event = decode_command(<const esr_command_event *>hdr, time, target.next_ei)
                target.commands += 1
                if (<const esr_command_event *>hdr).flags & ESR_COMMAND_TTY:
                    target.interactive = True
                audit = True
            elif hdr.type == ESR_EVENT_NETWORK:
                event = decode_network(<const esr_network_event *>hdr, time, target.next_ei)
                target.networks += 1
                audit = True
            else:
                orphans += 1
                continue
            target.next_ei += 1
            target.events.append(event)
            if audit:
                target.audited.append(event)
    finally:
        free(items)
    return orphans
