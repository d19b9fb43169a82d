// SPDX-License-Identifier: GPL-2.0
/* session.command: every execve/execveat of a recorded thread.
 *
 * A successful exec is reported from sched_process_exec, with argv read
 * from the new image (mm->arg_start..arg_end), which the kernel has just
 * written: it is complete even when the caller's argv pages were never
 * faulted in. A failed exec leaves no image, so its argv is read at syscall
 * entry, stashed per thread, and reported at syscall exit with the errno.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "session.bpf.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} command_events SEC(".maps");

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

/* Entry-time records of execs in flight, by thread id. LRU: a thread killed
 * mid-exec never reaches the exit that would delete its entry. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 128);
	__type(key, __u32);
	__type(value, struct esr_command_event);
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
	__u64 used = (__u64)e->argv_len + e->path_len;

	if (used > sizeof(e->data))
		used = sizeof(e->data);
	return offsetof(struct esr_command_event, data) + used;
}

struct argv_walk {
	const char *const *argv;
	struct argv_scratch *buf;
	__u64 off;
	__u32 argc;
	__u16 flags;
};

/* bpf_loop callback: copy argv[i] after the strings already copied. */
static long walk_arg(__u32 i, struct argv_walk *walk)
{
	const char *arg = NULL;
	__u64 off = walk->off;
	long n;

	if (bpf_probe_read_user(&arg, sizeof(arg), &walk->argv[i])) {
		walk->flags |= ESR_ARGV_UNREADABLE;
		return 1;
	}
	if (!arg)
		return 1;
	walk->argc++;
	if (off >= ESR_ARGV_MAX) {
		walk->flags |= ESR_ARGV_INCOMPLETE;
		return 0;
	}
	n = bpf_probe_read_user_str(&walk->buf->data[off], ESR_ARGV_MAX - off, arg);
	if (n <= 0) {
		walk->flags |= ESR_ARGV_UNREADABLE;
		return 1;
	}
	if (n == ESR_ARGV_MAX - off)
		walk->flags |= ESR_ARGV_INCOMPLETE;
	walk->off = off + n;
	return 0;
}

static __always_inline int stash_exec(const char *filename, const char *const *argv)
{
	__u64 session = recorded_session();
	__u32 cpu = bpf_get_smp_processor_id(), tid = current_tid();
	struct argv_walk walk = { .argv = argv, .flags = ESR_ARGV_FROM_ENTRY };
	struct esr_command_event *e;
	__u64 off;
	long n;

	if (!session)
		return 0;
	e = scratch_record();
	walk.buf = bpf_map_lookup_elem(&argv_scratch, &cpu);
	if (!e || !walk.buf)
		return 0;
	if (bpf_loop(ESR_ARGS_MAX, walk_arg, &walk, 0) == ESR_ARGS_MAX)
		walk.flags |= ESR_ARGV_INCOMPLETE;
	off = walk.off;
	/* Never taken (each read is bounded by what is left), but it tells
	 * the verifier where the path may start. */
	if (off > ESR_ARGV_MAX)
		return 0;

	e->argc = walk.argc;
	e->argv_size = off;
	e->argv_len = off;
	bpf_probe_read_kernel(e->data, ESR_ARGV_MAX, walk.buf->data);
	n = bpf_probe_read_user_str(&e->data[off], ESR_PATH_MAX, filename);
	e->path_len = n > 0 ? n : 0;
	e->flags = walk.flags;
	e->hdr.session = session;
	bpf_map_update_elem(&exec_in_flight, &tid, e, BPF_ANY);
	return 0;
}

static __always_inline int report_failed_exec(void *ctx, long ret)
{
	__u32 tid = current_tid();
	struct esr_command_event *e = bpf_map_lookup_elem(&exec_in_flight, &tid);
	__u64 session;

	if (!e)
		return 0;
	/* Success was reported by sched_process_exec. */
	if (ret < 0) {
		session = e->hdr.session;
		fill_header(&e->hdr, session, ESR_EVENT_COMMAND);
		fill_identity(e);
		e->return_code = ret;
		emit(ctx, &command_events, ESR_BUF_COMMAND, session, e, record_size(e));
	}
	bpf_map_delete_elem(&exec_in_flight, &tid);
	return 0;
}

SEC("tp/syscalls/sys_enter_execve")
int exec_enter(struct trace_event_raw_sys_enter *ctx)
{
	return stash_exec((const char *)ctx->args[0], (const char *const *)ctx->args[1]);
}

SEC("tp/syscalls/sys_enter_execveat")
int execat_enter(struct trace_event_raw_sys_enter *ctx)
{
	return stash_exec((const char *)ctx->args[1], (const char *const *)ctx->args[2]);
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

SEC("tp/sched/sched_process_exec")
int exec_done(struct trace_event_raw_sched_process_exec *ctx)
{
	__u32 old_tid = ctx->old_pid, new_tid = ctx->pid;
	struct esr_task *tracked = task_after_exec(old_tid, new_tid);
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct esr_command_event *e;
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
	/* The exec succeeded: its entry-time record is not needed. */
	bpf_map_delete_elem(&exec_in_flight, &old_tid);
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
				      (void *)ctx + (ctx->__data_loc_filename & 0xFFFF));
	e->path_len = n > 0 ? n : 0;
	emit(ctx, &command_events, ESR_BUF_COMMAND, session, e, record_size(e));
	return 0;
}
