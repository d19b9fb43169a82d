#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/perf_event.h>
#include <linux/bpf.h>
#include <bpf/bpf.h>
#include <bpf/btf.h>
#include <bpf/libbpf.h>
#include "object.h"
#include "feature_probe.subskel.h"

/* --- why a load failed ------------------------------------------------------ */

static char reason[1024];
/* libbpf says what went wrong first, then sums it up ("failed to load
 * object"): keep the first message, unless a verifier log comes, whose
 * last line is the kernel's own objection. */
static int have_reason, reason_is_verifiers;

/* The last line of text[0..len) that says something: not empty, and not
 * the verifier's statistics. */
static void last_line(const char *text, size_t len, char *out, size_t size)
{
	const char *start;

	for (;;) {
		while (len && (text[len - 1] == '\n' || text[len - 1] == ' '))
			len--;
		start = text + len;
		while (start > text && start[-1] != '\n')
			start--;
		if (start == text || (strncmp(start, "processed ", 10) &&
				      strncmp(start, "verification time", 17)))
			break;
		len = start - text;
	}
	if (!strncmp(start, "libbpf: ", 8))
		start += 8;
	snprintf(out, size, "%.*s", (int)(text + len - start), start);
}

static int capture(enum libbpf_print_level level, const char *fmt, va_list args)
{
	static const char end_marker[] = "-- END PROG LOAD LOG --";
	const char *end, *prog;
	char line[512];
	char *msg;
	va_list copy;
	int n;

	if (level == LIBBPF_DEBUG)
		return 0;
	va_copy(copy, args);
	n = vsnprintf(NULL, 0, fmt, copy);
	va_end(copy);
	if (n < 0 || !(msg = malloc(n + 1)))
		return 0;
	vsnprintf(msg, n + 1, fmt, args);
	end = strstr(msg, end_marker);
	prog = strstr(msg, "prog '");
	if (end && !reason_is_verifiers) {
		/* "prog 'NAME': -- BEGIN PROG LOAD LOG --\n<log>-- END ...": the
		 * log's last line is the verifier's objection. */
		last_line(msg, end - msg, line, sizeof(line));
		if (prog && strchr(prog + 6, '\''))
			snprintf(reason, sizeof(reason), "%.*s: %s",
				 (int)(strchr(prog + 6, '\'') + 1 - prog), prog, line);
		else
			snprintf(reason, sizeof(reason), "%s", line);
		reason_is_verifiers = 1;
	} else if (!have_reason) {
		last_line(msg, n, reason, sizeof(reason));
	}
	have_reason = 1;
	free(msg);
	return 0;
}

static void capture_reasons(void)
{
	libbpf_set_print(capture);
	reason[0] = 0;
	have_reason = reason_is_verifiers = 0;
}

const char *esr_libbpf_reason(void)
{
	return reason;
}

/* --- the recorder's object ---------------------------------------------------- */

static int fail(struct esr_object *o, const char **step, const char *what, int err)
{
	*step = what;
	esr_object_close(o);
	return err ? err : -EINVAL;
}

/* A byte per thread id up to pid_max, a page at least; the kernel's own
 * limit (PID_MAX_LIMIT) at most, were pid_max unreadable. */
static __u32 marks_size(void)
{
	static __u32 size;
	unsigned long pid_max = 0;
	FILE *f;

	if (size)
		return size;
	f = fopen("/proc/sys/kernel/pid_max", "r");
	if (!f || fscanf(f, "%lu", &pid_max) != 1 || pid_max > ESR_TID_MARKS_MAX)
		pid_max = ESR_TID_MARKS_MAX;
	if (f)
		fclose(f);
	size = pid_max < 4096 ? 4096 : pid_max;
	return size;
}

