// SPDX-License-Identifier: GPL-2.0
/* session.command: every execve/execveat of a recorded thread.
 *
 * A successful exec is reported from sched_process_exec, with argv read
 * from the new image (mm->arg_start..arg_end), which the kernel has just
 * written: it is complete even when the caller's argv pages were never
 * faulted in. The binary that runs is named as the kernel found it (the
 * target of a symlink, the interpreter of a script, a memfd), by device,
 * inode and path. A failed exec leaves no image: its argv is read at the
 * syscall's exit from the caller's memory, which is as it was at entry.
 *
 * The entry only notes where the caller's argv and path are, and counts
 * the arguments: for a script, the kernel puts the interpreter before the
 * caller's arguments, and the difference says how many strings it put.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "session.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* Shared with ptrace.bpf.c, which defines it the same way. */
struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} command_events __weak SEC(".maps");

/* The esr executable, set before load (0 when unknown). A session's anchor
 * (sshd's monitor, su) runs the PAM hook as a direct child: that child
 * leaves the session when it execs esr, so the hook's own work is not
 * recorded as the user's. dev is encoded as the kernel does: major << 20 | minor. */
const volatile __u64 recorder_exe_dev = 0;
const volatile __u64 recorder_exe_ino = 0;

/* The record being built, per CPU: too large for the BPF stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct esr_command_event);
} command_scratch SEC(".maps");

/* Twice the argv budget, so the verifier can bound offset + length. */
struct argv_scratch {
	char data[2 * ESR_ARGV_MAX];
};

/* Per-CPU values are capped at 32 KiB: one array entry per CPU instead,
 * sized by user space. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct argv_scratch);
} argv_scratch SEC(".maps");

/* The binary's path, assembled apart: twice its budget, as argv's. */
struct exe_scratch {
	char data[2 * ESR_EXE_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct exe_scratch);
} exe_scratch SEC(".maps");

/* An exec between its entry and its exit or its new image. */
struct exec_call {
	__u64 session;
	const char *filename;
	const char *const *argv;
	__u32 argc;		/* the caller's, argv[0] included */
	__u16 flags;		/* ESR_ARGV_INCOMPLETE: more than ESR_ARGS_MAX */
};

/* Execs in flight, by thread id; sized like tracked_tasks. LRU: a thread
 * killed mid-exec never reaches the exit that would delete its entry. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct exec_call);
} exec_in_flight SEC(".maps");

static __always_inline struct esr_command_event *scratch_record(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&command_scratch, &zero);
}

static __always_inline void fill_identity(struct esr_command_event *e)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u64 uid_gid = bpf_get_current_uid_gid();

	e->ppid = BPF_CORE_READ(task, real_parent, tgid);
	e->uid = (__u32)uid_gid;
	e->gid = uid_gid >> 32;
	if (BPF_CORE_READ(task, signal, tty))
		e->flags |= ESR_COMMAND_TTY;
}

static __always_inline __u64 record_size(const struct esr_command_event *e)
{
	__u64 used = (__u64)e->argv_len + e->path_len + e->exe_len;

	if (used > sizeof(e->data))
		used = sizeof(e->data);
	return offsetof(struct esr_command_event, data) + used;
}

/* Pointers read at once when counting arguments: one read for most execs. */
#define ARGV_BLOCK 8

/* How many pointers argv holds before its NULL, up to ESR_ARGS_MAX. */
static __always_inline __u32 count_args(const char *const *argv, __u16 *flags)
{
	const char *block[ARGV_BLOCK];
	__u32 argc = 0;
	int i, j;

	for (i = 0; i < ESR_ARGS_MAX / ARGV_BLOCK; i++) {
		/* A block may run past the end of the caller's mapping: then
		 * one pointer at a time. */
		if (bpf_probe_read_user(block, sizeof(block), argv + i * ARGV_BLOCK)) {
			for (j = 0; j < ARGV_BLOCK; j++)
				if (bpf_probe_read_user(&block[j], sizeof(block[j]),
							argv + i * ARGV_BLOCK + j))
					block[j] = NULL;
		}
		for (j = 0; j < ARGV_BLOCK; j++) {
			if (!block[j])
				return argc;
			argc++;
		}
	}
	*flags |= ESR_ARGV_INCOMPLETE;
	return argc;
}

static __always_inline int enter_exec(const char *filename, const char *const *argv)
{
	struct exec_call call = { .filename = filename, .argv = argv };
	__u32 tid = current_tid();

	call.session = recorded_session();
	if (!call.session)
		return 0;
	call.argc = count_args(argv, &call.flags);
	bpf_map_update_elem(&exec_in_flight, &tid, &call, BPF_ANY);
	return 0;
}

