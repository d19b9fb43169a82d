/* floor: the C floor of `esr bench`, the least a consumer of esr.bpf.o can
 * cost. It loads the recorder's own BPF object, sized and attached as
 * esr/_fast/probe.pyx does, opens the three perf buffers with the same
 * perf_event_attr (watermark at a quarter of the buffer), and only counts
 * the records per type: no decoding, no storage.
 *
 *   floor OBJECT --pages C,D,N [--cpu N] [--raw-tracepoints 0|1]
 *
 * C, D, N...: per-CPU pages of each buffer, in esr_events.h's order (powers
 * of two). --cpu pins floor (default 0, -1: no pinning). --raw-tracepoints:
 * fork, exec and exit hooked as esr hooks them on this kernel (default 0).
 *
 * Protocol, one line each way:
 *   floor prints "ready" once everything is attached;
 *   "track PID [TERMINAL_PID]"  records PID as a plain member of session
 *                slot 0 (cookie 1 << 32 | 0), and TERMINAL_PID as the one
 *                reading its pty's master; the first one opens the slot and
 *                starts the counts, the CPU and the peak RSS accounting;
 *                floor answers "tracking";
 *   "stop" (or end of input)  drains every buffer and prints one JSON line:
 *                {"records": {...}, "lost": {...}, "lost_notified": N,
 *                 "user_s": .., "sys_s": .., "max_rss_kb": ..}
 *                then floor exits 0.
 * "lost" is the session's counters in session_states, "lost_notified" the
 * PERF_RECORD_LOST records the buffers delivered. Errors: one line on
 * stderr and exit status 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <bpf/bpf.h>
#include "object.h"
#include "drain.h"

#define MAX_SESSIONS 64		/* session_states entries, as `esr bench` configures esr */
#define MAX_TASKS 65536		/* every per-thread map */
#define COOKIE ((1ULL << 32) | 0)	/* generation 1, slot 0 */

/* Counted by on_record(). */
static unsigned long long records[ESR_BUF_COUNT], lost_notified;

/* The session: slot 0 of the mapped session_states, and the object whose
 * tracked_tasks it adds to. */
static struct esr_session_state *states;
static struct esr_object obj;
static struct esr_tracking tracking_maps;
static int tracking;
static struct rusage start;	/* CPU at the first "track" */