static int size_maps(struct esr_bpf *skel, const struct esr_object_settings *settings,
		     const char **step)
{
	struct bpf_map *per_thread[] = { skel->maps.tracked_tasks, skel->maps.open_in_flight,
					 skel->maps.connect_attempts, skel->maps.connect_in_flight,
					 skel->maps.terminal_in_flight, skel->maps.exec_in_flight };
	int cpus = libbpf_num_possible_cpus();
	size_t i;
	int err;

	for (i = 0; i < sizeof(per_thread) / sizeof(per_thread[0]); i++)
		if ((err = bpf_map__set_max_entries(per_thread[i], settings->max_tasks))) {
			*step = "cannot size the per-thread maps";
			return err;
		}
	if ((err = bpf_map__set_max_entries(skel->maps.session_states, settings->max_sessions))) {
		*step = "cannot size session_states";
		return err;
	}
	if (cpus <= 0) {
		*step = "cannot count the possible CPUs";
		return cpus ? cpus : -EINVAL;
	}
	if ((err = bpf_map__set_value_size(skel->maps.tid_marks, marks_size()))) {
		*step = "cannot size tid_marks";
		return err;
	}
	*skel->rodata.tid_marks_size = marks_size();
	/* One argv scratch entry per CPU: per-CPU values are capped at 32 KiB. */
	if ((err = bpf_map__set_max_entries(skel->maps.argv_scratch, cpus))) {
		*step = "cannot size argv_scratch";
		return err;
	}
	return 0;
}

/* io_uring's tracepoints vary with the kernel (io_uring.bpf.c): keep the
 * programs of those this one has, as its BTF lists their records. Fork,
 * exec and exit's come twice (session.bpf.c): keep one of each pair. */
int esr_choose_programs(struct bpf_object *obj, bool raw_tracepoints,
			const char **io_uring_hook, const char **step)
{
	struct esr_bpf *skel = esr_bpf__open(obj);
	struct btf *vmlinux;
	int create, req, sqe, err = 0;

	if (!skel) {
		*step = "the BPF object is not esr.bpf.o";
		return -errno;
	}
	vmlinux = btf__load_vmlinux_btf();
	if (!vmlinux) {
		err = -errno;
		*step = "cannot read the kernel's BTF";
		esr_bpf__destroy(skel);
		return err;
	}
#define HAS(name) (btf__find_by_name_kind(vmlinux, "trace_event_raw_" name, BTF_KIND_STRUCT) > 0)
	create = HAS("io_uring_create");
	req = create && HAS("io_uring_submit_req");
	sqe = create && !req && HAS("io_uring_submit_sqe");
#undef HAS
	btf__free(vmlinux);
	*io_uring_hook = req ? "io_uring_submit_req" : sqe ? "io_uring_submit_sqe" : NULL;
	if (bpf_program__set_autoload(skel->progs.io_uring_created, create) ||
	    bpf_program__set_autoload(skel->progs.io_uring_submit_req, req) ||
	    bpf_program__set_autoload(skel->progs.io_uring_submit_sqe, sqe)) {
		*step = "cannot choose the io_uring programs";
		err = -EINVAL;
	} else if (bpf_program__set_autoload(skel->progs.track_fork, !raw_tracepoints) ||
		   bpf_program__set_autoload(skel->progs.track_fork_raw, raw_tracepoints) ||
		   bpf_program__set_autoload(skel->progs.exec_done, !raw_tracepoints) ||
		   bpf_program__set_autoload(skel->progs.exec_done_raw, raw_tracepoints) ||
		   bpf_program__set_autoload(skel->progs.untrack_exit, !raw_tracepoints) ||
		   bpf_program__set_autoload(skel->progs.untrack_exit_raw, raw_tracepoints)) {
		*step = "cannot choose the fork, exec and exit programs";
		err = -EINVAL;
	}
	esr_bpf__destroy(skel);
	return err;
}

static void join_reaper(struct esr_object *o);

int esr_object_prepare(struct esr_object *o, const void *image, size_t size,
		       const struct esr_object_settings *settings, const char **step)
{
	LIBBPF_OPTS(bpf_object_open_opts, opts, .object_name = "esr.bpf.o");
	struct esr_bpf *skel;
	int err;

	join_reaper(o);
	memset(o, 0, sizeof(*o));
	capture_reasons();
	o->obj = bpf_object__open_mem(image, size, &opts);
	if (!o->obj)
		return fail(o, step, "cannot open the BPF object", -errno);
	o->skel = skel = esr_bpf__open(o->obj);
	if (!skel)
		return fail(o, step, "the BPF object is not esr.bpf.o", -errno);
	if ((err = size_maps(skel, settings, step)) ||
	    (err = esr_choose_programs(o->obj, settings->raw_tracepoints, &o->io_uring_hook, step))) {
		esr_object_close(o);
		return err;
	}
	*skel->rodata.tasks_per_session = settings->tasks_per_session;
	*skel->rodata.recorder_exe_dev = settings->recorder_exe_dev;
	*skel->rodata.recorder_exe_ino = settings->recorder_exe_ino;
	*skel->rodata.record_input = settings->record_input;
	*skel->rodata.budget_rate = settings->terminal_rate;
	*skel->rodata.budget_burst = settings->terminal_burst;
	if (settings->terminal_rate)
		*skel->rodata.budget_fill_ns = settings->terminal_burst * 1000000000ULL /
					       settings->terminal_rate;
	return 0;
}

