/* floor: the C floor of `esr bench`, the least a consumer of esr.bpf.o can
 * cost. It loads the recorder's own BPF object, sized and attached as
 * esr/_fast/probe.pyx does, opens the three perf buffers with the same
 * perf_event_attr (watermark at a quarter of the buffer), and only counts
 * the records per type: no decoding, no storage.
 *
 *   floor OBJECT --pages C,D,N [--cpu N]
 *
 * C, D, N: per-CPU pages of the command, disk and network buffers (powers
 * of two). --cpu pins floor (default 0, -1: no pinning).
 *
 * Protocol, one line each way:
 *   floor prints "ready" once everything is attached;
 *   "track PID"  records PID as a plain member of session slot 0 (cookie
 *                1 << 32 | 0); the first one opens the slot and starts the
 *                counts, the CPU and the peak RSS accounting; floor answers
 *                "tracking";
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
#include <unistd.h>
#include <linux/types.h>
#include <linux/perf_event.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include "esr_events.h"

#define MAX_SESSIONS 64		/* session_states entries, as `esr bench` configures esr */
#define MAX_TASKS 65536		/* every per-thread map */
#define MAX_LINKS 64
#define COOKIE ((1ULL << 32) | 0)	/* generation 1, slot 0 */

static const char *const buffer_names[ESR_BUF_COUNT] = { "command", "disk", "network" };
static const char *const event_maps[ESR_BUF_COUNT] = { "command_events", "disk_events",
							"network_events" };
static const char *const per_task_maps[] = { "tracked_tasks", "open_in_flight",
					     "connect_attempts", "connect_in_flight" };

/* Counted by on_record(). */
static unsigned long long records[ESR_BUF_COUNT], unknown_records, lost_notified;

/* The session: slot 0 of the mapped session_states, and the tracked_tasks map. */
static struct esr_session_state *states;
static int tracked_fd, tracking;
static struct rusage start;	/* CPU at the first "track" */

/* libbpf's last warning: the verifier's or the kernel's reason for a failure. */
static char libbpf_reason[512];

static int on_libbpf_message(enum libbpf_print_level level, const char *fmt, va_list args)
{
	size_t len;

	if (level == LIBBPF_DEBUG)
		return 0;
	vsnprintf(libbpf_reason, sizeof(libbpf_reason), fmt, args);
	len = strlen(libbpf_reason);
	while (len && (libbpf_reason[len - 1] == '\n' || libbpf_reason[len - 1] == ' '))
		libbpf_reason[--len] = 0;
	return 0;
}

