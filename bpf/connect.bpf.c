// SPDX-License-Identifier: GPL-2.0
/* session.network: TCP connects over IPv4 and IPv6, failed ones included.
 *
 * sys_enter_connect notes the socket and the destination. The socket's
 * state changes into and out of SYN_SENT add the source. The result is the
 * syscall's return value, or, for a non-blocking connect, the state the
 * socket leaves SYN_SENT for: ESTABLISHED, or closed with sk_err.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "session.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define EINPROGRESS 115

struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} network_events SEC(".maps");

struct connect_attempt {
	struct esr_network_event event;
	__u8 syscall_returned;	/* connect() returned -EINPROGRESS */
	__u8 finished;		/* the socket left SYN_SENT */
	__s32 outcome;		/* 0 or -errno, once finished */
};

/* Socket -> attempt, from connect() entry until its outcome is reported. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct connect_attempt);
} connect_attempts SEC(".maps");

/* connect_attempts' entries: while there are none, the state changes of
 * every other TCP socket on the host need no lookup. A map, not a global:
 * programs loaded again over the pinned maps share it with those attached. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} connects_pending SEC(".maps");

static __always_inline void count_pending(__s64 delta)
{
	__u32 zero = 0;
	__u64 *pending = bpf_map_lookup_elem(&connects_pending, &zero);

	if (pending)
		__sync_fetch_and_add(pending, delta);
}

/* Thread -> socket of the connect() it is inside. LRU: a thread whose
 * session ended inside connect() never comes back for its entry. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u64);
} connect_in_flight SEC(".maps");

static __always_inline struct sock *tcp_sock_of_fd(int fd)
{
	struct file *file = file_of_fd(fd);
	struct socket *sock;
	struct sock *sk;

	if (!file || (BPF_CORE_READ(file, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return NULL;
	sock = BPF_CORE_READ(file, private_data);
	sk = BPF_CORE_READ(sock, sk);
	if (!sk || BPF_CORE_READ(sk, sk_type) != SOCK_STREAM ||
	    BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return NULL;
	return sk;
}

static __always_inline void forget_attempt(__u64 *sk)
{
	if (!bpf_map_delete_elem(&connect_attempts, sk))
		count_pending(-1);
}

static __always_inline void report(void *ctx, struct connect_attempt *attempt, __s32 result)
{
	struct esr_network_event *e = &attempt->event;

	e->hdr.ts_boot_ns = bpf_ktime_get_boot_ns();
	e->return_code = result;
	emit(ctx, &network_events, ESR_BUF_NETWORK, e->hdr.session, e, sizeof(*e));
}

SEC("tp/syscalls/sys_enter_connect")
int connect_enter(struct trace_event_raw_sys_enter *ctx)
{
	__u64 session = recorded_session();
	const void *uaddr = (const void *)ctx->args[1];
	struct connect_attempt attempt = {};
	struct esr_network_event *e = &attempt.event;
	__u32 tid = current_tid();
	__u16 family = 0, port = 0;
	struct sock *sk;
	__u64 key;

	if (!session)
		return 0;
	if (bpf_probe_read_user(&family, sizeof(family), uaddr))
		return 0;
	if (family != AF_INET && family != AF_INET6)
		return 0;
	sk = tcp_sock_of_fd(ctx->args[0]);
	if (!sk)
		return 0;

	fill_header(&e->hdr, session, ESR_EVENT_NETWORK);
	e->family = family;
	if (family == AF_INET) {
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

	key = (__u64)sk;
	/* A repeated connect() on a socket still connecting only polls it. */
	if (bpf_map_update_elem(&connect_attempts, &key, &attempt, BPF_NOEXIST))
		return 0;
	count_pending(1);
	bpf_map_update_elem(&connect_in_flight, &tid, &key, BPF_ANY);
	return 0;
}

SEC("tp/syscalls/sys_exit_connect")
int connect_exit(struct trace_event_raw_sys_exit *ctx)
{
	__u32 tid = current_tid();
	__u64 *key = in_flight(&connect_in_flight, &tid);
	struct connect_attempt *attempt;
	__u64 sk;

	if (!key)
		return 0;
	sk = *key;
	bpf_map_delete_elem(&connect_in_flight, &tid);
	attempt = bpf_map_lookup_elem(&connect_attempts, &sk);
	if (!attempt)
		return 0;
	if (ctx->ret == -EINPROGRESS && !attempt->finished) {
		attempt->syscall_returned = 1;
		return 0;
	}
	report(ctx, attempt, ctx->ret == -EINPROGRESS ? attempt->outcome : ctx->ret);
	forget_attempt(&sk);
	return 0;
}

SEC("tp/sock/inet_sock_set_state")
int connect_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	__u64 sk = (__u64)ctx->skaddr;
	struct connect_attempt *attempt;
	__u32 zero = 0;
	__u64 *pending;
	int err;

	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	if (ctx->newstate != TCP_SYN_SENT && ctx->oldstate != TCP_SYN_SENT)
		return 0;
	pending = bpf_map_lookup_elem(&connects_pending, &zero);
	if (!pending || !*pending)
		return 0;
	attempt = bpf_map_lookup_elem(&connect_attempts, &sk);
	if (!attempt)
		return 0;

	/* The source address is routed before SYN_SENT, but the port is only
	 * bound after it: take both as the socket leaves SYN_SENT too. */
	if (ctx->sport)
		attempt->event.src_port = ctx->sport;
	/* The context only allows constant offsets: copy through a helper. */
	if (ctx->family == AF_INET)
		bpf_probe_read_kernel(attempt->event.src_addr, 4, ctx->saddr);
	else
		bpf_probe_read_kernel(attempt->event.src_addr, 16, ctx->saddr_v6);
	if (ctx->newstate == TCP_SYN_SENT)
		return 0;

	if (ctx->newstate == TCP_ESTABLISHED) {
		attempt->outcome = 0;
	} else {
		err = BPF_CORE_READ((struct sock *)ctx->skaddr, sk_err);
		attempt->outcome = err ? -err : -EINPROGRESS;
	}
	attempt->finished = 1;
	if (attempt->syscall_returned) {
		report(ctx, attempt, attempt->outcome);
		forget_attempt(&sk);
	}
	return 0;
}
