/* The bcc peer's BPF programs: what esr's programs in bpf/ record, in bcc's
 * C dialect, compiled at run time by bccpeer.py with -I for the shared
 * esr_events.h, -DNCPUS, and the kernel struct offsets OFF_* (from BTF, or
 * -DOFFSETS_FROM_HEADERS). */
#include <linux/in.h>
#include <linux/in6.h>

/* bcc parses for the host target, so clang leaves __bpf__ undefined, and the
 * shared header would show its user-space-only part (#ifndef __bpf__). */
#define __bpf__ 1
#include "esr_events.h"

#define X_O_WRONLY 01
#define X_O_CREAT 0100
#define X_O_TRUNC 01000
#define X_AF_INET 2
#define X_AF_INET6 10
#define X_SOCK_STREAM 1
#define X_IPPROTO_TCP 6
#define X_S_IFMT 00170000
#define X_S_IFSOCK 0140000
#define X_EINPROGRESS 115
#define X_TCP_ESTABLISHED 1
#define X_TCP_SYN_SENT 2

#ifdef OFFSETS_FROM_HEADERS
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/mm_types.h>
#include <linux/fdtable.h>
#include <linux/fs.h>
#include <linux/net.h>
#include <net/sock.h>
#define OFF_TASK_MM offsetof(struct task_struct, mm)
#define OFF_TASK_REAL_PARENT offsetof(struct task_struct, real_parent)
#define OFF_TASK_TGID offsetof(struct task_struct, tgid)
#define OFF_TASK_SIGNAL offsetof(struct task_struct, signal)
#define OFF_TASK_FILES offsetof(struct task_struct, files)
#define OFF_SIGNAL_TTY offsetof(struct signal_struct, tty)
#define OFF_MM_ARG_START offsetof(struct mm_struct, arg_start)
#define OFF_MM_ARG_END offsetof(struct mm_struct, arg_end)
#define OFF_MM_START_STACK offsetof(struct mm_struct, start_stack)
#define OFF_FILES_FDT offsetof(struct files_struct, fdt)
#define OFF_FDT_MAX_FDS offsetof(struct fdtable, max_fds)
#define OFF_FDT_FD offsetof(struct fdtable, fd)
#define OFF_FILE_F_INODE offsetof(struct file, f_inode)
#define OFF_FILE_PRIVATE_DATA offsetof(struct file, private_data)
#define OFF_INODE_I_MODE offsetof(struct inode, i_mode)
#define OFF_SOCKET_SK offsetof(struct socket, sk)
#define OFF_SOCK_SK_TYPE offsetof(struct sock, sk_type)
#define OFF_SOCK_SK_PROTOCOL offsetof(struct sock, sk_protocol)
#define OFF_SOCK_SK_ERR offsetof(struct sock, sk_err)
#endif

/* The records: struct esr_*_event of the shared header, flattened, since
 * bcc's event() decoder knows no nested structs. The asserts below hold
 * them to the shared structs. */
struct command_event {
    u64 ts_boot_ns;
    u64 session;
    u64 cgroup_id;
    u32 pid;
    u16 type;
    u16 reserved;
    char comm[ESR_COMM_LEN];
    u32 ppid;
    u32 uid;
    u32 gid;
    s32 return_code;
    u32 argc;
    u32 argv_size;
    u32 argv_len;
    u16 path_len;
    u16 flags;
    /* esr's names the binary that runs, and a script's interpreter; the
     * peer leaves them 0: what a bcc tool would record. */
    u16 interpreter_args;
    u16 exe_len;
    u32 reserved2;
    u64 exe_dev;
    u64 exe_ino;
    char data[ESR_ARGV_MAX + ESR_PATH_MAX + ESR_EXE_MAX];
};

struct disk_event {
    u64 ts_boot_ns;
    u64 session;
    u64 cgroup_id;
    u32 pid;
    u16 type;
    u16 reserved;
    char comm[ESR_COMM_LEN];
    s32 flags;
    s32 return_code;
    u16 path_len;
    u16 path_truncated;
    u32 reserved2;
    char path[ESR_PATH_MAX];
};

struct network_event {
    u64 ts_boot_ns;
    u64 session;
    u64 cgroup_id;
    u32 pid;
    u16 type;
    u16 reserved;
    char comm[ESR_COMM_LEN];
    s32 return_code;
    u16 family;
    u16 src_port;
    u16 dst_port;
    u16 reserved2[3];
    u8 src_addr[16];
    u8 dst_addr[16];
};