int esr_object_load(struct esr_object *o, const char **step)
{
	struct esr_bpf *skel = o->skel;
	int err;

	capture_reasons();
	if ((err = bpf_object__load(o->obj)))
		return fail(o, step, "cannot load the BPF programs", err);
	o->tracked_tasks_fd = bpf_map__fd(skel->maps.tracked_tasks);
	o->session_states_fd = bpf_map__fd(skel->maps.session_states);
	o->buffer_lost_fd = bpf_map__fd(skel->maps.buffer_lost);
	return 0;
}

bool esr_is_session_hook(const struct bpf_program *prog)
{
	const char *section = bpf_program__section_name(prog);

	return strncmp(section, "tp/syscalls/", 12) == 0 ||
	       strcmp(section, "tp/sock/inet_sock_set_state") == 0;
}

static bool attached(const struct esr_object *o, const struct bpf_program *prog)
{
	for (int i = 0; i < o->nlinks; i++)
		if (o->linked[i] == prog)
			return true;
	return false;
}

static bool wanted(const struct bpf_program *prog, enum esr_hooks which)
{
	switch (which) {
	case ESR_HOOKS_SESSION:
		return esr_is_session_hook(prog);
	case ESR_HOOKS_ALWAYS:
		return !esr_is_session_hook(prog);
	default:
		return true;
	}
}

int esr_object_attach_hooks(struct esr_object *o, enum esr_hooks which, const char **step)
{
	struct bpf_program *prog;
	int err, before = o->nlinks;

	bpf_object__for_each_program(prog, o->obj) {
		if (!bpf_program__autoload(prog) || !wanted(prog, which) || attached(o, prog))
			continue;
		if (o->nlinks == ESR_MAX_LINKS) {
			err = -E2BIG;
			*step = "more BPF programs than ESR_MAX_LINKS";
			goto undo;
		}
		o->links[o->nlinks] = bpf_program__attach(prog);
		if (!o->links[o->nlinks]) {
			err = -errno;
			snprintf(reason, sizeof(reason), "%s: %s", bpf_program__name(prog),
				 strerror(-err));
			*step = "cannot attach a BPF program";
			goto undo;
		}
		o->linked[o->nlinks++] = prog;
	}
	return 0;
undo:
	while (o->nlinks > before)
		bpf_link__destroy(o->links[--o->nlinks]);
	return err ? err : -EINVAL;
}

int esr_object_attach(struct esr_object *o, const char **step)
{
	int err = esr_object_attach_hooks(o, ESR_HOOKS_ALL, step);

	if (err)
		esr_object_close(o);
	return err;
}

struct detach_job {
	struct bpf_link *link;
	int fd;
	pthread_t thread;
	bool started;
};

static void *detach_one(void *arg)
{
	struct detach_job *job = arg;

	if (job->link) {
		bpf_link__destroy(job->link);
	} else {
		/* A perf event attachment may have another copy open (the
		 * descriptor store): disabled, it stops now all the same. */
		ioctl(job->fd, PERF_EVENT_IOC_DISABLE, 0);
		close(job->fd);
	}
	return NULL;
}

/* Detaching a tracepoint's program waits for RCU grace periods, tens of
 * milliseconds each on recent kernels: one after another, two dozen take
 * seconds. From a thread each, the waits overlap. */
static void detach_all(struct detach_job *jobs, int n)
{
	for (int i = 0; i < n; i++)
		jobs[i].started = !pthread_create(&jobs[i].thread, NULL, detach_one, &jobs[i]);
	for (int i = 0; i < n; i++) {
		if (jobs[i].started)
			pthread_join(jobs[i].thread, NULL);
		else
			detach_one(&jobs[i]);
	}
}

void esr_detach_fds(const int *fds, int n)
{
	struct detach_job jobs[ESR_MAX_LINKS] = {};

	for (int done = 0; done < n; done += ESR_MAX_LINKS) {
		int batch = n - done < ESR_MAX_LINKS ? n - done : ESR_MAX_LINKS;

		for (int i = 0; i < batch; i++)
			jobs[i] = (struct detach_job){ .fd = fds[done + i] };
		detach_all(jobs, batch);
	}
}

