// SPDX-License-Identifier: GPL-2.0
/* session.terminal: what the user saw, on the clock of the session's commands.
 *
 * The stream is what the owner of the session's pty master reads from it:
 * what the programs printed, after the line discipline, echo included. A
 * task flagged ESR_TASK_TERMINAL owns it: sshd's session process, or
 * `esr run` relaying its command's pty. What the owner writes to the master
 * is the keystrokes, recorded only when asked and never while the
 * terminal's ECHO is off (a password prompt). Writes by session processes
 * to a terminal are recorded too, without their bytes: who printed what.
 *
 * Output beyond the session's budget is skipped and counted, so that a
 * flood (`yes`, a 10 GB cat) can't flood the host: recorded + skipped +
 * lost is every byte the stream carried.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "session.bpf.h"

#define ECHO 0000010
#define MKDEV(major, minor) (((major) << 20) | (minor))
#define TTY_MAJOR 4
#define TTYAUX_MAJOR 5
#define PTS_MAJOR_FIRST 136
#define PTS_MAJOR_LAST 143
/* A read of a master returns a few KiB; more than this is counted lost. */
#define MAX_CHUNKS 16

/* Set before load from the config. */
const volatile bool record_input = false;
const volatile __u64 budget_rate = 0;	/* output bytes per second; 0: no budget */
const volatile __u64 budget_burst = 0;	/* bytes the budget holds when full */
const volatile __u64 budget_fill_ns = 0;	/* how long an empty budget takes to fill */

struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} terminal_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct esr_terminal_data_event);
} terminal_scratch SEC(".maps");

/* A read or write of a terminal in flight. */
struct terminal_call {
	__u64 session;
	const char *buf;
	struct tty_struct *tty;
	__u16 type;	/* the record it makes: enum esr_event_type */
};

/* Thread id -> its call; sized like tracked_tasks. LRU: a thread whose
 * session ended inside the call never comes back for its entry. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct terminal_call);
} terminal_in_flight SEC(".maps");

struct terminal_key {
	__u64 session;
	__u64 tty;
};

struct terminal_size {
	__u16 rows;
	__u16 cols;
};

/* The size last reported for a session's terminal. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct terminal_key);
	__type(value, struct terminal_size);
} terminal_sizes SEC(".maps");

static __always_inline __u32 rdev_of(struct file *file)
{
	return BPF_CORE_READ(file, f_inode, i_rdev);
}

/* The tty behind a file of a terminal device (a pty's either end, /dev/tty). */
static __always_inline struct tty_struct *tty_of(struct file *file)
{
	struct tty_file_private *priv = BPF_CORE_READ(file, private_data);

	return BPF_CORE_READ(priv, tty);
}

/* A terminal a program prints to; /dev/ptmx, the other end, is not one. */
static __always_inline bool is_terminal(__u32 rdev)
{
	__u32 major = rdev >> 20;

	return (major >= PTS_MAJOR_FIRST && major <= PTS_MAJOR_LAST) || major == TTY_MAJOR ||
	       rdev == MKDEV(TTYAUX_MAJOR, 0) || rdev == MKDEV(TTYAUX_MAJOR, 1);
}

static __always_inline void stash(__u64 session, const char *buf, struct tty_struct *tty,
				  __u16 type)
{
	struct terminal_call call = { .session = session, .buf = buf, .tty = tty, .type = type };
	__u32 tid = current_tid();

	bpf_map_update_elem(&terminal_in_flight, &tid, &call, BPF_ANY);
}

/* Whether the keystrokes the owner writes now would be echoed. */
static __always_inline bool echoing(struct tty_struct *master)
{
	return BPF_CORE_READ(master, link, termios.c_lflag) & ECHO;
}

static __always_inline int enter_read(int fd, const char *buf)
{
	__u32 tid = current_tid();
	struct esr_task *task = tracked_task(tid);
	struct file *file;

	if (!task || !(task->flags & ESR_TASK_TERMINAL))
		return 0;
	file = file_of_fd(fd);
	if (!file || rdev_of(file) != MKDEV(TTYAUX_MAJOR, 2))
		return 0;
	stash(task->session, buf, tty_of(file), ESR_EVENT_TERMINAL_OUTPUT);
	return 0;
}

