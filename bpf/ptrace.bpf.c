// SPDX-License-Identifier: GPL-2.0
/* session.ptrace: a recorded thread attaching to another process, or
 * writing its memory, the way a debugger injects code into it.
 *
 * Each call is reported at its exit, with its result. After a successful
 * attach, the tracee the kernel has just put first in the tracer's ptraced
 * list is the target, named by its global ids whatever pid namespace the
 * tracer sees. A target in no session joins the tracer's, so that what the
 * tracer makes it do is recorded, until the tracer detaches from it or it
 * exits. The target of process_vm_writev joins too, once written, when the
 * caller names it in the host's pid namespace.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "session.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define PTRACE_ATTACH 16
#define PTRACE_DETACH 17
#define PTRACE_SEIZE 0x4206

/* Shared with exec.bpf.c, which defines it the same way. */
struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} command_events __weak SEC(".maps");

struct ptrace_call {
	__u64 session;
	__u32 target;	/* as the caller named it */
	__u16 request;	/* enum esr_ptrace_request */
};

/* Calls in flight, by thread id. They are rare: a small LRU map. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct ptrace_call);
} ptrace_in_flight SEC(".maps");

static __always_inline int stash(__u16 request, __u32 target)
{
	struct ptrace_call call = { .request = request, .target = target };
	__u32 tid = current_tid();

	call.session = recorded_session();
	if (call.session)
		bpf_map_update_elem(&ptrace_in_flight, &tid, &call, BPF_ANY);
	return 0;
}

/* Whether the current thread sees the host's pid numbers. */
static __always_inline bool in_host_pid_namespace(void)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();

	return BPF_CORE_READ(task, thread_pid, level) == 0;
}

/* Record tid in session, unless it is recorded already (here, in another
 * session, or as an anchor). Returns whether it joined. */
static __always_inline bool follow(__u32 tid, __u64 session)
{
	struct esr_task task = { .session = session, .flags = ESR_TASK_TRACED };
	struct esr_session_state *state = session_state(session);

	if (!state || tracked_task(tid))
		return false;
	if (state->live_tasks >= tasks_per_session || track(tid, &task)) {
		__sync_fetch_and_add(&state->untracked_forks, 1);
		return false;
	}
	__sync_fetch_and_add(&state->live_tasks, 1);
	return true;
}

/* Take tid out of session if it joined it by being traced. */
static __always_inline bool leave(__u32 tid, __u64 session)
{
	struct esr_task *task = tracked_task(tid);

	if (!task || !(task->flags & ESR_TASK_TRACED) || task->session != session)
		return false;
	untrack(tid, task);
	return true;
}

static __always_inline int report(void *ctx, long ret)
{
	struct task_struct *me = (struct task_struct *)bpf_get_current_task();
	struct esr_ptrace_event e = {};
	struct task_struct *target;
	struct ptrace_call call;
	struct list_head *first;
	__u32 tid = current_tid();
	struct ptrace_call *stashed = in_flight(&ptrace_in_flight, &tid);

	if (!stashed)
		return 0;
	call = *stashed;
	bpf_map_delete_elem(&ptrace_in_flight, &tid);

	fill_header(&e.hdr, call.session, ESR_EVENT_PTRACE);
	e.return_code = ret;
	e.request = call.request;
	e.target_pid = call.target;
	e.flags = ESR_PTRACE_AS_NAMED;
	if (call.request == ESR_PTRACE_ATTACH || call.request == ESR_PTRACE_SEIZE) {
		first = BPF_CORE_READ(me, ptraced.next);
		if (!ret && first != (void *)me + bpf_core_field_offset(struct task_struct, ptraced)) {
			target = (void *)first - bpf_core_field_offset(struct task_struct, ptrace_entry);
			e.target_pid = BPF_CORE_READ(target, pid);
			e.target_tgid = BPF_CORE_READ(target, tgid);
			BPF_CORE_READ_STR_INTO(&e.target_comm, target, comm);
			e.flags = follow(e.target_pid, call.session) ? ESR_PTRACE_FOLLOWED : 0;
		}
	} else if (in_host_pid_namespace()) {
		e.flags = 0;
		if (call.request == ESR_PTRACE_DETACH && !ret && leave(call.target, call.session))
			e.flags = ESR_PTRACE_LEFT;
		else if (call.request == ESR_PTRACE_VM_WRITE && ret > 0 &&
			 follow(call.target, call.session))
			e.flags = ESR_PTRACE_FOLLOWED;
	}
	emit(ctx, &command_events, ESR_BUF_COMMAND, call.session, &e, sizeof(e));
	return 0;
}

SEC("tp/syscalls/sys_enter_ptrace")
int ptrace_enter(struct trace_event_raw_sys_enter *ctx)
{
	switch (ctx->args[0]) {
	case PTRACE_ATTACH:
		return stash(ESR_PTRACE_ATTACH, ctx->args[1]);
	case PTRACE_SEIZE:
		return stash(ESR_PTRACE_SEIZE, ctx->args[1]);
	case PTRACE_DETACH:
		return stash(ESR_PTRACE_DETACH, ctx->args[1]);
	}
	return 0;
}

SEC("tp/syscalls/sys_exit_ptrace")
int ptrace_exit(struct trace_event_raw_sys_exit *ctx)
{
	return report(ctx, ctx->ret);
}

SEC("tp/syscalls/sys_enter_process_vm_writev")
int vm_write_enter(struct trace_event_raw_sys_enter *ctx)
{
	return stash(ESR_PTRACE_VM_WRITE, ctx->args[0]);
}

SEC("tp/syscalls/sys_exit_process_vm_writev")
int vm_write_exit(struct trace_event_raw_sys_exit *ctx)
{
	return report(ctx, ctx->ret);
}
