# cython: language_level=3, boundscheck=False, wraparound=False
"""The recorder's BPF programs, loaded by the statically linked libbpf.

A Probe loads and attaches esr.bpf.o as the config sizes it (object.c) and
starts the drain (drain.c): a C thread that empties the per-CPU perf
buffers into a batch as they fill, with no Python code per record.
take_batch() hands the batch over to esr._fast.decode.

With a pin directory (the daemon's), the kernel side outlives the process:
every map and link is pinned there, with two maps of the recorder's own
(handover.h): `recorder` says what is attached and who held it, `sessions`
which session holds each slot and how many of its records were read. The
rings and the files they hang from cannot be pinned: to_store() names them
for systemd's file descriptor store, and the next Probe gets them back in
`handed`. A Probe finding its own programs pinned takes them over without
loading anything; finding others (an upgrade, changed load-time settings),
it loads its own over the same maps and replaces them.
"""
import hashlib
import os
import signal
import time

from libc.errno cimport errno, ENOENT
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport strerror, memset, memcpy, strncpy, strcmp

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

cdef extern from "<sys/ioctl.h>":
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<linux/perf_event.h>":
    enum:
        PERF_EVENT_IOC_DISABLE

cdef extern from "<unistd.h>":
    long sysconf(int name)
    int close(int fd)
    enum:
        _SC_PAGESIZE

cdef extern from "<linux/bpf.h>":
    enum:
        BPF_ANY
        BPF_F_MMAPABLE
        BPF_MAP_TYPE_ARRAY
        BPF_MAP_TYPE_PERF_EVENT_ARRAY
        BPF_MAP_TYPE_RINGBUF
        BPF_MAP_TYPE_PERCPU_ARRAY
        BPF_MAP_TYPE_PERCPU_HASH
        BPF_MAP_TYPE_LRU_PERCPU_HASH
    struct bpf_map_info:
        uint32_t type
        uint32_t id
        uint32_t key_size
        uint32_t value_size
        uint32_t max_entries
        uint32_t map_flags
    struct bpf_prog_info:
        uint32_t id
        uint64_t run_time_ns
        uint64_t run_cnt
    struct bpf_link_info:
        uint32_t prog_id
    enum:
        BPF_STATS_RUN_TIME

cdef extern from "<bpf/libbpf.h>":
    struct bpf_object:
        pass
    struct bpf_map:
        pass
    struct bpf_program:
        pass
    struct bpf_link:
        pass
    int libbpf_probe_bpf_map_type(int map_type, const void *opts)
    int libbpf_num_possible_cpus()
    bpf_map *bpf_object__next_map(const bpf_object *obj, const bpf_map *map)
    bpf_program *bpf_object__next_program(const bpf_object *obj, bpf_program *prog)
    const char *bpf_map__name(const bpf_map *map)
    const char *bpf_program__name(const bpf_program *prog)
    bint bpf_program__autoload(const bpf_program *prog)
    const char *bpf_program__section_name(const bpf_program *prog)
    bpf_object *bpf_object__open_mem(const void *buf, size_t sz, const void *opts)
    void bpf_object__close(bpf_object *obj)
    int bpf_map__fd(const bpf_map *map)
    bint bpf_map__is_internal(const bpf_map *map)
    int bpf_map__type(const bpf_map *map)
    uint32_t bpf_map__key_size(const bpf_map *map)
    uint32_t bpf_map__value_size(const bpf_map *map)
    uint32_t bpf_map__max_entries(const bpf_map *map)
    uint32_t bpf_map__map_flags(const bpf_map *map)
    int bpf_map__reuse_fd(bpf_map *map, int fd)
    int bpf_link__fd(const bpf_link *link)
    int bpf_program__fd(const bpf_program *prog)

cdef extern from "<bpf/bpf.h>":
    struct bpf_map_create_opts:
        size_t sz
        uint32_t map_flags
    int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags)
    int bpf_map_lookup_elem(int fd, const void *key, void *value)
    int bpf_map_delete_elem(int fd, const void *key)
    int bpf_map_get_next_key(int fd, const void *key, void *next_key)
    int bpf_map_create(int map_type, const char *name, uint32_t key_size, uint32_t value_size,
                       uint32_t max_entries, const bpf_map_create_opts *opts)
    int bpf_obj_pin(int fd, const char *pathname)
    int bpf_obj_get(const char *pathname)
    int bpf_obj_get_info_by_fd(int fd, void *info, uint32_t *info_len)
    int bpf_prog_get_fd_by_id(uint32_t id)
    int bpf_enable_stats(int type)

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
        bint raw_tracepoints
    struct esr_object:
        bpf_object *obj
        bpf_link *links[64]
        bpf_program *linked[64]
        int nlinks
        const char *io_uring_hook
    enum esr_hook:
        ESR_HOOK_KPROBE
        ESR_HOOK_FENTRY
        ESR_HOOK_RAW_TP
    int esr_object_prepare(esr_object *o, const void *image, size_t size,
                           const esr_object_settings *settings, const char **step)
    int esr_object_load(esr_object *o, const char **step)
    enum esr_hooks:
        ESR_HOOKS_ALL
        ESR_HOOKS_SESSION
        ESR_HOOKS_ALWAYS
    int esr_object_attach_hooks(esr_object *o, esr_hooks which, const char **step)
    void esr_object_detach_session_hooks(esr_object *o, const int *fds, int nfds) nogil
    void esr_detach_fds(const int *fds, int n) nogil
    bint esr_is_session_hook(const bpf_program *prog)
    void esr_object_close(esr_object *o)
    void esr_object_release(esr_object *o)
    struct esr_tracking:
        pass
    int esr_tracking_open(esr_tracking *t, int tracked_tasks_fd, int tid_marks_fd)
    void esr_tracking_close(esr_tracking *t)
    int esr_track(const esr_tracking *t, uint32_t tid, const esr_task *task)
    int esr_untrack(const esr_tracking *t, uint32_t tid)
    int esr_try_hook(const void *image, size_t size, esr_hook hook, const char **step)
    int esr_missing_helper(const void *image, size_t size, bint raw_tracepoints, char *out,
                           size_t out_size)
    int esr_choose_programs(bpf_object *obj, bint raw_tracepoints, const char **io_uring_hook,
                            const char **step)
    const char *esr_libbpf_reason()

cdef extern from "handover.h":
    enum:
        ESR_HANDOVER_VERSION
        ESR_LEDGER_BUFFERS
        ESR_LEDGER_SID
        ESR_HANDED_OVER
        ESR_LEDGER_LEADER_GONE
    struct esr_handover:
        uint32_t version
        uint32_t flags
        uint64_t generation
        uint64_t alive_ns
        uint32_t max_sessions
        uint32_t max_tasks
        uint32_t pages[8]
        uint8_t fingerprint[32]
        char esr_version[32]
        uint64_t datadir_dev
        uint64_t datadir_ino
        uint32_t keeper_pid
        uint64_t keeper_start
    struct esr_ledger:
        uint64_t session
        uint64_t drained[8]
        uint32_t anchor_pid
        uint32_t terminal_pid
        uint32_t flags
        char sid[136]