static __always_inline int enter_write(int fd, const char *buf)
{
	__u32 tid = current_tid();
	struct esr_task *task = tracked_task(tid);
	struct file *file;
	__u32 rdev;

	if (!task)
		return 0;
	file = file_of_fd(fd);
	if (!file)
		return 0;
	rdev = rdev_of(file);
	if (rdev == MKDEV(TTYAUX_MAJOR, 2)) {
		struct tty_struct *master = tty_of(file);

		if ((task->flags & ESR_TASK_TERMINAL) && record_input && echoing(master))
			stash(task->session, buf, master, ESR_EVENT_TERMINAL_INPUT);
	} else if (!(task->flags & ESR_TASK_ANCHOR) && is_terminal(rdev)) {
		stash(task->session, buf, tty_of(file), ESR_EVENT_TERMINAL_WRITE);
	}
	return 0;
}

/* Whether len more output bytes fit in the session's budget, which refills
 * at budget_rate up to budget_burst. */
static __always_inline bool within_budget(struct esr_terminal_counts *t, __u64 len)
{
	__u64 now = bpf_ktime_get_ns(), tokens = t->tokens, elapsed = now - t->refilled_ns;

	if (!budget_rate)
		return true;
	if (!t->refilled_ns || elapsed >= budget_fill_ns)
		tokens = budget_burst;
	else
		tokens += elapsed * budget_rate / 1000000000;	/* < burst * 1e9: no overflow */
	if (tokens > budget_burst)
		tokens = budget_burst;
	t->refilled_ns = now;
	if (tokens < len) {
		t->tokens = tokens;
		return false;
	}
	t->tokens = tokens - len;
	return true;
}

static __always_inline void report_size(void *ctx, struct terminal_call *call, __u32 tty)
{
	struct tty_struct *master = call->tty;
	struct terminal_key key = { .session = call->session, .tty = (__u64)master };
	struct esr_terminal_resize_event e = {};
	struct terminal_size size = {}, *last;

	/* The size is the slave's: resizing either end sets only the slave's. */
	size.rows = BPF_CORE_READ(master, link, winsize.ws_row);
	size.cols = BPF_CORE_READ(master, link, winsize.ws_col);
	last = bpf_map_lookup_elem(&terminal_sizes, &key);
	if (last && last->rows == size.rows && last->cols == size.cols)
		return;
	bpf_map_update_elem(&terminal_sizes, &key, &size, BPF_ANY);
	fill_header(&e.hdr, call->session, ESR_EVENT_TERMINAL_RESIZE);
	e.tty = tty;
	e.rows = size.rows;
	e.cols = size.cols;
	emit(ctx, &terminal_events, ESR_BUF_TERMINAL, call->session, &e, sizeof(e));
}

/* The bytes of a read or write, in chunks; counted as sent or lost. */
static __always_inline void send_data(void *ctx, struct terminal_call *call, __u32 tty,
				      __u64 len, struct esr_terminal_counts *t)
{
	__u32 zero = 0;
	struct esr_terminal_data_event *e = bpf_map_lookup_elem(&terminal_scratch, &zero);
	__u64 off, n;
	__u32 i;

	if (!e) {
		__sync_fetch_and_add(&t->lost, len);
		return;
	}
	fill_header(&e->hdr, call->session, call->type);
	e->tty = tty;
	/* A running total: the bytes skipped before a record are the
	 * difference from the previous record's. */
	e->skipped = t->skipped;
	/* Nothing but i is carried from one chunk to the next: a running sum
	 * reaches the loop's head in two shapes per chunk (a full chunk, or
	 * the rest), which the verifier walks in every combination: four
	 * seconds of each load, for the four programs that send data. */
	for (i = 0; i < MAX_CHUNKS; i++) {
		off = (__u64)i * ESR_TERMINAL_CHUNK;
		if (off >= len)
			break;
		n = len - off;
		/* min(n, chunk) with the constant on the right, where kernels
		 * before 6.8 bound n from; clang, left to itself, compares a
		 * copy with the constant on the left (6.1 then refuses n). */
		asm volatile("if %[n] <= %[max] goto +1\n\t%[n] = %[max]"
			     : [n] "+r"(n)
			     : [max] "i"(ESR_TERMINAL_CHUNK));
		if (bpf_probe_read_user(e->data, n, call->buf + off))
			break;
		e->len = n;
		if (emit(ctx, &terminal_events, ESR_BUF_TERMINAL, call->session, e,
			 offsetof(struct esr_terminal_data_event, data) + n))
			__sync_fetch_and_add(call->type == ESR_EVENT_TERMINAL_INPUT ? &t->input
										: &t->recorded, n);
		else
			__sync_fetch_and_add(&t->lost, n);
	}
	off = (__u64)i * ESR_TERMINAL_CHUNK;	/* sent, whole chunks up to the last */
	if (off < len)
		__sync_fetch_and_add(&t->lost, len - off);
}

