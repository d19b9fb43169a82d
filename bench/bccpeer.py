#!/usr/bin/python3
"""The bcc peer of `esr bench`: a session recorder written the way bcc tools
are written, to compare esr's consumer cost against.

    /usr/bin/python3 bench/bccpeer.py --pages C,D,N [--wakeup-events K] [--cpu N]
                                      [--headers auto|running|DIR]

It records what esr's BPF programs record (bpf/*.bpf.c), in bcc's C dialect,
compiled at run time by BPF(text=...): TRACEPOINT_PROBEs, per-thread session
membership in a BPF_HASH filled at sched_process_fork and emptied at
sched_process_exit; opens stashed at sys_enter_* and emitted at sys_exit_*;
successful execs at sched_process_exec with argv from mm->arg_start..arg_end,
failed ones at sys_exit_execve(at) with argv read at entry; TCP connects at
sys_exit_connect (or, for a non-blocking connect, when the socket leaves
SYN_SENT). One BPF_PERF_OUTPUT per record type (command, disk, network),
each with its own page count, each read by a Python callback that decodes
with b[table].event(data) and touches the decoded fields.

Protocol (stdin/stdout, one line each):
    -> ready                      compiled and attached
    <- track PID                  PID joins the session; CPU/RSS/counts reset
    -> tracking
    <- stop (or EOF)              drain every buffer, then
    -> {"records": {...}, "lost": {...}, "user_s": .., "sys_s": .., ...}
On failure to compile (no kernel headers, ...): one line {"error": ...,
"headers": ...} and exit status 3.

Kernel headers (bcc needs them; --headers auto, the default): the running
kernel's (/lib/modules/$(uname -r)/{build,source}, or BCC_KERNEL_SOURCE as
set by the caller, or /sys/kernel/kheaders.tar.xz) when present; else the
nearest installed Debian linux-headers-*: Debian splits them into an arch
tree (generated headers, .config) and a -common tree (the sources), which
bcc 0.26 only combines for /lib/modules/$(uname -r); so BCC_KERNEL_SOURCE
points at the common tree and the arch tree's generated include directories
are added as cflags, in the kernel's own include order.

Headers of another kernel are fine for bcc's helpers and uapi types, but not
for the layout of kernel structs (task_struct, mm_struct, file, sock ...):
the few fields the programs read through pointers are located in the running
kernel's BTF (/sys/kernel/btf/vmlinux) and passed in as -D offsets; without
BTF they fall back to offsetof() in the headers (right only when the headers
are the running kernel's).
"""

import argparse
import collections
import ctypes as ct
import glob
import json
import os
import platform
import re
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading

EXIT_NO_BUILD = 3
POLL_MS = 50
TRACEFS = "/sys/kernel/tracing"
BTF_PATH = "/sys/kernel/btf/vmlinux"
TYPES = ("command", "disk", "network")

# Session cookie, as esr makes them: generation << 32 | slot.
SESSION_SLOT = 0
SESSION = (1 << 32) | SESSION_SLOT

