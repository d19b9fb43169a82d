# cython: language_level=3, boundscheck=False, wraparound=False
"""The BPF programs of esr.bpf.o, loaded by the statically linked libbpf.

A Probe sizes the maps from the config, loads and attaches every program,
and opens one per-CPU perf buffer per event type. A C thread drains the
buffers as they fill, through a callback that only appends raw records to a
batch; no Python code runs per record, and the Python side being busy does
not leave the buffers full. take_batch() hands the batch over to be decoded
by esr._fast.decode.
"""
from libc.errno cimport errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport strerror

from esr._fast.events cimport *

cdef extern from *:
    """
    #include <stdarg.h>
    #include <stdio.h>
    #include <string.h>
    #include <errno.h>
    #include <pthread.h>
    #include <signal.h>
    #include <stdint.h>
    #include <stdlib.h>
    #include <unistd.h>
    #include <sys/epoll.h>
    #include <sys/eventfd.h>
    #include <sys/mman.h>
    #include <linux/perf_event.h>
    #include <bpf/libbpf.h>
    #include <bpf/bpf.h>

    /* libbpf's messages, kept so a failed load can say why. */
    static char esr_libbpf_log[16384];
    static size_t esr_libbpf_log_len;

    static int esr_libbpf_print(enum libbpf_print_level level, const char *fmt, va_list args)
    {
        char line[1024];
        int n;

        if (level == LIBBPF_DEBUG)
            return 0;
        n = vsnprintf(line, sizeof(line), fmt, args);
        if (n < 0)
            return 0;
        if ((size_t)n >= sizeof(line))
            n = sizeof(line) - 1;
        if (esr_libbpf_log_len + n >= sizeof(esr_libbpf_log))
            esr_libbpf_log_len = 0;
        memcpy(esr_libbpf_log + esr_libbpf_log_len, line, n);
        esr_libbpf_log_len += n;
        esr_libbpf_log[esr_libbpf_log_len] = 0;
        return 0;
    }

    static void esr_libbpf_capture(void)
    {
        libbpf_set_print(esr_libbpf_print);
    }

    /* BPF programs update the same counters with atomic adds. */
    static void esr_atomic_add(long long *counter, long long delta)
    {
        __sync_fetch_and_add(counter, delta);
    }

    static void esr_libbpf_log_reset(void)
    {
        esr_libbpf_log_len = 0;
        esr_libbpf_log[0] = 0;
    }

    struct esr_batch {
        char *buf;
        size_t len;
        size_t cap;
        unsigned long long records;
    };

    /* The drain: a thread that empties the perf buffers into a batch as
     * soon as one passes its watermark, whatever the Python side is doing
     * (writing, fsyncing, ending a thousand sessions). The kernel buffers
     * then only need to hold a wakeup's worth of records; the batch grows
     * in user space up to its limit instead.
     *
     * Two batches: the drain fills one while Python decodes the other. */
    struct esr_drain {
        pthread_mutex_t lock;
        struct esr_batch batches[2];
        struct esr_batch *filling;
        size_t limit;
        struct perf_buffer *buffers[3];
        int epfd;           /* the buffers' epoll fds, and stop_fd */
        int stop_fd;
        int ready_fd;       /* readable once ready_at records are waiting */
        unsigned long long ready_at;
        int ready;
        int running;
        pthread_t thread;
        unsigned long long lost_notified;
    };

    static int esr_epoll_add(int epfd, int fd);

    struct esr_sample {
        struct perf_event_header header;
        __u32 size;
        char data[];
    };

    struct esr_lost {
        struct perf_event_header header;
        __u64 id;
        __u64 lost;
    };

    /* Appends each record to the filling batch as [u32 length][record],
     * 8-aligned; called with the lock held. Stops reading a buffer (leaving
     * the rest in the kernel) once the batch reaches the limit. */
    static enum bpf_perf_event_ret esr_on_record(void *ctx, int cpu, struct perf_event_header *header)
    {
        struct esr_drain *d = ctx;
        struct esr_batch *b = d->filling;

        if (header->type == PERF_RECORD_SAMPLE) {
            struct esr_sample *s = (struct esr_sample *)header;
            size_t need = (4 + (size_t)s->size + 7) & ~(size_t)7;

            if (b->len + need > b->cap) {
                size_t cap = b->cap;
                char *buf;

                if (b->len >= d->limit)
                    return LIBBPF_PERF_EVENT_DONE;
                while (cap < b->len + need)
                    cap *= 2;
                buf = realloc(b->buf, cap);
                if (!buf)
                    return LIBBPF_PERF_EVENT_DONE;
                b->buf = buf;
                b->cap = cap;
            }
            memcpy(b->buf + b->len, &s->size, 4);
            memcpy(b->buf + b->len + 4, s->data, s->size);
            memset(b->buf + b->len + 4 + s->size, 0, need - 4 - s->size);
            b->len += need;
            b->records++;
        } else if (header->type == PERF_RECORD_LOST) {
            d->lost_notified += ((struct esr_lost *)header)->lost;
        }
        return LIBBPF_PERF_EVENT_CONT;
    }

    /* Empty the kernel buffers into the filling batch; the lock is held. */
    static void esr_drain_locked(struct esr_drain *d)
    {
        uint64_t one = 1;
        int i;

        for (i = 0; i < 3; i++)
            if (d->buffers[i])
                perf_buffer__consume(d->buffers[i]);
        if (!d->ready && d->filling->records >= d->ready_at) {
            d->ready = 1;
            if (write(d->ready_fd, &one, sizeof(one)) < 0) {
                /* Only fails when the counter would overflow: already readable. */
            }
        }
    }

    static void *esr_drain_loop(void *arg)
    {
        struct esr_drain *d = arg;
        struct epoll_event events[4];
        int i, n;

        for (;;) {
            n = epoll_wait(d->epfd, events, 4, -1);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                return NULL;
            }
            for (i = 0; i < n; i++)
                if (events[i].data.fd == d->stop_fd)
                    return NULL;
            pthread_mutex_lock(&d->lock);
            esr_drain_locked(d);
            pthread_mutex_unlock(&d->lock);
        }
    }

    static int esr_drain_init(struct esr_drain *d, size_t limit, unsigned long long ready_at)
    {
        int i;

        memset(d, 0, sizeof(*d));
        d->epfd = d->stop_fd = d->ready_fd = -1;
        pthread_mutex_init(&d->lock, NULL);
        d->limit = limit;
        d->ready_at = ready_at;
        d->filling = &d->batches[0];
        for (i = 0; i < 2; i++) {
            d->batches[i].cap = 1 << 20;
            d->batches[i].buf = malloc(d->batches[i].cap);
            if (!d->batches[i].buf)
                return -ENOMEM;
        }
        d->epfd = epoll_create1(EPOLL_CLOEXEC);
        d->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        d->ready_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (d->epfd < 0 || d->stop_fd < 0 || d->ready_fd < 0)
            return -errno;
        return esr_epoll_add(d->epfd, d->stop_fd) ? -errno : 0;
    }

    /* After esr_drain_stop(). */
    static void esr_drain_free(struct esr_drain *d)
    {
        int i;

        for (i = 0; i < 3; i++) {
            if (d->buffers[i])
                perf_buffer__free(d->buffers[i]);
            d->buffers[i] = NULL;
        }
        for (i = 0; i < 2; i++) {
            free(d->batches[i].buf);
            d->batches[i].buf = NULL;
            d->batches[i].len = d->batches[i].cap = 0;
        }
        if (d->epfd >= 0)
            close(d->epfd);
        if (d->stop_fd >= 0)
            close(d->stop_fd);
        if (d->ready_fd >= 0)
            close(d->ready_fd);
        d->epfd = d->stop_fd = d->ready_fd = -1;
    }

    /* Signals stay with Python's main thread. */
    static int esr_drain_start(struct esr_drain *d)
    {
        sigset_t all, old;
        int err;

        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        err = pthread_create(&d->thread, NULL, esr_drain_loop, d);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (err)
            return err;
        d->running = 1;
        return 0;
    }

    static void esr_drain_stop(struct esr_drain *d)
    {
        uint64_t one = 1;

        if (!d->running)
            return;
        if (write(d->stop_fd, &one, sizeof(one)) < 0) {
            /* The counter cannot overflow from one write. */
        }
        pthread_join(d->thread, NULL);
        d->running = 0;
    }

    /* Drain once more, then hand the filling batch over and fill the other. */
    static struct esr_batch *esr_drain_take(struct esr_drain *d)
    {
        struct esr_batch *taken;
        uint64_t count;

        pthread_mutex_lock(&d->lock);
        esr_drain_locked(d);
        taken = d->filling;
        d->filling = taken == &d->batches[0] ? &d->batches[1] : &d->batches[0];
        d->ready = 0;
        if (read(d->ready_fd, &count, sizeof(count)) < 0) {
            /* EAGAIN: it was not readable. */
        }
        pthread_mutex_unlock(&d->lock);
        return taken;
    }

    static struct perf_buffer *esr_perf_buffer(int map_fd, size_t pages, struct esr_drain *drain)
    {
        struct perf_event_attr attr;

        memset(&attr, 0, sizeof(attr));
        attr.type = PERF_TYPE_SOFTWARE;
        attr.config = PERF_COUNT_SW_BPF_OUTPUT;
        attr.sample_type = PERF_SAMPLE_RAW;
        attr.sample_period = 1;
        /* Wake the drain once a quarter of the buffer is filled, not per
         * record: the recorded process pays for every wakeup. take() drains
         * whatever stays below the watermark. */
        attr.watermark = 1;
        attr.wakeup_watermark = pages * sysconf(_SC_PAGESIZE) / 4;
        return perf_buffer__new_raw(map_fd, pages, &attr, esr_on_record, drain, NULL);
    }

    static int esr_epoll_add(int epfd, int fd)
    {
        struct epoll_event ev;

        memset(&ev, 0, sizeof(ev));
        ev.events = EPOLLIN;
        ev.data.fd = fd;
        return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    }
    """
    struct bpf_object:
        pass
    struct bpf_map:
        pass
    struct bpf_program:
        pass
    struct bpf_link:
        pass
    struct perf_buffer:
        pass
    struct esr_batch:
        char *buf
        size_t len
        unsigned long long records
    struct esr_drain:
        perf_buffer *buffers[3]
        int epfd
        int ready_fd
        unsigned long long lost_notified
    int esr_drain_init(esr_drain *d, size_t limit, unsigned long long ready_at)
    int esr_drain_start(esr_drain *d)
    void esr_drain_stop(esr_drain *d) nogil
    void esr_drain_free(esr_drain *d)
    esr_batch *esr_drain_take(esr_drain *d) nogil

    char esr_libbpf_log[16384]
    void esr_libbpf_log_reset()
    void esr_libbpf_capture()
    void esr_atomic_add(long long *counter, long long delta)

    bpf_object *bpf_object__open_mem(const void *buf, size_t size, const void *opts)
    int bpf_object__load(bpf_object *obj)
    void bpf_object__close(bpf_object *obj)
    bpf_map *bpf_object__find_map_by_name(const bpf_object *obj, const char *name)
    int bpf_map__set_max_entries(bpf_map *map, uint32_t max_entries)
    int bpf_map__fd(const bpf_map *map)
    bpf_program *bpf_object__next_program(const bpf_object *obj, bpf_program *prog)
    const char *bpf_program__name(const bpf_program *prog)
    int bpf_program__set_autoload(bpf_program *prog, bint autoload)
    int libbpf_probe_bpf_map_type(int map_type, const void *opts)
    enum:
        BPF_MAP_TYPE_PERF_EVENT_ARRAY
        BPF_MAP_TYPE_RINGBUF
    bpf_link *bpf_program__attach(const bpf_program *prog)
    int bpf_link__destroy(bpf_link *link)
    int libbpf_num_possible_cpus()

    perf_buffer *esr_perf_buffer(int map_fd, size_t pages, esr_drain *drain)
    int perf_buffer__epoll_fd(const perf_buffer *pb)

    int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags)
    int bpf_map_lookup_elem(int fd, const void *key, void *value)
    int bpf_map_delete_elem(int fd, const void *key)
    int bpf_map_get_next_key(int fd, const void *key, void *next_key)
    enum:
        BPF_ANY

    int esr_epoll_add(int epfd, int fd)

    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    void *MAP_FAILED
    enum:
        PROT_READ
        PROT_WRITE
        MAP_SHARED


