// SPDX-License-Identifier: GPL-2.0
/* Session membership: a tracked thread's children join its session at fork,
 * before they can run, and leave the map when they exit. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "session.bpf.h"

char LICENSE[] SEC("license") = "GPL";

SEC("tp/sched/sched_process_fork")
int track_fork(struct trace_event_raw_sched_process_fork *ctx)
{
	__u32 parent_tid = current_tid();
	struct esr_task *parent = bpf_map_lookup_elem(&tracked_tasks, &parent_tid);
	struct esr_session_state *state;
	struct esr_task child = {};
	__u32 child_tid;

	if (!parent)
		return 0;
	state = session_state(parent->session);
	if (!state)
		return 0;
	child.session = parent->session;
	/* An anchor's child that never execs is sshd's session process, which
	 * relays the user's terminal. */
	child.flags = parent->flags & ESR_TASK_ANCHOR ? ESR_TASK_ANCHOR_CHILD | ESR_TASK_TERMINAL : 0;
	child_tid = ctx->child_pid;
	/* While an upgrade replaces the programs, the old and the new
	 * track_fork both run for a moment: the second must not count the
	 * child again. An entry of another session is a thread whose exit was
	 * missed, whose id is reused: replaced. */
	if (bpf_map_update_elem(&tracked_tasks, &child_tid, &child, BPF_NOEXIST)) {
		struct esr_task *known = bpf_map_lookup_elem(&tracked_tasks, &child_tid);

		if (known && known->session == child.session)
			return 0;
		if (bpf_map_update_elem(&tracked_tasks, &child_tid, &child, BPF_ANY)) {
			__sync_fetch_and_add(&state->untracked_forks, 1);
			return 0;
		}
	}
	__sync_fetch_and_add(&state->live_tasks, 1);
	return 0;
}

SEC("tp/sched/sched_process_exit")
int untrack_exit(void *ctx)
{
	__u32 tid = current_tid();
	struct esr_task *task = bpf_map_lookup_elem(&tracked_tasks, &tid);

	if (task)
		untrack(tid, task);
	return 0;
}