BPF_TEXT = r"""
#include <linux/in.h>
#include <linux/in6.h>

#define ESR_COMM_LEN 16
#define ESR_PATH_MAX 4096
#define ESR_ARGV_MAX 20480
#define ESR_ARGS_MAX 512

#define BUF_COMMAND 0
#define BUF_DISK 1
#define BUF_NETWORK 2
#define BUF_COUNT 3

#define EVENT_COMMAND 1
#define EVENT_DISK 2
#define EVENT_NETWORK 3

#define ARGV_FROM_ENTRY 0x1
#define ARGV_INCOMPLETE 0x2
#define ARGV_UNREADABLE 0x4
#define COMMAND_TTY 0x8

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

/* Every record starts with the same header fields (flattened: bcc's
 * event() decoder knows no nested structs). */
struct hdr {
    u64 ts_boot_ns;
    u64 session;
    u64 cgroup_id;
    u32 pid;
    u16 type;
    u16 reserved;
    char comm[ESR_COMM_LEN];
};

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
    char data[ESR_ARGV_MAX + ESR_PATH_MAX];
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

struct session_state {
    u64 session;
    s64 live_tasks;
    u64 lost[BUF_COUNT];
    u64 untracked_forks;
};

struct esr_task {
    u64 session;
    u32 flags;
    u32 reserved;
};

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
BPF_ARRAY(session_states, struct session_state, 64);
BPF_PERCPU_ARRAY(buffer_lost, u64, BUF_COUNT);

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

static __always_inline struct session_state *session_state(u64 session)
{
    u32 slot = (u32)session;
    struct session_state *state = session_states.lookup(&slot);

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

static __always_inline void fill_header(struct hdr *h, u64 session, u16 type)
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
    struct session_state *state;

    if (lost)
        *lost += 1;
    state = session_state(session);
    if (state && buffer < BUF_COUNT)
        __sync_fetch_and_add(&state->lost[buffer], 1);
}

/* ---- membership ---- */

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 parent_tid = current_tid();
    struct esr_task *parent = tracked_tasks.lookup(&parent_tid);
    struct session_state *state;
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
    struct session_state *state;

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
        fill_header((struct hdr *)e, session, EVENT_DISK);
        e->flags = call->flags;
        e->return_code = ret;
        n = bpf_probe_read_user_str(e->path, sizeof(e->path), (void *)call->path);
        len = n > 0 ? n : 0;
        if (len > sizeof(e->path))
            len = sizeof(e->path);
        e->path_len = len;
        e->path_truncated = len == sizeof(e->path);
        if (disk_events.perf_submit(ctx, e, offsetof(struct disk_event, path) + len))
            count_lost(BUF_DISK, session);
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
        e->flags |= COMMAND_TTY;
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
    u16 flags = ARGV_FROM_ENTRY;
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
            flags |= ARGV_UNREADABLE;
            break;
        }
        if (!arg)
            break;
        argc++;
        if (off >= ESR_ARGV_MAX) {
            flags |= ARGV_INCOMPLETE;
            break;
        }
        n = bpf_probe_read_user_str(&buf->data[off], ESR_ARGV_MAX - off, arg);
        if (n <= 0) {
            flags |= ARGV_UNREADABLE;
            break;
        }
        if (n == ESR_ARGV_MAX - off)
            flags |= ARGV_INCOMPLETE;
        off += n;
    }
    if (i == ESR_ARGS_MAX)
        flags |= ARGV_INCOMPLETE;
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
        fill_header((struct hdr *)e, session, EVENT_COMMAND);
        fill_identity(e);
        e->return_code = ret;
        if (command_events.perf_submit(ctx, e, record_size(e)))
            count_lost(BUF_COMMAND, session);
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
    fill_header((struct hdr *)e, session, EVENT_COMMAND);
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
        e->flags |= ARGV_UNREADABLE;
    e->argv_size = size;
    e->argv_len = copied;

    n = bpf_probe_read_kernel_str(&e->data[copied], ESR_PATH_MAX,
                                  (void *)args + (args->data_loc_filename & 0xFFFF));
    e->path_len = n > 0 ? n : 0;
    if (command_events.perf_submit(args, e, record_size(e)))
        count_lost(BUF_COMMAND, session);
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
        count_lost(BUF_NETWORK, e->session);
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

    fill_header((struct hdr *)e, session, EVENT_NETWORK);
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
"""

