# cython: language_level=3, boundscheck=False, wraparound=False
"""The recorder's BPF programs, loaded by the statically linked libbpf.

A Probe loads and attaches esr.bpf.o as the config sizes it (object.c) and
starts the drain (drain.c): a C thread that empties the per-CPU perf
buffers into a batch as they fill, with no Python code per record.
take_batch() hands the batch over to esr._fast.decode.
"""
from libc.errno cimport errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport strerror, memset

from esr._fast.events cimport *

from esr.errors import ProbeError

cdef extern from "<sys/mman.h>":
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    void *MAP_FAILED
    enum:
        PROT_READ
        PROT_WRITE
        MAP_SHARED

cdef extern from "<unistd.h>":
    long sysconf(int name)
    enum:
        _SC_PAGESIZE

cdef extern from "<bpf/libbpf.h>":
    int libbpf_probe_bpf_map_type(int map_type, const void *opts)
    int libbpf_num_possible_cpus()

cdef extern from "<bpf/bpf.h>":
    int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags)
    int bpf_map_lookup_elem(int fd, const void *key, void *value)
    int bpf_map_delete_elem(int fd, const void *key)
    int bpf_map_get_next_key(int fd, const void *key, void *next_key)

cdef extern from "<linux/bpf.h>":
    enum:
        BPF_ANY
        BPF_MAP_TYPE_PERF_EVENT_ARRAY
        BPF_MAP_TYPE_RINGBUF

cdef extern from "object.h":
    struct esr_object_settings:
        uint32_t max_sessions
        uint32_t max_tasks
        uint32_t tasks_per_session
        uint64_t recorder_exe_dev
        uint64_t recorder_exe_ino
        uint8_t record_input
        uint64_t terminal_rate
        uint64_t terminal_burst
    struct esr_object:
        int nlinks
        int tracked_tasks_fd
        int session_states_fd
        int buffer_lost_fd
        const char *io_uring_hook
    enum esr_hook:
        ESR_HOOK_KPROBE
        ESR_HOOK_FENTRY
    int esr_object_open(esr_object *o, const void *image, size_t size,
                        const esr_object_settings *settings, const char **step)
    void esr_object_close(esr_object *o)
    int esr_object_track(esr_object *o, uint32_t tid, const esr_task *task)
    int esr_object_untrack(esr_object *o, uint32_t tid)
    int esr_try_hook(const void *image, size_t size, esr_hook hook, const char **step)
    const char *esr_libbpf_reason()

cdef extern from "drain.h":
    struct esr_batch:
        char *buf
        size_t len
        unsigned long long records
    struct esr_drain:
        int ready_fd
        unsigned long long lost_notified
    void esr_drain_init(esr_drain *d)
    int esr_drain_start(esr_drain *d, const esr_object *o, const size_t *pages, size_t limit,
                        unsigned long long ready_at, const char **step)
    void esr_drain_close(esr_drain *d) nogil
    esr_batch *esr_drain_take(esr_drain *d) nogil

cdef extern from *:
    """
    /* BPF programs update the same counters with atomic adds. */
    static void esr_atomic_add(long long *counter, long long delta)
    {
        __sync_fetch_and_add(counter, delta);
    }
    """
    void esr_atomic_add(long long *counter, long long delta)


BUFFERS = tuple(esr_buffer_names[i].decode() for i in range(ESR_BUF_COUNT))


cdef str why(int err, const char *step):
    reason = esr_libbpf_reason().decode("utf-8", "replace")
    return f"{step.decode()}: {reason or strerror(-err).decode()}"


def map_type_supported(str kind):
    """Whether the kernel has the "perf" or "ringbuf" map type."""
    cdef int map_type = BPF_MAP_TYPE_PERF_EVENT_ARRAY if kind == "perf" else BPF_MAP_TYPE_RINGBUF
    return libbpf_probe_bpf_map_type(map_type, NULL) == 1


def try_hook(bytes image not None, str hook):
    """Load and attach the "kprobe" or "fentry" program of feature_probe.bpf.o
    alone, and undo it. Returns None when that works, or why not."""
    cdef const char *step = b""
    cdef int err = esr_try_hook(<const char *>image, len(image),
                                ESR_HOOK_KPROBE if hook == "kprobe" else ESR_HOOK_FENTRY, &step)
    return None if err == 0 else why(err, step)


