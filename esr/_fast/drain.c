#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include "drain.h"

/* --- the buffers ----------------------------------------------------------------- */

static int epoll_add(int epfd, int fd)
{
	struct epoll_event ev;

	memset(&ev, 0, sizeof(ev));
	ev.events = EPOLLIN;
	ev.data.fd = fd;
	return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) ? -errno : 0;
}

static struct perf_buffer *open_buffer(int map_fd, size_t pages, perf_buffer_event_fn on_record,
				       void *ctx)
{
	struct perf_event_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.type = PERF_TYPE_SOFTWARE;
	attr.config = PERF_COUNT_SW_BPF_OUTPUT;
	attr.sample_type = PERF_SAMPLE_RAW;
	attr.sample_period = 1;
	/* Wake the reader once a quarter of the buffer is filled, not per
	 * record: the recorded process pays for every wakeup. Whatever stays
	 * below the watermark is read at the next flush. */
	attr.watermark = 1;
	attr.wakeup_watermark = pages * sysconf(_SC_PAGESIZE) / 4;
	return perf_buffer__new_raw(map_fd, pages, &attr, on_record, ctx, NULL);
}

int esr_buffers_open(struct esr_buffers *b, const struct esr_object *o,
		     const size_t pages[ESR_BUF_COUNT], perf_buffer_event_fn on_record, void *ctx,
		     const char **step)
{
	int i, err;

	memset(b, 0, sizeof(*b));
	b->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (b->epfd < 0) {
		*step = "epoll_create1";
		return -errno;
	}
	for (i = 0; i < ESR_BUF_COUNT; i++) {
		b->sources[i].ctx = ctx;
		b->sources[i].buffer = i;
		b->buffers[i] = open_buffer(esr_object_buffer_fd(o, i), pages[i], on_record,
					    &b->sources[i]);
		if (!b->buffers[i]) {
			err = -errno;
			*step = "cannot open a perf buffer";
			goto fail;
		}
		if ((err = epoll_add(b->epfd, perf_buffer__epoll_fd(b->buffers[i])))) {
			*step = "epoll_ctl";
			goto fail;
		}
	}
	return 0;
fail:
	esr_buffers_close(b);
	return err;
}

int esr_buffers_consume(struct esr_buffers *b)
{
	int i, err;

	for (i = 0; i < ESR_BUF_COUNT; i++)
		if (b->buffers[i] && (err = perf_buffer__consume(b->buffers[i])) < 0)
			return err;
	return 0;
}

void esr_buffers_close(struct esr_buffers *b)
{
	int i;

	for (i = 0; i < ESR_BUF_COUNT; i++) {
		perf_buffer__free(b->buffers[i]);
		b->buffers[i] = NULL;
	}
	if (b->epfd >= 0)
		close(b->epfd);
	b->epfd = -1;
}

/* --- the drain --------------------------------------------------------------------- */

/* Appends each record to the filling batch as [u32 length][record], 8-aligned;
 * called with the lock held. Once the batch reaches its limit, stops reading
 * the buffer: the rest waits in the kernel. */
static enum bpf_perf_event_ret on_record(void *ctx, int cpu, struct perf_event_header *header)
{
	struct esr_drain *d = ((struct esr_buffer_source *)ctx)->ctx;
	struct esr_batch *b = d->filling;

	if (header->type == PERF_RECORD_SAMPLE) {
		struct esr_perf_sample *s = (struct esr_perf_sample *)header;
		size_t need = (4 + (size_t)s->size + 7) & ~(size_t)7;

		if (b->len + need > b->cap) {
			size_t cap = b->cap;
			char *buf;

			if (b->len >= d->limit)
				return LIBBPF_PERF_EVENT_DONE;
			while (cap < b->len + need)
				cap *= 2;
			buf = realloc(b->buf, cap);
			if (!buf)
				return LIBBPF_PERF_EVENT_DONE;
			b->buf = buf;
			b->cap = cap;
		}
		memcpy(b->buf + b->len, &s->size, 4);
		memcpy(b->buf + b->len + 4, s->data, s->size);
		memset(b->buf + b->len + 4 + s->size, 0, need - 4 - s->size);
		b->len += need;
		b->records++;
	} else if (header->type == PERF_RECORD_LOST) {
		d->lost_notified += ((struct esr_perf_lost *)header)->lost;
	}
	return LIBBPF_PERF_EVENT_CONT;
}

