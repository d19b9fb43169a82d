/* The recorder's BPF object (esr.bpf.o), loaded and attached: shared by
 * the Python extension (probe.pyx) and the benchmark's C floor, so that
 * both run exactly the same programs, sized the same way.
 *
 * Map, program and setting names go through the subskeleton bpftool
 * generates from the object at build time (esr.subskel.h): a name that
 * is not in the object fails the build, not a run.
 */
#ifndef ESR_OBJECT_H
#define ESR_OBJECT_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <linux/types.h>
#include <bpf/libbpf.h>
#include "esr_events.h"
#include "esr.subskel.h"

/* Links of every program the object has; checked when attaching. */
#define ESR_MAX_LINKS 64

/* Fixed at load time. */
struct esr_object_settings {
	__u32 max_sessions;	/* entries of session_states */
	__u32 max_tasks;	/* entries of every map with one entry per thread */
	__u32 tasks_per_session;	/* of those, the most one session may hold */
	__u64 recorder_exe_dev;	/* the esr executable, or 0: see exec.bpf.c */
	__u64 recorder_exe_ino;
	/* The terminal stream: see terminal.bpf.c. */
	__u8 record_input;
	__u64 terminal_rate;	/* output bytes per second a session may record; 0: all */
	__u64 terminal_burst;
	/* Fork, exec and exit through raw tracepoints (session.bpf.c): where
	 * esr_try_hook(ESR_HOOK_RAW_TP) says the kernel allows them. */
	bool raw_tracepoints;
};

struct esr_object {
	struct bpf_object *obj;
	struct esr_bpf *skel;
	struct bpf_link *links[ESR_MAX_LINKS];
	struct bpf_program *linked[ESR_MAX_LINKS];	/* the program of each link */
	int nlinks;
	/* The maps user space reads and writes, once loaded. */
	int tracked_tasks_fd;
	int session_states_fd;
	int buffer_lost_fd;
	pthread_t reaper;	/* esr_object_detach_session_hooks' thread, while reaping */
	bool reaping;
	/* The io_uring submit tracepoint attached, or NULL: io_uring.bpf.c. */
	const char *io_uring_hook;
};

/* PID_MAX_LIMIT on 64-bit: no thread id reaches it. */
#define ESR_TID_MARKS_MAX (4U << 20)

/* Open an image of esr.bpf.o, size its maps, set its load-time settings,
 * load it and attach every program. Returns 0, or -errno with what failed
 * in *step; esr_libbpf_reason() then has libbpf's own words. On failure
 * the object is closed. */
int esr_object_open(struct esr_object *o, const void *image, size_t size,
		    const struct esr_object_settings *settings, const char **step);

/* The same in three steps, so that maps of a previous load can be reused
 * (bpf_map__reuse_fd) before the load, and programs attached when the
 * caller decides: open, size and set; load; attach. Each returns 0, or
 * -errno with *step, and closes the object on failure. */
int esr_object_prepare(struct esr_object *o, const void *image, size_t size,
		       const struct esr_object_settings *settings, const char **step);
int esr_object_load(struct esr_object *o, const char **step);
int esr_object_attach(struct esr_object *o, const char **step);

/* The programs the recorder attaches only while a session is recorded: those
 * on syscall tracepoints ("tp/syscalls/"), since while any program is
 * attached to one, every syscall of every thread on the host takes the
 * kernel's slower traced path; and the one on TCP state changes, which only
 * finishes connects that a syscall hook began, and would otherwise run for
 * every state change of every TCP socket on the host. */
bool esr_is_session_hook(const struct bpf_program *prog);

/* Attach the programs of a class not attached yet: 0, or -errno with *step,
 * after detaching what this call attached; the object stays loaded. */
enum esr_hooks { ESR_HOOKS_ALL, ESR_HOOKS_SESSION, ESR_HOOKS_ALWAYS };
int esr_object_attach_hooks(struct esr_object *o, enum esr_hooks which, const char **step);

/* Detach the session hooks, and close fds, the links of those of a previous
 * recorder; the caller unpins them first, or a pin keeps them attached. Each
 * detach waits for RCU grace periods (tens of milliseconds on recent
 * kernels), so a thread of the object's does it meanwhile; closing the
 * object waits for it. */
void esr_object_detach_session_hooks(struct esr_object *o, const int *fds, int nfds);

/* Detach the links (or perf event attachments) of these descriptors, and
 * close them: those of a previous recorder's programs. */
void esr_detach_fds(const int *fds, int n);

/* Detach every program and free the object; safe to call twice. */
void esr_object_close(struct esr_object *o);

/* tracked_tasks, and tid_marks mapped (session.bpf.h): how user space adds
 * and removes threads as the programs do. */
struct esr_tracking {
	int tasks_fd;
	__u8 *marks;
	__u32 size;
};

/* Map tid_marks (again, over a previous mapping): 0 or -errno. */
int esr_tracking_open(struct esr_tracking *t, int tracked_tasks_fd, int tid_marks_fd);
void esr_tracking_close(struct esr_tracking *t);

/* Add a thread to tracked_tasks, or remove it, with its mark: 0 or -1
 * with errno set, as libbpf's map calls. */
int esr_track(const struct esr_tracking *t, __u32 tid, const struct esr_task *task);
int esr_untrack(const struct esr_tracking *t, __u32 tid);

/* Free the object, leaving attached the programs whose links are pinned or
 * held by another process, and the maps they use: what a recorder handing
 * over to the next one does. */
void esr_object_release(struct esr_object *o);

/* The perf event array of a buffer. */
int esr_object_buffer_fd(const struct esr_object *o, enum esr_buffer buffer);

/* Whether this kernel loads and attaches one of feature_probe.bpf.o's
 * hooks: 0, or -errno with the step that failed in *step. */
enum esr_hook { ESR_HOOK_KPROBE, ESR_HOOK_FENTRY, ESR_HOOK_RAW_TP };
int esr_try_hook(const void *image, size_t size, enum esr_hook hook, const char **step);

/* Leave autoloaded only the programs of obj (esr.bpf.o, opened) that this
 * kernel can run, fork, exec and exit's raw tracepoint or tracepoint ones as
 * raw_tracepoints says; *io_uring_hook names the io_uring tracepoint chosen,
 * NULL for none. 0, or -errno with the step that failed in *step. */
int esr_choose_programs(struct bpf_object *obj, bool raw_tracepoints,
			const char **io_uring_hook, const char **step);

/* A BPF helper that a program of the image calls and this kernel lacks,
 * among the programs esr_choose_programs keeps: writes "bpf_NAME (used by
 * PROGRAM)" into out and returns 1; 0 when it has them all, -errno when the
 * image cannot be read. */
int esr_missing_helper(const void *image, size_t size, bool raw_tracepoints, char *out,
		       size_t out_size);

/* libbpf reports why a load failed through its print callback: the last
 * line it printed, or "" (captured from the first esr_object_open on). */
const char *esr_libbpf_reason(void);

#endif /* ESR_OBJECT_H */