# The kernel fields the programs read through pointers: macro -> (struct,
# member, size in bytes).
KERNEL_FIELDS = {
    "OFF_TASK_MM": ("task_struct", "mm", 8),
    "OFF_TASK_REAL_PARENT": ("task_struct", "real_parent", 8),
    "OFF_TASK_TGID": ("task_struct", "tgid", 4),
    "OFF_TASK_SIGNAL": ("task_struct", "signal", 8),
    "OFF_TASK_FILES": ("task_struct", "files", 8),
    "OFF_SIGNAL_TTY": ("signal_struct", "tty", 8),
    "OFF_MM_ARG_START": ("mm_struct", "arg_start", 8),
    "OFF_MM_ARG_END": ("mm_struct", "arg_end", 8),
    "OFF_MM_START_STACK": ("mm_struct", "start_stack", 8),
    "OFF_FILES_FDT": ("files_struct", "fdt", 8),
    "OFF_FDT_MAX_FDS": ("fdtable", "max_fds", 4),
    "OFF_FDT_FD": ("fdtable", "fd", 8),
    "OFF_FILE_F_INODE": ("file", "f_inode", 8),
    "OFF_FILE_PRIVATE_DATA": ("file", "private_data", 8),
    "OFF_INODE_I_MODE": ("inode", "i_mode", 2),
    "OFF_SOCKET_SK": ("socket", "sk", 8),
    "OFF_SOCK_SK_TYPE": ("sock", "sk_type", 2),
    "OFF_SOCK_SK_PROTOCOL": ("sock", "sk_protocol", 2),
    "OFF_SOCK_SK_ERR": ("sock", "sk_err", 4),
}


class Unbuildable(Exception):
    """bcc cannot build the programs here; the message says why."""


# ---------------------------------------------------------------- BTF

_BTF_PTR, _BTF_ARRAY, _BTF_STRUCT, _BTF_UNION = 2, 3, 4, 5
_BTF_TYPEDEF, _BTF_VOLATILE, _BTF_CONST, _BTF_RESTRICT, _BTF_TYPE_TAG = 8, 9, 10, 11, 18
_BTF_EXTRA = {1: 4, 3: 12, 14: 4, 17: 4}                       # fixed tail
_BTF_PER_VLEN = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}    # per member


