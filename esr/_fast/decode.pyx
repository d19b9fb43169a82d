# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Decode a batch of raw BPF records into esr.schema Structs, per session.

A batch is what esr._fast.probe collects from the perf buffers, or a corpus
saved from it: entries of [u32 length][record], each padded to 8 bytes.
Every length is checked before anything is decoded: a damaged batch is
refused whole, and nothing is read past its end. Records are then put in
timestamp order, given their session's next event index, and appended to
that session's SessionEvents.

RECORD_TYPES is the one table of record types: for each type of
bpf/esr_events.h, how many bytes a record of it claims, how to decode it,
how to encode one (for corpora and tests), and its buffer.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint8_t, int32_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcmp, memcpy, memchr, memset

cdef extern from "<string.h>":
    size_t strnlen(const char *s, size_t maxlen)

from esr._fast.events cimport *

from esr import schema
from esr.errors import BatchError

cdef extern from "<arpa/inet.h>":
    const char *inet_ntop(int af, const void *src, char *dst, uint32_t size)
    int inet_pton(int af, const char *src, void *dst)
    enum:
        AF_INET
        AF_INET6

cdef extern from "<stddef.h>":
    const size_t HEADER_SIZE "sizeof(struct esr_event_header)"
    const size_t COMMAND_FIXED "offsetof(struct esr_command_event, data)"
    const size_t DISK_FIXED "offsetof(struct esr_disk_event, path)"
    const size_t NETWORK_SIZE "sizeof(struct esr_network_event)"
    const size_t TERMINAL_DATA_FIXED "offsetof(struct esr_terminal_data_event, data)"
    const size_t TERMINAL_WRITE_SIZE "sizeof(struct esr_terminal_write_event)"
    const size_t TERMINAL_RESIZE_SIZE "sizeof(struct esr_terminal_resize_event)"
    const size_t PTRACE_SIZE "sizeof(struct esr_ptrace_event)"
    const size_t IO_URING_SIZE "sizeof(struct esr_io_uring_event)"

BUFFERS = tuple(esr_buffer_names[i].decode() for i in range(ESR_BUF_COUNT))
if BUFFERS != schema.BUFFERS:
    raise ImportError(f"bpf/esr_events.h names the buffers {BUFFERS}, esr/schema.py "
                      f"{schema.BUFFERS}: rebuild, or bring the two together")

cdef object _Command = schema.Command
cdef object _Ptrace = schema.Ptrace
cdef object _IoUring = schema.IoUring
# enum esr_ptrace_request, by value.
cdef list _PTRACE_REQUESTS = [None, "attach", "seize", "detach", "process_vm_writev"]
cdef object _Disk = schema.Disk
cdef object _Network = schema.Network
cdef object _TerminalOutput = schema.TerminalOutput
cdef object _TerminalInput = schema.TerminalInput
cdef object _TerminalWrite = schema.TerminalWrite
cdef object _TerminalResize = schema.TerminalResize

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
    cdef uint64_t counts[ESR_BUF_COUNT]
    # Bit t set: records of type t are audited.
    cdef public uint64_t audit_types
    # Bit t set: failed ones too (return_code < 0).
    cdef public uint64_t audit_failures
    # Set once a command runs with a controlling terminal; never cleared.
    cdef public bint interactive

    def __init__(self, uint64_t next_ei=1, audited_records=(), bint interactive=False):
        self.events = []
        self.audited = []
        self.next_ei = next_ei
        memset(self.counts, 0, sizeof(self.counts))
        self.audit(audited_records)
        self.interactive = interactive

    def audit(self, records, failures=None):
        """Which schema.Record types the audit log gets from now on, and of
        those, which when they failed too (all of them unless told)."""
        self.audit_types = 0
        for record in records:
            self.audit_types |= 1 << record.__struct_config__.tag
        self.audit_failures = self.audit_types
        if failures is not None:
            self.audit_failures = 0
            for record in records:
                # A record without a return code never failed.
                if record in failures or "return_code" not in record.__struct_fields__:
                    self.audit_failures |= 1 << record.__struct_config__.tag

    def add(self, event):
        """An event of the recorder's own (session.lost): recorded and audited."""
        self.events.append(event)
        self.audited.append(event)
        self.next_ei += 1

    def take(self):
        """The pending events, those of them to audit, and how many records
        of each buffer they hold; pending is emptied."""
        events, self.events = self.events, []
        audited, self.audited = self.audited, []
        counts = [self.counts[i] for i in range(ESR_BUF_COUNT)]
        memset(self.counts, 0, sizeof(self.counts))
        return events, audited, counts


