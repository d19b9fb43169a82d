#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <fcntl.h>
#include <time.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <bpf/bpf.h>
#include "drain.h"

/* --- the rings ----------------------------------------------------------------- */

static int epoll_add(int epfd, int fd, void *ptr)
{
	struct epoll_event ev;

	memset(&ev, 0, sizeof(ev));
	ev.events = EPOLLIN;
	ev.data.ptr = ptr;
	return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) ? -errno : 0;
}

/* Map a ring's perf event: its control page, then pages of data. A ring
 * that exists already must be mapped with the size it was created with. */
static int ring_map(struct esr_ring *r, size_t pages)
{
	long page = sysconf(_SC_PAGESIZE);
	void *base = mmap(NULL, (pages + 1) * page, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);

	if (base == MAP_FAILED)
		return -errno;
	r->page = base;
	r->data = (char *)base + page;
	r->size = pages * page;
	return 0;
}

static int ring_create(struct esr_ring *r, size_t pages)
{
	struct perf_event_attr attr;
	int err;

	memset(&attr, 0, sizeof(attr));
	attr.size = sizeof(attr);
	attr.type = PERF_TYPE_SOFTWARE;
	attr.config = PERF_COUNT_SW_BPF_OUTPUT;
	attr.sample_type = PERF_SAMPLE_RAW;
	attr.sample_period = 1;
	/* Wake the reader once a quarter of the buffer is filled, not per
	 * record: the recorded process pays for every wakeup. Whatever stays
	 * below the watermark is read at the next flush. */
	attr.watermark = 1;
	attr.wakeup_watermark = pages * sysconf(_SC_PAGESIZE) / 4;
	r->fd = syscall(__NR_perf_event_open, &attr, -1, r->cpu, -1, PERF_FLAG_FD_CLOEXEC);
	if (r->fd < 0)
		return -errno;
	if ((err = ring_map(r, pages)))
		return err;
	return ioctl(r->fd, PERF_EVENT_IOC_ENABLE, 0) ? -errno : 0;
}

static void ring_close(struct esr_ring *r)
{
	if (r->page)
		munmap(r->page, r->size + sysconf(_SC_PAGESIZE));
	if (r->fd >= 0)
		close(r->fd);
	free(r->copy);
	r->page = NULL;
	r->copy = NULL;
	r->fd = -1;
}

/* Hand every record between the tail and the head to on_record, in order,
 * and move the tail past those it took. */
static int ring_read(struct esr_ring *r, perf_buffer_event_fn on_record)
{
	__u64 head = __atomic_load_n(&r->page->data_head, __ATOMIC_ACQUIRE);
	__u64 tail = r->page->data_tail;
	int ret = LIBBPF_PERF_EVENT_CONT;

	while (tail != head) {
		struct perf_event_header *record =
			(struct perf_event_header *)(r->data + (tail & (r->size - 1)));
		size_t size = record->size;
		size_t first = r->data + r->size - (char *)record;

		if (size > first) {
			if (r->copy_size < size) {
				char *copy = realloc(r->copy, size);

				if (!copy)
					break;
				r->copy = copy;
				r->copy_size = size;
			}
			memcpy(r->copy, record, first);
			memcpy(r->copy + first, r->data, size - first);
			record = (struct perf_event_header *)r->copy;
		}
		ret = on_record(r->source, r->cpu, record);
		if (ret != LIBBPF_PERF_EVENT_CONT)
			break;
		tail += size;
	}
	__atomic_store_n(&r->page->data_tail, tail, __ATOMIC_RELEASE);
	return ret == LIBBPF_PERF_EVENT_ERROR ? -EINVAL : 0;
}