def btf_field_offsets(fields: dict, path: str = BTF_PATH) -> dict:
    """{macro: byte offset} of struct members in the kernel's BTF; members
    of anonymous structs and unions are found as the compiler would."""
    with open(path, "rb") as f:
        data = f.read()
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, _str_len = \
        struct.unpack_from("<HBBIIIII", data, 0)
    if magic != 0xEB9F:
        raise ValueError(f"{path}: not BTF")
    strings = hdr_len + str_off

    def name(off):
        return data[strings + off:data.index(b"\0", strings + off)].decode()

    wanted = {s for s, _, _ in fields.values()}
    types = [None]          # id -> (kind, name_off, size_or_type, kind_flag, pos, vlen)
    by_name = {}
    pos, end = hdr_len + type_off, hdr_len + type_off + type_len
    while pos < end:
        name_off, info, size = struct.unpack_from("<III", data, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        types.append((kind, name_off, size, info >> 31, pos + 12, vlen))
        if kind == _BTF_STRUCT and name_off and vlen:
            n = name(name_off)
            if n in wanted:
                by_name.setdefault(n, len(types) - 1)
        pos += 12 + _BTF_EXTRA.get(kind, 0) + _BTF_PER_VLEN.get(kind, 0) * vlen

    def resolve(tid):
        while types[tid][0] in (_BTF_TYPEDEF, _BTF_VOLATILE, _BTF_CONST, _BTF_RESTRICT,
                                _BTF_TYPE_TAG):
            tid = types[tid][2]
        return tid

    def size_of(tid):
        tid = resolve(tid)
        kind, _, size, _, tpos, _ = types[tid]
        if kind == _BTF_PTR:
            return 8
        if kind == _BTF_ARRAY:
            elem, _index, nelems = struct.unpack_from("<III", data, tpos)
            return size_of(elem) * nelems
        return size

    def find(tid, member):
        """(bit offset, size) of member in struct/union tid, or None."""
        kind, _, _, kflag, mpos, vlen = types[tid]
        for i in range(vlen):
            m_name, m_type, m_off = struct.unpack_from("<III", data, mpos + 12 * i)
            bits = m_off & 0xFFFFFF if kflag else m_off
            bitfield = bool(kflag and m_off >> 24)
            if m_name and name(m_name) == member:
                if bitfield or bits % 8:
                    raise ValueError(f"{member} is a bit field")
                return bits, size_of(m_type)
            if not m_name:
                inner = resolve(m_type)
                if types[inner][0] in (_BTF_STRUCT, _BTF_UNION):
                    found = find(inner, member)
                    if found:
                        return bits + found[0], found[1]
        return None

    offsets = {}
    for macro, (struct_name, member, want_size) in fields.items():
        tid = by_name.get(struct_name)
        if tid is None:
            raise ValueError(f"struct {struct_name} not in {path}")
        found = find(tid, member)
        if found is None:
            raise ValueError(f"struct {struct_name} has no member {member}")
        bits, size = found
        if size != want_size:
            raise ValueError(f"{struct_name}.{member} is {size} bytes, expected {want_size}")
        offsets[macro] = bits // 8
    return offsets


# ---------------------------------------------------------------- headers

def _version_key(release: str):
    return tuple(int(x) for x in re.findall(r"\d+", release)[:4])


def _release_of(tree: str) -> str:
    try:
        with open(os.path.join(tree, "include/generated/utsrelease.h")) as f:
            m = re.search(r'UTS_RELEASE\s+"([^"]+)"', f.read())
            if m:
                return m.group(1)
    except OSError:
        pass
    return os.path.basename(tree.rstrip("/")).replace("linux-headers-", "")


def _deb_version(release: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "linux-headers-" + release],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _is_source_tree(d: str) -> bool:
    return os.path.isfile(os.path.join(d, "include/linux/kconfig.h"))


def _is_build_tree(d: str) -> bool:
    return os.path.isfile(os.path.join(d, "include/generated/autoconf.h"))


def _common_of(build: str) -> str:
    """The Debian -common source tree that goes with an arch tree."""
    release = _release_of(build)
    candidates = [os.path.join("/lib/modules", release, "source")]
    try:
        with open(os.path.join(build, "Makefile")) as f:
            m = re.search(r"^include\s+(\S+)/Makefile\s*$", f.read(), re.M)
            if m:
                candidates.append(m.group(1))
    except OSError:
        pass
    for c in candidates:
        if _is_source_tree(c):
            return os.path.realpath(c)
    return ""


def _split_tree(build: str, source: str, running: str, why: str):
    """bcc settings for a Debian-style split tree (build = arch, source = common)."""
    arch = "x86" if platform.machine() in ("x86_64", "i686", "i386") else {
        "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    cflags = [f"-I{build}/arch/{arch}/include/generated", f"-I{build}/include",
              f"-I{build}/arch/{arch}/include/generated/uapi",
              f"-I{build}/include/generated/uapi"]
    release = _release_of(build)
    deb = _deb_version(release)
    desc = f"{build} + {source} (Linux {release}{', Debian ' + deb if deb else ''}; {why}"
    if release != running:
        desc += f", not the running kernel {running}"
    desc += ")"
    return {"BCC_KERNEL_SOURCE": source}, cflags, desc


def find_headers(mode: str):
    """(environment, cflags, description) telling bcc which kernel headers
    to compile against, or Unbuildable."""
    running = platform.release()
    modules = os.path.join("/lib/modules", running)
    if mode not in ("auto", "running"):
        tree = os.path.realpath(mode)
        if _is_source_tree(tree) and _is_build_tree(tree):
            return ({"BCC_KERNEL_SOURCE": tree}, [],
                    f"{tree} (Linux {_release_of(tree)}; --headers)")
        common = _is_build_tree(tree) and _common_of(tree)
        if common:
            return _split_tree(tree, common, running, "--headers")
        raise Unbuildable(f"--headers {mode}: not a kernel header tree "
                          "(no include/linux/kconfig.h + include/generated/autoconf.h)")

    env_tree = os.environ.get("BCC_KERNEL_SOURCE")
    if env_tree:
        common = not _is_source_tree(env_tree) and _is_build_tree(env_tree) and _common_of(env_tree)
        if common:
            return _split_tree(os.path.realpath(env_tree), common, running, "BCC_KERNEL_SOURCE")
        return {}, [], f"{env_tree} (BCC_KERNEL_SOURCE, Linux {_release_of(env_tree)})"
    build, source = os.path.join(modules, "build"), os.path.join(modules, "source")
    if os.path.isdir(source) and os.path.isdir(build):
        if _is_source_tree(source) and _is_build_tree(build):
            return {}, [], f"{os.path.realpath(build)} + {os.path.realpath(source)} " \
                           f"(running kernel {running})"
    elif _is_source_tree(build) and _is_build_tree(build):
        return {}, [], f"{os.path.realpath(build)} (running kernel {running})"
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return {}, [], f"/sys/kernel/kheaders.tar.xz (running kernel {running})"
    if mode == "running":
        raise Unbuildable(f"no kernel headers for the running kernel {running} "
                          f"({modules}/build, /sys/kernel/kheaders.tar.xz)")

    # The nearest installed Debian linux-headers-*: the newest release not
    # newer than the running kernel, else the oldest newer one; the generic
    # flavour before -cloud, -rt.
    trees = []
    for build in glob.glob("/usr/src/linux-headers-*"):
        if not _is_build_tree(build) or not os.path.isfile(os.path.join(build, ".config")):
            continue
        if _is_source_tree(build):
            source = build
        else:
            source = _common_of(build)
            if not source:
                continue
        release = _release_of(build)
        flavour = 0 if re.search(r"\d-(amd64|arm64|686|686-pae)$", release) else 1
        trees.append((_version_key(release), flavour, release, os.path.realpath(build), source))
    if not trees:
        raise Unbuildable(f"no kernel headers: none for the running kernel {running} "
                          f"({modules}/build, /sys/kernel/kheaders.tar.xz) and no "
                          "/usr/src/linux-headers-* installed (apt-get install linux-headers-amd64)")
    mine = _version_key(running)
    older = [t for t in trees if t[0] <= mine]
    if older:
        best = max(older, key=lambda t: (t[0], -t[1]))
    else:
        best = min(trees, key=lambda t: (t[0], t[1]))
    _, _, release, build, source = best
    if build == source:
        return ({"BCC_KERNEL_SOURCE": build}, [],
                f"{build} (Linux {release}, nearest installed; not the running kernel {running})")
    return _split_tree(build, source, running, "nearest installed")


# ---------------------------------------------------------------- build

class _Captured:
    """fd 1 and 2 into a file while bcc compiles: it prints to stdout too,
    which is the protocol's channel."""

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = (os.dup(1), os.dup(2))
        os.dup2(self.file.fileno(), 1)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.file.seek(0)
        self.text = self.file.read().decode(errors="replace")
        self.file.close()
        return False


def _mount_tracefs():
    if os.path.isdir(os.path.join(TRACEFS, "events")):
        return
    if os.path.isdir("/sys/kernel/debug/tracing/events"):
        return
    libc = ct.CDLL(None, use_errno=True)
    if libc.mount(b"nodev", TRACEFS.encode(), b"tracefs", 0, None) != 0:
        err = ct.get_errno()
        raise Unbuildable(f"cannot mount tracefs on {TRACEFS}: {os.strerror(err)}")


def _summary(log: str) -> str:
    """The lines of bcc's output that say what went wrong."""
    lines = [l.strip() for l in log.splitlines() if l.strip()]
    keep = [l for l in lines if re.search(r"error|unable|cannot|not found|invalid", l, re.I)]
    return " | ".join((keep or lines)[:4])[:800]


def build(env: dict, cflags: list):
    """The BPF object compiled, loaded and attached, and where the struct
    offsets came from."""
    cflags = list(cflags)
    try:
        offsets = btf_field_offsets(KERNEL_FIELDS)
        cflags += [f"-D{k}={v}" for k, v in offsets.items()]
        offsets_from = "BTF " + BTF_PATH
    except (OSError, ValueError) as err:
        cflags.append("-DOFFSETS_FROM_HEADERS")
        offsets_from = f"headers (no usable BTF: {err})"
    os.environ.update(env)
    _mount_tracefs()
    try:
        from bcc import BPF
        from bcc.utils import get_possible_cpus
    except ImportError as err:
        raise Unbuildable(f"bcc's Python module is missing ({err}): apt-get install python3-bpfcc")
    # bpf_get_smp_processor_id() may be any possible CPU, not only an online one.
    cflags.append(f"-DNCPUS={max(get_possible_cpus()) + 1}")
    with _Captured() as out:
        try:
            bpf = BPF(text=BPF_TEXT, cflags=cflags)
            error = None
        except Exception as err:  # bcc raises Exception for compile and load errors
            error = str(err).splitlines()[0] if str(err) else type(err).__name__
    if error:
        raise Unbuildable(f"bcc could not build the programs with these headers: {error}: "
                          f"{_summary(out.text)}")
    return bpf, offsets_from


# ---------------------------------------------------------------- consumer

def _peak_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _addr(family, raw):
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, bytes(raw[:4]))
    return socket.inet_ntop(socket.AF_INET6, bytes(raw))