cdef extern from "drain.h":
    struct esr_batch:
        char *buf
        size_t len
        unsigned long long records
    struct esr_buffers:
        int ncpus
    struct esr_drain:
        int ready_fd
        unsigned int line_buffers
        unsigned long long lost_notified
        esr_buffers buffers
        esr_ledger *ledger
        uint32_t ledger_slots
    void esr_drain_init(esr_drain *d)
    int esr_drain_start(esr_drain *d, const int *map_fds, const size_t *pages,
                        const int *ring_fds, size_t limit, unsigned long long ready_at,
                        unsigned long long lines_at, const char **step)
    void esr_drain_stop(esr_drain *d) nogil
    void esr_drain_close(esr_drain *d) nogil
    esr_batch *esr_drain_take(esr_drain *d) nogil
    int esr_buffers_ring_fd(const esr_buffers *b, int buffer, int cpu)
    int esr_keeper_start(const esr_buffers *b, int max_fd, int *pipe_w)

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
# The maps the recorder reads and writes itself, besides the buffers'.
TRACKED_TASKS, SESSION_STATES, BUFFER_LOST = "tracked_tasks", "session_states", "buffer_lost"
TID_MARKS = "tid_marks"


cdef str why(int err, const char *step):
    reason = esr_libbpf_reason().decode("utf-8", "replace")
    return f"{step.decode()}: {reason or strerror(-err).decode()}"


cdef str oserror(str what):
    return f"{what}: {strerror(errno).decode()}"


def map_type_supported(str kind):
    """Whether the kernel has the "perf" or "ringbuf" map type."""
    cdef int map_type = BPF_MAP_TYPE_PERF_EVENT_ARRAY if kind == "perf" else BPF_MAP_TYPE_RINGBUF
    return libbpf_probe_bpf_map_type(map_type, NULL) == 1


HOOKS = {"kprobe": ESR_HOOK_KPROBE, "fentry": ESR_HOOK_FENTRY, "raw_tp": ESR_HOOK_RAW_TP}


def try_hook(bytes image not None, str hook):
    """Load and attach the "kprobe", "fentry" or "raw_tp" program of
    feature_probe.bpf.o alone, and undo it. Returns None when that works, or
    why not."""
    cdef const char *step = b""
    cdef int err = esr_try_hook(<const char *>image, len(image), HOOKS[hook], &step)
    return None if err == 0 else why(err, step)


def missing_helper(bytes image not None, bint raw_tracepoints):
    """A BPF helper the programs of image call and this kernel lacks, as
    "bpf_NAME (used by PROGRAM)", or None; raw_tracepoints: as Probe's."""
    cdef char out[256]
    cdef int found = esr_missing_helper(<const char *>image, len(image), raw_tracepoints, out,
                                        sizeof(out))
    if found < 0:
        raise ProbeError(-found, f"cannot read the BPF object: {strerror(-found).decode()}")
    return out.decode() if found else None


def tracepoints(bytes image not None, bint raw_tracepoints):
    """The tracepoints the programs of image (esr.bpf.o) attach to on this
    kernel, raw_tracepoints as Probe's: "category/name"."""
    cdef bpf_object *obj = bpf_object__open_mem(<const char *>image, len(image), NULL)
    cdef bpf_program *prog = NULL
    cdef const char *hook = NULL
    cdef const char *step = NULL
    if obj == NULL:
        raise ProbeError(errno, oserror("cannot read the BPF object"))
    found = set()
    try:
        err = esr_choose_programs(obj, raw_tracepoints, &hook, &step)
        if err:
            raise ProbeError(-err, f"{step.decode()}: {strerror(-err).decode()}")
        prog = bpf_object__next_program(obj, NULL)
        while prog != NULL:
            section = bpf_program__section_name(prog).decode()
            if bpf_program__autoload(prog) and section.startswith(("tp/", "tracepoint/")):
                found.add(section.split("/", 1)[1])
            prog = bpf_object__next_program(obj, prog)
    finally:
        bpf_object__close(obj)
    return sorted(found)


def run_stats():
    """Have the kernel count and time every BPF program's runs until the
    returned file descriptor is closed (Probe.program_runs reads them)."""
    cdef int fd = bpf_enable_stats(BPF_STATS_RUN_TIME)
    if fd < 0:
        raise ProbeError(-fd, f"cannot turn on BPF run statistics: {strerror(-fd).decode()}")
    return fd


cdef _prog_info(int fd, bpf_prog_info *info):
    cdef uint32_t size = sizeof(bpf_prog_info)
    memset(info, 0, size)
    if bpf_obj_get_info_by_fd(fd, info, &size) != 0:
        raise ProbeError(errno, oserror("cannot read a BPF program's statistics"))


def ring_name(str buffer, int cpu):
    return f"ring.{buffer}.{cpu}"


cdef int _info(int fd, bpf_map_info *info) except -1:
    cdef uint32_t size = sizeof(bpf_map_info)
    memset(info, 0, size)
    if bpf_obj_get_info_by_fd(fd, info, &size) != 0:
        raise ProbeError(errno, oserror("cannot read a pinned map's definition"))
    return 0


cdef bint _percpu(uint32_t map_type):
    return map_type in (BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PERCPU_HASH,
                        BPF_MAP_TYPE_LRU_PERCPU_HASH)


cdef uint32_t _map_id(int fd) except? 0:
    cdef bpf_map_info info
    _info(fd, &info)
    return info.id


cdef long _copy_map(int old_fd, int new_fd, int ncpus) except -2:
    """Copy the entries of a map into another of the same type and key, whose
    values may have grown (the bytes added stay zero) and whose size may
    differ. Returns the entries that did not fit, or -1 when none could be
    carried over (another type or key)."""
    cdef bpf_map_info old, new
    cdef size_t old_size, new_size, n, cpu
    cdef char *key = NULL
    cdef char *next_key = NULL
    cdef char *old_value = NULL
    cdef char *new_value = NULL
    cdef uint32_t index
    cdef long refused = 0
    cdef int more
    _info(old_fd, &old)
    _info(new_fd, &new)
    if old.type != new.type or old.key_size != new.key_size:
        return -1
    n = ncpus if _percpu(old.type) else 1
    old_size = (old.value_size + 7) // 8 * 8 if n > 1 else old.value_size
    new_size = (new.value_size + 7) // 8 * 8 if n > 1 else new.value_size
    key = <char *>calloc(1, old.key_size)
    next_key = <char *>calloc(1, old.key_size)
    old_value = <char *>calloc(n, old_size)
    new_value = <char *>calloc(n, new_size)
    try:
        if old.type in (BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY):
            for index in range(min(old.max_entries, new.max_entries)):
                if bpf_map_lookup_elem(old_fd, &index, old_value) != 0:
                    continue
                for cpu in range(n):
                    memcpy(new_value + cpu * new_size, old_value + cpu * old_size,
                           min(old_size, new_size))
                if bpf_map_update_elem(new_fd, &index, new_value, BPF_ANY) != 0:
                    refused += 1
            return refused + max(<long>old.max_entries - <long>new.max_entries, 0)
        more = bpf_map_get_next_key(old_fd, NULL, next_key) == 0
        while more:
            memcpy(key, next_key, old.key_size)
            if bpf_map_lookup_elem(old_fd, key, old_value) == 0:
                for cpu in range(n):
                    memcpy(new_value + cpu * new_size, old_value + cpu * old_size,
                           min(old_size, new_size))
                if bpf_map_update_elem(new_fd, key, new_value, BPF_ANY) != 0:
                    refused += 1
            more = bpf_map_get_next_key(old_fd, key, next_key) == 0
        return refused
    finally:
        free(key)
        free(next_key)
        free(old_value)
        free(new_value)