int esr_buffers_open(struct esr_buffers *b, const int map_fds[ESR_BUF_COUNT],
		     const size_t pages[ESR_BUF_COUNT], const int *ring_fds,
		     perf_buffer_event_fn on_record, void *ctx, const char **step)
{
	int i, cpu, err;

	memset(b, 0, sizeof(b[0]));
	b->epfd = -1;
	b->on_record = on_record;
	b->ncpus = libbpf_num_possible_cpus();
	if (b->ncpus <= 0) {
		*step = "cannot count the possible CPUs";
		return b->ncpus ? b->ncpus : -EINVAL;
	}
	b->rings = calloc(ESR_BUF_COUNT * b->ncpus, sizeof(b->rings[0]));
	if (!b->rings) {
		for (i = 0; ring_fds && i < ESR_BUF_COUNT * b->ncpus; i++)
			if (ring_fds[i] >= 0)
				close(ring_fds[i]);
		*step = "cannot allocate the rings";
		return -ENOMEM;
	}
	/* The given rings are this reader's from now on, to close if it fails. */
	for (i = 0; i < ESR_BUF_COUNT * b->ncpus; i++)
		b->rings[i].fd = ring_fds ? ring_fds[i] : -1;
	b->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (b->epfd < 0) {
		err = -errno;
		*step = "epoll_create1";
		goto fail;
	}
	for (i = 0; i < ESR_BUF_COUNT; i++) {
		b->pages[i] = pages[i];
		b->sources[i].ctx = ctx;
		b->sources[i].buffer = i;
		for (cpu = 0; cpu < b->ncpus; cpu++) {
			struct esr_ring *r = &b->rings[i * b->ncpus + cpu];

			r->cpu = cpu;
			r->source = &b->sources[i];
			if (r->fd >= 0) {
				if ((err = ring_map(r, pages[i]))) {
					*step = "cannot map a ring left by the previous recorder";
					goto fail;
				}
			} else if ((err = ring_create(r, pages[i]))) {
				if (err == -ENODEV) {	/* an offline CPU: nothing runs there */
					ring_close(r);
					continue;
				}
				*step = "cannot open a perf buffer";
				goto fail;
			}
			/* Through map_fds[i] even for a ring that is in the array
			 * already: the array drops its rings when the file they were
			 * put in through is closed, and that file is now this one. */
			if (bpf_map_update_elem(map_fds[i], &cpu, &r->fd, BPF_ANY)) {
				err = -errno;
				*step = "cannot put a ring into its perf event array";
				goto fail;
			}
			if ((err = epoll_add(b->epfd, r->fd, r))) {
				*step = "epoll_ctl";
				goto fail;
			}
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

	for (i = 0; i < ESR_BUF_COUNT * b->ncpus; i++)
		if (b->rings[i].page && (err = ring_read(&b->rings[i], b->on_record)))
			return err;
	return 0;
}

void esr_buffers_close(struct esr_buffers *b)
{
	int i;

	for (i = 0; b->rings && i < ESR_BUF_COUNT * b->ncpus; i++)
		ring_close(&b->rings[i]);
	free(b->rings);
	b->rings = NULL;
	if (b->epfd >= 0)
		close(b->epfd);
	b->epfd = -1;
}

int esr_buffers_ring_fd(const struct esr_buffers *b, enum esr_buffer buffer, int cpu)
{
	if (!b->rings || cpu < 0 || cpu >= b->ncpus)
		return -1;
	return b->rings[buffer * b->ncpus + cpu].fd;
}

/* --- the drain --------------------------------------------------------------------- */

/* The record is its session's, read out of the kernel: counted in the
 * ledger while the slot holds that session. */
static void count(struct esr_drain *d, enum esr_buffer buffer, const struct esr_perf_sample *s)
{
	__u64 session;
	__u32 slot;

	if (!d->ledger || s->size < offsetof(struct esr_event_header, session) + sizeof(session))
		return;
	memcpy(&session, s->data + offsetof(struct esr_event_header, session), sizeof(session));
	slot = (__u32)session;
	if (session && slot < d->ledger_slots && d->ledger[slot].session == session)
		d->ledger[slot].drained[buffer]++;
}

/* Appends each record to the filling batch as [u32 length][record], 8-aligned;
 * called with the lock held. Once the batch reaches its limit, stops reading
 * the buffer: the rest waits in the kernel. */
static enum bpf_perf_event_ret on_record(void *ctx, int cpu, struct perf_event_header *header)
{
	struct esr_drain *d = ((struct esr_buffer_source *)ctx)->ctx;
	enum esr_buffer buffer = ((struct esr_buffer_source *)ctx)->buffer;
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
		b->lines += d->line_buffers >> buffer & 1;
		count(d, buffer, s);
	} else if (header->type == PERF_RECORD_LOST) {
		d->lost_notified += ((struct esr_perf_lost *)header)->lost;
	}
	return LIBBPF_PERF_EVENT_CONT;
}

static void drain_locked(struct esr_drain *d)
{
	uint64_t one = 1;

	esr_buffers_consume(&d->buffers);
	if (!d->ready &&
	    (d->filling->records >= d->ready_at || d->filling->lines >= d->lines_at)) {
		d->ready = 1;
		if (write(d->ready_fd, &one, sizeof(one)) < 0) {
			/* Only fails when the counter would overflow: already readable. */
		}
	}
}

static void *drain_loop(void *arg)
{
	struct esr_drain *d = arg;
	struct epoll_event events[16];
	int i, n;

	for (;;) {
		n = epoll_wait(d->buffers.epfd, events, 16, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return NULL;
		}
		for (i = 0; i < n; i++)
			if (!events[i].data.ptr)	/* the stop eventfd */
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

int esr_drain_start(struct esr_drain *d, const int map_fds[ESR_BUF_COUNT],
		    const size_t pages[ESR_BUF_COUNT], const int *ring_fds, size_t limit,
		    unsigned long long ready_at, unsigned long long lines_at, const char **step)
{
	int i, err;

	/* First: from here on the given rings are closed with the buffers. */
	if ((err = esr_buffers_open(&d->buffers, map_fds, pages, ring_fds, on_record, d, step)))
		return err;
	d->limit = limit;
	d->ready_at = ready_at;
	d->lines_at = lines_at;
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
	if ((err = epoll_add(d->buffers.epfd, d->stop_fd, NULL))) {
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

void esr_drain_stop(struct esr_drain *d)
{
	uint64_t one = 1;

	if (d->running) {
		if (write(d->stop_fd, &one, sizeof(one)) < 0) {
			/* The counter cannot overflow from one write. */
		}
		pthread_join(d->thread, NULL);
		d->running = 0;
	}
}

void esr_drain_close(struct esr_drain *d)
{
	int i;

	esr_drain_stop(d);
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
	d->filling->records = d->filling->lines = 0;
	/* Written exactly when ready was set: no read (a syscall each flush) otherwise. */
	if (d->ready && read(d->ready_fd, &count, sizeof(count)) < 0) {
		/* Cannot fail: it was written, and only this reads it. */
	}
	d->ready = 0;
	pthread_mutex_unlock(&d->lock);
	return taken;
}

/* --- the keeper ---------------------------------------------------------------------- */

/* In the child of a threaded process: only async-signal-safe calls. */
static void __attribute__((noreturn)) keep(const struct esr_buffers *b, int pipe_r, int max_fd)
{
	struct timespec wait = { ESR_KEEPER_WAIT, 0 };
	long page = sysconf(_SC_PAGESIZE);
	sigset_t only_term;
	char byte;
	int i, fd;

	/* A fork does not inherit a perf event's mapping: map each ring anew. */
	for (i = 0; i < ESR_BUF_COUNT * b->ncpus; i++)
		if (b->rings[i].page)
			mmap(NULL, b->rings[i].size + page, PROT_READ | PROT_WRITE, MAP_SHARED, b->rings[i].fd, 0);
	for (fd = 0; fd <= max_fd; fd++)
		if (fd != pipe_r)
			close(fd);
	prctl(PR_SET_NAME, "esr-keeper", 0, 0, 0);
	signal(SIGTERM, SIG_DFL);
	sigfillset(&only_term);
	sigdelset(&only_term, SIGTERM);
	sigprocmask(SIG_SETMASK, &only_term, NULL);
	for (;;) {
		ssize_t n = read(pipe_r, &byte, 1);

		if (n == 0 || (n < 0 && errno != EINTR))
			break;
	}
	while (nanosleep(&wait, &wait) && errno == EINTR)
		;
	_exit(0);
}

int esr_keeper_start(const struct esr_buffers *b, int max_fd, int *pipe_w)
{
	int fds[2];
	pid_t pid;

	if (pipe2(fds, O_CLOEXEC))
		return -errno;
	pid = fork();
	if (pid < 0) {
		close(fds[0]);
		close(fds[1]);
		return -errno;
	}
	if (pid == 0)
		keep(b, fds[0], max_fd > fds[1] ? max_fd : fds[1]);
	close(fds[0]);
	*pipe_w = fds[1];
	return pid;
}