# --- the record types ----------------------------------------------------------------

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


cdef list split_strings(const char *block, uint32_t n):
    """The strings of a NUL-separated block."""
    cdef const char *p = block
    cdef const char *end = block + n
    cdef const char *nul
    cdef list strings = []
    while p < end:
        nul = <const char *>memchr(p, 0, end - p)
        if nul == NULL:
            nul = end
        strings.append(PyBytes_FromStringAndSize(p, nul - p))
        p = nul + 1
    return strings


cdef bytes exe_path(const char *components, uint32_t n):
    """A path from its components, listed from the file up to the root."""
    parts = split_strings(components, n)
    parts.reverse()
    return b"/" + b"/".join(parts)


cdef void fill_header(esr_event_header *hdr, uint16_t kind, uint64_t session, event):
    hdr.ts_boot_ns = event.time
    hdr.session = session
    hdr.type = kind
    comm = getattr(event, "program", b"")[:16]
    memcpy(hdr.comm, <const char *>comm, len(comm))


# session.command ---------------------------------------------------------------------

cdef uint64_t command_size(const esr_event_header *hdr):
    cdef const esr_command_event *e = <const esr_command_event *>hdr
    return COMMAND_FIXED + <uint64_t>e.argv_len + e.path_len + e.exe_len


cdef object decode_command(SessionEvents target, const esr_event_header *hdr, int64_t time,
                           uint64_t ei):
    cdef const esr_command_event *e = <const esr_command_event *>hdr
    cdef uint32_t argv_len = e.argv_len if e.argv_len <= ESR_ARGV_MAX else ESR_ARGV_MAX
    cdef list strings = split_strings(e.data, argv_len)
    cdef const char *path = e.data + argv_len
    cdef const char *exe_at = path + e.path_len
    cdef int64_t cut_args = <int64_t>e.argc - len(strings)
    cdef int64_t cut_bytes = <int64_t>e.argv_size - argv_len
    cdef uint16_t kernel = e.interpreter_args
    if cut_args < 0:
        cut_args = 0
    if cut_bytes < 0:
        cut_bytes = 0
    if e.flags & ESR_COMMAND_TTY:
        target.interactive = True
    truncated = cut_args > 0 or cut_bytes > 0 or (e.flags & (ESR_ARGV_INCOMPLETE | ESR_ARGV_UNREADABLE)) != 0
    # A script: the kernel put its interpreter first, then the script's
    # path where the caller's argv[0] was.
    if kernel and len(strings) > kernel:
        interpreter, argv = strings[:kernel], strings[kernel + 1:]
    else:
        interpreter, argv = [], strings[1:]
    if not e.exe_len:
        binary = b""
    elif e.flags & ESR_COMMAND_MEMFD:
        binary = PyBytes_FromStringAndSize(exe_at, cstr_len(exe_at, e.exe_len))
    elif e.flags & ESR_EXE_INCOMPLETE:
        binary = b"..." + exe_path(exe_at, e.exe_len)
    else:
        binary = exe_path(exe_at, e.exe_len)
    return _Command(
        ei, time, _pid.get(e.hdr.pid), e.ppid, _cgroup.get(e.hdr.cgroup_id),
        comm_obj(e.hdr.comm),
        PyBytes_FromStringAndSize(path, cstr_len(path, e.path_len)),
        argv, e.return_code, e.uid, e.gid, (e.flags & ESR_COMMAND_TTY) != 0,
        truncated, cut_args, cut_bytes, interpreter, binary, e.exe_dev, e.exe_ino,
        (e.flags & ESR_COMMAND_MEMFD) != 0, (e.flags & ESR_EXE_INCOMPLETE) != 0)