def _stat(pid):
    """The fields of /proc/PID/stat after the command's name, from the
    state on, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2:].split()


def _started(pid):
    """A process's start time (clock ticks since boot), or None once gone."""
    fields = _stat(pid)
    return int(fields[19]) if fields is not None else None


def _alive(tid):
    """Whether thread tid has not exited: a zombie's exit has happened."""
    fields = _stat(tid)
    return fields is not None and fields[0] not in (b"Z", b"X")


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


cdef class Probe:
    cdef esr_object obj
    cdef esr_drain drain
    cdef bint loaded
    cdef bint released
    cdef esr_batch *taken
    cdef esr_session_state *states
    cdef size_t states_size
    cdef esr_handover *header
    cdef esr_ledger *ledger
    cdef size_t ledger_size
    cdef uint32_t nslots
    cdef int ncpus
    cdef int tracked_tasks_fd, session_states_fd, buffer_lost_fd
    cdef esr_tracking tracking
    cdef int recorder_fd, sessions_fd
    cdef int perf_fds[ESR_BUF_COUNT]
    cdef readonly tuple buffer_pages
    cdef readonly str pin_dir
    cdef readonly object adopted
    cdef dict maps          # name -> fd of every map the programs use, but libbpf's internal ones
    cdef list own_fds       # descriptors this Probe opened itself (pins, the store)
    cdef dict links         # name -> fd of links taken over from a previous recorder
    cdef dict unpinned      # name -> fd of links only a descriptor store can keep
    cdef list retired       # names of the store's descriptors that are gone
    cdef int keeper_pid, keeper_w
    cdef list taken_over    # the ledger's sessions as the previous recorder left them
    # The session hooks are attached only while a session is recorded
    # (object.h); loading again, to attach them, takes the image and
    # settings loaded first.
    cdef bytes image
    cdef esr_object_settings settings
    cdef frozenset session_hooks
    cdef bint on_demand     # false where their links cannot be pinned: kept attached
    cdef readonly bint session_hooks_attached

    def __cinit__(self):
        memset(&self.obj, 0, sizeof(self.obj))
        memset(&self.tracking, 0, sizeof(self.tracking))
        esr_drain_init(&self.drain)
        self.loaded = self.released = False
        self.taken = NULL
        self.states = NULL
        self.header = NULL
        self.ledger = NULL
        self.recorder_fd = self.sessions_fd = -1
        self.maps, self.links, self.unpinned = {}, {}, {}
        self.own_fds, self.retired = [], []
        self.adopted = None
        self.keeper_pid, self.keeper_w = 0, -1
        self.taken_over = []
        self.session_hooks = frozenset()
        self.on_demand = True
        self.session_hooks_attached = False
        memset(self.perf_fds, 0, sizeof(self.perf_fds))

    def __init__(self, bytes image not None, tuple buffer_pages not None,
                 uint32_t max_sessions, uint32_t max_tasks, uint32_t tasks_per_session=0,
                 uint64_t recorder_exe_dev=0,
                 uint64_t recorder_exe_ino=0, bint record_input=False,
                 uint64_t terminal_rate=0, uint64_t terminal_burst=0,
                 size_t batch_limit=64 << 20, unsigned long long ready_at=16384,
                 unsigned long long lines_at=2048,
                 str pin_dir=None, dict handed=None, tuple owner=(0, 0), str version="",
                 bint keep_rings=False, bint raw_tracepoints=False):
        """Load and attach the programs of an esr.bpf.o image, or take over
        those a previous recorder left in pin_dir.

        buffer_pages: per-CPU pages of each buffer (BUFFERS order), powers of
        two, applied as given. tasks_per_session: the threads one session
        may have tracked at once (0: max_tasks). recorder_exe_*: the esr executable (kernel dev
        encoding, inode), whose run by a session's anchor is the PAM hook,
        not the user. record_input, terminal_rate, terminal_burst: the
        terminal stream's keystrokes and budget (terminal.bpf.c).
        batch_limit: bytes the drain may hold before records wait in the
        kernel. ready_at: records waiting that make fileno() readable;
        lines_at: audit lines (records of the line_buffers()) that do.

        pin_dir: where the kernel side is pinned, to outlive this process
        (None: it goes with it). handed: descriptors a previous recorder
        stored (to_store()), by name; this Probe owns them from now on.
        owner: (st_dev, st_ino) of the data dir recorded into, which a
        pin_dir belongs to. version: esr's, noted for the next recorder.
        keep_rings: the rings are stored for the next recorder: a keeper
        process (drain.h) keeps what they hold while no recorder runs.
        raw_tracepoints: hook fork, exec and exit through raw tracepoints
        (session.bpf.c), where try_hook(..., "raw_tp") says the kernel can.
        """
        cdef esr_object_settings settings
        cdef size_t pages[ESR_BUF_COUNT]
        cdef int ring_fds_given = 0
        cdef int *ring_fds = NULL
        cdef int *given
        cdef const char *step = b""
        cdef int err, i, cpu
        handed = dict(handed or {})
        previous = None
        if len(buffer_pages) != ESR_BUF_COUNT:
            raise ValueError(f"buffer_pages: {ESR_BUF_COUNT} sizes expected, one per buffer")
        self.pin_dir = pin_dir
        self.ncpus = libbpf_num_possible_cpus()
        try:
            previous = self._find_pinned(owner) if pin_dir else None
            if previous is not None:
                # Slots are indices into maps the sessions are in: they stay.
                max_sessions = self.header.max_sessions
            settings.max_sessions = max_sessions
            settings.max_tasks = max_tasks
            settings.tasks_per_session = tasks_per_session or max_tasks
            settings.recorder_exe_dev = recorder_exe_dev
            settings.recorder_exe_ino = recorder_exe_ino
            settings.record_input = record_input
            settings.terminal_rate = terminal_rate
            settings.terminal_burst = terminal_burst
            settings.raw_tracepoints = raw_tracepoints
            fingerprint = hashlib.sha256(image + repr((
                max_sessions, max_tasks, settings.tasks_per_session, recorder_exe_dev,
                recorder_exe_ino, record_input,
                terminal_rate, terminal_burst, raw_tracepoints)).encode()).digest()
            self.nslots = max_sessions
            self.image = image
            self.settings = settings
            if previous is None:
                self._load(image, &settings)
                self._create_own(max_sessions)
            self._note_named()
            # The rings a previous recorder stored are read on with their
            # size, through the file they hang from when it came too, and
            # first: loading programs takes a while, and they may fill.
            if previous is not None and any(n.startswith("ring.") for n in handed):
                buffer_pages = tuple(self.header.pages[i] for i in range(ESR_BUF_COUNT))
                ring_fds = <int *>malloc(ESR_BUF_COUNT * self.ncpus * sizeof(int))
                for i in range(ESR_BUF_COUNT):
                    perf = handed.pop(f"perf.{BUFFERS[i]}", None)
                    if perf is not None:
                        self.own_fds.append(perf)
                        self.perf_fds[i] = perf
                    for cpu in range(self.ncpus):
                        ring_fds[i * self.ncpus + cpu] = handed.pop(ring_name(BUFFERS[i], cpu), -1)
                        ring_fds_given += ring_fds[i * self.ncpus + cpu] >= 0
                self.adopted["rings"] = ring_fds_given
            elif previous is not None:
                self.adopted["rings"] = 0
            for i in range(ESR_BUF_COUNT):
                pages[i] = buffer_pages[i]
                self.header.pages[i] = buffer_pages[i]
            self.buffer_pages = buffer_pages
            # Before the drain reads on and counts what it reads.
            self.taken_over = self._ledger()
            self.drain.ledger = self.ledger
            self.drain.ledger_slots = self.nslots
            given, ring_fds = ring_fds, NULL  # the drain's from now on, whatever happens
            err = esr_drain_start(&self.drain, self.perf_fds, pages, given, batch_limit,
                                  ready_at, lines_at, &step)
            free(given)
            if err:
                raise ProbeError(-err, why(err, step))
            if previous is not None:
                self.adopted["reading_ns"] = time.time_ns()
            # The rings are mapped here now: the previous keeper can go.
            if previous is not None and _started(self.header.keeper_pid) == self.header.keeper_start:
                os.kill(self.header.keeper_pid, signal.SIGTERM)
            self.header.keeper_pid = self.header.keeper_start = 0
            if keep_rings:
                err = esr_keeper_start(&self.drain.buffers,
                                       max(int(fd) for fd in os.listdir("/proc/self/fd")),
                                       &self.keeper_w)
                if err < 0:
                    raise ProbeError(-err, f"cannot start the ring keeper: {strerror(-err).decode()}")
                self.keeper_pid = err
                self.header.keeper_pid = err
                self.header.keeper_start = _started(err) or 0

            if previous is None:
                pass
            elif self._same_programs(previous, fingerprint, image, &settings, handed):
                self.adopted["replaced"] = False
            else:
                self._replace(image, &settings, previous, handed)
                self.adopted["replaced"] = True
                self._note_named()
            if pin_dir:
                self._pin()
            self._map_states()
            if previous is not None and self.adopted.get("maps_changed"):
                self.adopted["reconciled"] = self._reconcile()
            # Where links cannot be pinned (perf event attachments, before
            # Linux 5.15), only the descriptor store keeps them across a
            # restart, and only as they were at start: keep them all.
            self.on_demand = not self.unpinned
            self._follow_sessions()
            self.header.version = ESR_HANDOVER_VERSION
            self.header.flags = 0
            self.header.max_tasks = max_tasks
            self.header.datadir_dev, self.header.datadir_ino = owner
            memcpy(self.header.fingerprint, <const char *>fingerprint, 32)
            encoded = version.encode()[:31]
            memset(self.header.esr_version, 0, 32)
            memcpy(self.header.esr_version, <const char *>encoded, len(encoded))
            self.heartbeat()
        except BaseException:
            if ring_fds != NULL:
                for i in range(ESR_BUF_COUNT * self.ncpus):
                    if ring_fds[i] >= 0:
                        close(ring_fds[i])
            for fd in handed.values():
                close(fd)
            self.close(unpin=previous is None)
            raise
        finally:
            free(ring_fds)
        for fd in handed.values():  # a previous layout's, unknown to this one
            close(fd)

    # --- finding, taking over, replacing ----------------------------------------

    cdef object _find_pinned(self, tuple owner):
        """What a previous recorder left in pin_dir, or None: maps `recorder`
        and `sessions`, and returns the header's fields as they were."""
        path = os.path.join(self.pin_dir, "recorder")
        if not os.path.exists(path):
            return None
        self.recorder_fd = self._get(path)
        self.sessions_fd = self._get(os.path.join(self.pin_dir, "sessions"))
        self._map_own()
        header = self.header
        where = self.pin_dir
        if header.version < 1 or header.max_sessions == 0:
            self.pin_dir = None  # not ours to empty
            raise ProbeError(0, f"{where}: not an esr pin directory")
        if (header.datadir_dev, header.datadir_ino) != owner:
            self.pin_dir = None
            raise ProbeError(
                0, f"{where} holds the programs of a recorder of another data dir: "
                "give this one a pin_dir of its own")
        previous = {
            "version": header.esr_version[:32].split(b"\0")[0].decode(errors="replace"),
            "handed_over": bool(header.flags & ESR_HANDED_OVER),
            "alive_ns": header.alive_ns,
            "fingerprint": bytes(header.fingerprint[:32]),
            "max_tasks": header.max_tasks,
        }
        self.adopted = dict(previous)
        for name in sorted(os.listdir(os.path.join(self.pin_dir, "maps"))):
            self.maps[name] = self._get(os.path.join(self.pin_dir, "maps", name))
        for name in sorted(os.listdir(os.path.join(self.pin_dir, "links"))):
            self.links[name] = self._get(os.path.join(self.pin_dir, "links", name))
        return previous

    cdef int _get(self, str path) except -1:
        cdef int fd = bpf_obj_get(path.encode())
        if fd < 0:
            raise ProbeError(errno, oserror(f"cannot open {path}"))
        self.own_fds.append(fd)
        return fd

    cdef bint _same_programs(self, dict previous, bytes fingerprint, bytes image,
                             esr_object_settings *settings, dict handed) except -1:
        """Whether the programs pinned are this image's, loaded with these
        settings, and all still attached: then nothing needs loading."""
        cdef const char *step = b""
        cdef int err
        for name in [n for n in handed if n.startswith("link.")]:
            self.links[name[5:]] = handed.pop(name)
            self.own_fds.append(self.links[name[5:]])
            self.unpinned[name[5:]] = self.links[name[5:]]
        if previous["fingerprint"] != fingerprint:
            return False
        err = esr_object_prepare(&self.obj, <const char *>image, len(image), settings, &step)
        if err:
            raise ProbeError(-err, why(err, step))
        try:
            names = self._note_programs()
        finally:
            esr_object_close(&self.obj)
        # The session hooks were left attached only if a session was recorded.
        self.session_hooks_attached = self.session_hooks <= set(self.links)
        return names - self.session_hooks <= set(self.links)

    cdef set _note_programs(self):
        """The names of the programs this kernel has hooks for, of the image
        opened; notes the session hooks."""
        cdef bpf_program *prog = bpf_object__next_program(self.obj.obj, NULL)
        names, session = set(), set()
        while prog != NULL:
            if bpf_program__autoload(prog):
                names.add(bpf_program__name(prog).decode())
                if esr_is_session_hook(prog):
                    session.add(bpf_program__name(prog).decode())
            prog = bpf_object__next_program(self.obj.obj, prog)
        self.session_hooks = frozenset(session)
        return names

    cdef _load(self, bytes image, esr_object_settings *settings):
        cdef const char *step = b""
        cdef int err = esr_object_prepare(&self.obj, <const char *>image, len(image), settings,
                                          &step)
        if not err:
            err = esr_object_load(&self.obj, &step)
        if not err:
            self.loaded = True
            self._note_programs()
            # The session hooks when a session needs them (_follow_sessions).
            err = esr_object_attach_hooks(&self.obj, ESR_HOOKS_ALWAYS, &step)
        if err:
            esr_object_close(&self.obj)
            self.loaded = False
            raise ProbeError(-err, why(err, step))
        self._note_maps()

    cdef _note_named(self):
        """The descriptors of the maps the recorder uses itself. A buffer's
        perf event array that is not the one its rings are in (the programs
        replaced it) gets them now."""
        cdef int i, cpu, fd, ring
        cdef uint32_t key
        self.tracked_tasks_fd = self.maps[TRACKED_TASKS]
        self._mark_tracked()
        self.session_states_fd = self.maps[SESSION_STATES]
        self.buffer_lost_fd = self.maps[BUFFER_LOST]
        for i in range(ESR_BUF_COUNT):
            fd = self.maps[f"{BUFFERS[i]}_events"]
            if self.perf_fds[i] > 0 and _map_id(self.perf_fds[i]) == _map_id(fd):
                continue
            self.perf_fds[i] = fd
            for cpu in range(self.ncpus):
                ring = esr_buffers_ring_fd(&self.drain.buffers, i, cpu)
                key = cpu
                if ring >= 0 and bpf_map_update_elem(fd, &key, &ring, BPF_ANY) != 0:
                    raise ProbeError(errno, oserror("cannot put a ring into its perf event array"))

    cdef _mark_tracked(self):
        """Map tid_marks, and mark every thread tracked_tasks holds: a map
        a previous recorder's programs did not have starts empty."""
        cdef esr_task task
        cdef int err = esr_tracking_open(&self.tracking, self.maps[TRACKED_TASKS],
                                         self.maps[TID_MARKS])
        if err:
            raise ProbeError(-err, f"cannot map tid_marks: {strerror(-err).decode()}")
        for tid, (cookie, flags) in list(self._tracked()):
            task.session, task.flags, task.reserved = cookie, flags, 0
            esr_track(&self.tracking, tid, &task)

    cdef _note_maps(self):
        cdef bpf_map *m = bpf_object__next_map(self.obj.obj, NULL)
        while m != NULL:
            if not bpf_map__is_internal(m):
                self.maps[bpf_map__name(m).decode()] = bpf_map__fd(m)
            m = bpf_object__next_map(self.obj.obj, m)

    cdef _replace(self, bytes image, esr_object_settings *settings, dict previous,
                  dict handed):
        """Load image over the maps pinned, replace the programs attached with
        its own, and pin what changed. A map whose definition changed is
        created anew and filled from the old one while no program runs, and
        what happened meanwhile is caught up with (reconcile); otherwise
        the new programs are attached before the old ones go, so that
        nothing goes unseen."""
        cdef const char *step = b""
        cdef int err
        old_maps, old_links = dict(self.maps), dict(self.links)
        changed = self._load_over(image, settings, old_maps)
        # The session hooks as the previous recorder had them, until the
        # sessions taken over say otherwise (_follow_sessions).
        self.session_hooks_attached = bool(self.session_hooks & set(old_links))
        self.maps = {}
        self._note_maps()
        if TID_MARKS not in old_maps:
            self._mark_tracked()
        started = time.time_ns()
        if changed:
            self._detach_links(old_links)
            for name in changed:
                refused = _copy_map(old_maps[name], self.maps[name], self.ncpus)
                if refused:
                    self.adopted.setdefault("not_carried", {})[name] = (
                        "all" if refused < 0 else refused)
        err = esr_object_attach_hooks(
            &self.obj, ESR_HOOKS_ALL if self.session_hooks_attached else ESR_HOOKS_ALWAYS,
            &step)
        if err:
            esr_object_close(&self.obj)
            self.loaded = False
            raise ProbeError(-err, why(err, step))
        if not changed:
            self._detach_links(old_links)
        self.adopted["switch_ns"] = (started, time.time_ns())
        self.adopted["maps_changed"] = changed
        for name, fd in old_maps.items():
            if name not in self.maps or _map_id(self.maps[name]) != _map_id(fd):
                _unlink(os.path.join(self.pin_dir, "maps", name))

    cdef list _load_over(self, bytes image, esr_object_settings *settings, dict old_maps):
        """Load image with the maps of old_maps whose definition it keeps;
        attach nothing. Returns the names of the maps it defines otherwise."""
        cdef const char *step = b""
        cdef bpf_map *m
        cdef bpf_map_info info
        cdef int err, expected
        err = esr_object_prepare(&self.obj, <const char *>image, len(image), settings, &step)
        if err:
            raise ProbeError(-err, why(err, step))
        changed = []
        m = bpf_object__next_map(self.obj.obj, NULL)
        while m != NULL:
            name = bpf_map__name(m).decode()
            if not bpf_map__is_internal(m) and name in old_maps:
                _info(old_maps[name], &info)
                expected = bpf_map__max_entries(m)
                if bpf_map__type(m) == BPF_MAP_TYPE_PERF_EVENT_ARRAY and not expected:
                    expected = self.ncpus
                if (info.type == <uint32_t>bpf_map__type(m)
                        and info.key_size == bpf_map__key_size(m)
                        and info.value_size == bpf_map__value_size(m)
                        and info.max_entries == <uint32_t>expected
                        and info.map_flags == bpf_map__map_flags(m)):
                    if bpf_map__reuse_fd(m, old_maps[name]) != 0:
                        raise ProbeError(errno, oserror(f"cannot reuse map {name}"))
                elif info.type != BPF_MAP_TYPE_PERF_EVENT_ARRAY:
                    changed.append(name)
            m = bpf_object__next_map(self.obj.obj, m)
        err = esr_object_load(&self.obj, &step)
        if err:
            raise ProbeError(-err, why(err, step))
        self.loaded = True
        self._note_programs()
        return changed

    # --- session hooks, while sessions are recorded ---------------------------

    cdef _follow_sessions(self):
        """Attach the session hooks when a session is recorded, and
        detach them when none is."""
        cdef uint32_t slot
        cdef bint wanted = not self.on_demand
        for slot in range(self.nslots):
            wanted = wanted or self.ledger[slot].session != 0
        if wanted and not self.session_hooks_attached:
            self._attach_session_hooks()
        elif not wanted and self.session_hooks_attached:
            self._detach_session_hooks()

    cdef _attach_session_hooks(self):
        cdef const char *step = b""
        cdef int err
        if not self.loaded:
            # Taken over without loading: load the same programs again over
            # the pinned maps (their state is all in maps), for these hooks.
            if self._load_over(self.image, &self.settings, self.maps):
                raise ProbeError(0, "the pinned maps are not those of the programs pinned")
        self._forget_connects()
        err = esr_object_attach_hooks(&self.obj, ESR_HOOKS_SESSION, &step)
        if err:
            raise ProbeError(-err, why(err, step))
        self.session_hooks_attached = True
        if self.pin_dir:
            self._pin()

    cdef _forget_connects(self):
        """Empty what the connect hooks keep from a connect's entry to its
        outcome. They were detached: no session was recorded, so all of it
        is of sessions that have ended. A connect still in progress then
        was never finished, and once another socket takes its socket's
        memory, that socket's connects would pass for polls of the old one
        and go unrecorded."""
        cdef uint32_t zero = 0
        cdef uint64_t key, pending = 0  # key: room for a socket's or a thread's
        for name in ("connect_attempts", "connect_in_flight"):
            fd = self.maps[name]
            while bpf_map_get_next_key(fd, NULL, &key) == 0:
                if bpf_map_delete_elem(fd, &key) != 0 and errno != ENOENT:
                    raise ProbeError(errno, oserror(f"cannot empty {name}"))
        if bpf_map_update_elem(self.maps["connects_pending"], &zero, &pending, BPF_ANY) != 0:
            raise ProbeError(errno, oserror("cannot reset connects_pending"))

    cdef _detach_session_hooks(self):
        cdef int *fds = NULL
        cdef int n = 0
        if self.pin_dir:
            for name in self.session_hooks:  # a pin would keep them attached
                _unlink(os.path.join(self.pin_dir, "links", name))
        taken = {name: fd for name, fd in self.links.items() if name in self.session_hooks}
        fds = self._forget_links(taken, &n)
        with nogil:
            esr_object_detach_session_hooks(&self.obj, fds, n)
        free(fds)
        self.session_hooks_attached = False

    cdef _detach_links(self, dict links):
        """Detach links taken over from a previous recorder, and unpin them."""
        cdef int n = 0
        cdef int *fds = self._forget_links(links, &n)
        with nogil:
            esr_detach_fds(fds, n)
        free(fds)

    cdef int *_forget_links(self, dict links, int *n) except NULL:
        """Unpin links taken over and let go of them: their descriptors, to
        detach, in a buffer the caller frees."""
        cdef int *fds = <int *>malloc(max(len(links), 1) * sizeof(int))
        if fds == NULL:
            raise MemoryError()
        for name, fd in links.items():
            _unlink(os.path.join(self.pin_dir, "links", name))
            if name in self.unpinned:
                self.retired.append(f"link.{name}")
                del self.unpinned[name]
            self.own_fds.remove(fd)
            del self.links[name]
            fds[n[0]] = fd
            n[0] += 1
        return fds

    def _reconcile(self):
        """After a switch that left no program attached for a moment: forget
        the threads that exited meanwhile, and track those that a tracked
        one forked meanwhile, as track_fork would have. Returns how many of
        each."""
        cdef esr_task task
        cdef uint32_t tid
        tracked = dict(self._tracked())
        gone = [t for t in tracked if not _alive(t)]
        for t in gone:
            self.untrack(t)
            del tracked[t]
        joined = 0
        while True:  # until a pass finds no one: a child may have forked too
            found = 0
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    threads = [int(t) for t in os.listdir(f"/proc/{entry.name}/task")]
                    with open(f"/proc/{entry.name}/stat", "rb") as f:
                        stat = f.read()
                except OSError:
                    continue
                untracked = [t for t in threads if t not in tracked]
                if not untracked:
                    continue
                parent = int(stat[stat.rindex(b")") + 2:].split()[1])
                creator = next((tracked[t] for t in threads if t in tracked), None)
                creator = creator or tracked.get(parent)
                if creator is None or self._state(creator[0] & 0xFFFFFFFF).session != creator[0]:
                    continue
                cookie, flags = creator
                task.session, task.reserved = cookie, 0
                task.flags = (ESR_TASK_ANCHOR_CHILD | ESR_TASK_TERMINAL
                              if flags & ESR_TASK_ANCHOR else 0)
                for t in untracked:
                    tid = t
                    if esr_track(&self.tracking, tid, &task) == 0:
                        esr_atomic_add(<long long *>&self._state(cookie & 0xFFFFFFFF).live_tasks, 1)
                        tracked[t] = (cookie, task.flags)
                        found += 1
            # One that exited between the scan and its tracking stays
            # counted alive: the exit it made is not coming again.
            for t in [t for t in tracked if not _alive(t)]:
                self.untrack(t)
                del tracked[t]
            joined += found
            if not found:
                return {"exited": len(gone), "forked": joined}

    def _tracked(self):
        cdef uint32_t key, next_key
        cdef esr_task task
        cdef int fd = self.tracked_tasks_fd
        if bpf_map_get_next_key(fd, NULL, &next_key) != 0:
            return
        while True:
            key = next_key
            if bpf_map_lookup_elem(fd, &key, &task) == 0:
                yield key, (task.session, task.flags)
            if bpf_map_get_next_key(fd, &key, &next_key) != 0:
                return

    cdef _create_own(self, uint32_t max_sessions):
        """The recorder's own maps, empty: the header, and the sessions' ledger."""
        self.recorder_fd = bpf_map_create(BPF_MAP_TYPE_ARRAY, b"esr_recorder", 4,
                                          sizeof(esr_handover), 1, NULL)
        if self.recorder_fd < 0:
            raise ProbeError(errno, oserror("cannot create the recorder map"))
        self.own_fds.append(self.recorder_fd)
        self.sessions_fd = self._create_mmapable(b"esr_sessions", sizeof(esr_ledger),
                                                 max_sessions)
        self._map_own()
        self.header.max_sessions = max_sessions

    cdef int _create_mmapable(self, const char *name, size_t value_size,
                              uint32_t entries) except -1:
        cdef bpf_map_create_opts opts
        memset(&opts, 0, sizeof(opts))
        opts.sz = sizeof(opts)
        opts.map_flags = BPF_F_MMAPABLE
        cdef int fd = bpf_map_create(BPF_MAP_TYPE_ARRAY, name, 4, value_size, entries, &opts)
        if fd < 0:
            raise ProbeError(errno, oserror("cannot create the sessions map"))
        self.own_fds.append(fd)
        return fd

    cdef _map_own(self):
        """Map the recorder's own maps; the header is read and written in place
        too, through a one-entry array that is not mmap-able: it is copied in
        and out instead."""
        cdef uint32_t zero = 0
        cdef bpf_map_info info
        page = sysconf(_SC_PAGESIZE)
        self.header = <esr_handover *>calloc(1, sizeof(esr_handover))
        if bpf_map_lookup_elem(self.recorder_fd, &zero, self.header) != 0:
            raise ProbeError(errno, oserror("cannot read the recorder map"))
        _info(self.sessions_fd, &info)
        if info.value_size != sizeof(esr_ledger):
            raise ProbeError(0, "the pinned sessions map has another layout")
        self.ledger_size = (info.max_entries * sizeof(esr_ledger) + page - 1) // page * page
        self.ledger = <esr_ledger *>mmap(NULL, self.ledger_size, PROT_READ | PROT_WRITE,
                                         MAP_SHARED, self.sessions_fd, 0)
        if <void *>self.ledger == MAP_FAILED:
            self.ledger = NULL
            raise ProbeError(errno, oserror("cannot map the sessions map"))

    cdef _map_states(self):
        page = sysconf(_SC_PAGESIZE)
        self.states_size = (self.nslots * sizeof(esr_session_state) + page - 1) // page * page
        self.states = <esr_session_state *>mmap(NULL, self.states_size, PROT_READ | PROT_WRITE,
                                                MAP_SHARED, self.session_states_fd, 0)
        if <void *>self.states == MAP_FAILED:
            self.states = NULL
            raise ProbeError(errno, oserror("cannot map session_states"))

    cdef _pin(self):
        """Pin every map and link, and the recorder's own maps, where they are
        not yet; a link the kernel cannot pin (a perf event attachment, before
        Linux 5.15) is noted for the descriptor store."""
        cdef int i, fd
        for sub in ("maps", "links"):
            os.makedirs(os.path.join(self.pin_dir, sub), mode=0o700, exist_ok=True)
        for name, fd in self.maps.items():
            self._pin_one(fd, os.path.join(self.pin_dir, "maps", name))
        if self.loaded:
            for i in range(self.obj.nlinks):
                name = bpf_program__name(self.obj.linked[i]).decode()
                fd = bpf_link__fd(self.obj.links[i])
                path = os.path.join(self.pin_dir, "links", name)
                if os.path.exists(path):
                    continue
                if bpf_obj_pin(fd, path.encode()) != 0:
                    self.unpinned[name] = fd
        self._pin_one(self.sessions_fd, os.path.join(self.pin_dir, "sessions"))
        # Last: its presence says the rest is there.
        self._write_header()
        self._pin_one(self.recorder_fd, os.path.join(self.pin_dir, "recorder"))

    cdef _pin_one(self, int fd, str path):
        if os.path.exists(path):
            return
        if bpf_obj_pin(fd, path.encode()) != 0:
            raise ProbeError(errno, oserror(f"cannot pin {path}"))

    cdef _write_header(self):
        cdef uint32_t zero = 0
        if self.header != NULL and self.recorder_fd >= 0:
            bpf_map_update_elem(self.recorder_fd, &zero, self.header, BPF_ANY)

    # --- what the next recorder needs ------------------------------------------

    def to_store(self):
        """Descriptors to keep in systemd's store for the next recorder, by
        name: each buffer's rings, the perf event array they were put in
        through, and links that could not be pinned."""
        cdef int i, cpu, fd
        out = {}
        for i in range(ESR_BUF_COUNT):
            out[f"perf.{BUFFERS[i]}"] = self.perf_fds[i]
            for cpu in range(self.ncpus):
                fd = esr_buffers_ring_fd(&self.drain.buffers, i, cpu)
                if fd >= 0:
                    out[ring_name(BUFFERS[i], cpu)] = fd
        for name, fd in self.unpinned.items():
            out[f"link.{name}"] = fd
        return out

    def retired_names(self):
        """Names of stored descriptors this Probe let go (replaced links)."""
        return list(self.retired)

    @property
    def raw_tracepoints(self):
        """Whether fork, exec and exit are hooked through raw tracepoints."""
        return bool(self.settings.raw_tracepoints)

    @property
    def io_uring_hook(self):
        """The io_uring tracepoint submissions are seen through, or None
        where the kernel has no io_uring."""
        if self.obj.io_uring_hook != NULL:
            return self.obj.io_uring_hook.decode()
        return next((n for n in ("io_uring_submit_req", "io_uring_submit_sqe")
                     if n in self.links), None)

    @property
    def max_sessions(self):
        """Session slots: the config's, or those of the maps taken over."""
        return self.nslots

    @property
    def generation(self):
        """The last cookie generation handed out: the next ones must be newer."""
        return self.header.generation if self.header != NULL else 0

    def pinned_sessions(self):
        """The sessions the previous recorder left in the ledger, as it left
        them: (slot, cookie, sid, anchor_pid, terminal_pid, leader_gone,
        drained per buffer)."""
        return list(self.taken_over)

    cdef list _ledger(self):
        cdef uint32_t slot
        cdef esr_ledger *e
        out = []
        for slot in range(self.nslots):
            e = &self.ledger[slot]
            if e.session:
                out.append((slot, e.session, e.sid[:ESR_LEDGER_SID].split(b"\0")[0].decode(),
                            e.anchor_pid, e.terminal_pid, bool(e.flags & ESR_LEDGER_LEADER_GONE),
                            tuple(e.drained[i] for i in range(ESR_BUF_COUNT))))
        return out

    def heartbeat(self):
        """The recorder is alive: when it stops, this is when the gap began."""
        if self.header != NULL:
            self.header.alive_ns = time.time_ns()
            self._write_header()

    # --- the drain --------------------------------------------------------------

    @property
    def programs(self):
        """How many BPF programs record: attached, or (the session hooks)
        attached while a session is recorded."""
        cdef int i
        names = set(self.links) | self.session_hooks
        if self.loaded:
            for i in range(self.obj.nlinks):
                names.add(bpf_program__name(self.obj.linked[i]).decode())
        return len(names)

    def program_runs(self):
        """How many times the programs attached ran, and their time in all
        (ns), while run_stats() is on: what the probe costs the host's
        processes in BPF, aside from the tracepoints' own work."""
        cdef bpf_prog_info prog
        cdef bpf_link_info link
        cdef uint32_t size
        cdef int i, fd, prog_fd
        found = {}
        if self.loaded:
            for i in range(self.obj.nlinks):
                _prog_info(bpf_program__fd(self.obj.linked[i]), &prog)
                found[prog.id] = (prog.run_cnt, prog.run_time_ns)
        for fd in self.links.values():  # taken over: the links lead to the programs
            size = sizeof(bpf_link_info)
            memset(&link, 0, size)
            if bpf_obj_get_info_by_fd(fd, &link, &size) != 0 or link.prog_id in found:
                continue  # a perf event attachment before Linux 5.15 tells nothing
            prog_fd = bpf_prog_get_fd_by_id(link.prog_id)
            if prog_fd < 0:
                continue
            try:
                _prog_info(prog_fd, &prog)
            finally:
                close(prog_fd)
            found[prog.id] = (prog.run_cnt, prog.run_time_ns)
        return sum(r for r, _ in found.values()), sum(ns for _, ns in found.values())

    def fileno(self):
        """Readable once the drain holds ready_at records, or lines_at of
        them audit lines: time to take them."""
        return self.drain.ready_fd

    def line_buffers(self, indexes):
        """The buffers (by index) whose records become audit lines, which
        lines_at counts: the audit log's write of a flush then stays small
        enough to find them in cache."""
        cdef unsigned int mask = 0
        for i in indexes:
            mask |= 1u << i
        self.drain.line_buffers = mask

    def take_batch(self):
        """Every record waiting, in the kernel buffers or in the drain, as a
        read-only memoryview of [u32 length][record] entries, valid until
        release_batch()."""
        if self.states == NULL:
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
                if bpf_map_lookup_elem(self.buffer_lost_fd, &key, values) != 0:
                    raise OSError(errno, strerror(errno).decode())
                totals.append(sum(values[cpu] for cpu in range(self.ncpus)))
        finally:
            free(values)
        return tuple(totals)

    # --- sessions ---------------------------------------------------------------

    cdef esr_session_state *_state(self, uint32_t slot) except NULL:
        if self.states == NULL:
            raise ProbeError(0, "probe is closed")
        if slot >= self.nslots:
            raise ValueError(f"slot {slot} out of range")
        return &self.states[slot]

    def open_session(self, uint32_t slot, uint64_t cookie, str sid="", uint32_t anchor_pid=0,
                     uint32_t terminal_pid=0):
        cdef esr_session_state *state = self._state(slot)
        cdef esr_ledger *e = &self.ledger[slot]
        encoded = sid.encode()[:ESR_LEDGER_SID - 1]
        memset(state, 0, sizeof(esr_session_state))
        state.session = cookie
        e.session = 0
        memset(e.drained, 0, sizeof(e.drained))
        memset(e.sid, 0, ESR_LEDGER_SID)
        memcpy(e.sid, <const char *>encoded, len(encoded))
        e.anchor_pid, e.terminal_pid, e.flags = anchor_pid, terminal_pid, 0
        e.session = cookie
        try:
            self._follow_sessions()
        except BaseException:
            state.session = e.session = 0
            raise
        self.header.generation = cookie >> 32
        self._write_header()

    def session_left(self, uint32_t slot):
        """The session's leader is gone: the next recorder must not wait for it."""
        self._state(slot)
        self.ledger[slot].flags |= ESR_LEDGER_LEADER_GONE

    def close_session(self, uint32_t slot, bint forget_tasks):
        """Free the slot; with forget_tasks, also remove every thread still
        tracked in it (a walk of the whole map: only for sessions ended while
        some of their tasks run)."""
        cdef esr_session_state *state = self._state(slot)
        cdef uint64_t cookie = state.session
        cdef uint32_t key
        state.session = 0
        self.ledger[slot].session = 0
        if cookie != 0 and forget_tasks:
            stale = [tid for tid, (session, _flags) in self._tracked() if session == cookie]
            for key in stale:
                esr_untrack(&self.tracking, key)
        self._follow_sessions()

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
        if esr_track(&self.tracking, tid, &task) != 0:
            raise OSError(errno, f"cannot track pid {tid}: {strerror(errno).decode()}")
        if not anchor:
            esr_atomic_add(<long long *>&state.live_tasks, 1)

    def untrack(self, uint32_t tid):
        cdef esr_task task
        cdef esr_session_state *state
        if bpf_map_lookup_elem(self.tracked_tasks_fd, &tid, &task) != 0:
            return
        esr_untrack(&self.tracking, tid)
        if not (task.flags & ESR_TASK_ANCHOR):
            state = self._state(<uint32_t>task.session)
            if state.session == task.session:
                esr_atomic_add(<long long *>&state.live_tasks, -1)

    def task_session(self, uint32_t tid):
        """(cookie, anchor) of the session thread tid is tracked in, or None."""
        cdef esr_task task
        if bpf_map_lookup_elem(self.tracked_tasks_fd, &tid, &task) != 0:
            return None
        return task.session, bool(task.flags & ESR_TASK_ANCHOR)

    # --- the end ----------------------------------------------------------------

    cdef _unmap(self):
        with nogil:
            esr_drain_close(&self.drain)
        self.taken = NULL
        if self.states != NULL:
            munmap(self.states, self.states_size)
            self.states = NULL
        if self.ledger != NULL:
            munmap(self.ledger, self.ledger_size)
            self.ledger = NULL

    cdef _stop_keeper(self, bint wait):
        """Let the keeper go: it waits for the next recorder, or with wait,
        it is told to exit now."""
        if self.keeper_w >= 0:
            close(self.keeper_w)
            self.keeper_w = -1
        if self.keeper_pid and wait:
            os.kill(self.keeper_pid, signal.SIGTERM)
            os.waitpid(self.keeper_pid, 0)
        self.keeper_pid = 0

    cdef _close_own(self):
        esr_tracking_close(&self.tracking)
        free(self.header)
        self.header = NULL
        for fd in self.own_fds:
            close(fd)
        self.own_fds = []
        self.maps, self.links, self.unpinned = {}, {}, {}

    def unplug(self):
        """Take the rings out of their perf event arrays: from now on the
        programs count what they cannot send, per session, instead of
        filling rings that go with this process. What the rings hold is
        still read."""
        cdef uint32_t cpu
        cdef int i
        for i in range(ESR_BUF_COUNT):
            for cpu in range(<uint32_t>self.ncpus):
                bpf_map_delete_elem(self.perf_fds[i], &cpu)

    def stop_draining(self):
        """Stop the drain's thread: take_batch() still reads the rings, and
        what arrives after the last one stays there, for the next recorder."""
        with nogil:
            esr_drain_stop(&self.drain)

    def release(self):
        """Leave the kernel side to the next recorder: the programs stay
        attached and the maps as they are; the header says everything read
        was written. The caller has stopped the drain and written what it
        took last."""
        if self.released or self.header == NULL:
            return
        self.header.flags |= ESR_HANDED_OVER
        self.heartbeat()
        self._stop_keeper(False)
        self._unmap()
        esr_object_release(&self.obj)
        self.loaded = False
        self._close_own()
        self.released = True

    def close(self, bint unpin=True):
        """Detach every program and free everything; with a pin directory,
        empty it too (unless unpin is false: a failed start leaves what a
        previous recorder pinned to the next attempt)."""
        if self.released:
            return
        self._stop_keeper(True)
        self._unmap()
        if unpin and self.pin_dir:
            self._detach_links(dict(self.links))
            for sub in ("links", "maps"):
                path = os.path.join(self.pin_dir, sub)
                if os.path.isdir(path):
                    for name in os.listdir(path):
                        _unlink(os.path.join(path, name))
                    os.rmdir(path)
            for name in ("recorder", "sessions"):
                _unlink(os.path.join(self.pin_dir, name))
            try:
                os.rmdir(self.pin_dir)
            except OSError:
                pass
        if unpin or not self.pin_dir:
            esr_object_close(&self.obj)
        else:
            esr_object_release(&self.obj)
        self.loaded = False
        self._close_own()
        self.released = True

    def __dealloc__(self):
        if not self.released:
            self.close()