/* One line on stderr, with errno's or libbpf's reason when asked, and exit 1. */
__attribute__((noreturn, format(printf, 2, 3)))
static void die(int with_reason, const char *fmt, ...)
{
	int err = errno;
	va_list ap;

	fputs("floor: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	if (with_reason)
		fprintf(stderr, ": %s", libbpf_reason[0] ? libbpf_reason : strerror(err));
	fputc('\n', stderr);
	exit(1);
}

struct sample {
	struct perf_event_header header;
	__u32 size;
	char data[];
};

struct lost {
	struct perf_event_header header;
	__u64 id;
	__u64 lost;
};

static enum bpf_perf_event_ret on_record(void *ctx, int cpu, struct perf_event_header *header)
{
	if (header->type == PERF_RECORD_SAMPLE) {
		struct sample *s = (struct sample *)header;
		__u16 type = 0;

		if (s->size >= sizeof(struct esr_event_header))
			memcpy(&type, s->data + offsetof(struct esr_event_header, type), sizeof(type));
		if (type >= ESR_EVENT_COMMAND && type <= ESR_EVENT_NETWORK)
			records[type - ESR_EVENT_COMMAND]++;
		else
			unknown_records++;
	} else if (header->type == PERF_RECORD_LOST) {
		lost_notified += ((struct lost *)header)->lost;
	}
	return LIBBPF_PERF_EVENT_CONT;
}

/* The same attributes as probe.pyx's esr_perf_buffer(), down to attr.size
 * left 0, which the kernel reads as PERF_ATTR_SIZE_VER0: every field set
 * here is within it. */
static struct perf_buffer *open_buffer(int map_fd, size_t pages)
{
	struct perf_event_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.type = PERF_TYPE_SOFTWARE;
	attr.config = PERF_COUNT_SW_BPF_OUTPUT;
	attr.sample_type = PERF_SAMPLE_RAW;
	attr.sample_period = 1;
	attr.watermark = 1;
	/* A quarter of the ring, which libbpf maps as pages of the system page size. */
	attr.wakeup_watermark = pages * sysconf(_SC_PAGESIZE) / 4;
	return perf_buffer__new_raw(map_fd, pages, &attr, on_record, NULL, NULL);
}

static struct bpf_map *find_map(struct bpf_object *obj, const char *name)
{
	struct bpf_map *map = bpf_object__find_map_by_name(obj, name);

	if (!map)
		die(0, "no map %s in the BPF object", name);
	return map;
}

static void size_map(struct bpf_object *obj, const char *name, __u32 entries)
{
	if (bpf_map__set_max_entries(find_map(obj, name), entries))
		die(1, "cannot size map %s", name);
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
	return records[0] + records[1] + records[2] + unknown_records + lost_notified;
}

/* "track PID": as probe.pyx's open_session(0, COOKIE), the first time, and
 * track(PID, COOKIE), a plain member. */
static void track(const char *arg)
{
	struct esr_task task = { .session = COOKIE };
	unsigned long pid;
	char *rest;
	__u32 tid;

	pid = strtoul(arg, &rest, 10);
	if (*rest || !pid || pid > 0xffffffffUL)
		die(0, "track: bad pid %s", arg);
	tid = pid;
	if (!tracking) {
		states[0].live_tasks = 0;
		memset(states[0].lost, 0, sizeof(states[0].lost));
		states[0].untracked_forks = 0;
		__atomic_store_n(&states[0].session, COOKIE, __ATOMIC_RELEASE);
	}
	if (bpf_map_update_elem(tracked_fd, &tid, &task, BPF_ANY))
		die(1, "cannot track pid %lu", pid);
	__sync_fetch_and_add(&states[0].live_tasks, 1);
	if (!tracking) {
		memset(records, 0, sizeof(records));
		unknown_records = lost_notified = 0;
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
			die(1, "read stdin");
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
			die(0, "unknown command: %s", line);
	}
	len -= line - input;
	memmove(input, line, len + 1);
	if (len == sizeof(input) - 1)
		die(0, "command line too long");
	return 0;
}

int main(int argc, char **argv)
{
	struct perf_buffer *buffers[ESR_BUF_COUNT];
	struct bpf_link *links[MAX_LINKS];
	struct epoll_event event, events[ESR_BUF_COUNT + 1];
	struct rusage end;
	struct bpf_object *obj;
	struct bpf_program *prog;
	size_t pages[ESR_BUF_COUNT] = { 0, 0, 0 }, states_size;
	int cpu = 0, nlinks = 0, ncpus, epfd, i, n, stopping = 0;
	unsigned long long before;
	char *rest;

	if (argc < 2)
		die(0, "usage: floor OBJECT --pages C,D,N [--cpu N]");
	for (i = 2; i < argc; i += 2) {
		if (i + 1 >= argc)
			die(0, "usage: floor OBJECT --pages C,D,N [--cpu N]");
		if (!strcmp(argv[i], "--pages")) {
			if (sscanf(argv[i + 1], "%zu,%zu,%zu%n", &pages[0], &pages[1], &pages[2], &n) != 3 ||
			    argv[i + 1][n])
				die(0, "--pages: expected C,D,N, not %s", argv[i + 1]);
		} else if (!strcmp(argv[i], "--cpu")) {
			cpu = strtol(argv[i + 1], &rest, 10);
			if (*rest || !argv[i + 1][0])
				die(0, "--cpu: expected a number, not %s", argv[i + 1]);
		} else {
			die(0, "usage: floor OBJECT --pages C,D,N [--cpu N]");
		}
	}
	if (!pages[0] || !pages[1] || !pages[2])
		die(0, "--pages C,D,N is required");
	if (cpu >= 0) {
		cpu_set_t set;

		CPU_ZERO(&set);
		CPU_SET(cpu, &set);
		if (sched_setaffinity(0, sizeof(set), &set))
			die(1, "cannot pin to CPU %d", cpu);
	}

	/* Load and attach, as Probe.__init__ does. */
	libbpf_set_print(on_libbpf_message);
	ncpus = libbpf_num_possible_cpus();
	if (ncpus <= 0)
		die(0, "cannot count the possible CPUs");
	obj = bpf_object__open_file(argv[1], NULL);
	if (!obj)
		die(1, "cannot open %s", argv[1]);
	size_map(obj, "session_states", MAX_SESSIONS);
	size_map(obj, "argv_scratch", ncpus);
	for (i = 0; i < (int)(sizeof(per_task_maps) / sizeof(per_task_maps[0])); i++)
		size_map(obj, per_task_maps[i], MAX_TASKS);
	if (bpf_object__load(obj))
		die(1, "cannot load the BPF programs");
	bpf_object__for_each_program(prog, obj) {
		if (nlinks == MAX_LINKS)
			die(0, "too many BPF programs");
		links[nlinks] = bpf_program__attach(prog);
		if (!links[nlinks])
			die(1, "cannot attach %s", bpf_program__name(prog));
		nlinks++;
	}
	tracked_fd = bpf_map__fd(find_map(obj, "tracked_tasks"));
	states_size = (MAX_SESSIONS * sizeof(*states) + 4095) & ~(size_t)4095;
	states = mmap(NULL, states_size, PROT_READ | PROT_WRITE, MAP_SHARED,
		      bpf_map__fd(find_map(obj, "session_states")), 0);
	if (states == MAP_FAILED)
		die(1, "cannot map session_states");

	epfd = epoll_create1(EPOLL_CLOEXEC);
	if (epfd < 0)
		die(1, "epoll_create1");
	memset(&event, 0, sizeof(event));
	event.events = EPOLLIN;
	for (i = 0; i < ESR_BUF_COUNT; i++) {
		buffers[i] = open_buffer(bpf_map__fd(find_map(obj, event_maps[i])), pages[i]);
		if (!buffers[i])
			die(1, "cannot open the %s buffer of %zu pages", buffer_names[i], pages[i]);
		event.data.fd = perf_buffer__epoll_fd(buffers[i]);
		if (epoll_ctl(epfd, EPOLL_CTL_ADD, event.data.fd, &event))
			die(1, "epoll_ctl");
	}
	event.data.fd = 0;
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &event))
		die(1, "epoll_ctl stdin");
	printf("ready\n");
	fflush(stdout);

	/* Consume on every wakeup (a buffer past its watermark, or a command)
	 * and at least every 100 ms. */
	while (!stopping) {
		int ready = epoll_wait(epfd, events, ESR_BUF_COUNT + 1, 100);

		if (ready < 0 && errno != EINTR)
			die(1, "epoll_wait");
		for (i = 0; i < ESR_BUF_COUNT; i++)
			perf_buffer__consume(buffers[i]);
		for (n = 0; n < ready; n++)
			if (events[n].data.fd == 0)
				stopping = read_commands();
	}
	if (!tracking)
		getrusage(RUSAGE_SELF, &start);

	/* Drain: until a pass over every buffer finds nothing more. */
	do {
		before = records_total();
		for (i = 0; i < ESR_BUF_COUNT; i++)
			if (perf_buffer__consume(buffers[i]) < 0)
				die(1, "cannot read the %s buffer", buffer_names[i]);
	} while (records_total() != before);
	getrusage(RUSAGE_SELF, &end);

	if (unknown_records)
		fprintf(stderr, "floor: warning: %llu records of an unknown type\n", unknown_records);
	printf("{\"records\": {\"command\": %llu, \"disk\": %llu, \"network\": %llu}, "
	       "\"lost\": {\"command\": %llu, \"disk\": %llu, \"network\": %llu}, "
	       "\"lost_notified\": %llu, \"user_s\": %.6f, \"sys_s\": %.6f, \"max_rss_kb\": %ld}\n",
	       records[0], records[1], records[2],
	       (unsigned long long)states[0].lost[0], (unsigned long long)states[0].lost[1],
	       (unsigned long long)states[0].lost[2], lost_notified,
	       cpu_seconds(end.ru_utime) - cpu_seconds(start.ru_utime),
	       cpu_seconds(end.ru_stime) - cpu_seconds(start.ru_stime), peak_rss_kb());
	fflush(stdout);

	for (i = 0; i < ESR_BUF_COUNT; i++)
		perf_buffer__free(buffers[i]);
	while (nlinks)
		bpf_link__destroy(links[--nlinks]);
	munmap(states, states_size);
	bpf_object__close(obj);
	return 0;
}