cdef bytes encode_command(event, uint64_t session):
    first = [*event.interpreter, event.path] if event.interpreter else [event.program]
    argv = b"\0".join([*first, *event.argv]) + b"\0"
    path = event.path + b"\0"
    if event.memfd:
        exe = event.exe + b"\0"
    else:
        exe = b"".join(part + b"\0" for part in reversed(event.exe.split(b"/")[1:]))
    exe_flags = ESR_EXE_INCOMPLETE if event.exe_truncated else 0
    cdef bytes raw = bytes(COMMAND_FIXED + len(argv) + len(path) + len(exe))
    cdef esr_command_event *e = <esr_command_event *>PyBytes_AS_STRING(raw)
    fill_header(&e.hdr, ESR_EVENT_COMMAND, session, event)
    e.hdr.pid = event.pid
    e.hdr.cgroup_id = event.cgroup_id
    e.ppid = event.ppid
    e.uid = event.unix_uid
    e.gid = event.unix_gid
    e.return_code = event.return_code
    e.argc = len(first) + len(event.argv)
    e.argv_size = e.argv_len = len(argv)
    e.path_len = len(path)
    e.exe_len = len(exe)
    e.exe_dev = event.exe_dev
    e.exe_ino = event.exe_ino
    e.interpreter_args = len(event.interpreter)
    e.flags = (ESR_COMMAND_TTY if event.has_tty else 0) | (ESR_COMMAND_MEMFD if event.memfd else 0) | exe_flags
    memcpy(e.data, <const char *>argv, len(argv))
    memcpy(e.data + len(argv), <const char *>path, len(path))
    memcpy(e.data + len(argv) + len(path), <const char *>exe, len(exe))
    return raw


# session.disk -------------------------------------------------------------------------

cdef uint64_t disk_size(const esr_event_header *hdr):
    return DISK_FIXED + (<const esr_disk_event *>hdr).path_len


cdef object decode_disk(SessionEvents target, const esr_event_header *hdr, int64_t time,
                        uint64_t ei):
    cdef const esr_disk_event *e = <const esr_disk_event *>hdr
    return _Disk(
        ei, time, _pid.get(e.hdr.pid), _cgroup.get(e.hdr.cgroup_id),
        comm_obj(e.hdr.comm),
        path_obj(e.path, cstr_len(e.path, e.path_len)),
        _flags.get(e.flags), e.return_code, e.path_truncated != 0)


cdef bytes encode_disk(event, uint64_t session):
    path = event.path + b"\0"
    cdef bytes raw = bytes(DISK_FIXED + len(path))
    cdef esr_disk_event *e = <esr_disk_event *>PyBytes_AS_STRING(raw)
    fill_header(&e.hdr, ESR_EVENT_DISK, session, event)
    e.hdr.pid = event.pid
    e.hdr.cgroup_id = event.cgroup_id
    e.flags = event.flags
    e.return_code = event.return_code
    e.path_len = len(path)
    e.path_truncated = event.path_truncated
    memcpy(e.path, <const char *>path, len(path))
    return raw


# session.network -----------------------------------------------------------------------

cdef uint64_t network_size(const esr_event_header *hdr):
    return NETWORK_SIZE


cdef object address(int family, const uint8_t *raw):
    cdef char text[64]
    if inet_ntop(family, raw, text, sizeof(text)) == NULL:
        return ""
    return text.decode("ascii")


cdef object decode_network(SessionEvents target, const esr_event_header *hdr, int64_t time,
                           uint64_t ei):
    cdef const esr_network_event *e = <const esr_network_event *>hdr
    cdef int family = AF_INET if e.family == AF_INET else AF_INET6
    return _Network(
        ei, time, _pid.get(e.hdr.pid), _cgroup.get(e.hdr.cgroup_id),
        comm_obj(e.hdr.comm),
        4 if family == AF_INET else 6,
        address(family, e.src_addr), e.src_port,
        address(family, e.dst_addr), e.dst_port,
        e.return_code)


cdef bytes encode_network(event, uint64_t session):
    cdef bytes raw = bytes(NETWORK_SIZE)
    cdef esr_network_event *e = <esr_network_event *>PyBytes_AS_STRING(raw)
    fill_header(&e.hdr, ESR_EVENT_NETWORK, session, event)
    e.hdr.pid = event.pid
    e.hdr.cgroup_id = event.cgroup_id
    e.return_code = event.return_code
    e.family = AF_INET if event.version == 4 else AF_INET6
    e.src_port = event.src_port
    e.dst_port = event.dst_port
    inet_pton(e.family, event.src_addr.encode(), e.src_addr)
    inet_pton(e.family, event.dst_addr.encode(), e.dst_addr)
    return raw


# terminal.output and terminal.input --------------------------------------------------------


cdef uint64_t terminal_data_size(const esr_event_header *hdr):
    return TERMINAL_DATA_FIXED + (<const esr_terminal_data_event *>hdr).len


