/* Session membership, shared by every esr BPF program.
 *
 * The maps are declared __weak so that each *.bpf.c can include this header
 * and the static linker keeps one copy of each in esr.bpf.o.
 */
#ifndef ESR_SESSION_BPF_H
#define ESR_SESSION_BPF_H

#include <bpf/bpf_core_read.h>
#include "esr_events.h"

/* Thread id -> session; sized by user space from the config. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct esr_task);
} tracked_tasks __weak SEC(".maps");

/* One byte per thread id, non-zero while the thread may be in tracked_tasks:
 * every hook asks it first, so a thread outside every session costs one
 * array read (inlined by the verifier) instead of a hash lookup. Set before
 * a thread enters tracked_tasks, cleared after it leaves. Sized by user
 * space to pid_max; an id beyond it (pid_max raised since) takes the hash
 * lookup. Mapped by user space, which tracks the threads it adds. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, 4096);
	__uint(map_flags, BPF_F_MMAPABLE);
} tid_marks __weak SEC(".maps");

/* Set before load (session.bpf.c): tid_marks' value size, and the most
 * threads one session may have tracked at once. */
extern const volatile __u32 tid_marks_size;
extern const volatile __s64 tasks_per_session;

/* Slot -> session state; mapped by user space, which reads the counters in place. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct esr_session_state);
} session_states __weak SEC(".maps");

/* Records lost per buffer, whatever their session. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ESR_BUF_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} buffer_lost __weak SEC(".maps");

static __always_inline __u32 current_tid(void)
{
	return (__u32)bpf_get_current_pid_tgid();
}

/* The state of a live session, or NULL when the cookie is stale. */
static __always_inline struct esr_session_state *session_state(__u64 session)
{
	__u32 slot = (__u32)session;
	struct esr_session_state *state = bpf_map_lookup_elem(&session_states, &slot);

	if (!state || state->session != session)
		return NULL;
	return state;
}

/* tid's byte of tid_marks, or NULL beyond them. */
static __always_inline __u8 *mark_of(__u32 tid)
{
	__u32 zero = 0;
	__u8 *marks = bpf_map_lookup_elem(&tid_marks, &zero);
	__u64 i = tid, size = tid_marks_size;

	if (!marks)
		return NULL;
	/* The index first, the size second: before 6.8 the verifier only
	 * decides a comparison from its right-hand side's known value, and
	 * clang, left to itself, may put the size on the left. Then a tid
	 * checked twice (tracked_task, then track) leaves the second check a
	 * branch the verifier still walks with impossible bounds, and
	 * marks + i loses its pointer type there (5.10, 6.1). */
	asm goto("if %[i] >= %[size] goto %l[beyond]" : : [i] "r"(i), [size] "r"(size) : : beyond);
	/* Index with the register just compared: the verifier proves the
	 * bound on it, not on a copy clang might make before the compare. */
	barrier_var(i);
	return marks + i;
beyond:
	return NULL;
}

/* Whether tid may be tracked: false for (almost) every thread outside a
 * session, at the cost of one array read. */
static __always_inline bool maybe_tracked(__u32 tid)
{
	__u8 *mark = mark_of(tid);

	return !mark || *mark;
}

static __always_inline void mark(__u32 tid, __u8 value)
{
	__u8 *mark = mark_of(tid);

	if (mark)
		*mark = value;
}

/* tid's membership, or NULL. */
static __always_inline struct esr_task *tracked_task(__u32 tid)
{
	if (!maybe_tracked(tid))
		return NULL;
	return bpf_map_lookup_elem(&tracked_tasks, &tid);
}

/* tid's entry in a per-thread map of calls in flight, which only threads
 * that may be tracked have. */
static __always_inline void *in_flight(void *map, __u32 *tid)
{
	if (!maybe_tracked(*tid))
		return NULL;
	return bpf_map_lookup_elem(map, tid);
}

/* Add tid to tracked_tasks; 0, or the map's error. */
static __always_inline long track(__u32 tid, struct esr_task *task)
{
	long err;

	mark(tid, 1);
	err = bpf_map_update_elem(&tracked_tasks, &tid, task, BPF_ANY);
	if (err)
		mark(tid, 0);
	return err;
}

/* Forget a tracked thread; it no longer counts as alive in its session. */
static __always_inline void untrack(__u32 tid, struct esr_task *task)
{
	struct esr_session_state *state = session_state(task->session);

	if (state && !(task->flags & ESR_TASK_ANCHOR))
		__sync_fetch_and_add(&state->live_tasks, -1);
	bpf_map_delete_elem(&tracked_tasks, &tid);
	mark(tid, 0);
}

/* The session the current thread is recorded in, or 0. */
static __always_inline __u64 recorded_session(void)
{
	struct esr_task *task = tracked_task(current_tid());

	if (!task || (task->flags & ESR_TASK_ANCHOR))
		return 0;
	return task->session;
}

/* The membership of a thread that has just exec'd, or NULL. A non-leader
 * thread that execs takes over the leader's pid, and the leader's exit has
 * already removed that pid from the map: carry the membership over to it. */
static __always_inline struct esr_task *task_after_exec(__u32 old_tid, __u32 new_tid)
{
	struct esr_task *task = tracked_task(old_tid);

	if (!task || old_tid == new_tid)
		return task;
	if (track(new_tid, task))
		return NULL;
	bpf_map_delete_elem(&tracked_tasks, &old_tid);
	mark(old_tid, 0);
	return bpf_map_lookup_elem(&tracked_tasks, &new_tid);
}

static __always_inline void fill_header(struct esr_event_header *hdr, __u64 session, __u16 type)
{
	hdr->ts_boot_ns = bpf_ktime_get_boot_ns();
	hdr->session = session;
	hdr->cgroup_id = bpf_get_current_cgroup_id();
	hdr->pid = bpf_get_current_pid_tgid() >> 32;
	hdr->type = type;
	hdr->reserved = 0;
	bpf_get_current_comm(hdr->comm, sizeof(hdr->comm));
}

/* Send a record; a full buffer is counted against the buffer and the
 * session. Returns whether it was sent. */
static __always_inline bool emit(void *ctx, void *events, __u32 buffer, __u64 session,
				 void *record, __u64 size)
{
	struct esr_session_state *state;
	__u64 *lost;

	if (!bpf_perf_event_output(ctx, events, BPF_F_CURRENT_CPU, record, size))
		return true;
	lost = bpf_map_lookup_elem(&buffer_lost, &buffer);
	if (lost)
		*lost += 1;
	state = session_state(session);
	if (state && buffer < ESR_BUF_COUNT)
		__sync_fetch_and_add(&state->lost[buffer], 1);
	return false;
}

/* The file open at fd in the current task, or NULL. */
static __always_inline struct file *file_of_fd(int fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *file = NULL;

	if (fd < 0 || fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]);
	return file;
}

#endif /* ESR_SESSION_BPF_H */