struct reaping {
	int n;
	struct detach_job jobs[];
};

static void *reap(void *arg)
{
	struct reaping *r = arg;

	detach_all(r->jobs, r->n);
	free(r);
	return NULL;
}

/* Wait for the links handed to the reaper to be gone. */
static void join_reaper(struct esr_object *o)
{
	if (o->reaping)
		pthread_join(o->reaper, NULL);
	o->reaping = false;
}

void esr_object_detach_session_hooks(struct esr_object *o, const int *fds, int nfds)
{
	struct reaping *r = calloc(1, sizeof(*r) + (ESR_MAX_LINKS + nfds) * sizeof(r->jobs[0]));
	int kept = 0;

	join_reaper(o);
	if (!r) {	/* no memory for the thread's list: detach them here */
		esr_detach_fds(fds, nfds);
		for (int i = 0; i < o->nlinks; i++)
			if (esr_is_session_hook(o->linked[i]))
				bpf_link__destroy(o->links[i]);
	} else {
		for (int i = 0; i < nfds; i++)
			r->jobs[r->n++].fd = fds[i];
		for (int i = 0; i < o->nlinks; i++)
			if (esr_is_session_hook(o->linked[i]))
				r->jobs[r->n++].link = o->links[i];
	}
	for (int i = 0; i < o->nlinks; i++) {
		if (esr_is_session_hook(o->linked[i]))
			continue;
		o->links[kept] = o->links[i];
		o->linked[kept++] = o->linked[i];
	}
	o->nlinks = kept;
	if (!r || !r->n)
		free(r);
	else if (!pthread_create(&o->reaper, NULL, reap, r))
		o->reaping = true;
	else
		reap(r);
}

int esr_object_open(struct esr_object *o, const void *image, size_t size,
		    const struct esr_object_settings *settings, const char **step)
{
	int err;

	if ((err = esr_object_prepare(o, image, size, settings, step)) ||
	    (err = esr_object_load(o, step)))
		return err;
	return esr_object_attach(o, step);
}

void esr_object_close(struct esr_object *o)
{
	join_reaper(o);
	while (o->nlinks)
		bpf_link__destroy(o->links[--o->nlinks]);
	esr_bpf__destroy(o->skel);
	o->skel = NULL;
	bpf_object__close(o->obj);
	o->obj = NULL;
}

int esr_tracking_open(struct esr_tracking *t, int tracked_tasks_fd, int tid_marks_fd)
{
	struct bpf_map_info info = {};
	__u32 len = sizeof(info);
	void *marks;

	if (bpf_obj_get_info_by_fd(tid_marks_fd, &info, &len))
		return -errno;
	marks = mmap(NULL, info.value_size, PROT_READ | PROT_WRITE, MAP_SHARED, tid_marks_fd, 0);
	if (marks == MAP_FAILED)
		return -errno;
	esr_tracking_close(t);
	t->tasks_fd = tracked_tasks_fd;
	t->marks = marks;
	t->size = info.value_size;
	return 0;
}

void esr_tracking_close(struct esr_tracking *t)
{
	if (t->marks)
		munmap(t->marks, t->size);
	t->marks = NULL;
	t->size = 0;
}

/* As session.bpf.h's track() and untrack(): the mark is set before the
 * thread enters tracked_tasks and cleared after it leaves, so that a hook
 * never misses a tracked thread. */
int esr_track(const struct esr_tracking *t, __u32 tid, const struct esr_task *task)
{
	int err;

	if (tid < t->size)
		t->marks[tid] = 1;
	err = bpf_map_update_elem(t->tasks_fd, &tid, task, BPF_ANY);
	if (err && tid < t->size)
		t->marks[tid] = 0;
	return err;
}

int esr_untrack(const struct esr_tracking *t, __u32 tid)
{
	int err = bpf_map_delete_elem(t->tasks_fd, &tid);

	if (tid < t->size)
		t->marks[tid] = 0;
	return err;
}

void esr_object_release(struct esr_object *o)
{
	/* Destroying a link detaches it, and a perf event link disables its
	 * event first, which a pin does not undo: only close the descriptor.
	 * (A perf event link's own perf event descriptor stays open until the
	 * process exits, which is what a recorder handing over does next.) */
	while (o->nlinks) {
		struct bpf_link *link = o->links[--o->nlinks];

		bpf_link__disconnect(link);
		close(bpf_link__fd(link));
		bpf_link__destroy(link);
	}
	esr_object_close(o);
}