cdef object decode_terminal_data(
    SessionEvents target, const esr_event_header *hdr, int64_t time, uint64_t ei
):
    cdef const esr_terminal_data_event *e = <const esr_terminal_data_event *>hdr
    data = PyBytes_FromStringAndSize(e.data, e.len)
    if hdr.type == ESR_EVENT_TERMINAL_INPUT:
        return _TerminalInput(ei, time, _pid.get(e.hdr.pid), e.tty, data)
    return _TerminalOutput(ei, time, _pid.get(e.hdr.pid), e.tty, data, e.skipped)


cdef bytes encode_terminal_data(event, uint64_t session):
    cdef bytes raw = bytes(TERMINAL_DATA_FIXED + len(event.data))
    cdef esr_terminal_data_event *e = <esr_terminal_data_event *>PyBytes_AS_STRING(raw)
    output = type(event) is _TerminalOutput
    fill_header(
        &e.hdr, ESR_EVENT_TERMINAL_OUTPUT if output else ESR_EVENT_TERMINAL_INPUT, session, event
    )
    e.hdr.pid = event.pid
    e.tty = event.tty
    e.len = len(event.data)
    e.skipped = event.skipped if output else 0
    memcpy(e.data, <const char *>event.data, len(event.data))
    return raw


# terminal.write -----------------------------------------------------------------------------


cdef uint64_t terminal_write_size(const esr_event_header *hdr):
    return TERMINAL_WRITE_SIZE


cdef object decode_terminal_write(
    SessionEvents target, const esr_event_header *hdr, int64_t time, uint64_t ei
):
    cdef const esr_terminal_write_event *e = <const esr_terminal_write_event *>hdr
    return _TerminalWrite(
        ei, time, _pid.get(e.hdr.pid), comm_obj(e.hdr.comm), e.tty, e.major, e.bytes
    )


cdef bytes encode_terminal_write(event, uint64_t session):
    cdef bytes raw = bytes(TERMINAL_WRITE_SIZE)
    cdef esr_terminal_write_event *e = <esr_terminal_write_event *>PyBytes_AS_STRING(raw)
    fill_header(&e.hdr, ESR_EVENT_TERMINAL_WRITE, session, event)
    e.hdr.pid = event.pid
    e.tty = event.tty
    e.major = event.major
    e.bytes = event.written
    return raw


# terminal.resize ----------------------------------------------------------------------------


cdef uint64_t terminal_resize_size(const esr_event_header *hdr):
    return TERMINAL_RESIZE_SIZE


cdef object decode_terminal_resize(
    SessionEvents target, const esr_event_header *hdr, int64_t time, uint64_t ei
):
    cdef const esr_terminal_resize_event *e = <const esr_terminal_resize_event *>hdr
    return _TerminalResize(ei, time, e.tty, e.rows, e.cols)


cdef bytes encode_terminal_resize(event, uint64_t session):
    cdef bytes raw = bytes(TERMINAL_RESIZE_SIZE)
    cdef esr_terminal_resize_event *e = <esr_terminal_resize_event *>PyBytes_AS_STRING(raw)
    fill_header(&e.hdr, ESR_EVENT_TERMINAL_RESIZE, session, event)
    e.tty = event.tty
    e.rows = event.rows
    e.cols = event.cols
    return raw


# session.ptrace -------------------------------------------------------------------------


cdef uint64_t ptrace_size(const esr_event_header *hdr):
    return PTRACE_SIZE


cdef object decode_ptrace(
    SessionEvents target, const esr_event_header *hdr, int64_t time, uint64_t ei
):
    cdef const esr_ptrace_event *e = <const esr_ptrace_event *>hdr
    return _Ptrace(
        ei, time, _pid.get(e.hdr.pid), _cgroup.get(e.hdr.cgroup_id), comm_obj(e.hdr.comm),
        _PTRACE_REQUESTS[e.request] if 0 < e.request < len(_PTRACE_REQUESTS) else str(e.request),
        e.target_pid, e.target_tgid,
        PyBytes_FromStringAndSize(e.target_comm, cstr_len(e.target_comm, 16)),
        e.return_code, (e.flags & ESR_PTRACE_FOLLOWED) != 0, (e.flags & ESR_PTRACE_LEFT) != 0,
        (e.flags & ESR_PTRACE_AS_NAMED) != 0,
    )


