# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Decode a batch of raw BPF records into each session's pending frame.

A batch is what esr._fast.probe collects from the perf buffers, or a corpus
saved from it: entries of [u32 length][record], each padded to 8 bytes.
Every length is checked before anything is decoded: a damaged batch is
refused whole, and nothing is read past its end. Records are then put in
timestamp order, given their session's next event index, and written
straight from the raw bytes, with no Python object per record: into the
session's msgpack list of events (byte for byte what msgspec makes of its
schema Struct, so readers decode it as one), and, for the records the audit
log gets, into its audit lines (byte for byte what schema.AuditFormat
renders; a line the fast path cannot render, with bytes that are not ASCII
or longer than a line may be, is left to AuditFormat).

RECORD_TYPES is the one table of record types: for each type of
bpf/esr_events.h, how many bytes a record of it claims, how to pack it as
its Struct, how to render its audit log fields, its return code, how to
encode one (for corpora and tests), and its buffer.
"""
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint8_t, int32_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcmp, memcpy, memchr, memset, strlen

cdef extern from "<string.h>":
    size_t strnlen(const char *s, size_t maxlen)

cdef extern from "<time.h>":
    ctypedef long time_t
    struct tm:
        pass
    tm *gmtime_r(const time_t *t, tm *result)
    size_t strftime(char *s, size_t maxsize, const char *fmt, const tm *t)

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

cdef object _TerminalOutput = schema.TerminalOutput
cdef object _encode_event = schema.encode_event
cdef object _decode_events = schema.decode_events
cdef size_t MAX_LINE = schema.MAX_LINE


# --- output: a growing buffer, msgpack and JSON ----------------------------------------

cdef struct buf:
    char *data
    size_t len
    size_t cap


cdef int reserve(buf *b, size_t n) except -1:
    """Room for n more bytes. Each record's writers reserve what it may
    take at most, once: the functions below then write without checking."""
    cdef size_t cap
    cdef char *grown
    if b.len + n <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 4096
    while cap < b.len + n:
        cap *= 2
    grown = <char *>realloc(b.data, cap)
    if grown == NULL:
        raise MemoryError()
    b.data = grown
    b.cap = cap
    return 0


cdef inline int put(buf *b, const void *src, size_t n) except -1:
    reserve(b, n)
    memcpy(b.data + b.len, src, n)
    b.len += n
    return 0


# The writers below take a cursor into a buffer with room reserved and return
# it moved past what they wrote: a cursor stays in a register, where a buf's
# length would be stored and loaded again after every byte (a char store may
# alias it).

cdef inline char *at(buf *b, size_t n) except NULL:
    """Where the next bytes go, with room for n of them."""
    reserve(b, n)
    return b.data + b.len


cdef inline char *w(char *p, const void *src, size_t n) noexcept:
    memcpy(p, src, n)
    return p + n


cdef inline char *w1(char *p, char c) noexcept:
    p[0] = c
    return p + 1


cdef extern from *:
    """
    /* A string literal: its length folds into a constant. */
    #define ESR_LIT(p, s) (memcpy((p), (s), strlen(s)), (p) + strlen(s))
    """
    char *lit "ESR_LIT"(char *p, const char *s) noexcept


cdef extern from *:
    """
    /* v's low n bytes (2, 4 or 8), big-endian: one store each. */
    static inline void esr_be(char *p, uint64_t v, int n)
    {
        uint16_t v2 = __builtin_bswap16((uint16_t)v);
        uint32_t v4 = __builtin_bswap32((uint32_t)v);
        uint64_t v8 = __builtin_bswap64(v);

        if (n == 2)
            memcpy(p, &v2, 2);
        else if (n == 4)
            memcpy(p, &v4, 4);
        else
            memcpy(p, &v8, 8);
    }
    """
    void esr_be(char *p, uint64_t v, int n) noexcept


# msgpack as msgspec writes it: the shortest form of each value. At most 9
# bytes each, 5 before a string's bytes.
cdef enum:
    MP_MAX = 9


cdef inline char *mp_head(char *p, uint8_t fix, uint8_t fix_max, uint8_t code8, uint8_t code16,
                          uint8_t code32, uint64_t n) noexcept:
    if n <= fix_max and fix_max:
        p[0] = <char>(fix | <uint8_t>n)
        return p + 1
    if n < 256 and code8:
        p[0] = <char>code8
        p[1] = <char><uint8_t>n
        return p + 2
    if n < 65536:
        p[0] = <char>code16
        esr_be(p + 1, n, 2)
        return p + 3
    p[0] = <char>code32
    esr_be(p + 1, n, 4)
    return p + 5


cdef inline char *mp_array(char *p, uint64_t n) noexcept:
    return mp_head(p, 0x90, 15, 0, 0xdc, 0xdd, n)


cdef inline char *mp_bin(char *p, const char *src, size_t n) noexcept:
    p = mp_head(p, 0, 0, 0xc4, 0xc5, 0xc6, n)
    memcpy(p, src, n)
    return p + n


cdef inline char *mp_str(char *p, const char *src, size_t n) noexcept:
    p = mp_head(p, 0xa0, 31, 0xd9, 0xda, 0xdb, n)
    memcpy(p, src, n)
    return p + n


cdef inline char *mp_uint(char *p, uint64_t v) noexcept:
    if v < 128:
        p[0] = <char><uint8_t>v
        return p + 1
    if v < 256:
        p[0] = <char>0xcc
        p[1] = <char><uint8_t>v
        return p + 2
    if v < 65536:
        p[0] = <char>0xcd
        esr_be(p + 1, v, 2)
        return p + 3
    if v >> 32 == 0:
        p[0] = <char>0xce
        esr_be(p + 1, v, 4)
        return p + 5
    p[0] = <char>0xcf
    esr_be(p + 1, v, 8)
    return p + 9


cdef inline char *mp_int(char *p, int64_t v) noexcept:
    if v >= 0:
        return mp_uint(p, <uint64_t>v)
    if v >= -32:
        p[0] = <char><uint8_t>v
        return p + 1
    if v >= -128:
        p[0] = <char>0xd0
        p[1] = <char><uint8_t>v
        return p + 2
    if v >= -32768:
        p[0] = <char>0xd1
        esr_be(p + 1, <uint64_t>v, 2)
        return p + 3
    if v >= -2147483648:
        p[0] = <char>0xd2
        esr_be(p + 1, <uint64_t>v, 4)
        return p + 5
    p[0] = <char>0xd3
    esr_be(p + 1, <uint64_t>v, 8)
    return p + 9


cdef inline char *mp_bool(char *p, bint v) noexcept:
    p[0] = <char>(0xc3 if v else 0xc2)
    return p + 1


# JSON text as AuditFormat writes it. Fields of ASCII text are msgspec's;
# once any is not ASCII, the whole object is json.dumps(ensure_ascii=True)'s:
# each character outside ASCII \u-escaped (in surrogate pairs beyond the
# BMP), and DEL too. A string of n bytes takes at most 2 + 6n, a number 20.
# js_str returns NULL when it cannot: a byte outside ASCII in msgspec's form
# (the line is rendered again the other way), bytes that are not UTF-8 in
# json's (U+FFFD and _base64: the line is AuditFormat's to render).

cdef const char *HEX = b"0123456789abcdef"

# Bytes JSON text takes as they are, in msgspec's form.
cdef bint PLAIN[256]
for _c in range(256):
    PLAIN[_c] = 0x20 <= _c < 0x7F and _c != ord('"') and _c != ord("\\")


cdef inline char *u_escape(char *o, uint32_t code) noexcept:
    o[0] = c'\\'
    o[1] = c'u'
    o[2] = HEX[(code >> 12) & 15]
    o[3] = HEX[(code >> 8) & 15]
    o[4] = HEX[(code >> 4) & 15]
    o[5] = HEX[code & 15]
    return o + 6


cdef inline int utf8_char(const uint8_t *s, size_t n, uint32_t *code) noexcept:
    """The length of the well-formed UTF-8 character at s (Unicode's table
    3-7, which Python's strict decoder follows) and its code point; 0 if
    it is not one."""
    cdef uint8_t c = s[0]
    cdef uint8_t lo = 0x80, hi = 0xBF
    cdef int length, i
    if 0xC2 <= c <= 0xDF:
        length, code[0] = 2, c & 0x1F
    elif 0xE0 <= c <= 0xEF:
        length, code[0] = 3, c & 0x0F
        if c == 0xE0:
            lo = 0xA0
        elif c == 0xED:  # no surrogates
            hi = 0x9F
    elif 0xF0 <= c <= 0xF4:
        length, code[0] = 4, c & 0x07
        if c == 0xF0:
            lo = 0x90
        elif c == 0xF4:  # nothing past U+10FFFF
            hi = 0x8F
    else:
        return 0
    if <size_t>length > n or not lo <= s[1] <= hi:
        return 0
    for i in range(1, length):
        if i > 1 and not 0x80 <= s[i] <= 0xBF:
            return 0
        code[0] = (code[0] << 6) | (s[i] & 0x3F)
    return length


cdef char *js_str(char *o, const char *s, size_t n, bint ensure_ascii) noexcept:
    cdef const uint8_t *u = <const uint8_t *>s
    cdef size_t i = 0
    cdef uint8_t c
    cdef uint32_t code
    cdef int length
    o[0] = c'"'
    o += 1
    while i < n:
        c = u[i]
        if PLAIN[c]:
            o[0] = <char>c
            o += 1
            i += 1
            continue
        if c >= 0x7F:
            if not ensure_ascii:
                if c == 0x7F:
                    o[0] = <char>c
                    o += 1
                    i += 1
                    continue
                return NULL
            if c == 0x7F:
                o = u_escape(o, c)
                i += 1
                continue
            length = utf8_char(u + i, n - i, &code)
            if length == 0:
                return NULL
            if code >= 0x10000:
                code -= 0x10000
                o = u_escape(o, 0xD800 + (code >> 10))
                o = u_escape(o, 0xDC00 + (code & 0x3FF))
            else:
                o = u_escape(o, code)
            i += length
            continue
        o[0] = c'\\'
        if c == c'"' or c == c'\\':
            o[1] = <char>c
        elif c == 0x08:
            o[1] = c'b'
        elif c == 0x09:
            o[1] = c't'
        elif c == 0x0a:
            o[1] = c'n'
        elif c == 0x0c:
            o[1] = c'f'
        elif c == 0x0d:
            o[1] = c'r'
        else:
            o = u_escape(o, c) - 2
        o += 2
        i += 1
    o[0] = c'"'
    return o + 1


cdef inline char *js_uint(char *p, uint64_t v) noexcept:
    # Its digits, counted first, are written from the last.
    cdef int n = 1
    cdef uint64_t bound = 10
    cdef char *o
    while n < 20 and v >= bound:
        n += 1
        bound *= 10
    p += n
    o = p
    while True:
        o -= 1
        o[0] = <char>(c'0' + v % 10)
        v //= 10
        if v == 0:
            return p


cdef inline char *js_int(char *p, int64_t v) noexcept:
    if v < 0:
        p[0] = c'-'
        return js_uint(p + 1, <uint64_t>0 - <uint64_t>v)
    return js_uint(p, <uint64_t>v)


cdef char *js_hex12(char *p, uint64_t v) noexcept:
    """f"{v:012x}"."""
    cdef char t[16]
    cdef int i = 16
    while i > 4 or v:
        i -= 1
        t[i] = HEX[v & 15]
        v >>= 4
    return w(p, t + i, 16 - i)


# --- strings in records -----------------------------------------------------------------

cdef inline Py_ssize_t cstr_len(const char *s, Py_ssize_t n_with_nul):
    """Length of a string copied with its NUL, as the BPF side reports it."""
    if n_with_nul <= 0:
        return 0
    return strnlen(s, n_with_nul)


cdef inline const char *next_string(const char *p, const char *end, size_t *n) noexcept:
    """The string at p of a NUL-separated block (its length in n), and where
    the next one starts. Arguments and path components are short: a loop
    beats memchr's call."""
    cdef const char *nul = p
    while nul < end and nul[0] != 0:
        nul += 1
    n[0] = nul - p
    return nul + 1


cdef int exe_path(buf *out, const char *components, size_t n) except -1:
    """A path from its components, listed from the file up to the root:
    written from the back, each component before the one it is in."""
    cdef const char *p = components
    cdef const char *end = components + n
    cdef const char *part
    cdef size_t total = 1, length, at
    while p < end:
        p = next_string(p, end, &length)
        total += length + 1
    if total > 1:
        total -= 1  # no slash after the last
    reserve(out, total)
    at = out.len + total
    out.data[out.len] = c'/'
    p = components
    while p < end:
        part = p
        p = next_string(p, end, &length)
        at -= length
        memcpy(out.data + at, part, length)
        if at > out.len + 1:
            at -= 1
            out.data[at] = c'/'
    out.len += total
    return 0


cdef void fill_header(esr_event_header *hdr, uint16_t kind, uint64_t session, event):
    hdr.ts_boot_ns = event.time
    hdr.session = session
    hdr.type = kind
    comm = getattr(event, "program", b"")[:16]
    memcpy(hdr.comm, <const char *>comm, len(comm))


cdef inline char *pack_comm(char *p, const esr_event_header *hdr) noexcept:
    return mp_bin(p, hdr.comm, strnlen(hdr.comm, 16))


cdef inline char *render_comm(char *p, const esr_event_header *hdr, bint ensure_ascii) noexcept:
    return js_str(p, hdr.comm, strnlen(hdr.comm, 16), ensure_ascii)


# What a pack or a render function reserves, besides its strings: room for
# its head and each scalar field.
cdef enum:
    FIXED = 1024


cdef inline char *pack_head(char *p, uint64_t fields, uint16_t kind, uint64_t ei,
                            int64_t time) noexcept:
    """Every Struct's first elements: its tag, ei and time."""
    p = mp_array(p, fields)
    p = mp_uint(p, kind)
    p = mp_uint(p, ei)
    return mp_int(p, time)


# --- the record types ----------------------------------------------------------------

# session.command ---------------------------------------------------------------------

cdef struct command_view:
    const char *argv  # NUL-separated: interpreter, argv[0], argv[1:]
    size_t argv_n
    size_t interpreter  # strings of the kernel's before argv[0]
    size_t skip  # strings before argv[1]
    size_t args  # argv[1:]
    const char *path
    size_t path_n
    const char *exe  # the binary's path, or a memfd's name
    size_t exe_n
    int64_t cut_args
    int64_t cut_bytes
    bint truncated


# The command record viewed last, and what its fields mean: its pack and then
# its line read them, and both run before the next record is decoded. The
# GIL is held throughout, so one view serves every session.
cdef const esr_event_header *viewed = NULL
cdef command_view view
# Where each of its argv strings ends (its NUL, or the block's end), so that
# the block is scanned once however often its strings are written. A string
# takes at least its NUL: ESR_ARGV_MAX bounds their number.
cdef uint16_t string_end[ESR_ARGV_MAX]
# The binary's path, built from its components, and those components: a
# host runs the same few binaries over and over.
cdef buf exe_built
cdef buf exe_components


cdef uint64_t command_size(const esr_event_header *hdr):
    cdef const esr_command_event *e = <const esr_command_event *>hdr
    return COMMAND_FIXED + <uint64_t>e.argv_len + e.path_len + e.exe_len


cdef size_t split_strings(const char *block, size_t n) noexcept:
    """Note where each string of the block ends; how many there are."""
    cdef const char *p = block
    cdef size_t count = 0, length
    while p < block + n:
        p = next_string(p, block + n, &length)
        string_end[count] = <uint16_t>(p - 1 - block)
        count += 1
    return count


cdef inline size_t string_start(size_t i) noexcept:
    return string_end[i - 1] + 1 if i else 0


cdef int exe_of(const esr_command_event *e, const char *components) except -1:
    """view.exe: a memfd's name, or the binary's path built from its
    components, as last time when they are the same."""
    cdef char incomplete = 1 if e.flags & ESR_EXE_INCOMPLETE else 0
    if not e.exe_len:
        view.exe, view.exe_n = components, 0
        return 0
    if e.flags & ESR_COMMAND_MEMFD:
        view.exe, view.exe_n = components, cstr_len(components, e.exe_len)
        return 0
    if exe_components.len != e.exe_len + 1u or exe_components.data[0] != incomplete or \
            memcmp(exe_components.data + 1, components, e.exe_len) != 0:
        exe_components.len = 0
        put(&exe_components, &incomplete, 1)
        put(&exe_components, components, e.exe_len)
        exe_built.len = 0
        if incomplete:
            put(&exe_built, b"...", 3)
        exe_path(&exe_built, components, e.exe_len)
    view.exe, view.exe_n = exe_built.data, exe_built.len
    return 0


cdef int view_command(const esr_event_header *hdr) except -1:
    """Fill view with what the fields of a command record mean."""
    global viewed
    cdef const esr_command_event *e = <const esr_command_event *>hdr
    cdef uint32_t argv_len = e.argv_len if e.argv_len <= ESR_ARGV_MAX else ESR_ARGV_MAX
    cdef size_t strings
    viewed = NULL
    strings = split_strings(e.data, argv_len)
    view.argv = <const char *>e.data
    view.argv_n = argv_len
    # A script: the kernel put its interpreter first, then the script's
    # path where the caller's argv[0] was.
    if e.interpreter_args and strings > e.interpreter_args:
        view.interpreter = e.interpreter_args
        view.skip = view.interpreter + 1
    else:
        view.interpreter = 0
        view.skip = 1
    view.args = strings - view.skip if strings > view.skip else 0
    view.path = e.data + argv_len
    view.path_n = cstr_len(view.path, e.path_len)
    exe_of(e, view.path + e.path_len)
    view.cut_args = <int64_t>e.argc - <int64_t>strings
    view.cut_bytes = <int64_t>e.argv_size - argv_len
    if view.cut_args < 0:
        view.cut_args = 0
    if view.cut_bytes < 0:
        view.cut_bytes = 0
    view.truncated = view.cut_args > 0 or view.cut_bytes > 0 or \
        (e.flags & (ESR_ARGV_INCOMPLETE | ESR_ARGV_UNREADABLE)) != 0
    viewed = hdr
    return 0


cdef char *pack_strings(char *p, size_t first, size_t count) noexcept:
    cdef size_t i, start
    p = mp_array(p, count)
    for i in range(first, first + count):
        start = string_start(i)
        p = mp_bin(p, view.argv + start, string_end[i] - start)
    return p


cdef char *render_strings(char *p, size_t first, size_t count, bint ensure_ascii) noexcept:
    cdef size_t i, start
    p = w1(p, c'[')
    for i in range(first, first + count):
        if i > first:
            p = w1(p, c',')
        start = string_start(i)
        p = js_str(p, view.argv + start, string_end[i] - start, ensure_ascii)
        if p == NULL:
            return NULL
    return w1(p, c']')


cdef inline size_t command_room(size_t per_byte) noexcept:
    """Bytes the viewed command's fields may take at most, at per_byte for
    each of its strings' bytes."""
    return FIXED + 6 * (view.skip + view.args) + \
        per_byte * (16 + view.path_n + view.exe_n + view.argv_n)


cdef int pack_command(SessionEvents s, const esr_event_header *hdr, int64_t time,
                      uint64_t ei) except -1:
    cdef const esr_command_event *e = <const esr_command_event *>hdr
    cdef char *p
    view_command(hdr)
    if e.flags & ESR_COMMAND_TTY:
        s.interactive = True
    p = at(&s.body, command_room(1))
    p = pack_head(p, 22, ESR_EVENT_COMMAND, ei, time)
    p = mp_uint(p, e.hdr.pid)
    p = mp_uint(p, e.ppid)
    p = mp_uint(p, e.hdr.cgroup_id)
    p = pack_comm(p, hdr)
    p = mp_bin(p, view.path, view.path_n)
    p = pack_strings(p, view.skip, view.args)
    p = mp_int(p, e.return_code)
    p = mp_uint(p, e.uid)
    p = mp_uint(p, e.gid)
    p = mp_bool(p, e.flags & ESR_COMMAND_TTY)
    p = mp_bool(p, view.truncated)
    p = mp_int(p, view.cut_args)
    p = mp_int(p, view.cut_bytes)
    p = pack_strings(p, 0, view.interpreter)
    p = mp_bin(p, view.exe, view.exe_n)
    p = mp_uint(p, e.exe_dev)
    p = mp_uint(p, e.exe_ino)
    p = mp_bool(p, e.flags & ESR_COMMAND_MEMFD)
    p = mp_bool(p, e.flags & ESR_EXE_INCOMPLETE)
    s.body.len = p - s.body.data
    return 0


cdef int render_command(SessionEvents s, const esr_event_header *hdr, buf *o) except -1:
    cdef char *p
    cdef const esr_command_event *e = <const esr_command_event *>hdr
    # Its pack, just before, viewed the same record.
    if viewed != hdr:
        view_command(hdr)
    p = at(o, command_room(6))
    p = lit(p, b'"pid":')
    p = js_uint(p, e.hdr.pid)
    p = lit(p, b',"ppid":')
    p = js_uint(p, e.ppid)
    p = lit(p, b',"cgroup_id":')
    p = js_uint(p, e.hdr.cgroup_id)
    p = lit(p, b',"program":')
    p = render_comm(p, hdr, s.ensure_ascii)
    if p == NULL:
        return 1
    p = lit(p, b',"path":')
    p = js_str(p, view.path, view.path_n, s.ensure_ascii)
    if p == NULL:
        return 1
    p = lit(p, b',"argv":')
    p = render_strings(p, view.skip, view.args, s.ensure_ascii)
    if p == NULL:
        return 1
    p = lit(p, b',"return_code":')
    p = js_int(p, e.return_code)
    p = lit(p, b',"unix_uid":')
    p = js_uint(p, e.uid)
    p = lit(p, b',"unix_gid":')
    p = js_uint(p, e.gid)
    if view.interpreter:
        p = lit(p, b',"interpreter":')
        p = render_strings(p, 0, view.interpreter, s.ensure_ascii)
        if p == NULL:
            return 1
    if view.exe_n:
        p = lit(p, b',"exe":')
        p = js_str(p, view.exe, view.exe_n, s.ensure_ascii)
        if p == NULL:
            return 1
        p = lit(p, b',"exe_dev":')
        p = js_uint(p, e.exe_dev)
        p = lit(p, b',"exe_ino":')
        p = js_uint(p, e.exe_ino)
        if e.flags & ESR_COMMAND_MEMFD:
            p = lit(p, b',"memfd":true')
        if e.flags & ESR_EXE_INCOMPLETE:
            p = lit(p, b',"exe_truncated":true')
    if view.truncated:
        p = lit(p, b',"argv_truncated":true,"argv_cut_args":')
        p = js_int(p, view.cut_args)
        p = lit(p, b',"argv_cut_bytes":')
        p = js_int(p, view.cut_bytes)
    o.len = p - o.data
    return 0


cdef int64_t command_return_code(const esr_event_header *hdr):
    return (<const esr_command_event *>hdr).return_code


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


cdef int pack_disk(SessionEvents s, const esr_event_header *hdr, int64_t time,
                   uint64_t ei) except -1:
    cdef const esr_disk_event *e = <const esr_disk_event *>hdr
    cdef char *p
    cdef Py_ssize_t path_n = cstr_len(e.path, e.path_len)
    p = at(&s.body, FIXED + path_n)
    p = pack_head(p, 10, ESR_EVENT_DISK, ei, time)
    p = mp_uint(p, e.hdr.pid)
    p = mp_uint(p, e.hdr.cgroup_id)
    p = pack_comm(p, hdr)
    p = mp_bin(p, e.path, path_n)
    p = mp_int(p, e.flags)
    p = mp_int(p, e.return_code)
    p = mp_bool(p, e.path_truncated != 0)
    s.body.len = p - s.body.data
    return 0


cdef int render_disk(SessionEvents s, const esr_event_header *hdr, buf *o) except -1:
    cdef char *p
    cdef const esr_disk_event *e = <const esr_disk_event *>hdr
    cdef Py_ssize_t path_n = cstr_len(e.path, e.path_len)
    p = at(o, FIXED + 6 * (16 + path_n))
    p = lit(p, b'"pid":')
    p = js_uint(p, e.hdr.pid)
    p = lit(p, b',"cgroup_id":')
    p = js_uint(p, e.hdr.cgroup_id)
    p = lit(p, b',"program":')
    p = render_comm(p, hdr, s.ensure_ascii)
    if p == NULL:
        return 1
    p = lit(p, b',"path":')
    p = js_str(p, e.path, path_n, s.ensure_ascii)
    if p == NULL:
        return 1
    p = lit(p, b',"flags":')
    p = js_int(p, e.flags)
    p = lit(p, b',"return_code":')
    p = js_int(p, e.return_code)
    if e.path_truncated:
        p = lit(p, b',"path_truncated":true')
    o.len = p - o.data
    return 0


cdef int64_t disk_return_code(const esr_event_header *hdr):
    return (<const esr_disk_event *>hdr).return_code


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


cdef size_t address(int family, const uint8_t *raw, char *text):
    """The address as inet_ntop writes it, in text[64]: "" if it cannot.
    IPv4 without it: inet_ntop formats through sprintf, a third of a
    connect's cost."""
    cdef size_t n = 0
    cdef int i
    cdef uint8_t octet
    if family != AF_INET:
        if inet_ntop(family, raw, text, 64) == NULL:
            text[0] = 0
        return strlen(text)
    for i in range(4):
        octet = raw[i]
        if octet >= 100:
            text[n] = <char>(c'0' + octet // 100)
            n += 1
        if octet >= 10:
            text[n] = <char>(c'0' + octet // 10 % 10)
            n += 1
        text[n] = <char>(c'0' + octet % 10)
        text[n + 1] = c'.'
        n += 2
    text[n - 1] = 0
    return n - 1


# The network record viewed last and its addresses as text: its pack and
# then its line read them (as the command view, above).
cdef const esr_event_header *net_viewed = NULL
cdef char net_src[64]
cdef char net_dst[64]
cdef size_t net_src_n, net_dst_n


cdef void view_network(const esr_event_header *hdr) noexcept:
    global net_viewed, net_src_n, net_dst_n
    cdef const esr_network_event *e = <const esr_network_event *>hdr
    cdef int family = AF_INET if e.family == AF_INET else AF_INET6
    net_src_n = address(family, e.src_addr, net_src)
    net_dst_n = address(family, e.dst_addr, net_dst)
    net_viewed = hdr


cdef inline char *js_address(char *p, const char *text, size_t n) noexcept:
    """An address as address() wrote it: digits, hex, dots and colons, which
    JSON takes as they are."""
    p = w1(p, c'"')
    p = w(p, text, n)
    return w1(p, c'"')


cdef int pack_network(SessionEvents s, const esr_event_header *hdr, int64_t time,
                      uint64_t ei) except -1:
    cdef const esr_network_event *e = <const esr_network_event *>hdr
    cdef char *p
    view_network(hdr)
    p = at(&s.body, FIXED)
    p = pack_head(p, 14, ESR_EVENT_NETWORK, ei, time)
    p = mp_uint(p, e.hdr.pid)
    p = mp_uint(p, e.hdr.cgroup_id)
    p = pack_comm(p, hdr)
    p = mp_uint(p, 4 if e.family == AF_INET else 6)
    p = mp_str(p, net_src, net_src_n)
    p = mp_uint(p, e.src_port)
    p = mp_str(p, net_dst, net_dst_n)
    p = mp_uint(p, e.dst_port)
    p = mp_int(p, e.return_code)
    p = mp_uint(p, 0)  # operation: connect
    p = mp_uint(p, 0)  # action: observed
    s.body.len = p - s.body.data
    return 0


cdef int render_network(SessionEvents s, const esr_event_header *hdr, buf *o) except -1:
    cdef char *p
    cdef const esr_network_event *e = <const esr_network_event *>hdr
    cdef size_t src_n, dst_n
    cdef const char *src_at = net_src
    cdef const char *dst_at = net_dst
    cdef int version = 4 if e.family == AF_INET else 6
    # Its pack, just before, viewed the same record.
    if net_viewed != hdr:
        view_network(hdr)
    src_n, dst_n = net_src_n, net_dst_n
    # An AF_INET6 socket connecting to an IPv4 address: IPv4 on the wire,
    # and in Teleport's log (as schema.Network.fields()).
    if version == 6 and dst_n > 7 and memcmp(net_dst, b"::ffff:", 7) == 0 and \
            memchr(net_dst, c'.', dst_n) != NULL:
        if src_n >= 7 and memcmp(net_src, b"::ffff:", 7) == 0:
            src_at = net_src + 7
            src_n -= 7
        else:
            src_at = b"0.0.0.0"
            src_n = 7
        dst_at = net_dst + 7
        dst_n -= 7
        version = 4
    p = at(o, FIXED + 6 * 16)
    p = lit(p, b'"pid":')
    p = js_uint(p, e.hdr.pid)
    p = lit(p, b',"cgroup_id":')
    p = js_uint(p, e.hdr.cgroup_id)
    p = lit(p, b',"program":')
    p = render_comm(p, hdr, s.ensure_ascii)
    if p == NULL:
        return 1
    p = lit(p, b',"src_addr":')
    p = js_address(p, src_at, src_n)
    p = lit(p, b',"src_port":')
    p = js_uint(p, e.src_port)
    p = lit(p, b',"dst_addr":')
    p = js_address(p, dst_at, dst_n)
    p = lit(p, b',"dst_port":')
    p = js_uint(p, e.dst_port)
    p = lit(p, b',"version":')
    p = js_uint(p, version)
    p = lit(p, b',"operation":0,"action":0,"return_code":')
    p = js_int(p, e.return_code)
    o.len = p - o.data
    return 0


cdef int64_t network_return_code(const esr_event_header *hdr):
    return (<const esr_network_event *>hdr).return_code


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


cdef int pack_terminal_data(SessionEvents s, const esr_event_header *hdr, int64_t time,
                            uint64_t ei) except -1:
    cdef const esr_terminal_data_event *e = <const esr_terminal_data_event *>hdr
    cdef bint output = hdr.type == ESR_EVENT_TERMINAL_OUTPUT
    cdef char *p
    p = at(&s.body, FIXED + e.len)
    p = pack_head(p, 7 if output else 6, hdr.type, ei, time)
    p = mp_uint(p, e.hdr.pid)
    p = mp_uint(p, e.tty)
    p = mp_bin(p, e.data, e.len)
    if output:
        p = mp_uint(p, e.skipped)
    s.body.len = p - s.body.data
    return 0


cdef int render_terminal_data(SessionEvents s, const esr_event_header *hdr, buf *o) except -1:
    cdef char *p
    cdef const esr_terminal_data_event *e = <const esr_terminal_data_event *>hdr
    p = at(o, FIXED + 6 * <size_t>e.len)
    p = lit(p, b'"pid":')
    p = js_uint(p, e.hdr.pid)
    p = lit(p, b',"tty":')
    p = js_uint(p, e.tty)
    p = lit(p, b',"data":')
    p = js_str(p, e.data, e.len, s.ensure_ascii)
    if p == NULL:
        return 1
    if hdr.type == ESR_EVENT_TERMINAL_OUTPUT:
        p = lit(p, b',"skipped":')
        p = js_uint(p, e.skipped)
    o.len = p - o.data
    return 0


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


cdef int pack_terminal_write(SessionEvents s, const esr_event_header *hdr, int64_t time,
                             uint64_t ei) except -1:
    cdef const esr_terminal_write_event *e = <const esr_terminal_write_event *>hdr
    cdef char *p
    p = at(&s.body, FIXED)
    p = pack_head(p, 8, ESR_EVENT_TERMINAL_WRITE, ei, time)
    p = mp_uint(p, e.hdr.pid)
    p = pack_comm(p, hdr)
    p = mp_uint(p, e.tty)
    p = mp_uint(p, e.major)
    p = mp_int(p, e.bytes)
    s.body.len = p - s.body.data
    return 0


cdef int render_terminal_write(SessionEvents s, const esr_event_header *hdr, buf *o) except -1:
    cdef char *p
    cdef const esr_terminal_write_event *e = <const esr_terminal_write_event *>hdr
    p = at(o, FIXED + 6 * 16)
    p = lit(p, b'"pid":')
    p = js_uint(p, e.hdr.pid)
    p = lit(p, b',"program":')
    p = render_comm(p, hdr, s.ensure_ascii)
    if p == NULL:
        return 1
    p = lit(p, b',"tty":')
    p = js_uint(p, e.tty)
    p = lit(p, b',"major":')
    p = js_uint(p, e.major)
    p = lit(p, b',"bytes":')
    p = js_int(p, e.bytes)
    o.len = p - o.data
    return 0


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


cdef int pack_terminal_resize(SessionEvents s, const esr_event_header *hdr, int64_t time,
                              uint64_t ei) except -1:
    cdef const esr_terminal_resize_event *e = <const esr_terminal_resize_event *>hdr
    cdef char *p
    p = at(&s.body, FIXED)
    p = pack_head(p, 6, ESR_EVENT_TERMINAL_RESIZE, ei, time)
    p = mp_uint(p, e.tty)
    p = mp_uint(p, e.rows)
    p = mp_uint(p, e.cols)
    s.body.len = p - s.body.data
    return 0


cdef int render_terminal_resize(SessionEvents s, const esr_event_header *hdr,
                                buf *o) except -1:
    cdef char *p
    cdef const esr_terminal_resize_event *e = <const esr_terminal_resize_event *>hdr
    p = at(o, FIXED)
    p = lit(p, b'"tty":')
    p = js_uint(p, e.tty)
    p = lit(p, b',"rows":')
    p = js_uint(p, e.rows)
    p = lit(p, b',"cols":')
    p = js_uint(p, e.cols)
    o.len = p - o.data
    return 0


cdef bytes encode_terminal_resize(event, uint64_t session):
    cdef bytes raw = bytes(TERMINAL_RESIZE_SIZE)
    cdef esr_terminal_resize_event *e = <esr_terminal_resize_event *>PyBytes_AS_STRING(raw)
    fill_header(&e.hdr, ESR_EVENT_TERMINAL_RESIZE, session, event)
    e.tty = event.tty
    e.rows = event.rows
    e.cols = event.cols
    return raw


# session.ptrace -------------------------------------------------------------------------

# enum esr_ptrace_request, by value.
cdef list PTRACE_REQUESTS = [None, b"attach", b"seize", b"detach", b"process_vm_writev"]


cdef bytes ptrace_request(uint16_t request):
    """As its Struct names it: a request this version does not know, by its number."""
    if 0 < request < len(PTRACE_REQUESTS):
        return <bytes>PTRACE_REQUESTS[request]
    return str(request).encode()


cdef uint64_t ptrace_size(const esr_event_header *hdr):
    return PTRACE_SIZE


cdef int pack_ptrace(SessionEvents s, const esr_event_header *hdr, int64_t time,
                     uint64_t ei) except -1:
    cdef const esr_ptrace_event *e = <const esr_ptrace_event *>hdr
    cdef bytes request = ptrace_request(e.request)
    cdef char *p
    p = at(&s.body, FIXED)
    p = pack_head(p, 14, ESR_EVENT_PTRACE, ei, time)
    p = mp_uint(p, e.hdr.pid)
    p = mp_uint(p, e.hdr.cgroup_id)
    p = pack_comm(p, hdr)
    p = mp_str(p, <const char *>request, len(request))
    p = mp_uint(p, e.target_pid)
    p = mp_uint(p, e.target_tgid)
    p = mp_bin(p, e.target_comm, strnlen(e.target_comm, 16))
    p = mp_int(p, e.return_code)
    p = mp_bool(p, e.flags & ESR_PTRACE_FOLLOWED)
    p = mp_bool(p, e.flags & ESR_PTRACE_LEFT)
    p = mp_bool(p, e.flags & ESR_PTRACE_AS_NAMED)
    s.body.len = p - s.body.data
    return 0


cdef int render_ptrace(SessionEvents s, const esr_event_header *hdr, buf *o) except -1:
    cdef char *p
    cdef const esr_ptrace_event *e = <const esr_ptrace_event *>hdr
    cdef bytes request = ptrace_request(e.request)
    cdef size_t target_n = strnlen(e.target_comm, 16)
    p = at(o, FIXED + 6 * 32)
    p = lit(p, b'"pid":')
    p = js_uint(p, e.hdr.pid)
    p = lit(p, b',"cgroup_id":')
    p = js_uint(p, e.hdr.cgroup_id)
    p = lit(p, b',"program":')
    p = render_comm(p, hdr, s.ensure_ascii)
    if p == NULL:
        return 1
    p = lit(p, b',"request":')
    p = js_str(p, <const char *>request, len(request), s.ensure_ascii)
    if p == NULL:
        return 1
    p = lit(p, b',"target_pid":')
    p = js_uint(p, e.target_pid)
    if e.target_tgid:
        p = lit(p, b',"target_tgid":')
        p = js_uint(p, e.target_tgid)
    if target_n:
        p = lit(p, b',"target_program":')
        p = js_str(p, e.target_comm, target_n, s.ensure_ascii)
        if p == NULL:
            return 1
    p = lit(p, b',"return_code":')
    p = js_int(p, e.return_code)
    if e.flags & ESR_PTRACE_FOLLOWED:
        p = lit(p, b',"followed":true')
    if e.flags & ESR_PTRACE_LEFT:
        p = lit(p, b',"left":true')
    if e.flags & ESR_PTRACE_AS_NAMED:
        p = lit(p, b',"pid_as_named":true')
    o.len = p - o.data
    return 0


cdef int64_t ptrace_return_code(const esr_event_header *hdr):
    return (<const esr_ptrace_event *>hdr).return_code


cdef bytes encode_ptrace(event, uint64_t session):
    cdef bytes raw = bytes(PTRACE_SIZE)
    cdef esr_ptrace_event *e = <esr_ptrace_event *>PyBytes_AS_STRING(raw)
    fill_header(&e.hdr, ESR_EVENT_PTRACE, session, event)
    e.hdr.pid = event.pid
    e.hdr.cgroup_id = event.cgroup_id
    e.return_code = event.return_code
    request = event.request.encode()
    e.request = PTRACE_REQUESTS.index(request) if request in PTRACE_REQUESTS else int(request)
    e.target_pid = event.target_pid
    e.target_tgid = event.target_tgid
    memcpy(e.target_comm, <const char *>event.target_program, min(len(event.target_program), 15))
    e.flags = ((ESR_PTRACE_FOLLOWED if event.followed else 0)
               | (ESR_PTRACE_LEFT if event.left else 0)
               | (ESR_PTRACE_AS_NAMED if event.pid_as_named else 0))
    return raw


# session.io_uring -----------------------------------------------------------------------

# schema.io_uring_operation of each opcode an u8 holds, and "setup".
cdef list _io_uring_operations = [schema.io_uring_operation(i).encode() for i in range(256)]
cdef bytes _IO_URING_SETUP = b"setup"


cdef inline bytes io_uring_operation(const esr_io_uring_event *e):
    return _IO_URING_SETUP if e.setup else <bytes>_io_uring_operations[e.opcode]


cdef uint64_t io_uring_size(const esr_event_header *hdr):
    return IO_URING_SIZE


cdef int pack_io_uring(SessionEvents s, const esr_event_header *hdr, int64_t time,
                       uint64_t ei) except -1:
    cdef const esr_io_uring_event *e = <const esr_io_uring_event *>hdr
    cdef bytes operation = io_uring_operation(e)
    cdef char *p
    p = at(&s.body, FIXED)
    p = pack_head(p, 12, ESR_EVENT_IO_URING, ei, time)
    p = mp_uint(p, e.hdr.pid)
    p = mp_uint(p, e.hdr.cgroup_id)
    p = pack_comm(p, hdr)
    p = mp_str(p, <const char *>operation, len(operation))
    p = mp_uint(p, e.opcode)
    p = mp_uint(p, e.ring_fd)
    p = mp_uint(p, e.ring_pid)
    p = mp_uint(p, e.sq_entries)
    p = mp_uint(p, e.setup_flags)
    s.body.len = p - s.body.data
    return 0


cdef int render_io_uring(SessionEvents s, const esr_event_header *hdr, buf *o) except -1:
    cdef char *p
    cdef const esr_io_uring_event *e = <const esr_io_uring_event *>hdr
    cdef bytes operation = io_uring_operation(e)
    p = at(o, FIXED + 6 * 16)
    p = lit(p, b'"pid":')
    p = js_uint(p, e.hdr.pid)
    p = lit(p, b',"cgroup_id":')
    p = js_uint(p, e.hdr.cgroup_id)
    p = lit(p, b',"program":')
    p = render_comm(p, hdr, s.ensure_ascii)
    if p == NULL:
        return 1
    p = lit(p, b',"operation":')
    p = js_str(p, <const char *>operation, len(operation), s.ensure_ascii)
    if p == NULL:
        return 1
    p = lit(p, b',"ring_fd":')
    p = js_uint(p, e.ring_fd)
    p = lit(p, b',"ring_pid":')
    p = js_uint(p, e.ring_pid)
    if e.setup:
        p = lit(p, b',"sq_entries":')
        p = js_uint(p, e.sq_entries)
        p = lit(p, b',"setup_flags":')
        p = js_uint(p, e.setup_flags)
    else:
        p = lit(p, b',"opcode":')
        p = js_uint(p, e.opcode)
    o.len = p - o.data
    return 0


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
ctypedef int (*pack_fn)(SessionEvents s, const esr_event_header *hdr, int64_t time,
                        uint64_t ei) except -1
ctypedef int (*render_fn)(SessionEvents s, const esr_event_header *hdr, buf *out) except -1
ctypedef int64_t (*return_code_fn)(const esr_event_header *hdr)
ctypedef bytes (*encode_fn)(event, uint64_t session)

cdef struct record_type:
    uint64_t fixed_size  # bytes before any variable-length part
    size_fn size  # bytes a record claims, variable parts included
    # Appends its schema Struct's msgpack to the session's frame.
    pack_fn pack
    # Writes its audit log fields as schema's fields() and AuditFormat do,
    # without the opening brace; 1: this record's line is AuditFormat's to render.
    render_fn render
    return_code_fn return_code  # NULL: it has none, and never fails
    encode_fn encode
    int buffer

cdef record_type RECORD_TYPES[ESR_EVENT_TYPE_END]
memset(RECORD_TYPES, 0, sizeof(RECORD_TYPES))
RECORD_TYPES[ESR_EVENT_COMMAND] = record_type(
    COMMAND_FIXED, command_size, pack_command, render_command, command_return_code,
    encode_command, ESR_BUF_COMMAND
)
RECORD_TYPES[ESR_EVENT_DISK] = record_type(
    DISK_FIXED, disk_size, pack_disk, render_disk, disk_return_code, encode_disk, ESR_BUF_DISK
)
RECORD_TYPES[ESR_EVENT_NETWORK] = record_type(
    NETWORK_SIZE, network_size, pack_network, render_network, network_return_code,
    encode_network, ESR_BUF_NETWORK
)
RECORD_TYPES[ESR_EVENT_TERMINAL_OUTPUT] = record_type(
    TERMINAL_DATA_FIXED, terminal_data_size, pack_terminal_data, render_terminal_data, NULL,
    encode_terminal_data, ESR_BUF_TERMINAL
)
RECORD_TYPES[ESR_EVENT_TERMINAL_INPUT] = record_type(
    TERMINAL_DATA_FIXED, terminal_data_size, pack_terminal_data, render_terminal_data, NULL,
    encode_terminal_data, ESR_BUF_TERMINAL
)
RECORD_TYPES[ESR_EVENT_TERMINAL_WRITE] = record_type(
    TERMINAL_WRITE_SIZE, terminal_write_size, pack_terminal_write, render_terminal_write, NULL,
    encode_terminal_write, ESR_BUF_TERMINAL
)
RECORD_TYPES[ESR_EVENT_TERMINAL_RESIZE] = record_type(
    TERMINAL_RESIZE_SIZE, terminal_resize_size, pack_terminal_resize, render_terminal_resize,
    NULL, encode_terminal_resize, ESR_BUF_TERMINAL
)
RECORD_TYPES[ESR_EVENT_PTRACE] = record_type(
    PTRACE_SIZE, ptrace_size, pack_ptrace, render_ptrace, ptrace_return_code, encode_ptrace,
    ESR_BUF_COMMAND
)
RECORD_TYPES[ESR_EVENT_IO_URING] = record_type(
    IO_URING_SIZE, io_uring_size, pack_io_uring, render_io_uring, NULL, encode_io_uring,
    ESR_BUF_COMMAND
)


cdef inline const record_type *known(uint16_t kind):
    if kind >= ESR_EVENT_TYPE_END or RECORD_TYPES[kind].pack == NULL:
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


# --- sessions --------------------------------------------------------------------------------

# The start of each type's audit log line, up to its ei.
cdef list _line_heads = [None] * ESR_EVENT_TYPE_END
cdef const char *LINE_HEAD[ESR_EVENT_TYPE_END]
cdef size_t LINE_HEAD_LEN[ESR_EVENT_TYPE_END]
for _record in schema.RECORDS:
    _line_heads[_record.__struct_config__.tag] = \
        f'{{"event":"{_record.name}","code":"{_record.code}","ei":'.encode()
for _kind in range(ESR_EVENT_TYPE_END):
    if _line_heads[_kind] is not None:
        LINE_HEAD[_kind] = <const char *>_line_heads[_kind]
        LINE_HEAD_LEN[_kind] = len(_line_heads[_kind])


cdef class Chunk:
    """Bytes a session wrote, handed over without a copy: a busy session's
    are megabytes per flush. Once released, its buffer goes back to the
    session to be written again, not to the kernel to be faulted in again."""
    cdef buf b
    cdef size_t start
    cdef SessionEvents owner
    cdef int kind

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self.b.data + self.start, self.b.len - self.start, 1, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __dealloc__(self):
        if self.owner is not None:
            self.owner.recycle(&self.b, self.kind)
        else:
            free(self.b.data)


cdef class Taken:
    """A session's pending events, taken to be written as one frame."""
    # The msgpack list of the events: a frame's payload, uncompressed.
    cdef readonly memoryview payload
    cdef readonly uint64_t first_ei
    cdef readonly uint64_t count
    cdef readonly memoryview lines  # audit log lines of its records
    cdef readonly list records  # records of each buffer

    @property
    def last_ei(self):
        return self.first_ei + self.count - 1


cdef class SessionEvents:
    """Events decoded for one session and not yet written, as the msgpack
    list a frame holds; and apart, the audit log lines of those of them the
    log gets, rendered as they are decoded, so that an open storm is never
    scanned again in Python."""
    # The msgpack of each pending event, after room for the list's header.
    cdef buf body
    cdef buf lines
    cdef buf spare[2]  # a body's and a lines' buffer, written and given back
    # The form of the line's JSON text: see js_str.
    cdef bint ensure_ascii
    cdef public uint64_t next_ei
    cdef readonly uint64_t count
    cdef uint64_t counts[ESR_BUF_COUNT]
    # Bit t set: records of type t are audited.
    cdef public uint64_t audit_types
    # Bit t set: failed ones too (return_code < 0).
    cdef public uint64_t audit_failures
    # Set once a command runs with a controlling terminal; never cleared.
    cdef public bint interactive
    # The session's schema.AuditFormat: the fields its lines share, and the
    # lines this module leaves to it.
    cdef object format
    cdef bytes uid_prefix
    cdef bytes common
    cdef int64_t second  # of the last time rendered, and that time up to its seconds
    cdef char second_text[32]
    cdef size_t second_len

    def __init__(self, uint64_t next_ei=1, audited_records=(), bint interactive=False,
                 format=None):
        """format: the session's schema.AuditFormat, needed once a record type is audited."""
        self.next_ei = next_ei
        self.count = 0
        self.fresh(&self.body, 0)
        memset(self.counts, 0, sizeof(self.counts))
        self.format = format
        if format is not None:
            self.uid_prefix = format.uid_prefix.encode()
            self.common = format.common
        self.second = -1
        self.audit(audited_records)
        self.interactive = interactive

    def __dealloc__(self):
        free(self.body.data)
        free(self.lines.data)
        free(self.spare[0].data)
        free(self.spare[1].data)

    cdef int fresh(self, buf *b, int kind) except -1:
        """A buffer to write on in place of one handed over: the spare, or
        a new one; a body's with room for its list's header."""
        cdef buf new = self.spare[kind]
        new.len = 0
        if kind == 0:
            reserve(&new, MP_MAX)
            new.len = MP_MAX
        self.spare[kind].data = NULL
        self.spare[kind].cap = 0
        b[0] = new
        return 0

    cdef void recycle(self, buf *b, int kind) noexcept:
        if self.spare[kind].data == NULL:
            self.spare[kind] = b[0]
        else:
            free(b.data)
        b.data = NULL

    def audit(self, records, failures=None):
        """Which schema.Record types the audit log gets from now on, and of
        those, which when they failed too (all of them unless told)."""
        if records and self.format is None:
            raise ValueError("auditing needs the session's AuditFormat")
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
        """An event of the recorder's own (session.lost, session.end), the
        session's next: recorded, and audited by the recorder itself."""
        encoded = _encode_event(event)
        put(&self.body, <const char *>encoded, len(encoded))
        self.count += 1
        self.next_ei += 1

    def take(self):
        """The pending events as a Taken; pending is emptied."""
        cdef Taken taken = Taken.__new__(Taken)
        cdef char head_data[MP_MAX]
        cdef buf head
        cdef Chunk payload = Chunk.__new__(Chunk)
        cdef Chunk lines
        cdef buf next_body, next_lines
        cdef int i
        head.data, head.len, head.cap = head_data, 0, MP_MAX
        head.len = mp_array(head.data, self.count) - head.data
        self.fresh(&next_body, 0)
        # The list's header goes in the room kept before its events.
        payload.b, self.body = self.body, next_body
        payload.owner, payload.kind, payload.start = self, 0, MP_MAX - head.len
        memcpy(payload.b.data + payload.start, head.data, head.len)
        taken.payload = memoryview(payload)
        if self.lines.len:
            self.fresh(&next_lines, 1)
            lines = Chunk.__new__(Chunk)
            lines.b, self.lines = self.lines, next_lines
            lines.owner, lines.kind, lines.start = self, 1, 0
            taken.lines = memoryview(lines)
        else:
            taken.lines = memoryview(b"")
        taken.first_ei = self.next_ei - self.count
        taken.count = self.count
        taken.records = [self.counts[i] for i in range(ESR_BUF_COUNT)]
        self.count = 0
        memset(self.counts, 0, sizeof(self.counts))
        return taken

    cdef char *time_text(self, char *p, int64_t ns) noexcept:
        """The line's time as schema.rfc3339 writes it: UTC, to the
        microsecond at most, without trailing zeros; the seconds are
        formatted once per second. NULL: a time gmtime cannot take."""
        cdef int64_t seconds = ns // 1000000000
        cdef int64_t micros
        cdef time_t t
        cdef tm parts
        cdef char frac[8]
        cdef int n, i
        if seconds * 1000000000 > ns:  # floor, as Python's divmod
            seconds -= 1
        micros = (ns - seconds * 1000000000) // 1000
        if seconds != self.second:
            t = seconds
            if gmtime_r(&t, &parts) == NULL:
                return NULL
            self.second_len = strftime(self.second_text, sizeof(self.second_text),
                                       b"%Y-%m-%dT%H:%M:%S", &parts)
            self.second = seconds
        p = w(p, self.second_text, self.second_len)
        if micros:
            frac[0] = c'.'
            n = 6
            while micros % 10 == 0:
                micros //= 10
                n -= 1
            for i in range(n, 0, -1):
                frac[i] = <char>(c'0' + micros % 10)
                micros //= 10
            p = w(p, frac, n + 1)
        return w1(p, c'Z')

    cdef int line(self, const record_type *t, const esr_event_header *hdr, int64_t time,
                  uint64_t ei, size_t packed_at) except -1:
        """Append the record's audit log line; AuditFormat renders those
        this cannot, from the record's msgpack, at packed_at in body."""
        cdef buf *o = &self.lines
        cdef size_t start = o.len, fields
        cdef bint rendered
        cdef char *p = at(
            o, FIXED + LINE_HEAD_LEN[hdr.type] + len(self.uid_prefix) + len(self.common))
        p = w(p, LINE_HEAD[hdr.type], LINE_HEAD_LEN[hdr.type])
        p = js_uint(p, ei)
        p = lit(p, b',"uid":"')
        p = w(p, <const char *>self.uid_prefix, len(self.uid_prefix))
        p = js_hex12(p, ei)
        p = lit(p, b'","time":"')
        p = self.time_text(p, time)
        if p != NULL:
            p = lit(p, b'",')
            p = w(p, <const char *>self.common, len(self.common))
            p = w1(p, c',')
            fields = o.len = p - o.data
            # The fields reserve their own room, and room for what ends the line.
            self.ensure_ascii = False
            rendered = t.render(self, hdr, o) == 0
            if not rendered:  # text that is not ASCII: json's form
                o.len = fields
                self.ensure_ascii = True
                rendered = t.render(self, hdr, o) == 0
            if rendered:
                o.len = lit(o.data + o.len, b"}\n") - o.data
                if o.len - start <= MAX_LINE:
                    return 0
        o.len = start
        event = _decode_events(
            b"\x91" + PyBytes_FromStringAndSize(self.body.data + packed_at, self.body.len - packed_at)
        )[0]
        line = self.format.line(event)
        return put(o, <const char *>line, len(line))


# Each type's pack must write its Struct as msgspec does: a record of each
# type with every field zero decodes as its Struct, or this module is wrong.
def _check_table():
    cdef SessionEvents s = SessionEvents()
    cdef bytes raw
    cdef esr_event_header *hdr
    cdef const record_type *t
    for record in schema.RECORDS:
        kind = record.__struct_config__.tag
        t = known(kind)
        if t == NULL or BUFFERS[t.buffer] != record.buffer:
            raise ImportError(f"schema.{record.__name__} and the decoder's table disagree on its "
                              "type or buffer")
        raw = bytes(t.fixed_size)
        hdr = <esr_event_header *>PyBytes_AS_STRING(raw)
        hdr.type = kind
        t.pack(s, hdr, 0, 0)
        s.count += 1
    try:
        decoded = _decode_events(s.take().payload)
    except ValueError as err:
        raise ImportError(f"the decoder packs records its schema cannot read: {err}") from None
    if [type(e) for e in decoded] != list(schema.RECORDS):
        raise ImportError("the decoder packs records as other types than its schema's")


_check_table()


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


cdef Py_ssize_t list_entries(const uint8_t *base, Py_ssize_t size, entry *items) except -1:
    """Each entry of the batch in items, every length checked; how many
    there are. One pass: a flat-out batch is megabytes, past the cache."""
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
        items[n].offset = pos + 4
        items[n].ts = hdr.ts_boot_ns
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
    cdef Py_ssize_t n, i
    cdef const esr_event_header *hdr
    cdef const record_type *t
    cdef entry *items
    cdef entry *tmp
    cdef uint64_t orphans = 0, cookie, last_cookie = 0, ei, bit
    cdef int64_t time
    cdef size_t packed_at
    cdef SessionEvents target = None

    # Room for as many entries as the batch could hold: each takes at least
    # a length and a header, 8-aligned.
    cdef Py_ssize_t most = size // ((4 + HEADER_SIZE + 7) & ~7) + 1
    if size == 0:
        return 0
    items = <entry *>malloc(2 * most * sizeof(entry))
    if items == NULL:
        raise MemoryError()
    try:
        n = list_entries(base, size, items)
        tmp = items + n
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
            time = <int64_t>hdr.ts_boot_ns + time_offset_ns
            ei = target.next_ei
            packed_at = target.body.len
            t.pack(target, hdr, time, ei)
            target.next_ei += 1
            target.count += 1
            target.counts[t.buffer] += 1
            bit = <uint64_t>1 << hdr.type
            if target.audit_types & bit and (
                    target.audit_failures & bit or t.return_code(hdr) >= 0):
                target.line(t, hdr, time, ei, packed_at)
    finally:
        free(items)
    return orphans
