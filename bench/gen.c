/* gen: the workload generator of `esr bench`.
 *
 *   gen WORKLOAD SECONDS RATE [--cpu N] [--nop PATH]
 *
 * WORKLOAD, one operation (op) and the one record it makes:
 *   open     open("/etc/hostname", O_RDONLY) + close       one disk record
 *   connect  TCP connect to a loopback listener, then close  one network record
 *            (a thread of gen accepts and closes; the client closes with
 *            SO_LINGER {1, 0}, a reset, so no TIME_WAIT piles up)
 *   exec     vfork + execve(nop) + waitpid                  one command record
 *   mixed    a fixed cycle of 50 opens, 5 connects, 1 exec
 * RATE is ops (= events) per second, paced by busy-waiting on
 * CLOCK_MONOTONIC; 0 runs flat out. --cpu pins gen, its thread and its
 * children (default 1, -1: no pinning). --nop defaults to `nop` next to gen.
 *
 * Protocol: after setup gen prints "ready", waits for the line "go" on
 * stdin, runs for SECONDS and prints one JSON line. Its "events" are exactly
 * the records esr's BPF programs make for gen and its children meanwhile: a
 * disk record per open() call, a command record per execve() reached, a
 * network record per connect() on a TCP socket, whether they fail or not.
 * So nothing else in the run may open, exec or connect: no stdio file, no
 * name lookup; the acceptor thread starts before "ready", which is before
 * the consumer starts tracking gen, so it is not recorded.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum op { OP_OPEN, OP_CONNECT, OP_EXEC };
enum workload { W_OPEN, W_CONNECT, W_EXEC, W_MIXED };
static const char *const workload_names[] = {
	[W_OPEN] = "open", [W_CONNECT] = "connect", [W_EXEC] = "exec", [W_MIXED] = "mixed",
};

/* The mixed cycle: ops 0..49 open, 50..54 connect, 55 exec. */
#define MIXED_OPENS 50
#define MIXED_CONNECTS 5
#define MIXED_CYCLE (MIXED_OPENS + MIXED_CONNECTS + 1)

static enum workload workload;
static char nop_path[4096];
static struct sockaddr_in listener;

/* What the run did: records expected per type, and failed ops. */
static unsigned long long commands, disks, networks, failures;

__attribute__((noreturn, format(printf, 1, 2)))
static void die(const char *fmt, ...)
{
	va_list ap;

	fputs("gen: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static unsigned long long now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000000000ULL + t.tv_nsec;
}

static double seconds_of(struct timeval t)
{
	return t.tv_sec + t.tv_usec / 1e6;
}

static void do_open(void)
{
	int fd = open("/etc/hostname", O_RDONLY);

	disks++;
	if (fd < 0)
		failures++;
	else
		close(fd);
}

static void do_connect(void)
{
	static const struct linger reset = { .l_onoff = 1, .l_linger = 0 };
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0) {		/* no socket, no connect(), no record */
		failures++;
		return;
	}
	if (setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset)))
		failures++;
	networks++;
	if (connect(fd, (struct sockaddr *)&listener, sizeof(listener)))
		failures++;
	close(fd);
}

static void do_exec(void)
{
	char *argv[] = { "nop", NULL }, *envp[] = { NULL };
	int status;
	pid_t pid = vfork();

	if (pid == 0) {
		execve(nop_path, argv, envp);
		_exit(127);	/* a failed execve is still one record */
	}
	if (pid < 0) {		/* no child, no execve, no record */
		failures++;
		return;
	}
	commands++;
	if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status))
		failures++;
}

static void run_op(enum op op)
{
	if (op == OP_OPEN)
		do_open();
	else if (op == OP_CONNECT)
		do_connect();
	else
		do_exec();
}

/* The op number n of the workload. */
static enum op op_of(unsigned long long n)
{
	switch (workload) {
	case W_OPEN:
		return OP_OPEN;
	case W_CONNECT:
		return OP_CONNECT;
	case W_EXEC:
		return OP_EXEC;
	case W_MIXED:
		break;
	}
	n %= MIXED_CYCLE;
	return n < MIXED_OPENS ? OP_OPEN : n < MIXED_OPENS + MIXED_CONNECTS ? OP_CONNECT : OP_EXEC;
}

static void *acceptor(void *arg)
{
	int fd = *(int *)arg, conn;

	for (;;) {
		conn = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
		if (conn >= 0)
			close(conn);
	}
	return NULL;
}

/* A loopback listener on an ephemeral port, with a thread emptying it. */
static void start_listener(void)
{
	static int fd;
	socklen_t len = sizeof(listener);
	pthread_t thread;

	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket: %s", strerror(errno));
	listener.sin_family = AF_INET;
	listener.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	listener.sin_port = 0;
	if (bind(fd, (struct sockaddr *)&listener, sizeof(listener)) ||
	    getsockname(fd, (struct sockaddr *)&listener, &len) || listen(fd, 4096))
		die("listener: %s", strerror(errno));
	errno = pthread_create(&thread, NULL, acceptor, &fd);
	if (errno)
		die("pthread_create: %s", strerror(errno));
}