/* The caller's argv strings, after a failed exec: into e->data. */
static __always_inline void read_caller_argv(struct esr_command_event *e, struct exec_call *call)
{
	__u32 cpu = bpf_get_smp_processor_id();
	struct argv_scratch *buf = bpf_map_lookup_elem(&argv_scratch, &cpu);
	const char *arg;
	__u64 off = 0;
	long n;
	int i;

	if (!buf)
		return;
	for (i = 0; i < ESR_ARGS_MAX; i++) {
		if (bpf_probe_read_user(&arg, sizeof(arg), &call->argv[i])) {
			e->flags |= ESR_ARGV_UNREADABLE;
			break;
		}
		if (!arg)
			break;
		/* Stop at the budget (argc was counted at entry): going on
		 * would only make the verifier's work grow. */
		if (off >= ESR_ARGV_MAX) {
			e->flags |= ESR_ARGV_INCOMPLETE;
			break;
		}
		n = bpf_probe_read_user_str(&buf->data[off], ESR_ARGV_MAX - off, arg);
		if (n <= 0) {
			e->flags |= ESR_ARGV_UNREADABLE;
			break;
		}
		if (n == ESR_ARGV_MAX - off)
			e->flags |= ESR_ARGV_INCOMPLETE;
		off += n;
	}
	/* Never taken (each read is bounded by what is left), but it tells the
	 * verifier where the path may start. */
	if (off > ESR_ARGV_MAX)
		return;
	e->argv_size = e->argv_len = off;
	bpf_probe_read_kernel(e->data, ESR_ARGV_MAX, buf->data);
}

static __always_inline int report_failed_exec(void *ctx, long ret)
{
	__u32 tid = current_tid();
	struct exec_call *call = in_flight(&exec_in_flight, &tid);
	struct esr_command_event *e;
	long n;

	if (!call)
		return 0;
	/* Success was reported by sched_process_exec. */
	if (ret < 0 && (e = scratch_record())) {
		fill_header(&e->hdr, call->session, ESR_EVENT_COMMAND);
		e->flags = ESR_ARGV_FROM_ENTRY | call->flags;
		fill_identity(e);
		e->return_code = ret;
		e->argc = call->argc;
		e->argv_size = e->argv_len = 0;
		e->interpreter_args = 0;
		e->exe_len = 0;
		e->exe_dev = e->exe_ino = 0;
		read_caller_argv(e, call);
		if (e->argv_len <= ESR_ARGV_MAX) {
			n = bpf_probe_read_user_str(&e->data[e->argv_len], ESR_PATH_MAX, call->filename);
			e->path_len = n > 0 ? n : 0;
			emit(ctx, &command_events, ESR_BUF_COMMAND, call->session, e, record_size(e));
		}
	}
	bpf_map_delete_elem(&exec_in_flight, &tid);
	return 0;
}

SEC("tp/syscalls/sys_enter_execve")
int exec_enter(struct trace_event_raw_sys_enter *ctx)
{
	return enter_exec((const char *)ctx->args[0], (const char *const *)ctx->args[1]);
}

SEC("tp/syscalls/sys_enter_execveat")
int execat_enter(struct trace_event_raw_sys_enter *ctx)
{
	return enter_exec((const char *)ctx->args[1], (const char *const *)ctx->args[2]);
}

SEC("tp/syscalls/sys_exit_execve")
int exec_exit(struct trace_event_raw_sys_exit *ctx)
{
	return report_failed_exec(ctx, ctx->ret);
}

SEC("tp/syscalls/sys_exit_execveat")
int execat_exit(struct trace_event_raw_sys_exit *ctx)
{
	return report_failed_exec(ctx, ctx->ret);
}

static __always_inline bool is_recorder_exe(struct task_struct *task)
{
	struct inode *inode = BPF_CORE_READ(task, mm, exe_file, f_inode);

	return recorder_exe_ino && BPF_CORE_READ(inode, i_ino) == recorder_exe_ino &&
	       BPF_CORE_READ(inode, i_sb, s_dev) == recorder_exe_dev;
}

/* What memfd_create names its files: "memfd:NAME". */
static __always_inline bool is_memfd_name(const char name[6])
{
	return name[0] == 'm' && name[1] == 'e' && name[2] == 'm' && name[3] == 'f' &&
	       name[4] == 'd' && name[5] == ':';
}

/* The binary that runs: device, inode, and its path as the kernel found it,
 * each component from the file up to the root, crossing mounts; for a
 * memfd, its name. Written at data[at..]. */