static void drain_locked(struct esr_drain *d)
{
	uint64_t one = 1;

	esr_buffers_consume(&d->buffers);
	if (!d->ready && d->filling->records >= d->ready_at) {
		d->ready = 1;
		if (write(d->ready_fd, &one, sizeof(one)) < 0) {
			/* Only fails when the counter would overflow: already readable. */
		}
	}
}

static void *drain_loop(void *arg)
{
	struct esr_drain *d = arg;
	struct epoll_event events[ESR_BUF_COUNT + 1];
	int i, n;

	for (;;) {
		n = epoll_wait(d->buffers.epfd, events, ESR_BUF_COUNT + 1, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return NULL;
		}
		for (i = 0; i < n; i++)
			if (events[i].data.fd == d->stop_fd)
				return NULL;
		pthread_mutex_lock(&d->lock);
		drain_locked(d);
		pthread_mutex_unlock(&d->lock);
	}
}

static int start_thread(struct esr_drain *d)
{
	sigset_t all, old;
	int err;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	err = pthread_create(&d->thread, NULL, drain_loop, d);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (err)
		return -err;
	d->running = 1;
	return 0;
}

void esr_drain_init(struct esr_drain *d)
{
	memset(d, 0, sizeof(*d));
	d->buffers.epfd = d->stop_fd = d->ready_fd = -1;
	pthread_mutex_init(&d->lock, NULL);
}

int esr_drain_start(struct esr_drain *d, const struct esr_object *o,
		    const size_t pages[ESR_BUF_COUNT], size_t limit, unsigned long long ready_at,
		    const char **step)
{
	int i, err;

	d->limit = limit;
	d->ready_at = ready_at;
	d->filling = &d->batches[0];
	for (i = 0; i < 2; i++) {
		d->batches[i].cap = 1 << 20;
		d->batches[i].buf = malloc(d->batches[i].cap);
		if (!d->batches[i].buf) {
			err = -ENOMEM;
			*step = "cannot allocate the drain's batches";
			goto fail;
		}
	}
	d->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	d->ready_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (d->stop_fd < 0 || d->ready_fd < 0) {
		err = -errno;
		*step = "eventfd";
		goto fail;
	}
	if ((err = esr_buffers_open(&d->buffers, o, pages, on_record, d, step)))
		goto fail;
	if ((err = epoll_add(d->buffers.epfd, d->stop_fd))) {
		*step = "epoll_ctl";
		goto fail;
	}
	if ((err = start_thread(d))) {
		*step = "cannot start the drain thread";
		goto fail;
	}
	return 0;
fail:
	esr_drain_close(d);
	return err;
}

void esr_drain_close(struct esr_drain *d)
{
	uint64_t one = 1;
	int i;

	if (d->running) {
		if (write(d->stop_fd, &one, sizeof(one)) < 0) {
			/* The counter cannot overflow from one write. */
		}
		pthread_join(d->thread, NULL);
		d->running = 0;
	}
	esr_buffers_close(&d->buffers);
	for (i = 0; i < 2; i++) {
		free(d->batches[i].buf);
		d->batches[i].buf = NULL;
		d->batches[i].len = d->batches[i].cap = 0;
	}
	if (d->stop_fd >= 0)
		close(d->stop_fd);
	if (d->ready_fd >= 0)
		close(d->ready_fd);
	d->stop_fd = d->ready_fd = -1;
}

struct esr_batch *esr_drain_take(struct esr_drain *d)
{
	struct esr_batch *taken;
	uint64_t count;

	pthread_mutex_lock(&d->lock);
	drain_locked(d);
	taken = d->filling;
	d->filling = taken == &d->batches[0] ? &d->batches[1] : &d->batches[0];
	d->filling->len = 0;
	d->filling->records = 0;
	d->ready = 0;
	if (read(d->ready_fd, &count, sizeof(count)) < 0) {
		/* EAGAIN: it was not readable. */
	}
	pthread_mutex_unlock(&d->lock);
	return taken;
}