cdef bytes encode_ptrace(event, uint64_t session):
    cdef bytes raw = bytes(PTRACE_SIZE)
    cdef esr_ptrace_event *e = <esr_ptrace_event *>PyBytes_AS_STRING(raw)
    fill_header(&e.hdr, ESR_EVENT_PTRACE, session, event)
    e.hdr.pid = event.pid
    e.hdr.cgroup_id = event.cgroup_id
    e.return_code = event.return_code
    e.request = _PTRACE_REQUESTS.index(event.request)
    e.target_pid = event.target_pid
    e.target_tgid = event.target_tgid
    memcpy(e.target_comm, <const char *>event.target_program, min(len(event.target_program), 15))
    e.flags = ((ESR_PTRACE_FOLLOWED if event.followed else 0)
               | (ESR_PTRACE_LEFT if event.left else 0)
               | (ESR_PTRACE_AS_NAMED if event.pid_as_named else 0))
    return raw


# session.io_uring -----------------------------------------------------------------------


cdef uint64_t io_uring_size(const esr_event_header *hdr):
    return IO_URING_SIZE


cdef object decode_io_uring(
    SessionEvents target, const esr_event_header *hdr, int64_t time, uint64_t ei
):
    cdef const esr_io_uring_event *e = <const esr_io_uring_event *>hdr
    return _IoUring(
        ei, time, _pid.get(e.hdr.pid), _cgroup.get(e.hdr.cgroup_id), comm_obj(e.hdr.comm),
        "setup" if e.setup else schema.io_uring_operation(e.opcode), e.opcode, e.ring_fd,
        e.ring_pid, e.sq_entries, e.setup_flags,
    )


cdef bytes encode_io_uring(event, uint64_t session):
    cdef bytes raw = bytes(IO_URING_SIZE)
    cdef esr_io_uring_event *e = <esr_io_uring_event *>PyBytes_AS_STRING(raw)
    fill_header(&e.hdr, ESR_EVENT_IO_URING, session, event)
    e.hdr.pid = event.pid
    e.hdr.cgroup_id = event.cgroup_id
    e.ring_fd = event.ring_fd
    e.ring_pid = event.ring_pid
    e.sq_entries = event.sq_entries
    e.setup_flags = event.setup_flags
    e.setup = event.operation == "setup"
    e.opcode = event.opcode
    return raw


# The table ------------------------------------------------------------------------------

ctypedef uint64_t (*size_fn)(const esr_event_header *hdr)
ctypedef object (*decode_fn)(SessionEvents target, const esr_event_header *hdr, int64_t time,
                             uint64_t ei)
ctypedef bytes (*encode_fn)(event, uint64_t session)

cdef struct record_type:
    uint64_t fixed_size  # bytes before any variable-length part
    size_fn size  # bytes a record claims, variable parts included
    decode_fn decode
    encode_fn encode
    int buffer

cdef record_type RECORD_TYPES[ESR_EVENT_TYPE_END]
memset(RECORD_TYPES, 0, sizeof(RECORD_TYPES))
RECORD_TYPES[ESR_EVENT_COMMAND] = record_type(COMMAND_FIXED, command_size, decode_command,
                                              encode_command, ESR_BUF_COMMAND)
RECORD_TYPES[ESR_EVENT_DISK] = record_type(DISK_FIXED, disk_size, decode_disk, encode_disk,
                                           ESR_BUF_DISK)
RECORD_TYPES[ESR_EVENT_NETWORK] = record_type(NETWORK_SIZE, network_size, decode_network,
                                              encode_network, ESR_BUF_NETWORK)
RECORD_TYPES[ESR_EVENT_TERMINAL_OUTPUT] = record_type(
    TERMINAL_DATA_FIXED, terminal_data_size, decode_terminal_data, encode_terminal_data,
    ESR_BUF_TERMINAL
)
RECORD_TYPES[ESR_EVENT_TERMINAL_INPUT] = record_type(
    TERMINAL_DATA_FIXED, terminal_data_size, decode_terminal_data, encode_terminal_data,
    ESR_BUF_TERMINAL
)
RECORD_TYPES[ESR_EVENT_TERMINAL_WRITE] = record_type(
    TERMINAL_WRITE_SIZE, terminal_write_size, decode_terminal_write, encode_terminal_write,
    ESR_BUF_TERMINAL
)
RECORD_TYPES[ESR_EVENT_TERMINAL_RESIZE] = record_type(
    TERMINAL_RESIZE_SIZE, terminal_resize_size, decode_terminal_resize, encode_terminal_resize,
    ESR_BUF_TERMINAL
)
RECORD_TYPES[ESR_EVENT_PTRACE] = record_type(PTRACE_SIZE, ptrace_size, decode_ptrace,
                                             encode_ptrace, ESR_BUF_COMMAND)
