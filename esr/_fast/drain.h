/* Reading the recorder's perf buffers: one per enum esr_buffer.
 *
 * struct esr_buffers opens them all with the same attributes and reads them
 * through one callback; the benchmark's C floor uses it as is. The drain
 * adds a thread that empties the buffers into a batch as soon as one passes
 * its watermark, whatever the Python side is doing (writing, fsyncing,
 * ending a thousand sessions): the kernel buffers then only need to hold a
 * wakeup's worth of records, and the batch grows in user space instead.
 */
#ifndef ESR_DRAIN_H
#define ESR_DRAIN_H

#include <pthread.h>
#include <stddef.h>
#include <linux/perf_event.h>
#include <linux/types.h>
#include <bpf/libbpf.h>
#include "esr_events.h"
#include "object.h"

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

struct esr_buffers {
	struct perf_buffer *buffers[ESR_BUF_COUNT];
	struct esr_buffer_source sources[ESR_BUF_COUNT];
	int epfd;	/* readable once a buffer passed its watermark */
};

/* Open every buffer of the object, pages[i] pages per CPU for buffer i, each
 * waking its reader once a quarter full; on_record's ctx is a struct
 * esr_buffer_source. Returns 0, or -errno with what failed in *step (and
 * everything closed). */
int esr_buffers_open(struct esr_buffers *b, const struct esr_object *o,
		     const size_t pages[ESR_BUF_COUNT], perf_buffer_event_fn on_record, void *ctx,
		     const char **step);
/* Read what every buffer holds, through the callback. */
int esr_buffers_consume(struct esr_buffers *b);
void esr_buffers_close(struct esr_buffers *b);

/* A batch: [u32 length][record] entries, each padded to 8 bytes. */
struct esr_batch {
	char *buf;
	size_t len;
	size_t cap;
	unsigned long long records;
};

/* Two batches: the drain fills one while Python decodes the other. */
struct esr_drain {
	pthread_mutex_t lock;
	struct esr_batch batches[2];
	struct esr_batch *filling;
	size_t limit;		/* bytes a batch may hold before records wait in the kernel */
	struct esr_buffers buffers;
	int stop_fd;
	int ready_fd;		/* readable once ready_at records are waiting */
	unsigned long long ready_at;
	int ready;
	int running;
	pthread_t thread;
	unsigned long long lost_notified;	/* PERF_RECORD_LOST counts */
};

/* A drain that is not started, which esr_drain_close() accepts. */
void esr_drain_init(struct esr_drain *d);
/* Open the buffers and start the thread, after esr_drain_init(). The thread
 * blocks every signal: they stay with Python's main thread. Returns 0, or
 * -errno with *step. */
int esr_drain_start(struct esr_drain *d, const struct esr_object *o,
		    const size_t pages[ESR_BUF_COUNT], size_t limit, unsigned long long ready_at,
		    const char **step);
/* Stop the thread and free everything; safe on a drain that never started. */
void esr_drain_close(struct esr_drain *d);
/* Drain once more, then hand the filling batch over and fill the other;
 * the batch stays the caller's until the next call. */
struct esr_batch *esr_drain_take(struct esr_drain *d);

#endif /* ESR_DRAIN_H */
