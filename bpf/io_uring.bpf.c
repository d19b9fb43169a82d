// SPDX-License-Identifier: GPL-2.0
/* session.io_uring: the rings a session sets up, and the kinds of operation
 * they run.
 *
 * An io_uring's operations (openat, connect, ...) bypass the syscall
 * tracepoints every other record comes from, and its tracepoints carry the
 * opcode but not what it acts on. So a session's ring is noted when it is
 * created (io_uring_create, in its creator's context), and each kind of
 * operation is reported the first time the ring takes it, whichever thread
 * submits it: a ring's SQPOLL kernel thread is no session member.
 *
 * The submit tracepoint is io_uring_submit_req since 6.0 and
 * io_uring_submit_sqe before; user space loads the one the kernel has, or
 * neither where io_uring is not built in.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "session.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* Shared with exec.bpf.c, which defines it the same way. */
struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} command_events __weak SEC(".maps");

struct ring {
	__u64 session;
	__u32 fd;
	__u32 pid;
	__u64 opcodes_seen[4];	/* a bit per IORING_OP_* (a __u8) */
};

/* A session's rings, by their kernel context. There is no tracepoint when a
 * ring is freed: LRU, and a context created again (its memory reused by
 * another ring) is dropped at its creation. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct ring);
} rings SEC(".maps");

/* Whether a session ever set up a ring: until then, io_uring on the rest
 * of the host costs no lookup. A map, not a global: programs loaded again
 * over the pinned maps share it with those attached. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} rings_seen SEC(".maps");

static __always_inline bool any_ring_seen(void)
{
	__u32 zero = 0;
	__u64 *seen = bpf_map_lookup_elem(&rings_seen, &zero);

	return seen && *seen;
}

/* The tracepoint before 6.0; its other fields changed over the versions. */
struct trace_event_raw_io_uring_submit_sqe___old {
	void *ctx;
	u8 opcode;
} __attribute__((preserve_access_index));

static __always_inline void report(void *ctx, struct ring *ring, __u8 setup, __u8 opcode,
				   __u32 sq_entries, __u32 flags)
{
	struct esr_io_uring_event e = {};

	fill_header(&e.hdr, ring->session, ESR_EVENT_IO_URING);
	e.ring_fd = ring->fd;
	e.ring_pid = ring->pid;
	e.sq_entries = sq_entries;
	e.setup_flags = flags;
	e.setup = setup;
	e.opcode = opcode;
	emit(ctx, &command_events, ESR_BUF_COMMAND, ring->session, &e, sizeof(e));
}

SEC("tp/io_uring/io_uring_create")
int io_uring_created(struct trace_event_raw_io_uring_create *ctx)
{
	__u64 key = (__u64)ctx->ctx;
	struct ring ring = {};

	ring.session = recorded_session();
	if (!ring.session) {
		if (any_ring_seen())
			bpf_map_delete_elem(&rings, &key);
		return 0;
	}
	ring.fd = ctx->fd;
	ring.pid = bpf_get_current_pid_tgid() >> 32;
	bpf_map_update_elem(&rings, &key, &ring, BPF_ANY);
	if (!any_ring_seen()) {
		__u32 zero = 0;
		__u64 seen = 1;

		bpf_map_update_elem(&rings_seen, &zero, &seen, BPF_ANY);
	}
	report(ctx, &ring, 1, 0, ctx->sq_entries, ctx->flags);
	return 0;
}

static __always_inline int submitted(void *ctx, __u64 key, __u8 opcode)
{
	struct ring *ring;
	__u64 bit = 1ULL << (opcode & 63);
	__u32 word = (opcode >> 6) & 3;

	if (!any_ring_seen())
		return 0;
	ring = bpf_map_lookup_elem(&rings, &key);
	if (!ring || (ring->opcodes_seen[word] & bit))
		return 0;
	/* Two CPUs taking a new kind at once may both report it. */
	ring->opcodes_seen[word] |= bit;
	report(ctx, ring, 0, opcode, 0, 0);
	return 0;
}

SEC("tp/io_uring/io_uring_submit_req")
int io_uring_submit_req(struct trace_event_raw_io_uring_submit_req *ctx)
{
	return submitted(ctx, (__u64)ctx->ctx, ctx->opcode);
}

SEC("tp/io_uring/io_uring_submit_sqe")
int io_uring_submit_sqe(struct trace_event_raw_io_uring_submit_sqe___old *ctx)
{
	return submitted(ctx, (__u64)ctx->ctx, ctx->opcode);
}
