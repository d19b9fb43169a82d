/* What a recorder leaves in the kernel for the next one, besides the
 * programs and their maps: two arrays of its own, created by user space,
 * mapped into it and pinned next to the rest (probe.pyx).
 *
 * Both are read by a recorder of another version after an upgrade: fields
 * are only ever added at the end, and a reader takes version into account.
 */
#ifndef ESR_HANDOVER_H
#define ESR_HANDOVER_H

#include <linux/types.h>

#define ESR_HANDOVER_VERSION 1
/* Per-buffer counts: room for buffers to come, as in a recording's header. */
#define ESR_LEDGER_BUFFERS 8
/* A session id is at most 128 bytes (esr/datadir.py), NUL-terminated here. */
#define ESR_LEDGER_SID 136

/* struct esr_handover.flags */
#define ESR_HANDED_OVER 0x1	/* the last recorder left on purpose, everything written */

/* The `recorder` map's one entry: what is attached, and who held it. */
struct esr_handover {
	__u32 version;
	__u32 flags;
	__u64 generation;	/* of the last session cookie handed out */
	__u64 alive_ns;		/* CLOCK_REALTIME of the holder's last flush */
	__u32 max_sessions;
	__u32 max_tasks;
	__u32 pages[ESR_LEDGER_BUFFERS];	/* per-CPU pages of each buffer's rings */
	__u8 fingerprint[32];	/* of the programs attached: image and load-time settings */
	char esr_version[32];	/* of the recorder that attached them */
	__u64 datadir_dev;	/* the data dir recorded into */
	__u64 datadir_ino;
	__u32 keeper_pid;	/* the holder's ring keeper (drain.h), 0 when none */
	__u32 reserved;
	__u64 keeper_start;	/* its start time, in clock ticks since boot */
};

/* struct esr_ledger.flags */
#define ESR_LEDGER_LEADER_GONE 0x1	/* the session waits for its last processes */

/* The `sessions` map, one entry per session slot: which session holds it,
 * and how many of its records the drain has read out of the kernel. What
 * the recording holds of them is on disk: after a crash, the difference is
 * what the recorder read and never wrote. */
struct esr_ledger {
	__u64 session;		/* the cookie, 0 when the slot is free */
	__u64 drained[ESR_LEDGER_BUFFERS];
	__u32 anchor_pid;
	__u32 terminal_pid;
	__u32 flags;
	__u32 reserved;
	char sid[ESR_LEDGER_SID];
};

#endif /* ESR_HANDOVER_H */