/* One line on stderr, with a reason when given, and exit 1. */
__attribute__((noreturn, format(printf, 2, 3)))
static void die(const char *reason, const char *fmt, ...)
{
	va_list ap;

	fputs("floor: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	if (reason)
		fprintf(stderr, ": %s", reason);
	fputc('\n', stderr);
	exit(1);
}

static enum bpf_perf_event_ret on_record(void *ctx, int cpu, struct perf_event_header *header)
{
	if (header->type == PERF_RECORD_SAMPLE) {
		records[((struct esr_buffer_source *)ctx)->buffer]++;
	} else if (header->type == PERF_RECORD_LOST) {
		lost_notified += ((struct esr_perf_lost *)header)->lost;
	}
	return LIBBPF_PERF_EVENT_CONT;
}

/* The whole file, which stays allocated as long as floor runs. */
static void *read_file(const char *path, size_t *size)
{
	struct stat st;
	void *data;
	int fd = open(path, O_RDONLY);

	if (fd < 0 || fstat(fd, &st))
		die(strerror(errno), "cannot open %s", path);
	data = malloc(st.st_size);
	if (!data || read(fd, data, st.st_size) != st.st_size)
		die(strerror(errno), "cannot read %s", path);
	close(fd);
	*size = st.st_size;
	return data;
}

static double cpu_seconds(struct timeval t)
{
	return t.tv_sec + t.tv_usec / 1e6;
}

/* Peak RSS from now on, as esr's bench reports it (VmHWM after clear_refs). */
static void restart_peak_rss(void)
{
	int fd = open("/proc/self/clear_refs", O_WRONLY);

	if (fd < 0)
		return;		/* then the peak is the whole process's */
	if (write(fd, "5", 1) != 1)
		fprintf(stderr, "floor: warning: cannot restart the peak RSS count\n");
	close(fd);
}

static long peak_rss_kb(void)
{
	FILE *f = fopen("/proc/self/status", "r");
	char line[256];
	long kb = 0;

	while (f && fgets(line, sizeof(line), f))
		if (sscanf(line, "VmHWM: %ld", &kb) == 1)
			break;
	if (f)
		fclose(f);
	return kb;
}

static unsigned long long records_total(void)
{
	unsigned long long total = lost_notified;
	int i;

	for (i = 0; i < ESR_BUF_COUNT; i++)
		total += records[i];
	return total;
}

static __u32 pid_of(const char *arg, char **rest)
{
	unsigned long pid = strtoul(arg, rest, 10);

	if (!pid || pid > 0xffffffffUL || (**rest && **rest != ' '))
		die(NULL, "track: bad pid %s", arg);
	return pid;
}

/* "track PID [TERMINAL_PID]": as probe.pyx's open_session(0, COOKIE), the
 * first time, and track(PID, COOKIE), a plain member; TERMINAL_PID reads the
 * session's pty master, as Recorder.open_session's terminal_pid. */
static void track(const char *arg)
{
	struct esr_task task = { .session = COOKIE };
	struct esr_task terminal = { .session = COOKIE,
				     .flags = ESR_TASK_ANCHOR | ESR_TASK_TERMINAL };
	char *rest;
	__u32 tid = pid_of(arg, &rest), terminal_tid;

	if (!tracking) {
		memset(&states[0], 0, sizeof(states[0]));
		__atomic_store_n(&states[0].session, COOKIE, __ATOMIC_RELEASE);
	}
	if (esr_track(&tracking_maps, tid, &task))
		die(strerror(errno), "cannot track pid %u", tid);
	__sync_fetch_and_add(&states[0].live_tasks, 1);
	if (*rest) {
		terminal_tid = pid_of(rest + 1, &rest);
		if (*rest || esr_track(&tracking_maps, terminal_tid, &terminal))
			die(strerror(errno), "cannot track the terminal's pid %u", terminal_tid);
	}
	if (!tracking) {
		memset(records, 0, sizeof(records));
		lost_notified = 0;
		restart_peak_rss();
		getrusage(RUSAGE_SELF, &start);
		tracking = 1;
	}
	printf("tracking\n");
	fflush(stdout);
}

/* Reads what stdin has; runs every complete line. Returns 1 on "stop" or
 * end of input. */
static int read_commands(void)
{
	static char input[256];
	static size_t len;
	char *line, *nl;
	ssize_t got;

	got = read(0, input + len, sizeof(input) - 1 - len);
	if (got < 0) {
		if (errno != EINTR)
			die(strerror(errno), "read stdin");
		return 0;
	}
	if (got == 0)
		return 1;
	len += got;
	input[len] = 0;
	for (line = input; (nl = strchr(line, '\n')); line = nl + 1) {
		*nl = 0;
		if (!strcmp(line, "stop"))
			return 1;
		if (!strncmp(line, "track ", 6))
			track(line + 6);
		else
			die(NULL, "unknown command: %s", line);
	}
	len -= line - input;
	memmove(input, line, len + 1);
	if (len == sizeof(input) - 1)
		die(NULL, "command line too long");
	return 0;
}

/* --pages C,D,N...: one size per buffer. */
static void parse_pages(const char *arg, size_t pages[ESR_BUF_COUNT])
{
	const char *p = arg;
	char *rest;
	int i;

	for (i = 0; i < ESR_BUF_COUNT; i++) {
		pages[i] = strtoul(p, &rest, 10);
		if (rest == p || !pages[i] || *rest != (i == ESR_BUF_COUNT - 1 ? '\0' : ','))
			die(NULL, "--pages: expected %d page counts separated by commas, not %s",
			    ESR_BUF_COUNT, arg);
		p = rest + 1;
	}
}

/* Records per buffer, and the terminal's bytes: as esr's consumer reports them. */
static void print_counts(const char *name, const unsigned long long counts[ESR_BUF_COUNT],
			 unsigned long long terminal_bytes)
{
	int i;

	printf("\"%s\": {", name);
	for (i = 0; i < ESR_BUF_COUNT; i++)
		printf("\"%s\": %llu, ", esr_buffer_names[i], counts[i]);
	printf("\"terminal_bytes\": %llu}, ", terminal_bytes);
}

#define USAGE "usage: floor OBJECT --pages C,D,N... [--cpu N] [--raw-tracepoints 0|1]"

int main(int argc, char **argv)
{
	struct esr_object_settings settings = { .max_sessions = MAX_SESSIONS,
						.max_tasks = MAX_TASKS,
						.tasks_per_session = MAX_TASKS };
	struct esr_buffers buffers;
	struct epoll_event event, events[ESR_BUF_COUNT + 1];
	struct rusage end;
	unsigned long long before, lost[ESR_BUF_COUNT];
	size_t pages[ESR_BUF_COUNT] = { 0 }, states_size, image_size;
	const char *step = "";
	void *image;
	int map_fds[ESR_BUF_COUNT];
	int cpu = 0, i, n, err, stopping = 0;
	char *rest;

	if (argc < 2)
		die(NULL, USAGE);
	for (i = 2; i < argc; i += 2) {
		if (i + 1 >= argc)
			die(NULL, USAGE);
		if (!strcmp(argv[i], "--pages")) {
			parse_pages(argv[i + 1], pages);
		} else if (!strcmp(argv[i], "--cpu")) {
			cpu = strtol(argv[i + 1], &rest, 10);
			if (*rest || !argv[i + 1][0])
				die(NULL, "--cpu: expected a number, not %s", argv[i + 1]);
		} else if (!strcmp(argv[i], "--raw-tracepoints")) {
			if (strcmp(argv[i + 1], "0") && strcmp(argv[i + 1], "1"))
				die(NULL, "--raw-tracepoints: expected 0 or 1, not %s", argv[i + 1]);
			settings.raw_tracepoints = argv[i + 1][0] == '1';
		} else {
			die(NULL, USAGE);
		}
	}
	if (!pages[0])
		die(NULL, "--pages is required");
	if (cpu >= 0) {
		cpu_set_t set;

		CPU_ZERO(&set);
		CPU_SET(cpu, &set);
		if (sched_setaffinity(0, sizeof(set), &set))
			die(strerror(errno), "cannot pin to CPU %d", cpu);
	}

	image = read_file(argv[1], &image_size);
	if ((err = esr_object_open(&obj, image, image_size, &settings, &step)))
		die(esr_libbpf_reason()[0] ? esr_libbpf_reason() : strerror(-err), "%s", step);
	states_size = MAX_SESSIONS * sizeof(*states);
	states = mmap(NULL, states_size, PROT_READ | PROT_WRITE, MAP_SHARED,
		      obj.session_states_fd, 0);
	if (states == MAP_FAILED)
		die(strerror(errno), "cannot map session_states");
	if ((err = esr_tracking_open(&tracking_maps, obj.tracked_tasks_fd,
				     bpf_map__fd(obj.skel->maps.tid_marks))))
		die(strerror(-err), "cannot map tid_marks");
	for (i = 0; i < ESR_BUF_COUNT; i++)
		map_fds[i] = esr_object_buffer_fd(&obj, i);
	if ((err = esr_buffers_open(&buffers, map_fds, pages, NULL, on_record, NULL, &step)))
		die(strerror(-err), "%s", step);
	memset(&event, 0, sizeof(event));
	event.events = EPOLLIN;
	event.data.ptr = &stopping;
	if (epoll_ctl(buffers.epfd, EPOLL_CTL_ADD, 0, &event))
		die(strerror(errno), "epoll_ctl stdin");
	printf("ready\n");
	fflush(stdout);

	/* Consume on every wakeup (a buffer past its watermark, or a command)
	 * and at least every 100 ms. */
	while (!stopping) {
		int ready = epoll_wait(buffers.epfd, events, ESR_BUF_COUNT + 1, 100);

		if (ready < 0 && errno != EINTR)
			die(strerror(errno), "epoll_wait");
		esr_buffers_consume(&buffers);
		for (n = 0; n < ready; n++)
			if (events[n].data.ptr == &stopping)
				stopping = read_commands();
	}
	if (!tracking)
		getrusage(RUSAGE_SELF, &start);

	/* Drain: until a pass over every buffer finds nothing more. */
	do {
		before = records_total();
		if ((err = esr_buffers_consume(&buffers)))
			die(strerror(-err), "cannot read the buffers");
	} while (records_total() != before);
	getrusage(RUSAGE_SELF, &end);

	for (i = 0; i < ESR_BUF_COUNT; i++)
		lost[i] = states[0].lost[i];
	printf("{");
	print_counts("records", records, states[0].terminal.recorded);
	print_counts("lost", lost, states[0].terminal.skipped + states[0].terminal.lost);
	printf("\"lost_notified\": %llu, \"user_s\": %.6f, \"sys_s\": %.6f, \"max_rss_kb\": %ld}\n",
	       lost_notified, cpu_seconds(end.ru_utime) - cpu_seconds(start.ru_utime),
	       cpu_seconds(end.ru_stime) - cpu_seconds(start.ru_stime), peak_rss_kb());
	fflush(stdout);

	esr_buffers_close(&buffers);
	munmap(states, states_size);
	esr_object_close(&obj);
	free(image);
	return 0;
}