def run(args) -> int:
    pages = [int(p) for p in args.pages.split(",")]
    if len(pages) != 3 or any(p <= 0 or p & (p - 1) for p in pages):
        print(json.dumps({"error": f"--pages {args.pages}: three powers of two, "
                                   "command,disk,network"}), flush=True)
        return 2
    os.sched_setaffinity(0, {args.cpu})
    headers = "none"
    try:
        env, cflags, headers = find_headers(args.headers)
        b, offsets_from = build(env, cflags)
    except Unbuildable as err:
        print(json.dumps({"error": str(err), "headers": headers}), flush=True)
        return EXIT_NO_BUILD

    records = [0, 0, 0]
    lost_cb = [0, 0, 0]
    last = [None]
    command_table, disk_table, network_table = \
        b["command_events"], b["disk_events"], b["network_events"]
    data_offset = []  # offset of command_event.data, known after the first decode

    def on_command(cpu, data, size):
        e = command_table.event(data)
        if not data_offset:
            data_offset.append(type(e).data.offset)
        base = ct.addressof(e) + data_offset[0]
        raw = ct.string_at(base, e.argv_len)
        argv = raw.split(b"\0")
        if raw.endswith(b"\0"):
            argv.pop()
        path = ct.string_at(base + e.argv_len, max(e.path_len - 1, 0))
        last[0] = (e.ts_boot_ns, e.session, e.cgroup_id, e.pid, e.comm.decode(errors="replace"),
                   e.ppid, e.uid, e.gid, e.return_code, e.argc, e.argv_size, e.flags,
                   [a.decode(errors="surrogateescape") for a in argv],
                   path.decode(errors="surrogateescape"))
        records[0] += 1

    def on_disk(cpu, data, size):
        e = disk_table.event(data)
        last[0] = (e.ts_boot_ns, e.session, e.cgroup_id, e.pid, e.comm.decode(errors="replace"),
                   e.flags, e.return_code, e.path_truncated,
                   e.path.decode(errors="surrogateescape"))
        records[1] += 1

    def on_network(cpu, data, size):
        e = network_table.event(data)
        last[0] = (e.ts_boot_ns, e.session, e.cgroup_id, e.pid, e.comm.decode(errors="replace"),
                   e.return_code, e.family, _addr(e.family, e.src_addr), e.src_port,
                   _addr(e.family, e.dst_addr), e.dst_port)
        records[2] += 1

    def lost_into(i):
        def lost(count):
            lost_cb[i] += count
        return lost

    for i, (table, cb) in enumerate(((command_table, on_command), (disk_table, on_disk),
                                     (network_table, on_network))):
        table.open_perf_buffer(cb, page_cnt=pages[i], lost_cb=lost_into(i),
                               wakeup_events=args.wakeup_events)

    tracked = b["tracked_tasks"]
    states = b["session_states"]
    buffer_lost = b["buffer_lost"]

    # Commands arrive on a thread of their own, so the main loop is the one
    # a bcc tool has: perf_buffer_poll, over and over.
    commands = collections.deque()

    def read_commands():
        for line in sys.stdin:
            commands.append(line)
        commands.append("")

    threading.Thread(target=read_commands, daemon=True).start()
    print("ready", flush=True)

    start = resource.getrusage(resource.RUSAGE_SELF)
    while True:
        b.perf_buffer_poll(timeout=POLL_MS)
        while commands:
            words = commands.popleft().split()
            if words[:1] == ["track"] and len(words) == 2:
                state = states.Leaf()
                state.session = SESSION
                states[ct.c_int(SESSION_SLOT)] = state
                task = tracked.Leaf()
                task.session = SESSION
                tracked[tracked.Key(int(words[1]))] = task
                records[:] = [0, 0, 0]
                lost_cb[:] = [0, 0, 0]
                _reset_peak_rss()
                start = resource.getrusage(resource.RUSAGE_SELF)
                print("tracking", flush=True)
            elif words[:1] == ["stop"] or not words:
                return stop(b, args, headers, offsets_from, start, records, lost_cb,
                            states, buffer_lost)