int esr_object_buffer_fd(const struct esr_object *o, enum esr_buffer buffer)
{
	const struct esr_bpf *skel = o->skel;
	struct bpf_map *maps[ESR_BUF_COUNT] = {
#define ESR_BUFFER_MAP(upper, lower) [ESR_BUF_##upper] = skel->maps.lower##_events,
		ESR_BUFFERS(ESR_BUFFER_MAP)
#undef ESR_BUFFER_MAP
	};

	return bpf_map__fd(maps[buffer]);
}

/* --- optional hooks ------------------------------------------------------------ */

int esr_try_hook(const void *image, size_t size, enum esr_hook hook, const char **step)
{
	LIBBPF_OPTS(bpf_object_open_opts, opts, .object_name = "feature_probe.bpf.o");
	struct feature_probe_bpf *skel = NULL;
	struct bpf_object *obj;
	struct bpf_program *wanted, *prog;
	struct bpf_link *link;
	int err = 0;

	capture_reasons();
	obj = bpf_object__open_mem(image, size, &opts);
	if (!obj) {
		*step = "open";
		return -errno;
	}
	skel = feature_probe_bpf__open(obj);
	if (!skel) {
		err = -errno;
		*step = "open";
		goto out;
	}
	wanted = hook == ESR_HOOK_KPROBE ? skel->progs.probe_kprobe
	       : hook == ESR_HOOK_FENTRY ? skel->progs.probe_fentry
					 : skel->progs.probe_raw_tp;
	bpf_object__for_each_program(prog, obj)
		bpf_program__set_autoload(prog, prog == wanted);
	if ((err = bpf_object__load(obj))) {
		*step = "load";
		goto out;
	}
	link = bpf_program__attach(wanted);
	if (!link) {
		err = -errno;
		*step = "attach";
		goto out;
	}
	bpf_link__destroy(link);
out:
	feature_probe_bpf__destroy(skel);
	bpf_object__close(obj);
	return err;
}

/* --- what the kernel lacks ----------------------------------------------------- */

#define HELPER_NAME(name) "bpf_" #name
static const char *const helper_names[] = { __BPF_FUNC_MAPPER(HELPER_NAME) };
#undef HELPER_NAME

int esr_missing_helper(const void *image, size_t size, bool raw_tracepoints, char *out,
		       size_t out_size)
{
	LIBBPF_OPTS(bpf_object_open_opts, opts, .object_name = "esr.bpf.o");
	/* Each helper is probed once per program type: a probe is a load. */
	enum { UNKNOWN, HAS, LACKS };
	unsigned char known[sizeof(helper_names) / sizeof(helper_names[0])];
	enum bpf_prog_type known_for = BPF_PROG_TYPE_UNSPEC;
	struct bpf_object *obj;
	struct bpf_program *prog;
	const char *hook, *step;
	int found = 0, err;

	capture_reasons();
	obj = bpf_object__open_mem(image, size, &opts);
	if (!obj)
		return -errno;
	if ((err = esr_choose_programs(obj, raw_tracepoints, &hook, &step))) {
		bpf_object__close(obj);
		return err;
	}
	bpf_object__for_each_program(prog, obj) {
		const struct bpf_insn *insn = bpf_program__insns(prog);
		size_t i, n = bpf_program__insn_cnt(prog);

		if (!bpf_program__autoload(prog))
			continue;
		if (bpf_program__type(prog) != known_for) {
			known_for = bpf_program__type(prog);
			memset(known, UNKNOWN, sizeof(known));
		}
		for (i = 0; i < n && !found; i++) {
			__s32 id = insn[i].imm;

			if (insn[i].code != (BPF_JMP | BPF_CALL) || insn[i].src_reg != 0)
				continue;
			if (id <= 0 || (size_t)id >= sizeof(known)) {
				snprintf(out, out_size, "#%d (used by %s)", id, bpf_program__name(prog));
				found = 1;
				break;
			}
			if (known[id] == UNKNOWN)
				known[id] = libbpf_probe_bpf_helper(known_for, id, NULL) == 0 ? LACKS : HAS;
			if (known[id] == HAS)
				continue;
			snprintf(out, out_size, "%s (used by %s)", helper_names[id],
				 bpf_program__name(prog));
			found = 1;
		}
		if (found)
			break;
	}
	bpf_object__close(obj);
	return found;
}