RECORD_TYPES[ESR_EVENT_IO_URING] = record_type(IO_URING_SIZE, io_uring_size, decode_io_uring,
                                               encode_io_uring, ESR_BUF_COMMAND)


cdef inline const record_type *known(uint16_t kind):
    if kind >= ESR_EVENT_TYPE_END or RECORD_TYPES[kind].decode == NULL:
        return NULL
    return &RECORD_TYPES[kind]


def encode_record(event, uint64_t session):
    """The raw record the BPF programs would have sent for a schema.Record,
    padded into a batch entry: for corpora and tests."""
    cdef uint16_t kind = event.__struct_config__.tag
    cdef const record_type *t = known(kind)
    if t == NULL:
        raise ValueError(f"{type(event).__name__} is not made by the BPF programs")
    record = t.encode(event, session)
    padded = (4 + len(record) + 7) & ~7
    return len(record).to_bytes(4, "little") + record + bytes(padded - 4 - len(record))


for _record in schema.RECORDS:
    if known(_record.__struct_config__.tag) == NULL or \
            BUFFERS[known(_record.__struct_config__.tag).buffer] != _record.buffer:
        raise ImportError(f"schema.{_record.__name__} and the decoder's table disagree on its "
                          "type or buffer")


# --- batches -------------------------------------------------------------------------------

cdef struct entry:
    uint64_t ts
    uint64_t offset


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


cdef Py_ssize_t count_entries(const uint8_t *base, Py_ssize_t size) except -1:
    """How many entries the batch holds, every length checked."""
    cdef Py_ssize_t pos = 0, n = 0
    cdef uint32_t length
    cdef const esr_event_header *hdr
    cdef const record_type *t
    while pos < size:
        if size - pos < 4:
            raise BatchError(f"damaged batch: {size - pos} stray bytes at its end")
        length = (<const uint32_t *>(base + pos))[0]
        if length > size - pos - 4:
            raise BatchError(f"damaged batch: record {n} claims {length} bytes, "
                             f"{size - pos - 4} are left")
        if length < HEADER_SIZE:
            raise BatchError(f"damaged batch: record {n} is {length} bytes, shorter than a header")
        hdr = <const esr_event_header *>(base + pos + 4)
        t = known(hdr.type)
        if t != NULL and (length < t.fixed_size or t.size(hdr) > length):
            raise BatchError(f"damaged batch: record {n} (type {hdr.type}) of {length} bytes "
                             f"claims more")
        pos += (4 + <Py_ssize_t>length + 7) & ~7
        n += 1
    return n


def decode_batch(const uint8_t[::1] batch not None, dict sessions not None, int64_t time_offset_ns):
    """Decode every record of a batch into its session's SessionEvents.

    sessions maps a session cookie to its SessionEvents; time_offset_ns turns
    the kernel's boot-time clock into nanoseconds since the epoch. Returns the
    number of records that belong to no known session. Raises BatchError,
    having decoded nothing, if any length in the batch is wrong.
    """
    cdef Py_ssize_t size = batch.shape[0]
    cdef const uint8_t *base = &batch[0] if size else NULL
    cdef Py_ssize_t pos = 0, n, i
    cdef uint32_t length
    cdef const esr_event_header *hdr
    cdef const record_type *t
    cdef entry *items
    cdef entry *tmp
    cdef uint64_t orphans = 0, cookie, last_cookie = 0
    cdef SessionEvents target = None
    cdef object event

    n = count_entries(base, size)
    if n == 0:
        return 0
    items = <entry *>malloc(2 * n * sizeof(entry))
    if items == NULL:
        raise MemoryError()
    tmp = items + n
    try:
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
            t = known(hdr.type)
            if target is None or t == NULL:
                orphans += 1
                continue
            event = t.decode(target, hdr, <int64_t>hdr.ts_boot_ns + time_offset_ns,
                             target.next_ei)
            target.next_ei += 1
            target.counts[t.buffer] += 1
            target.events.append(event)
            if target.audit_types & (1 << hdr.type) and (
                    target.audit_failures & (1 << hdr.type) or event.return_code >= 0):
                target.audited.append(event)
    finally:
        free(items)
    return orphans
