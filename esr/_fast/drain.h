/* Reading the recorder's perf buffers: one per enum esr_buffer, each a ring
 * per CPU.
 *
 * struct esr_buffers reads the rings itself rather than through libbpf's
 * perf_buffer, so that a ring can outlive the process that opened it: the
 * perf event of each ring and the perf event array it is in are handed to
 * the next recorder (systemd's file descriptor store), which maps the same
 * rings again and reads on from where the previous one stopped. The
 * benchmark's C floor uses it as is.
 *
 * The drain adds a thread that empties the buffers into a batch as soon as
 * one passes its watermark, whatever the Python side is doing (writing,
 * fsyncing, ending a thousand sessions): the kernel buffers then only need
 * to hold a wakeup's worth of records, and the batch grows in user space
 * instead.
 */
#ifndef ESR_DRAIN_H
#define ESR_DRAIN_H

#include <pthread.h>
#include <stddef.h>
#include <linux/perf_event.h>
#include <linux/types.h>
#include <bpf/libbpf.h>
#include "esr_events.h"
#include "handover.h"

/* The two kinds of perf records a buffer delivers. */
struct esr_perf_sample {
	struct perf_event_header header;
	__u32 size;
	char data[];
};

struct esr_perf_lost {
	struct perf_event_header header;
	__u64 id;
	__u64 lost;
};

/* What the callback gets as its ctx: which buffer the record comes from, and
 * the reader's own ctx. */
struct esr_buffer_source {
	void *ctx;
	enum esr_buffer buffer;
};

/* One CPU's ring of one buffer. */
struct esr_ring {
	int fd;			/* the perf event, -1 for a CPU without one (offline) */
	int cpu;
	struct perf_event_mmap_page *page;	/* the control page, then the data */
	char *data;
	size_t size;		/* data bytes, a power of two */
	char *copy;		/* a record wrapping around the end, made whole */
	size_t copy_size;
	struct esr_buffer_source *source;
};

struct esr_buffers {
	struct esr_ring *rings;	/* ESR_BUF_COUNT * ncpus: rings[buffer * ncpus + cpu] */
	int ncpus;
	size_t pages[ESR_BUF_COUNT];
	struct esr_buffer_source sources[ESR_BUF_COUNT];
	perf_buffer_event_fn on_record;
	int epfd;		/* readable once a ring passed its watermark */
};

/* Open every buffer, pages[i] pages per CPU for buffer i, each waking its
 * reader once a quarter full, and put the rings into the perf event arrays
 * map_fds (one per buffer, by CPU), which then hold them as long as that
 * file is open. ring_fds, when not NULL, holds ESR_BUF_COUNT * ncpus perf
 * events that exist already (-1 where none): the rings a previous reader
 * left, opened with the same pages, and taken over here (closed with the
 * rest, even when opening fails); the others are created.
 * on_record's ctx is a struct esr_buffer_source. Returns 0, or -errno with
 * what failed in *step (and everything closed). */
int esr_buffers_open(struct esr_buffers *b, const int map_fds[ESR_BUF_COUNT],
		     const size_t pages[ESR_BUF_COUNT], const int *ring_fds,
		     perf_buffer_event_fn on_record, void *ctx, const char **step);
/* Read what every ring holds, through the callback: a record it answers
 * LIBBPF_PERF_EVENT_DONE for stays in its ring, for the next call. */
int esr_buffers_consume(struct esr_buffers *b);
/* Unmap and close every ring. The perf events go with the last descriptor
 * of each: one kept elsewhere (a duplicate, a descriptor store) keeps the
 * ring and what it holds. */
void esr_buffers_close(struct esr_buffers *b);
/* The perf event of a buffer's ring on a CPU, or -1. */
int esr_buffers_ring_fd(const struct esr_buffers *b, enum esr_buffer buffer, int cpu);

/* The keeper: a child process that only keeps the rings mapped. A perf
 * event's ring lives only as long as some process maps it (the kernel
 * frees it with the last mapping, and what it held), so while no recorder
 * runs, between one that stops or crashes and the next, the keeper maps
 * them. It closes every descriptor but the read end of a pipe; once the
 * other end closes (the recorder is gone) it waits ESR_KEEPER_WAIT seconds
 * for the next recorder, which maps the rings again and sends it SIGTERM,
 * then exits. Returns its pid, or -errno; *pipe_w is the write end,
 * close-on-exec. max_fd: the highest descriptor open now. */
#define ESR_KEEPER_WAIT 60
int esr_keeper_start(const struct esr_buffers *b, int max_fd, int *pipe_w);

/* A batch: [u32 length][record] entries, each padded to 8 bytes. */
struct esr_batch {
	char *buf;
	size_t len;
	size_t cap;
	unsigned long long records;
	unsigned long long lines;	/* of them, records of the line_buffers */
};

/* Two batches: the drain fills one while Python decodes the other. */
struct esr_drain {
	pthread_mutex_t lock;
	struct esr_batch batches[2];
	struct esr_batch *filling;
	size_t limit;		/* bytes a batch may hold before records wait in the kernel */
	struct esr_buffers buffers;
	int stop_fd;
	int ready_fd;		/* readable once ready_at records, or lines_at lines, are waiting */
	unsigned long long ready_at;
	unsigned long long lines_at;
	unsigned int line_buffers;	/* bit per enum esr_buffer: its records are audit lines */
	int ready;
	int running;
	pthread_t thread;
	unsigned long long lost_notified;	/* PERF_RECORD_LOST counts */
	/* Each record read is counted for its session here, by slot, when the
	 * cookie there is the record's (NULL: not counted). */
	struct esr_ledger *ledger;
	__u32 ledger_slots;
};

/* A drain that is not started, which esr_drain_close() accepts. */
void esr_drain_init(struct esr_drain *d);
/* Open the buffers (as esr_buffers_open, taking ring_fds over) and start
 * the thread, after esr_drain_init(). The thread blocks every signal: they
 * stay with Python's main thread. Returns 0, or -errno with *step. */
int esr_drain_start(struct esr_drain *d, const int map_fds[ESR_BUF_COUNT],
		    const size_t pages[ESR_BUF_COUNT], const int *ring_fds, size_t limit,
		    unsigned long long ready_at, unsigned long long lines_at, const char **step);
/* Stop the thread: from now on the rings are read only by esr_drain_take,
 * and what it leaves there stays. */
void esr_drain_stop(struct esr_drain *d);
/* Stop the thread and free everything; safe on a drain that never started. */
void esr_drain_close(struct esr_drain *d);
/* Drain once more, then hand the filling batch over and fill the other;
 * the batch stays the caller's until the next call. */
struct esr_batch *esr_drain_take(struct esr_drain *d);

#endif /* ESR_DRAIN_H */