static __always_inline void describe_exe(struct esr_command_event *e, struct task_struct *task,
					 __u64 at)
{
	struct file *exe = BPF_CORE_READ(task, mm, exe_file);
	struct inode *inode = BPF_CORE_READ(exe, f_inode);
	struct dentry *dentry = BPF_CORE_READ(exe, f_path.dentry), *parent, *root;
	struct vfsmount *vfsmnt = BPF_CORE_READ(exe, f_path.mnt);
	struct mount *mnt = (void *)vfsmnt - bpf_core_field_offset(struct mount, mnt), *up;
	char prefix[7] = {};
	const unsigned char *name;
	struct exe_scratch *buf;
	__u32 zero = 0;
	__u64 off = 0;
	long n;
	int i;

	e->exe_dev = BPF_CORE_READ(inode, i_sb, s_dev);
	e->exe_ino = BPF_CORE_READ(inode, i_ino);
	e->exe_len = 0;
	buf = bpf_map_lookup_elem(&exe_scratch, &zero);
	if (!buf || at > ESR_ARGV_MAX + ESR_PATH_MAX)
		return;
	for (i = 0; i < ESR_EXE_DEPTH; i++) {
		parent = BPF_CORE_READ(dentry, d_parent);
		root = BPF_CORE_READ(vfsmnt, mnt_root);
		if (dentry == root) {
			/* The top of a mount: go on from where it is mounted. */
			up = BPF_CORE_READ(mnt, mnt_parent);
			if (up == mnt)
				break;
			dentry = BPF_CORE_READ(mnt, mnt_mountpoint);
			mnt = up;
			vfsmnt = (void *)mnt + bpf_core_field_offset(struct mount, mnt);
			continue;
		}
		name = BPF_CORE_READ(dentry, d_name.name);
		if (i == 0 && dentry == parent) {
			/* No directory: a file of an internal mount, as a memfd's is. */
			bpf_probe_read_kernel_str(prefix, sizeof(prefix), name);
			if (is_memfd_name(prefix))
				e->flags |= ESR_COMMAND_MEMFD;
		}
		if (off >= ESR_EXE_MAX) {
			e->flags |= ESR_EXE_INCOMPLETE;
			break;
		}
		n = bpf_probe_read_kernel_str(&buf->data[off], ESR_EXE_MAX - off, name);
		if (n <= 0)
			break;
		off += n;
		if (dentry == parent)
			break;
		dentry = parent;
	}
	if (i == ESR_EXE_DEPTH)
		e->flags |= ESR_EXE_INCOMPLETE;
	if (off > ESR_EXE_MAX)	/* never: it tells the verifier */
		return;
	bpf_probe_read_kernel(&e->data[at], off, buf->data);
	e->exe_len = off;
}

/* How many strings the kernel put before the caller's arguments: the
 * interpreter (and its argument) of a script, each level of scripts. */
static __always_inline __u16 interpreter_args(struct exec_call *call, __u64 argc)
{
	if (!call || (call->flags & ESR_ARGV_INCOMPLETE) || argc <= call->argc)
		return 0;
	return argc - call->argc <= 2 * 4 ? argc - call->argc : 0;	/* 4 levels at most */
}

/* A successful exec of old_tid, now new_tid (a thread's exec takes over
 * its leader's id), running filename. */
static __always_inline int on_exec(void *ctx, __u32 old_tid, __u32 new_tid,
				     const char *filename)
{
	struct esr_task *tracked = task_after_exec(old_tid, new_tid);
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct esr_command_event *e;
	struct exec_call *call;
	unsigned long arg_start, arg_end, start_stack;
	__u64 argc = 0, size, len, copied, session;
	long n;

	if (!tracked)
		return 0;
	if (tracked->flags & ESR_TASK_ANCHOR_CHILD) {
		if (is_recorder_exe(task)) {
			untrack(new_tid, tracked);
			return 0;
		}
		tracked->flags &= ~(ESR_TASK_ANCHOR_CHILD | ESR_TASK_TERMINAL);
	}
	if (tracked->flags & ESR_TASK_ANCHOR)
		return 0;
	session = tracked->session;
	e = scratch_record();
	if (!e)
		return 0;
	fill_header(&e->hdr, session, ESR_EVENT_COMMAND);
	e->flags = 0;
	fill_identity(e);
	e->return_code = 0;

	arg_start = BPF_CORE_READ(task, mm, arg_start);
	arg_end = BPF_CORE_READ(task, mm, arg_end);
	start_stack = BPF_CORE_READ(task, mm, start_stack);
	/* The new stack starts with argc, then the argv pointers. */
	bpf_probe_read_user(&argc, sizeof(argc), (void *)start_stack);
	e->argc = argc;
	call = bpf_map_lookup_elem(&exec_in_flight, &old_tid);
	e->interpreter_args = interpreter_args(call, argc);
	bpf_map_delete_elem(&exec_in_flight, &old_tid);

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

	n = bpf_probe_read_kernel_str(&e->data[copied], ESR_PATH_MAX, filename);
	e->path_len = n > 0 ? n : 0;
	describe_exe(e, task, copied + e->path_len);
	emit(ctx, &command_events, ESR_BUF_COMMAND, session, e, record_size(e));
	return 0;
}

/* One of the two is loaded: the raw tracepoint where the kernel allows it,
 * as it skips building the tracepoint's record (session.bpf.c). */
SEC("tp/sched/sched_process_exec")
int exec_done(struct trace_event_raw_sched_process_exec *ctx)
{
	return on_exec(ctx, ctx->old_pid, ctx->pid,
			 (void *)ctx + (ctx->__data_loc_filename & 0xFFFF));
}

SEC("raw_tp/sched_process_exec")
int BPF_PROG(exec_done_raw, struct task_struct *task, pid_t old_pid, struct linux_binprm *bprm)
{
	return on_exec(ctx, old_pid, current_tid(), BPF_CORE_READ(bprm, filename));
}
