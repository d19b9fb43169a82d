// SPDX-License-Identifier: GPL-2.0
/* session.disk: open, openat, openat2 and creat of a recorded thread.
 *
 * Entry stashes the path pointer and flags; exit reads the path (the kernel
 * has just copied it, so it is resident) and reports it with the result.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "session.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define O_WRONLY 01
#define O_CREAT 0100
#define O_TRUNC 01000

struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} disk_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct esr_disk_event);
} disk_scratch SEC(".maps");

struct open_in_flight {
	__u64 session;
	const char *path;
	__s32 flags;
};

/* One entry per recorded thread inside an open call; sized like
 * tracked_tasks. LRU: a thread whose session ended inside the call never
 * comes back for its entry. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct open_in_flight);
} open_in_flight SEC(".maps");

static __always_inline int stash_open(const char *path, __s32 flags)
{
	struct open_in_flight call = { .path = path, .flags = flags };
	__u32 tid = current_tid();

	call.session = recorded_session();
	if (!call.session)
		return 0;
	bpf_map_update_elem(&open_in_flight, &tid, &call, BPF_ANY);
	return 0;
}

static __always_inline int report_open(struct trace_event_raw_sys_exit *ctx)
{
	__u32 tid = current_tid(), zero = 0;
	struct open_in_flight *call = in_flight(&open_in_flight, &tid);
	struct esr_disk_event *e;
	__u64 len;
	long n;

	if (!call)
		return 0;
	e = bpf_map_lookup_elem(&disk_scratch, &zero);
	if (e) {
		fill_header(&e->hdr, call->session, ESR_EVENT_DISK);
		e->flags = call->flags;
		e->return_code = ctx->ret;
		n = bpf_probe_read_user_str(e->path, sizeof(e->path), call->path);
		len = n > 0 ? n : 0;
		if (len > sizeof(e->path))
			len = sizeof(e->path);
		e->path_len = len;
		e->path_truncated = len == sizeof(e->path);
		emit(ctx, &disk_events, ESR_BUF_DISK, call->session, e,
		     offsetof(struct esr_disk_event, path) + len);
	}
	bpf_map_delete_elem(&open_in_flight, &tid);
	return 0;
}

SEC("tp/syscalls/sys_enter_open")
int open_enter(struct trace_event_raw_sys_enter *ctx)
{
	return stash_open((const char *)ctx->args[0], ctx->args[1]);
}

SEC("tp/syscalls/sys_enter_openat")
int openat_enter(struct trace_event_raw_sys_enter *ctx)
{
	return stash_open((const char *)ctx->args[1], ctx->args[2]);
}

SEC("tp/syscalls/sys_enter_openat2")
int openat2_enter(struct trace_event_raw_sys_enter *ctx)
{
	struct open_how how = {};

	bpf_probe_read_user(&how, sizeof(how.flags), (void *)ctx->args[2]);
	return stash_open((const char *)ctx->args[1], how.flags);
}

SEC("tp/syscalls/sys_enter_creat")
int creat_enter(struct trace_event_raw_sys_enter *ctx)
{
	return stash_open((const char *)ctx->args[0], O_CREAT | O_WRONLY | O_TRUNC);
}

SEC("tp/syscalls/sys_exit_open")
int open_exit(struct trace_event_raw_sys_exit *ctx)
{
	return report_open(ctx);
}

SEC("tp/syscalls/sys_exit_openat")
int openat_exit(struct trace_event_raw_sys_exit *ctx)
{
	return report_open(ctx);
}

SEC("tp/syscalls/sys_exit_openat2")
int openat2_exit(struct trace_event_raw_sys_exit *ctx)
{
	return report_open(ctx);
}

SEC("tp/syscalls/sys_exit_creat")
int creat_exit(struct trace_event_raw_sys_exit *ctx)
{
	return report_open(ctx);
}