/* A record that drifts from the shared header fails bcc's compile at start,
 * naming the field: each field of a flat copy must have the offset and type
 * of the shared field, and each record the size of the shared one. The
 * shared records have no padding, so a member cannot be added there without
 * moving another or growing the record. */
#define SAME_FIELD(flat, field, shared, shared_field)                              \
    _Static_assert(offsetof(struct flat, field) ==                                 \
                       offsetof(struct shared, shared_field) &&                    \
                   __builtin_types_compatible_p(typeof(((struct flat *)0)->field), \
                       typeof(((struct shared *)0)->shared_field)),                \
                   "record layout drift: " #flat "." #field                        \
                   " is not " #shared "." #shared_field " of esr_events.h")
#define SAME_SIZE(flat, shared)                                                    \
    _Static_assert(sizeof(struct flat) == sizeof(struct shared),                   \
                   "record layout drift: " #flat " is not the size of "            \
                   #shared " of esr_events.h")
#define SAME_HEADER(flat, shared)                                                  \
    SAME_FIELD(flat, ts_boot_ns, shared, hdr.ts_boot_ns);                          \
    SAME_FIELD(flat, session, shared, hdr.session);                                \
    SAME_FIELD(flat, cgroup_id, shared, hdr.cgroup_id);                            \
    SAME_FIELD(flat, pid, shared, hdr.pid);                                        \
    SAME_FIELD(flat, type, shared, hdr.type);                                      \
    SAME_FIELD(flat, reserved, shared, hdr.reserved);                              \
    SAME_FIELD(flat, comm, shared, hdr.comm)

SAME_HEADER(command_event, esr_command_event);
SAME_FIELD(command_event, ppid, esr_command_event, ppid);
SAME_FIELD(command_event, uid, esr_command_event, uid);
SAME_FIELD(command_event, gid, esr_command_event, gid);
SAME_FIELD(command_event, return_code, esr_command_event, return_code);
SAME_FIELD(command_event, argc, esr_command_event, argc);
SAME_FIELD(command_event, argv_size, esr_command_event, argv_size);
SAME_FIELD(command_event, argv_len, esr_command_event, argv_len);
SAME_FIELD(command_event, path_len, esr_command_event, path_len);
SAME_FIELD(command_event, flags, esr_command_event, flags);
SAME_FIELD(command_event, interpreter_args, esr_command_event, interpreter_args);
SAME_FIELD(command_event, exe_len, esr_command_event, exe_len);
SAME_FIELD(command_event, reserved2, esr_command_event, reserved);
SAME_FIELD(command_event, exe_dev, esr_command_event, exe_dev);
SAME_FIELD(command_event, exe_ino, esr_command_event, exe_ino);
SAME_FIELD(command_event, data, esr_command_event, data);
SAME_SIZE(command_event, esr_command_event);

SAME_HEADER(disk_event, esr_disk_event);
SAME_FIELD(disk_event, flags, esr_disk_event, flags);
SAME_FIELD(disk_event, return_code, esr_disk_event, return_code);
SAME_FIELD(disk_event, path_len, esr_disk_event, path_len);
SAME_FIELD(disk_event, path_truncated, esr_disk_event, path_truncated);
SAME_FIELD(disk_event, reserved2, esr_disk_event, reserved);
SAME_FIELD(disk_event, path, esr_disk_event, path);
SAME_SIZE(disk_event, esr_disk_event);

SAME_HEADER(network_event, esr_network_event);
SAME_FIELD(network_event, return_code, esr_network_event, return_code);
SAME_FIELD(network_event, family, esr_network_event, family);
SAME_FIELD(network_event, src_port, esr_network_event, src_port);
SAME_FIELD(network_event, dst_port, esr_network_event, dst_port);
SAME_FIELD(network_event, reserved2, esr_network_event, reserved);
SAME_FIELD(network_event, src_addr, esr_network_event, src_addr);
SAME_FIELD(network_event, dst_addr, esr_network_event, dst_addr);
SAME_SIZE(network_event, esr_network_event);

/* bccpeer.py reads the lost counters by these indices. */
_Static_assert(ESR_BUF_COMMAND == 0 && ESR_BUF_DISK == 1 && ESR_BUF_NETWORK == 2,
               "esr_events.h renumbered its buffers: bccpeer.py reads lost[] "
               "as command, disk, network");

struct open_call {
    u64 session;
    u64 path;
    s32 flags;
};

struct argv_scratch {
    char data[2 * ESR_ARGV_MAX];
};

struct connect_attempt {
    struct network_event event;
    u8 syscall_returned;
    u8 finished;
    s32 outcome;
};

BPF_HASH(tracked_tasks, u32, struct esr_task, 65536);
BPF_ARRAY(session_states, struct esr_session_state, 64);
BPF_PERCPU_ARRAY(buffer_lost, u64, ESR_BUF_COUNT);

BPF_PERF_OUTPUT(command_events);
BPF_PERF_OUTPUT(disk_events);
BPF_PERF_OUTPUT(network_events);

BPF_PERCPU_ARRAY(disk_scratch, struct disk_event, 1);
BPF_HASH(open_in_flight, u32, struct open_call, 65536);

BPF_PERCPU_ARRAY(command_scratch, struct command_event, 1);
BPF_ARRAY(argv_scratch, struct argv_scratch, NCPUS);
BPF_TABLE("lru_hash", u32, struct command_event, exec_in_flight, 128);

BPF_F_TABLE("hash", u64, struct connect_attempt, connect_attempts, 65536, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", u32, u64, connect_in_flight, 65536, BPF_F_NO_PREALLOC);

/* Kernel memory behind pointers, at offsets of the running kernel. */
static __always_inline u64 rd_u64(u64 base, u64 off)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
    return v;
}

static __always_inline u32 rd_u32(u64 base, u64 off)
{
    u32 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
    return v;
}

static __always_inline u16 rd_u16(u64 base, u64 off)
{
    u16 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
    return v;
}

static __always_inline u32 current_tid(void)
{
    return (u32)bpf_get_current_pid_tgid();
}

static __always_inline struct esr_session_state *session_state(u64 session)
{
    u32 slot = (u32)session;
    struct esr_session_state *state = session_states.lookup(&slot);

    if (!state || state->session != session)
        return NULL;
    return state;
}

static __always_inline u64 recorded_session(void)
{
    u32 tid = current_tid();
    struct esr_task *task = tracked_tasks.lookup(&tid);

    if (!task)
        return 0;
    return task->session;
}

/* Each flat record starts with the shared header's fields (asserted above). */
static __always_inline void fill_header(struct esr_event_header *h, u64 session, u16 type)
{
    h->ts_boot_ns = bpf_ktime_get_boot_ns();
    h->session = session;
    h->cgroup_id = bpf_get_current_cgroup_id();
    h->pid = bpf_get_current_pid_tgid() >> 32;
    h->type = type;
    h->reserved = 0;
    bpf_get_current_comm(h->comm, sizeof(h->comm));
}

/* A record perf_submit could not send: counted per buffer and per session. */
static __always_inline void count_lost(u32 buffer, u64 session)
{
    u64 *lost = buffer_lost.lookup(&buffer);
    struct esr_session_state *state;

    if (lost)
        *lost += 1;
    state = session_state(session);
    if (state && buffer < ESR_BUF_COUNT)
        __sync_fetch_and_add(&state->lost[buffer], 1);
}

/* ---- membership ---- */

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 parent_tid = current_tid();
    struct esr_task *parent = tracked_tasks.lookup(&parent_tid);
    struct esr_session_state *state;
    struct esr_task child = {};
    u32 child_tid;

    if (!parent)
        return 0;
    state = session_state(parent->session);
    if (!state)
        return 0;
    child.session = parent->session;
    child_tid = args->child_pid;
    if (tracked_tasks.update(&child_tid, &child)) {
        __sync_fetch_and_add(&state->untracked_forks, 1);
        return 0;
    }
    __sync_fetch_and_add(&state->live_tasks, 1);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u32 tid = current_tid();
    struct esr_task *task = tracked_tasks.lookup(&tid);
    struct esr_session_state *state;

    if (!task)
        return 0;
    state = session_state(task->session);
    if (state)
        __sync_fetch_and_add(&state->live_tasks, -1);
    tracked_tasks.delete(&tid);
    return 0;
}

/* ---- disk: open, openat, openat2, creat ---- */

static __always_inline int stash_open(const char *path, s32 flags)
{
    struct open_call call = {};
    u32 tid = current_tid();

    call.session = recorded_session();
    if (!call.session)
        return 0;
    call.path = (u64)path;
    call.flags = flags;
    open_in_flight.update(&tid, &call);
    return 0;
}

static __always_inline int report_open(void *ctx, long ret)
{
    u32 tid = current_tid(), zero = 0;
    struct open_call *call = open_in_flight.lookup(&tid);
    struct disk_event *e;
    u64 len, session;
    long n;

    if (!call)
        return 0;
    e = disk_scratch.lookup(&zero);
    if (e) {
        session = call->session;
        fill_header((struct esr_event_header *)e, session, ESR_EVENT_DISK);
        e->flags = call->flags;
        e->return_code = ret;
        n = bpf_probe_read_user_str(e->path, sizeof(e->path), (void *)call->path);
        len = n > 0 ? n : 0;
        if (len > sizeof(e->path))
            len = sizeof(e->path);
        e->path_len = len;
        e->path_truncated = len == sizeof(e->path);
        if (disk_events.perf_submit(ctx, e, offsetof(struct disk_event, path) + len))
            count_lost(ESR_BUF_DISK, session);
    }
    open_in_flight.delete(&tid);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_open)
{
    return stash_open(args->filename, args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
    return stash_open(args->filename, args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat2)
{
    u64 flags = 0;

    bpf_probe_read_user(&flags, sizeof(flags), (void *)args->how);
    return stash_open(args->filename, flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_creat)
{
    return stash_open(args->pathname, X_O_CREAT | X_O_WRONLY | X_O_TRUNC);
}

TRACEPOINT_PROBE(syscalls, sys_exit_open)
{
    return report_open(args, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat)
{
    return report_open(args, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat2)
{
    return report_open(args, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_creat)
{
    return report_open(args, args->ret);
}

/* ---- command: execve, execveat ---- */

static __always_inline void fill_identity(struct command_event *e)
{
    u64 task = bpf_get_current_task();
    u64 uid_gid = bpf_get_current_uid_gid();

    e->ppid = rd_u32(rd_u64(task, OFF_TASK_REAL_PARENT), OFF_TASK_TGID);
    e->uid = (u32)uid_gid;
    e->gid = uid_gid >> 32;
    if (rd_u64(rd_u64(task, OFF_TASK_SIGNAL), OFF_SIGNAL_TTY))
        e->flags |= ESR_COMMAND_TTY;
}

static __always_inline u64 record_size(struct command_event *e)
{
    u64 used = (u64)e->argv_len + e->path_len;

    if (used > sizeof(e->data))
        used = sizeof(e->data);
    return offsetof(struct command_event, data) + used;
}

/* Failed exec: argv walked at entry, pointer by pointer, in a bounded loop
 * (esr uses bpf_loop, which bcc's one-function-per-section programs cannot).
 * Unlike esr the walk stops when the argv budget is used up (the verifier
 * cannot follow more paths): argc then counts what was walked. */
static __always_inline int stash_exec(const char *filename, const char *const *argv)
{
    u64 session = recorded_session();
    u32 zero = 0, cpu = bpf_get_smp_processor_id(), tid = current_tid();
    struct command_event *e;
    struct argv_scratch *buf;
    u64 off = 0;
    u32 argc = 0, i;
    u16 flags = ESR_ARGV_FROM_ENTRY;
    long n;

    if (!session)
        return 0;
    e = command_scratch.lookup(&zero);
    buf = argv_scratch.lookup(&cpu);
    if (!e || !buf)
        return 0;
    for (i = 0; i < ESR_ARGS_MAX; i++) {
        const char *arg = NULL;

        if (bpf_probe_read_user(&arg, sizeof(arg), &argv[i])) {
            flags |= ESR_ARGV_UNREADABLE;
            break;
        }
        if (!arg)
            break;
        argc++;
        if (off >= ESR_ARGV_MAX) {
            flags |= ESR_ARGV_INCOMPLETE;
            break;
        }
        n = bpf_probe_read_user_str(&buf->data[off], ESR_ARGV_MAX - off, arg);
        if (n <= 0) {
            flags |= ESR_ARGV_UNREADABLE;
            break;
        }
        if (n == ESR_ARGV_MAX - off)
            flags |= ESR_ARGV_INCOMPLETE;
        off += n;
    }
    if (i == ESR_ARGS_MAX)
        flags |= ESR_ARGV_INCOMPLETE;
    if (off > ESR_ARGV_MAX)
        return 0;
    e->argc = argc;
    e->argv_size = off;
    e->argv_len = off;
    bpf_probe_read_kernel(e->data, ESR_ARGV_MAX, buf->data);
    n = bpf_probe_read_user_str(&e->data[off], ESR_PATH_MAX, filename);
    e->path_len = n > 0 ? n : 0;
    e->flags = flags;
    e->session = session;
    exec_in_flight.update(&tid, e);
    return 0;
}

static __always_inline int report_failed_exec(void *ctx, long ret)
{
    u32 tid = current_tid();
    struct command_event *e = exec_in_flight.lookup(&tid);
    u64 session;

    if (!e)
        return 0;
    /* Success was reported by sched_process_exec. */
    if (ret < 0) {
        session = e->session;
        fill_header((struct esr_event_header *)e, session, ESR_EVENT_COMMAND);
        fill_identity(e);
        e->return_code = ret;
        if (command_events.perf_submit(ctx, e, record_size(e)))
            count_lost(ESR_BUF_COMMAND, session);
    }
    exec_in_flight.delete(&tid);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve)
{
    return stash_exec(args->filename, args->argv);
}

TRACEPOINT_PROBE(syscalls, sys_enter_execveat)
{
    return stash_exec(args->filename, args->argv);
}

TRACEPOINT_PROBE(syscalls, sys_exit_execve)
{
    return report_failed_exec(args, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_execveat)
{
    return report_failed_exec(args, args->ret);
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 old_tid = args->old_pid, new_tid = args->pid, zero = 0;
    struct esr_task *tracked = tracked_tasks.lookup(&old_tid);
    struct command_event *e;
    u64 task, mm, arg_start, arg_end, start_stack;
    u64 argc = 0, size, len, copied, session;
    long n;

    if (!tracked)
        return 0;
    /* A non-leader thread that execs takes over the leader's pid. */
    if (old_tid != new_tid) {
        tracked_tasks.update(&new_tid, tracked);
        tracked_tasks.delete(&old_tid);
        tracked = tracked_tasks.lookup(&new_tid);
        if (!tracked)
            return 0;
    }
    session = tracked->session;
    exec_in_flight.delete(&old_tid);
    e = command_scratch.lookup(&zero);
    if (!e)
        return 0;
    fill_header((struct esr_event_header *)e, session, ESR_EVENT_COMMAND);
    e->flags = 0;
    fill_identity(e);
    e->return_code = 0;

    task = bpf_get_current_task();
    mm = rd_u64(task, OFF_TASK_MM);
    arg_start = rd_u64(mm, OFF_MM_ARG_START);
    arg_end = rd_u64(mm, OFF_MM_ARG_END);
    start_stack = rd_u64(mm, OFF_MM_START_STACK);
    bpf_probe_read_user(&argc, sizeof(argc), (void *)start_stack);
    e->argc = argc;

    size = arg_end > arg_start ? arg_end - arg_start : 0;
    len = size;
    if (len > ESR_ARGV_MAX)
        len = ESR_ARGV_MAX;
    copied = 0;
    if (len && !bpf_probe_read_user(e->data, len, (void *)arg_start))
        copied = len;
    else if (len)
        e->flags |= ESR_ARGV_UNREADABLE;
    e->argv_size = size;
    e->argv_len = copied;

    n = bpf_probe_read_kernel_str(&e->data[copied], ESR_PATH_MAX,
                                  (void *)args + (args->data_loc_filename & 0xFFFF));
    e->path_len = n > 0 ? n : 0;
    if (command_events.perf_submit(args, e, record_size(e)))
        count_lost(ESR_BUF_COMMAND, session);
    return 0;
}

/* ---- network: TCP connect ---- */

static __always_inline u64 tcp_sock_of_fd(int fd)
{
    u64 task = bpf_get_current_task();
    u64 fdt = rd_u64(rd_u64(task, OFF_TASK_FILES), OFF_FILES_FDT);
    u64 fds = rd_u64(fdt, OFF_FDT_FD);
    u64 file, sk;

    if (fd < 0 || fd >= rd_u32(fdt, OFF_FDT_MAX_FDS))
        return 0;
    file = rd_u64(fds, (u64)fd * sizeof(u64));
    if (!file || (rd_u16(rd_u64(file, OFF_FILE_F_INODE), OFF_INODE_I_MODE) & X_S_IFMT) != X_S_IFSOCK)
        return 0;
    sk = rd_u64(rd_u64(file, OFF_FILE_PRIVATE_DATA), OFF_SOCKET_SK);
    if (!sk || rd_u16(sk, OFF_SOCK_SK_TYPE) != X_SOCK_STREAM ||
        rd_u16(sk, OFF_SOCK_SK_PROTOCOL) != X_IPPROTO_TCP)
        return 0;
    return sk;
}

static __always_inline void report_connect(void *ctx, struct connect_attempt *attempt, s32 result)
{
    struct network_event *e = &attempt->event;

    e->ts_boot_ns = bpf_ktime_get_boot_ns();
    e->return_code = result;
    if (network_events.perf_submit(ctx, e, sizeof(*e)))
        count_lost(ESR_BUF_NETWORK, e->session);
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    u64 session = recorded_session();
    const void *uaddr = (const void *)args->uservaddr;
    struct connect_attempt attempt = {};
    struct network_event *e = &attempt.event;
    u32 tid = current_tid();
    u16 family = 0, port = 0;
    u64 sk;

    if (!session)
        return 0;
    if (bpf_probe_read_user(&family, sizeof(family), uaddr))
        return 0;
    if (family != X_AF_INET && family != X_AF_INET6)
        return 0;
    sk = tcp_sock_of_fd(args->fd);
    if (!sk)
        return 0;

    fill_header((struct esr_event_header *)e, session, ESR_EVENT_NETWORK);
    e->family = family;
    if (family == X_AF_INET) {
        struct sockaddr_in sin = {};

        bpf_probe_read_user(&sin, sizeof(sin), uaddr);
        port = sin.sin_port;
        __builtin_memcpy(e->dst_addr, &sin.sin_addr, 4);
    } else {
        struct sockaddr_in6 sin6 = {};

        bpf_probe_read_user(&sin6, sizeof(sin6), uaddr);
        port = sin6.sin6_port;
        __builtin_memcpy(e->dst_addr, &sin6.sin6_addr, 16);
    }
    e->dst_port = __builtin_bswap16(port);

    /* A repeated connect() on a socket still connecting only polls it. */
    if (connect_attempts.insert(&sk, &attempt))
        return 0;
    connect_in_flight.update(&tid, &sk);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
    u32 tid = current_tid();
    u64 *key = connect_in_flight.lookup(&tid);
    struct connect_attempt *attempt;
    u64 sk;

    if (!key)
        return 0;
    sk = *key;
    connect_in_flight.delete(&tid);
    attempt = connect_attempts.lookup(&sk);
    if (!attempt)
        return 0;
    if (args->ret == -X_EINPROGRESS && !attempt->finished) {
        attempt->syscall_returned = 1;
        return 0;
    }
    report_connect(args, attempt, args->ret == -X_EINPROGRESS ? attempt->outcome : args->ret);
    connect_attempts.delete(&sk);
    return 0;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    u64 sk = (u64)args->skaddr;
    struct connect_attempt *attempt;
    int err;

    if (args->protocol != X_IPPROTO_TCP)
        return 0;
    if (args->newstate != X_TCP_SYN_SENT && args->oldstate != X_TCP_SYN_SENT)
        return 0;
    attempt = connect_attempts.lookup(&sk);
    if (!attempt)
        return 0;
    if (args->sport)
        attempt->event.src_port = args->sport;
    if (args->family == X_AF_INET)
        bpf_probe_read_kernel(attempt->event.src_addr, 4, args->saddr);
    else
        bpf_probe_read_kernel(attempt->event.src_addr, 16, args->saddr_v6);
    if (args->newstate == X_TCP_SYN_SENT)
        return 0;
    if (args->newstate == X_TCP_ESTABLISHED) {
        attempt->outcome = 0;
    } else {
        err = rd_u32(sk, OFF_SOCK_SK_ERR);
        attempt->outcome = err ? -err : -X_EINPROGRESS;
    }
    attempt->finished = 1;
    if (attempt->syscall_returned) {
        report_connect(args, attempt, attempt->outcome);
        connect_attempts.delete(&sk);
    }
    return 0;
}
