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
 *   tty      write 4 KiB to a pty whose master a child of gen reads, as sshd
 *            or esr run would: counted in bytes ("terminal_bytes"), each
 *            recorded, skipped by the budget or lost
 *   write    write 1 byte to /dev/null: no record; what the terminal hooks
 *            cost a program that writes
 * RATE is ops (= events) per second, paced by busy-waiting on
 * CLOCK_MONOTONIC; 0 runs flat out. --cpu pins gen, its thread and its
 * children (default 1, -1: no pinning). --nop defaults to `nop` next to gen.
 *
 * A flat-out run also reports its CPU time per op (its children's included)
 * in each 100 ms window ("window_ns_per_op"): on a shared host, others'
 * interference only ever adds to a window, so its low windows show the
 * cost of the op itself.
 *
 * Protocol: after setup gen prints "ready" (for tty: "ready terminal=PID",
 * the pid reading the master, which the consumer records as the session's
 * terminal), waits for the line "go" on
 * stdin, runs for SECONDS (or until SIGUSR1) and prints one JSON line. Its "events" are exactly
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
#include <poll.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

enum op { OP_OPEN, OP_CONNECT, OP_EXEC, OP_TTY, OP_WRITE, OP_COUNT };
enum workload { W_OPEN, W_CONNECT, W_EXEC, W_MIXED, W_TTY, W_WRITE };
static const char *const workload_names[] = {
	[W_OPEN] = "open", [W_CONNECT] = "connect", [W_EXEC] = "exec", [W_MIXED] = "mixed",
	[W_TTY] = "tty", [W_WRITE] = "write",
};

#define TTY_CHUNK 4096

/* The mixed cycle: ops 0..49 open, 50..54 connect, 55 exec. */
#define MIXED_OPENS 50
#define MIXED_CONNECTS 5
#define MIXED_CYCLE (MIXED_OPENS + MIXED_CONNECTS + 1)

#define WINDOW_NS 100000000ULL
#define MAX_WINDOWS 36000	/* an hour */
static unsigned long window_ns_per_op[MAX_WINDOWS];
static int windows;

static enum workload workload;
static char nop_path[4096];
static struct sockaddr_in listener;

/* What the run did: records expected per type, terminal bytes, failed ops. */
static unsigned long long commands, disks, networks, terminal_bytes, failures;
static volatile sig_atomic_t stopped;	/* SIGUSR1: the run ends now */

static int tty_slave = -1, devnull = -1;
static int tty_warm = -1;	/* readable once the reader has read the warm-up's chunk */
static pid_t tty_reader;

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

/* CPU seconds of gen, its threads and its children waited for. */
static double cpu_seconds(void)
{
	struct rusage self, children;

	getrusage(RUSAGE_SELF, &self);
	getrusage(RUSAGE_CHILDREN, &children);
	return seconds_of(self.ru_utime) + seconds_of(self.ru_stime) +
	       seconds_of(children.ru_utime) + seconds_of(children.ru_stime);
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

static void do_tty(void)
{
	static const char chunk[TTY_CHUNK] = { [0 ... TTY_CHUNK - 1] = 'x' };
	ssize_t n = write(tty_slave, chunk, sizeof(chunk));

	if (n < 0)
		failures++;
	else
		terminal_bytes += n;
}

static void do_write(void)
{
	if (write(devnull, "x", 1) != 1)
		failures++;
}

static void run_op(enum op op)
{
	switch (op) {
	case OP_OPEN: do_open(); break;
	case OP_CONNECT: do_connect(); break;
	case OP_EXEC: do_exec(); break;
	case OP_TTY: do_tty(); break;
	case OP_WRITE: do_write(); break;
	case OP_COUNT: break;
	}
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
	case W_TTY:
		return OP_TTY;
	case W_WRITE:
		return OP_WRITE;
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

/* A pty in raw mode, so that the bytes written are the bytes read, and a
 * child that reads its master until every writer is gone. The child says
 * when it has read the warm-up's chunk: read later, while tracked, it would
 * count as recorded without being generated. */
static void start_tty(void)
{
	static char buf[65536];
	struct termios raw;
	int warm[2];
	int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);

	if (master < 0 || grantpt(master) || unlockpt(master))
		die("pty: %s", strerror(errno));
	tty_slave = open(ptsname(master), O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (tty_slave < 0 || tcgetattr(tty_slave, &raw))
		die("pty slave: %s", strerror(errno));
	cfmakeraw(&raw);
	if (tcsetattr(tty_slave, TCSANOW, &raw))
		die("pty slave: %s", strerror(errno));
	if (pipe2(warm, O_CLOEXEC))
		die("pipe: %s", strerror(errno));
	tty_reader = fork();
	if (tty_reader < 0)
		die("fork: %s", strerror(errno));
	if (tty_reader == 0) {
		struct pollfd readable = { .fd = master, .events = POLLIN };
		size_t total = 0;
		ssize_t n;

		/* Wait in poll(), as sshd and esr run do, not in read(): a read
		 * entered before the consumer tracks this process is not seen. */
		close(tty_slave);
		close(warm[0]);
		while (poll(&readable, 1, -1) >= 0 && (n = read(master, buf, sizeof(buf))) > 0) {
			total += n;
			if (warm[1] >= 0 && total >= TTY_CHUNK) {
				close(warm[1]);
				warm[1] = -1;
			}
		}
		_exit(0);	/* EIO: the writer closed its end */
	}
	close(master);
	close(warm[1]);
	tty_warm = warm[0];
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
	die("usage: gen open|exec|connect|mixed|tty|write SECONDS RATE [--cpu N] [--nop PATH]");
}

static void stop(int sig)
{
	(void)sig;
	stopped = 1;
}

int main(int argc, char **argv)
{
	struct rusage self0, self1, child0, child1;
	unsigned long long t0, t, end, ops = 0, window_end, window_ops = 0;
	double window_cpu;
	unsigned long rate;
	double seconds;
	int cpu = 1, i;
	char *rest;
	size_t w;
	bool uses[OP_COUNT] = { false };
	struct sigaction on_usr1 = { .sa_handler = stop, .sa_flags = SA_RESTART };

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
	if (uses[OP_TTY])
		start_tty();
	if (uses[OP_WRITE] && (devnull = open("/dev/null", O_WRONLY | O_CLOEXEC)) < 0)
		die("/dev/null: %s", strerror(errno));
	/* One warm-up op of each kind, untracked yet: it faults in the code
	 * paths and proves the setup works before "ready". */
	for (i = 0; i < OP_COUNT; i++)
		if (uses[i])
			run_op(i);
	if (failures)
		die("the warm-up %s failed", workload_names[workload]);
	if (uses[OP_TTY]) {
		char byte;

		if (read(tty_warm, &byte, 1) != 0)
			die("the pty's reader did not read the warm-up");
		close(tty_warm);
	}
	commands = disks = networks = terminal_bytes = 0;

	if (uses[OP_TTY])
		printf("ready terminal=%d\n", (int)tty_reader);
	else
		printf("ready\n");
	fflush(stdout);
	/* For a run that must outlast something of unknown length (a package
	 * upgrade): started long, ended when that is done. SA_RESTART: no op
	 * is cut short and miscounted. */
	if (sigaction(SIGUSR1, &on_usr1, NULL))
		die("sigaction: %s", strerror(errno));
	wait_for_go();

	getrusage(RUSAGE_SELF, &self0);
	getrusage(RUSAGE_CHILDREN, &child0);
	t0 = t = now_ns();
	end = t0 + (unsigned long long)(seconds * 1e9);
	window_end = t0 + WINDOW_NS;
	window_cpu = cpu_seconds();
	while (t < end && !stopped) {
		run_op(op_of(ops));
		ops++;
		if (rate) {
			unsigned long long next = t0 + (unsigned long long)(ops * 1e9 / rate);

			do
				t = now_ns();
			while (t < next && t < end);
		} else {
			t = now_ns();
			if (t >= window_end && windows < MAX_WINDOWS) {
				double cpu = cpu_seconds();

				window_ns_per_op[windows++] =
					(unsigned long)((cpu - window_cpu) * 1e9 / (ops - window_ops));
				window_cpu = cpu;
				window_ops = ops;
				window_end = t + WINDOW_NS;
			}
		}
	}
	getrusage(RUSAGE_SELF, &self1);
	getrusage(RUSAGE_CHILDREN, &child1);	/* the pty's reader is not the writer */
	if (uses[OP_TTY]) {
		/* Every byte read (and recorded) before the figures are reported. */
		close(tty_slave);
		waitpid(tty_reader, NULL, 0);
	}

	printf("{\"workload\": \"%s\", \"rate\": %lu, \"seconds\": %.6f, \"ops\": %llu, "
	       "\"events\": {\"command\": %llu, \"disk\": %llu, \"network\": %llu, "
	       "\"terminal_bytes\": %llu}, "
	       "\"failures\": %llu, \"user_s\": %.6f, \"sys_s\": %.6f, "
	       "\"children_user_s\": %.6f, \"children_sys_s\": %.6f, \"window_ns_per_op\": [",
	       workload_names[workload], rate, (t - t0) / 1e9, ops, commands, disks, networks,
	       terminal_bytes, failures,
	       seconds_of(self1.ru_utime) - seconds_of(self0.ru_utime),
	       seconds_of(self1.ru_stime) - seconds_of(self0.ru_stime),
	       seconds_of(child1.ru_utime) - seconds_of(child0.ru_utime),
	       seconds_of(child1.ru_stime) - seconds_of(child0.ru_stime));
	for (i = 0; i < windows; i++)
		printf("%s%lu", i ? ", " : "", window_ns_per_op[i]);
	printf("]}\n");
	fflush(stdout);
	return 0;
}