esr_libbpf_capture()

BUFFER_NAMES = ("command", "disk", "network")
EVENT_MAPS = (b"command_events", b"disk_events", b"network_events")

# Maps holding one entry per thread that can be inside a session at once.
PER_TASK_MAPS = (b"tracked_tasks", b"open_in_flight", b"connect_attempts", b"connect_in_flight")

cdef enum:
    MAX_LINKS = 64


class ProbeError(OSError):
    """Loading or attaching the BPF programs failed."""


cdef str libbpf_reason():
    """The last line libbpf printed: the verifier's or the kernel's reason."""
    cdef bytes log = esr_libbpf_log
    lines = [l for l in log.decode("utf-8", "replace").splitlines() if l.strip()]
    return lines[len(lines) - 1].strip() if lines else ""  # wraparound is off


def map_type_supported(str kind):
    """Whether the kernel has the "perf" or "ringbuf" map type."""
    cdef int map_type = BPF_MAP_TYPE_PERF_EVENT_ARRAY if kind == "perf" else BPF_MAP_TYPE_RINGBUF
    return libbpf_probe_bpf_map_type(map_type, NULL) == 1


def try_program(bytes image not None, str name):
    """Load and attach one program of an object, alone, and undo it.
    Returns None when that works, or why not."""
    cdef bpf_object *obj
    cdef bpf_program *prog
    cdef bpf_link *link = NULL
    cdef bint found = False
    esr_libbpf_log_reset()
    obj = bpf_object__open_mem(<const char *>image, len(image), NULL)
    if obj == NULL:
        return libbpf_reason() or strerror(errno).decode()
    try:
        prog = bpf_object__next_program(obj, NULL)
        while prog != NULL:
            if bpf_program__name(prog).decode() == name:
                found = True
            else:
                bpf_program__set_autoload(prog, False)
            prog = bpf_object__next_program(obj, prog)
        if not found:
            return f"no program {name}"
        if bpf_object__load(obj) != 0:
            return f"load: {strerror(errno).decode()}"
        prog = bpf_object__next_program(obj, NULL)
        while prog != NULL:
            if bpf_program__name(prog).decode() == name:
                link = bpf_program__attach(prog)
                if link == NULL:
                    return f"attach: {strerror(errno).decode()}"
                bpf_link__destroy(link)
            prog = bpf_object__next_program(obj, prog)
        return None
    finally:
        bpf_object__close(obj)