def stop(b, args, headers, offsets_from, start, records, lost_cb, states, buffer_lost) -> int:
    # Drain: read every ring whatever its wakeup count, until a pass finds
    # nothing more.
    while True:
        seen = sum(records) + sum(lost_cb)
        b.perf_buffer_consume()
        if sum(records) + sum(lost_cb) == seen:
            break
    end = resource.getrusage(resource.RUSAGE_SELF)
    state = states[ct.c_int(SESSION_SLOT)]
    lost_bpf = [int(state.lost[i]) for i in range(3)] if state.session == SESSION else [0, 0, 0]
    per_buffer = [sum(buffer_lost[ct.c_int(i)]) for i in range(3)]
    # A record the ring had no room for fails perf_submit (counted in BPF)
    # and is reported to the lost callback too: take the larger, not the sum.
    lost = [max(a, c) for a, c in zip(lost_bpf, lost_cb)]
    result = {
        "records": dict(zip(TYPES, records)),
        "lost": dict(zip(TYPES, lost)),
        "lost_callback": dict(zip(TYPES, lost_cb)),
        "lost_bpf": dict(zip(TYPES, lost_bpf)),
        "lost_bpf_all_sessions": dict(zip(TYPES, per_buffer)),
        "untracked_forks": int(state.untracked_forks),
        "user_s": end.ru_utime - start.ru_utime,
        "sys_s": end.ru_stime - start.ru_stime,
        "max_rss_kb": _peak_rss_kb(),
        "wakeup_events": args.wakeup_events,
        "pages": dict(zip(TYPES, (int(p) for p in args.pages.split(",")))),
        "headers": headers,
        "struct_offsets": offsets_from,
    }
    print(json.dumps(result), flush=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", required=True, metavar="C,D,N",
                        help="perf buffer pages per CPU: command,disk,network")
    parser.add_argument("--wakeup-events", type=int, default=1, metavar="K",
                        help="records per wakeup (bcc's default: 1)")
    parser.add_argument("--cpu", type=int, default=0, help="CPU to run on (default 0)")
    parser.add_argument("--headers", default="auto", metavar="auto|running|DIR",
                        help="kernel headers for bcc: auto (running kernel's, else the "
                             "nearest installed linux-headers-*), running, or a tree")
    args = parser.parse_args()
    try:
        status = run(args)
    except Exception as err:  # one line the harness can show, whatever happened
        print(json.dumps({"error": f"{type(err).__name__}: {err}"}), flush=True)
        status = 1
    sys.stdout.flush()
    os._exit(status)  # skip bcc's noisy destructors


if __name__ == "__main__":
    main()