static __always_inline int exit_call(void *ctx, long ret)
{
	__u32 tid = current_tid();
	struct terminal_call *call = in_flight(&terminal_in_flight, &tid);
	struct esr_session_state *state;
	struct esr_terminal_counts *t;
	struct tty_struct *tty_struct;
	__u32 tty;

	if (!call)
		return 0;
	state = session_state(call->session);
	if (!state || ret <= 0)
		goto done;
	t = &state->terminal;
	tty_struct = call->tty;
	tty = BPF_CORE_READ(tty_struct, index);
	if (call->type == ESR_EVENT_TERMINAL_WRITE) {
		struct esr_terminal_write_event e = {};

		fill_header(&e.hdr, call->session, ESR_EVENT_TERMINAL_WRITE);
		e.tty = tty;
		e.major = BPF_CORE_READ(tty_struct, driver, major);
		e.bytes = ret;
		emit(ctx, &terminal_events, ESR_BUF_TERMINAL, call->session, &e, sizeof(e));
		goto done;
	}
	if (call->type == ESR_EVENT_TERMINAL_OUTPUT) {
		report_size(ctx, call, tty);
		if (!within_budget(t, ret)) {
			__sync_fetch_and_add(&t->skipped, ret);
			goto done;
		}
	}
	send_data(ctx, call, tty, ret, t);
done:
	bpf_map_delete_elem(&terminal_in_flight, &tid);
	return 0;
}

SEC("tp/syscalls/sys_enter_read")
int terminal_read_enter(struct trace_event_raw_sys_enter *ctx)
{
	return enter_read(ctx->args[0], (const char *)ctx->args[1]);
}

SEC("tp/syscalls/sys_exit_read")
int terminal_read_exit(struct trace_event_raw_sys_exit *ctx)
{
	return exit_call(ctx, ctx->ret);
}

SEC("tp/syscalls/sys_enter_write")
int terminal_write_enter(struct trace_event_raw_sys_enter *ctx)
{
	return enter_write(ctx->args[0], (const char *)ctx->args[1]);
}

SEC("tp/syscalls/sys_exit_write")
int terminal_write_exit(struct trace_event_raw_sys_exit *ctx)
{
	return exit_call(ctx, ctx->ret);
}

/* Who printed what, through the other write calls; their bytes are in the
 * stream the owner reads. */
static __always_inline int enter_printing(int fd)
{
	__u32 tid = current_tid();
	struct esr_task *task = tracked_task(tid);
	struct file *file;

	if (!task || (task->flags & ESR_TASK_ANCHOR))
		return 0;
	file = file_of_fd(fd);
	if (file && is_terminal(rdev_of(file)))
		stash(task->session, NULL, tty_of(file), ESR_EVENT_TERMINAL_WRITE);
	return 0;
}

SEC("tp/syscalls/sys_enter_writev")
int terminal_writev_enter(struct trace_event_raw_sys_enter *ctx)
{
	return enter_printing(ctx->args[0]);
}

SEC("tp/syscalls/sys_exit_writev")
int terminal_writev_exit(struct trace_event_raw_sys_exit *ctx)
{
	return exit_call(ctx, ctx->ret);
}

SEC("tp/syscalls/sys_enter_pwrite64")
int terminal_pwrite_enter(struct trace_event_raw_sys_enter *ctx)
{
	return enter_printing(ctx->args[0]);
}

SEC("tp/syscalls/sys_exit_pwrite64")
int terminal_pwrite_exit(struct trace_event_raw_sys_exit *ctx)
{
	return exit_call(ctx, ctx->ret);
}
