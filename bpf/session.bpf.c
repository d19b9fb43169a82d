// SPDX-License-Identifier: GPL-2.0
/* Session membership: a tracked thread's children join its session at fork,
 * before they can run, and leave the map when they exit.
 *
 * Fork, exec and exit are hooked for every process on the host, recorded or
 * not. Through a tracepoint, the kernel first builds the event's record (for
 * an exec, copying the file's name) and then runs the program; a raw
 * tracepoint runs the program on the arguments as they are. So each hook
 * comes twice, and the loader keeps the raw one where the kernel allows
 * raw tracepoints, the tracepoint elsewhere (object.c). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "session.bpf.h"

char LICENSE[] SEC("license") = "GPL";

const volatile __u32 tid_marks_size = 0;
/* The most threads one session may have tracked at once (a share of
 * tracked_tasks): a session forking without end cannot take the whole map. */
const volatile __s64 tasks_per_session = 0;

static __always_inline int on_fork(__u32 child_tid)
{
	__u32 parent_tid = current_tid();
	struct esr_task *parent = tracked_task(parent_tid);
	struct esr_session_state *state;
	struct esr_task child = {}, *known;

	if (!parent)
		return 0;
	state = session_state(parent->session);
	if (!state)
		return 0;
	child.session = parent->session;
	/* An anchor's child that never execs is sshd's session process, which
	 * relays the user's terminal. */
	child.flags = parent->flags & ESR_TASK_ANCHOR ? ESR_TASK_ANCHOR_CHILD | ESR_TASK_TERMINAL : 0;
	/* While an upgrade replaces the programs, the old and the new
	 * track_fork both run, one after the other, on the fork: the second
	 * must not count the child again. An entry of another session is a
	 * thread whose exit was missed, whose id is reused: replaced. */
	known = bpf_map_lookup_elem(&tracked_tasks, &child_tid);
	if (known && known->session == child.session)
		return 0;
	if (state->live_tasks >= tasks_per_session || track(child_tid, &child)) {
		__sync_fetch_and_add(&state->untracked_forks, 1);
		return 0;
	}
	__sync_fetch_and_add(&state->live_tasks, 1);
	return 0;
}

SEC("tp/sched/sched_process_fork")
int track_fork(struct trace_event_raw_sched_process_fork *ctx)
{
	return on_fork(ctx->child_pid);
}

SEC("raw_tp/sched_process_fork")
int BPF_PROG(track_fork_raw, struct task_struct *parent, struct task_struct *child)
{
	return on_fork(BPF_CORE_READ(child, pid));
}

static __always_inline int on_exit(void)
{
	__u32 tid = current_tid();
	struct esr_task *task = tracked_task(tid);

	if (task)
		untrack(tid, task);
	return 0;
}

SEC("tp/sched/sched_process_exit")
int untrack_exit(void *ctx)
{
	return on_exit();
}

SEC("raw_tp/sched_process_exit")
int untrack_exit_raw(void *ctx)
{
	return on_exit();
}
