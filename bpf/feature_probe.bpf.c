// SPDX-License-Identifier: GPL-2.0
/* Not part of the recorder: `esr check` loads each of these alone to learn
 * which hook types this kernel allows beyond tracepoints. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

SEC("kprobe/do_sys_openat2")
int probe_kprobe(void *ctx)
{
	return 0;
}

SEC("fentry/do_sys_openat2")
int BPF_PROG(probe_fentry, int dfd)
{
	return 0;
}

SEC("raw_tp/sched_process_exit")
int probe_raw_tp(void *ctx)
{
	return 0;
}