/* The default nop: next to gen itself. */
static void default_nop(void)
{
	ssize_t n = readlink("/proc/self/exe", nop_path, sizeof(nop_path) - 5);
	char *slash;

	if (n < 0)
		die("readlink /proc/self/exe: %s", strerror(errno));
	nop_path[n] = 0;
	slash = strrchr(nop_path, '/');
	strcpy(slash ? slash + 1 : nop_path, "nop");
}

/* Block until the line "go" on stdin (read(2), so stdio opens nothing). */
static void wait_for_go(void)
{
	char line[64];
	size_t len = 0;
	char c;

	for (;;) {
		if (read(0, &c, 1) != 1)
			die("stdin closed before go");
		if (c != '\n') {
			if (len < sizeof(line) - 1)
				line[len++] = c;
			continue;
		}
		line[len] = 0;
		if (!strcmp(line, "go"))
			return;
		len = 0;
	}
}

__attribute__((noreturn))
static void usage(void)
{
	die("usage: gen open|exec|connect|mixed SECONDS RATE [--cpu N] [--nop PATH]");
}

int main(int argc, char **argv)
{
	struct rusage self0, self1, child0, child1;
	unsigned long long t0, t, end, ops = 0;
	unsigned long rate;
	double seconds;
	int cpu = 1, i;
	char *rest;
	size_t w;
	bool uses[3] = { false, false, false };

	if (argc < 4)
		usage();
	for (w = 0; w < sizeof(workload_names) / sizeof(workload_names[0]); w++)
		if (!strcmp(argv[1], workload_names[w]))
			break;
	if (w == sizeof(workload_names) / sizeof(workload_names[0]))
		usage();
	workload = w;
	seconds = strtod(argv[2], &rest);
	if (*rest || !(seconds > 0))
		usage();
	rate = strtoul(argv[3], &rest, 10);
	if (*rest || argv[3][0] == '-')
		usage();
	default_nop();
	for (i = 4; i < argc; i += 2) {
		if (i + 1 >= argc)
			usage();
		if (!strcmp(argv[i], "--cpu")) {
			cpu = strtol(argv[i + 1], &rest, 10);
			if (*rest)
				usage();
		} else if (!strcmp(argv[i], "--nop")) {
			snprintf(nop_path, sizeof(nop_path), "%s", argv[i + 1]);
		} else {
			usage();
		}
	}

	/* Pin first: the acceptor thread and every child inherit it. */
	if (cpu >= 0) {
		cpu_set_t set;

		CPU_ZERO(&set);
		CPU_SET(cpu, &set);
		if (sched_setaffinity(0, sizeof(set), &set))
			die("cannot pin to CPU %d: %s", cpu, strerror(errno));
	}
	for (i = 0; i < MIXED_CYCLE; i++)
		uses[op_of(i)] = true;
	if (uses[OP_CONNECT])
		start_listener();
	if (uses[OP_EXEC] && access(nop_path, X_OK))
		die("%s: %s", nop_path, strerror(errno));
	/* One warm-up op of each kind, untracked yet: it faults in the code
	 * paths and proves the setup works before "ready". */
	for (i = 0; i < 3; i++)
		if (uses[i])
			run_op(i);
	if (failures)
		die("the warm-up %s failed", workload_names[workload]);
	commands = disks = networks = 0;

	printf("ready\n");
	fflush(stdout);
	wait_for_go();

	getrusage(RUSAGE_SELF, &self0);
	getrusage(RUSAGE_CHILDREN, &child0);
	t0 = t = now_ns();
	end = t0 + (unsigned long long)(seconds * 1e9);
	while (t < end) {
		run_op(op_of(ops));
		ops++;
		if (rate) {
			unsigned long long next = t0 + (unsigned long long)(ops * 1e9 / rate);

			do
				t = now_ns();
			while (t < next && t < end);
		} else {
			t = now_ns();
		}
	}
	getrusage(RUSAGE_SELF, &self1);
	getrusage(RUSAGE_CHILDREN, &child1);

	printf("{\"workload\": \"%s\", \"rate\": %lu, \"seconds\": %.6f, \"ops\": %llu, "
	       "\"events\": {\"command\": %llu, \"disk\": %llu, \"network\": %llu}, "
	       "\"failures\": %llu, \"user_s\": %.6f, \"sys_s\": %.6f, "
	       "\"children_user_s\": %.6f, \"children_sys_s\": %.6f}\n",
	       workload_names[workload], rate, (t - t0) / 1e9, ops, commands, disks, networks, failures,
	       seconds_of(self1.ru_utime) - seconds_of(self0.ru_utime),
	       seconds_of(self1.ru_stime) - seconds_of(self0.ru_stime),
	       seconds_of(child1.ru_utime) - seconds_of(child0.ru_utime),
	       seconds_of(child1.ru_stime) - seconds_of(child0.ru_stime));
	fflush(stdout);
	return 0;
}