cdef class Probe:
    cdef esr_object obj
    cdef esr_drain drain
    cdef bint loaded
    cdef esr_batch *taken
    cdef esr_session_state *states
    cdef size_t states_size
    cdef uint32_t max_sessions
    cdef int ncpus
    cdef readonly tuple buffer_pages

    def __cinit__(self):
        memset(&self.obj, 0, sizeof(self.obj))
        esr_drain_init(&self.drain)
        self.loaded = False
        self.taken = NULL
        self.states = NULL

    def __init__(self, bytes image not None, tuple buffer_pages not None,
                 uint32_t max_sessions, uint32_t max_tasks, uint32_t tasks_per_session=0,
                 uint64_t recorder_exe_dev=0,
                 uint64_t recorder_exe_ino=0, bint record_input=False,
                 uint64_t terminal_rate=0, uint64_t terminal_burst=0,
                 size_t batch_limit=64 << 20, unsigned long long ready_at=4096):
        """Load and attach the programs of an esr.bpf.o image.

        buffer_pages: per-CPU pages of each buffer (BUFFERS order), powers of
        two, applied as given. tasks_per_session: the threads one session
        may have tracked at once (0: max_tasks). recorder_exe_*: the esr executable (kernel dev
        encoding, inode), whose run by a session's anchor is the PAM hook,
        not the user. record_input, terminal_rate, terminal_burst: the
        terminal stream's keystrokes and budget (terminal.bpf.c).
        batch_limit: bytes the drain may hold before records wait in the
        kernel. ready_at: records waiting that make fileno() readable.
        """
        cdef esr_object_settings settings
        cdef size_t pages[ESR_BUF_COUNT]
        cdef const char *step = b""
        cdef int err, i
        if len(buffer_pages) != ESR_BUF_COUNT:
            raise ValueError(f"buffer_pages: {ESR_BUF_COUNT} sizes expected, one per buffer")
        for i in range(ESR_BUF_COUNT):
            pages[i] = buffer_pages[i]
        self.buffer_pages = buffer_pages
        self.max_sessions = max_sessions
        self.ncpus = libbpf_num_possible_cpus()
        settings.max_sessions = max_sessions
        settings.max_tasks = max_tasks
        settings.tasks_per_session = tasks_per_session or max_tasks
        settings.recorder_exe_dev = recorder_exe_dev
        settings.recorder_exe_ino = recorder_exe_ino
        settings.record_input = record_input
        settings.terminal_rate = terminal_rate
        settings.terminal_burst = terminal_burst
        err = esr_object_open(&self.obj, <const char *>image, len(image), &settings, &step)
        if err:
            raise ProbeError(-err, why(err, step))
        self.loaded = True
        page = sysconf(_SC_PAGESIZE)
        self.states_size = (max_sessions * sizeof(esr_session_state) + page - 1) // page * page
        self.states = <esr_session_state *>mmap(NULL, self.states_size, PROT_READ | PROT_WRITE,
                                                MAP_SHARED, self.obj.session_states_fd, 0)
        if <void *>self.states == MAP_FAILED:
            self.states = NULL
            err = -errno
            self.close()
            raise ProbeError(-err, f"cannot map session_states: {strerror(-err).decode()}")
        err = esr_drain_start(&self.drain, &self.obj, pages, batch_limit, ready_at, &step)
        if err:
            self.close()
            raise ProbeError(-err, why(err, step))

    @property
    def programs(self):
        """How many BPF programs are attached."""
        return self.obj.nlinks

    @property
    def io_uring_hook(self):
        """The io_uring tracepoint submissions are seen through, or None
        where the kernel has no io_uring."""
        return self.obj.io_uring_hook.decode() if self.obj.io_uring_hook != NULL else None

    def fileno(self):
        """Readable once the drain holds ready_at records: time to take them."""
        return self.drain.ready_fd

    def take_batch(self):
        """Every record waiting, in the kernel buffers or in the drain, as a
        read-only memoryview of [u32 length][record] entries, valid until
        release_batch()."""
        if not self.loaded:
            raise ProbeError(0, "probe is closed")
        if self.taken != NULL:
            raise ProbeError(0, "the previous batch was not released")
        with nogil:
            self.taken = esr_drain_take(&self.drain)
        if self.taken.len == 0:
            return memoryview(b"")
        return memoryview(<uint8_t[:self.taken.len]><uint8_t *>self.taken.buf).toreadonly()

    def release_batch(self):
        """The batch taken goes back to the drain, to be filled again."""
        self.taken = NULL

    @property
    def lost_notified(self):
        """Records the kernel reported lost through the buffers themselves."""
        return self.drain.lost_notified

    def buffer_lost(self):
        """Records lost per buffer (BUFFERS order), over all CPUs."""
        cdef uint32_t key
        cdef uint64_t *values = <uint64_t *>malloc(8 * max(self.ncpus, 1))
        cdef int cpu
        totals = []
        try:
            for key in range(<uint32_t>ESR_BUF_COUNT):
                if bpf_map_lookup_elem(self.obj.buffer_lost_fd, &key, values) != 0:
                    raise OSError(errno, strerror(errno).decode())
                totals.append(sum(values[cpu] for cpu in range(self.ncpus)))
        finally:
            free(values)
        return tuple(totals)

    cdef esr_session_state *_state(self, uint32_t slot) except NULL:
        if self.states == NULL:
            raise ProbeError(0, "probe is closed")
        if slot >= self.max_sessions:
            raise ValueError(f"slot {slot} out of range")
        return &self.states[slot]

    def open_session(self, uint32_t slot, uint64_t cookie):
        cdef esr_session_state *state = self._state(slot)
        memset(state, 0, sizeof(esr_session_state))
        state.session = cookie

    def close_session(self, uint32_t slot, bint forget_tasks):
        """Free the slot; with forget_tasks, also remove every thread still
        tracked in it (a walk of the whole map: only for sessions ended while
        some of their tasks run)."""
        cdef esr_session_state *state = self._state(slot)
        cdef uint64_t cookie = state.session
        cdef uint32_t key, next_key
        cdef esr_task task
        cdef list stale = []
        state.session = 0
        if cookie == 0 or not forget_tasks:
            return
        fd = self.obj.tracked_tasks_fd
        if bpf_map_get_next_key(fd, NULL, &next_key) == 0:
            while True:
                key = next_key
                if bpf_map_lookup_elem(fd, &key, &task) == 0 and task.session == cookie:
                    stale.append(key)
                if bpf_map_get_next_key(fd, &key, &next_key) != 0:
                    break
        for key in stale:
            esr_object_untrack(&self.obj, key)

    def session_counters(self, uint32_t slot):
        """(live tasks, lost per buffer (a tuple), untracked forks, terminal
        bytes (recorded, skipped, lost, input))."""
        cdef esr_session_state *state = self._state(slot)
        cdef esr_terminal_counts *t = &state.terminal
        return (state.live_tasks, tuple(state.lost[i] for i in range(ESR_BUF_COUNT)),
                state.untracked_forks, (t.recorded, t.skipped, t.lost, t.input))

    def track(self, uint32_t tid, uint64_t cookie, bint anchor=False, bint terminal=False):
        """Record thread tid in a session; an anchor is not recorded itself,
        but what it forks from now on is. With terminal, its reads and
        writes of pty masters are the session's terminal stream."""
        cdef esr_task task
        cdef esr_session_state *state = self._state(<uint32_t>cookie)
        task.session = cookie
        task.flags = (ESR_TASK_ANCHOR if anchor else 0) | (ESR_TASK_TERMINAL if terminal else 0)
        task.reserved = 0
        if esr_object_track(&self.obj, tid, &task) != 0:
            raise OSError(errno, f"cannot track pid {tid}: {strerror(errno).decode()}")
        if not anchor:
            esr_atomic_add(<long long *>&state.live_tasks, 1)

    def untrack(self, uint32_t tid):
        cdef esr_task task
        cdef esr_session_state *state
        if bpf_map_lookup_elem(self.obj.tracked_tasks_fd, &tid, &task) != 0:
            return
        esr_object_untrack(&self.obj, tid)
        if not (task.flags & ESR_TASK_ANCHOR):
            state = self._state(<uint32_t>task.session)
            if state.session == task.session:
                esr_atomic_add(<long long *>&state.live_tasks, -1)

    def task_session(self, uint32_t tid):
        """(cookie, anchor) of the session thread tid is tracked in, or None."""
        cdef esr_task task
        if bpf_map_lookup_elem(self.obj.tracked_tasks_fd, &tid, &task) != 0:
            return None
        return task.session, bool(task.flags & ESR_TASK_ANCHOR)

    def close(self):
        with nogil:
            esr_drain_close(&self.drain)
        self.taken = NULL
        if self.states != NULL:
            munmap(self.states, self.states_size)
            self.states = NULL
        esr_object_close(&self.obj)
        self.loaded = False

    def __dealloc__(self):
        self.close()