cdef class Probe:
    cdef bpf_object *obj
    cdef bpf_link *links[MAX_LINKS]
    cdef int nlinks
    cdef esr_drain drain
    cdef bint drain_ready
    cdef esr_batch *taken
    cdef esr_session_state *states
    cdef size_t states_size
    cdef uint32_t max_sessions
    cdef int tracked_fd
    cdef int buffer_lost_fd
    cdef int ncpus
    cdef readonly tuple buffer_pages
    cdef readonly list programs

    def __cinit__(self):
        self.obj = NULL
        self.nlinks = 0
        self.states = NULL
        self.drain_ready = False
        self.taken = NULL

    def __init__(self, bytes image not None, tuple buffer_pages not None,
                 uint32_t max_sessions, uint32_t max_tasks,
                 size_t batch_limit=64 << 20, unsigned long long ready_at=4096):
        """Load and attach the programs of a BPF object image.

        buffer_pages: per-CPU pages of the (command, disk, network) buffers,
        each a power of two, exactly as configured. batch_limit: bytes the
        drain may hold before records wait in the kernel. ready_at: records
        waiting that make fileno() readable.
        """
        cdef bpf_program *prog
        cdef bpf_link *link
        cdef esr_session_state *state
        cdef int i
        self.buffer_pages = buffer_pages
        self.max_sessions = max_sessions
        self.programs = []
        self.ncpus = libbpf_num_possible_cpus()
        esr_libbpf_log_reset()
        self.obj = bpf_object__open_mem(<const char *>image, len(image), NULL)
        if self.obj == NULL:
            self._fail("cannot open the BPF object")
        self._size(b"session_states", max_sessions)
        self._size(b"argv_scratch", self.ncpus)
        for name in PER_TASK_MAPS:
            self._size(name, max_tasks)
        if bpf_object__load(self.obj) != 0:
            self._fail("cannot load the BPF programs")

        prog = bpf_object__next_program(self.obj, NULL)
        while prog != NULL:
            if self.nlinks == MAX_LINKS:
                raise ProbeError(0, "too many BPF programs")
            link = bpf_program__attach(prog)
            name = bpf_program__name(prog).decode()
            if link == NULL:
                self._fail(f"cannot attach {name}")
            self.links[self.nlinks] = link
            self.nlinks += 1
            self.programs.append(name)
            prog = bpf_object__next_program(self.obj, prog)

        self.tracked_fd = self._fd(b"tracked_tasks")
        self.buffer_lost_fd = self._fd(b"buffer_lost")
        self.states_size = ((max_sessions * sizeof(esr_session_state)) + 4095) & ~(<size_t>4095)
        self.states = <esr_session_state *>mmap(NULL, self.states_size, PROT_READ | PROT_WRITE,
                                                MAP_SHARED, self._fd(b"session_states"), 0)
        if <void *>self.states == MAP_FAILED:
            self.states = NULL
            self._fail("cannot map session_states")

        self.drain_ready = True
        err = esr_drain_init(&self.drain, batch_limit, ready_at)
        if err:
            self.close()
            raise ProbeError(-err, f"cannot set up the drain: {strerror(-err).decode()}")
        for i in range(3):
            self.drain.buffers[i] = esr_perf_buffer(self._fd(EVENT_MAPS[i]), buffer_pages[i],
                                                    &self.drain)
            if self.drain.buffers[i] == NULL:
                self._fail(f"cannot open the {BUFFER_NAMES[i]} buffer of {buffer_pages[i]} pages")
            if esr_epoll_add(self.drain.epfd, perf_buffer__epoll_fd(self.drain.buffers[i])) != 0:
                self._fail("epoll_ctl")
        err = esr_drain_start(&self.drain)
        if err:
            self.close()
            raise ProbeError(err, f"cannot start the drain thread: {strerror(err).decode()}")

    cdef _fail(self, str what):
        err = errno
        reason = libbpf_reason()
        self.close()
        raise ProbeError(err, f"{what}: {reason or strerror(err).decode()}")

    cdef _size(self, bytes name, uint32_t entries):
        cdef bpf_map *m = bpf_object__find_map_by_name(self.obj, name)
        if m == NULL or bpf_map__set_max_entries(m, entries) != 0:
            self._fail(f"cannot size map {name.decode()}")

    cdef int _fd(self, bytes name) except -1:
        cdef bpf_map *m = bpf_object__find_map_by_name(self.obj, name)
        if m == NULL:
            raise ProbeError(0, f"no map {name.decode()} in the BPF object")
        return bpf_map__fd(m)

    def fileno(self):
        """Readable once the drain holds ready_at records: time to take them."""
        return self.drain.ready_fd

    def take_batch(self):
        """Every record waiting, in the kernel buffers or in the drain, as a
        read-only memoryview of [u32 length][record] entries, valid until
        release_batch()."""
        if not self.drain_ready:
            raise ProbeError(0, "probe is closed")
        if self.taken != NULL:
            raise ProbeError(0, "the previous batch was not released")
        with nogil:
            self.taken = esr_drain_take(&self.drain)
        if self.taken.len == 0:
            return memoryview(b"")
        return memoryview(<uint8_t[:self.taken.len]><uint8_t *>self.taken.buf).toreadonly()

    def release_batch(self):
        if self.taken != NULL:
            self.taken.len = 0
            self.taken.records = 0
            self.taken = NULL

    @property
    def lost_notified(self):
        """Records the kernel reported lost through the buffers themselves."""
        return self.drain.lost_notified

    def buffer_lost(self):
        """Records lost per buffer (command, disk, network), over all CPUs."""
        cdef uint32_t key
        cdef uint64_t *values = <uint64_t *>malloc(8 * max(self.ncpus, 1))
        cdef int cpu
        totals = []
        try:
            for key in range(3):
                if bpf_map_lookup_elem(self.buffer_lost_fd, &key, values) != 0:
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
        state.live_tasks = 0
        state.lost[0] = state.lost[1] = state.lost[2] = 0
        state.untracked_forks = 0
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
        if bpf_map_get_next_key(self.tracked_fd, NULL, &next_key) == 0:
            while True:
                key = next_key
                if bpf_map_lookup_elem(self.tracked_fd, &key, &task) == 0 and task.session == cookie:
                    stale.append(key)
                if bpf_map_get_next_key(self.tracked_fd, &key, &next_key) != 0:
                    break
        for key in stale:
            bpf_map_delete_elem(self.tracked_fd, &key)

    def session_counters(self, uint32_t slot):
        """(live_tasks, lost command, lost disk, lost network, untracked forks)."""
        cdef esr_session_state *state = self._state(slot)
        return (state.live_tasks, state.lost[0], state.lost[1], state.lost[2],
                state.untracked_forks)

    def track(self, uint32_t tid, uint64_t cookie, bint anchor=False):
        """Record thread tid in a session; an anchor is not recorded itself,
        but what it forks from now on is."""
        cdef esr_task task
        cdef esr_session_state *state = self._state(<uint32_t>cookie)
        task.session = cookie
        task.flags = ESR_TASK_ANCHOR if anchor else 0
        task.reserved = 0
        if bpf_map_update_elem(self.tracked_fd, &tid, &task, BPF_ANY) != 0:
            raise OSError(errno, f"cannot track pid {tid}: {strerror(errno).decode()}")
        if not anchor:
            esr_atomic_add(<long long *>&state.live_tasks, 1)

    def untrack(self, uint32_t tid):
        cdef esr_task task
        cdef esr_session_state *state
        if bpf_map_lookup_elem(self.tracked_fd, &tid, &task) != 0:
            return
        bpf_map_delete_elem(self.tracked_fd, &tid)
        if not (task.flags & ESR_TASK_ANCHOR):
            state = self._state(<uint32_t>task.session)
            if state.session == task.session:
                esr_atomic_add(<long long *>&state.live_tasks, -1)

    def set_recorder_exe(self, uint64_t dev, uint64_t ino):
        """Name the esr executable (kernel dev encoding, inode): an anchor's
        child that execs it is the PAM hook, and leaves the session."""
        cdef uint32_t zero = 0
        cdef esr_exe exe
        exe.dev = dev
        exe.ino = ino
        if bpf_map_update_elem(self._fd(b"recorder_exe"), &zero, &exe, BPF_ANY) != 0:
            raise OSError(errno, strerror(errno).decode())

    def task_session(self, uint32_t tid):
        """(cookie, anchor) of the session thread tid is tracked in, or None."""
        cdef esr_task task
        if bpf_map_lookup_elem(self.tracked_fd, &tid, &task) != 0:
            return None
        return task.session, bool(task.flags & ESR_TASK_ANCHOR)

    def close(self):
        cdef int i
        if self.drain_ready:
            with nogil:
                esr_drain_stop(&self.drain)
            esr_drain_free(&self.drain)
            self.drain_ready = False
            self.taken = NULL
        for i in range(self.nlinks):
            bpf_link__destroy(self.links[i])
        self.nlinks = 0
        if self.states != NULL:
            munmap(self.states, self.states_size)
            self.states = NULL
        if self.obj != NULL:
            bpf_object__close(self.obj)
            self.obj = NULL

    def __dealloc__(self):
        self.close()
