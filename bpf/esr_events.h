/* Records and maps shared by the BPF programs and esr/_fast.
 *
 * Every record starts with struct esr_event_header; user space reads the
 * header to learn the type and the session, then the type's struct.
 * Variable-length parts (paths, argv) are emitted only as far as they are
 * used, so a typical record is a few hundred bytes, not the struct's size.
 */
#ifndef ESR_EVENTS_H
#define ESR_EVENTS_H

#define ESR_COMM_LEN 16
#define ESR_PATH_MAX 4096
/* The argv block is argv[0] plus at least 16 KiB of arguments. */
#define ESR_ARGV_MAX 20480
/* An exec's arguments are counted, and a failed exec's read, pointer by
 * pointer: up to this many. */
#define ESR_ARGS_MAX 512
/* The binary that runs, as the kernel found it: its path's components,
 * from the file up to the root, at most this deep and this long. */
#define ESR_EXE_DEPTH 32
#define ESR_EXE_MAX 1024

/* The perf buffers, the one place that names them. A buffer's name also
 * names its BPF map (<name>_events), its config key (<name>_buffer_size)
 * and its counters; its index orders every per-buffer array. */
#define ESR_BUFFERS(X) \
	X(COMMAND, command) \
	X(DISK, disk) \
	X(NETWORK, network) \
	X(TERMINAL, terminal)

enum esr_buffer {
#define ESR_BUFFER_INDEX(upper, lower) ESR_BUF_##upper,
	ESR_BUFFERS(ESR_BUFFER_INDEX)
#undef ESR_BUFFER_INDEX
	ESR_BUF_COUNT
};

/* Record types: struct esr_event_header.type, and their tag in recordings
 * (4 is taken there by an event of the recorder's own). */
enum esr_event_type {
	ESR_EVENT_COMMAND = 1,
	ESR_EVENT_DISK = 2,
	ESR_EVENT_NETWORK = 3,
	ESR_EVENT_TERMINAL_OUTPUT = 5,	/* struct esr_terminal_data_event */
	ESR_EVENT_TERMINAL_INPUT = 6,	/* struct esr_terminal_data_event */
	ESR_EVENT_TERMINAL_WRITE = 7,	/* struct esr_terminal_write_event */
	ESR_EVENT_TERMINAL_RESIZE = 8,	/* struct esr_terminal_resize_event */
	ESR_EVENT_PTRACE = 9,		/* struct esr_ptrace_event */
	ESR_EVENT_IO_URING = 15,	/* struct esr_io_uring_event */
	ESR_EVENT_TYPE_END
};

struct esr_event_header {
	__u64 ts_boot_ns;	/* bpf_ktime_get_boot_ns() */
	__u64 session;		/* the session's cookie: generation << 32 | slot */
	__u64 cgroup_id;
	__u32 pid;		/* tgid */
	__u16 type;		/* enum esr_event_type */
	__u16 reserved;
	char comm[ESR_COMM_LEN];
};

/* struct esr_command_event.flags */
#define ESR_ARGV_FROM_ENTRY	0x1	/* failed exec: argv read at syscall exit, from the caller */
#define ESR_ARGV_INCOMPLETE	0x2	/* failed exec: more than ESR_ARGS_MAX pointers, or a string cut */
#define ESR_ARGV_UNREADABLE	0x4	/* the argv memory could not be read */
#define ESR_COMMAND_TTY		0x8	/* the process has a controlling terminal */
#define ESR_COMMAND_MEMFD	0x10	/* the binary is a memfd: exe is its name */
#define ESR_EXE_INCOMPLETE	0x20	/* exe: deeper or longer than recorded */

struct esr_command_event {
	struct esr_event_header hdr;
	__u32 ppid;
	__u32 uid;
	__u32 gid;
	__s32 return_code;	/* 0 or -errno */
	__u32 argc;		/* arguments in the image, argv[0] included */
	__u32 argv_size;	/* bytes of the whole argv block */
	__u32 argv_len;		/* bytes of it copied to data[] */
	__u16 path_len;		/* bytes of path copied after the argv block, NUL included */
	__u16 flags;
	/* A script: the first strings of argv the kernel put there, the
	 * interpreter and its argument, before the script's path; after them,
	 * argv is the caller's from its argv[1]. */
	__u16 interpreter_args;
	__u16 exe_len;		/* bytes of exe after the path */
	__u32 reserved;
	__u64 exe_dev;		/* the binary that runs (a script's interpreter), */
	__u64 exe_ino;		/* as the kernel encodes its device */
	/* argv block (NUL-separated, argv[0] first), the path as called, then
	 * exe: the binary's path components NUL-separated from the file up to
	 * the root (or a memfd's name) */
	char data[ESR_ARGV_MAX + ESR_PATH_MAX + ESR_EXE_MAX];
};

struct esr_disk_event {
	struct esr_event_header hdr;
	__s32 flags;		/* open flags as passed */
	__s32 return_code;	/* fd, or -errno */
	__u16 path_len;		/* NUL included */
	__u16 path_truncated;
	__u32 reserved;
	char path[ESR_PATH_MAX];
};

struct esr_network_event {
	struct esr_event_header hdr;
	__s32 return_code;	/* 0, or -errno; -EINPROGRESS when the outcome was never seen */
	__u16 family;		/* AF_INET or AF_INET6 */
	__u16 src_port;		/* 0 when the kernel never bound one */
	__u16 dst_port;
	__u16 reserved[3];
	__u8 src_addr[16];
	__u8 dst_addr[16];
};

/* The terminal stream is read from the pty master in chunks of at most
 * this many bytes: what one read of a master returns. */
#define ESR_TERMINAL_CHUNK 4096

/* Bytes the pty master's owner read (output: what the user saw, echo
 * included) or wrote (input: keystrokes). */
struct esr_terminal_data_event {
	struct esr_event_header hdr;
	__u64 skipped;		/* output bytes the budget left out of the session so far */
	__u32 tty;		/* the pty's index: /dev/pts/<tty> */
	__u32 len;		/* bytes in data[] */
	char data[ESR_TERMINAL_CHUNK];
};

/* A session process wrote to a terminal: who printed what. */
struct esr_terminal_write_event {
	struct esr_event_header hdr;
	__u32 tty;		/* the terminal's index */
	__u32 major;		/* its driver's major: 136..143 for a pty */
	__s64 bytes;		/* written, or -errno */
};

/* The terminal's size: when first seen, and at every change. */
struct esr_terminal_resize_event {
	struct esr_event_header hdr;
	__u32 tty;
	__u16 rows;
	__u16 cols;
};

/* struct esr_ptrace_event.request */
enum esr_ptrace_request {
	ESR_PTRACE_ATTACH = 1,
	ESR_PTRACE_SEIZE = 2,
	ESR_PTRACE_DETACH = 3,
	ESR_PTRACE_VM_WRITE = 4,	/* process_vm_writev */
};

/* struct esr_ptrace_event.flags */
#define ESR_PTRACE_FOLLOWED	0x1	/* the target is recorded in this session from now on */
#define ESR_PTRACE_LEFT		0x2	/* detached: the target is no longer recorded here */
#define ESR_PTRACE_AS_NAMED	0x4	/* target_pid is as the caller named it, in its pid namespace */

/* A recorded thread reached into another process: it attached to it, or
 * wrote its memory. */
struct esr_ptrace_event {
	struct esr_event_header hdr;
	__s64 return_code;	/* 0 or -errno; bytes written for process_vm_writev */
	__u32 target_pid;	/* the thread (attach, detach) or process (write) */
	__u32 target_tgid;	/* its process, when the kernel says (attach) */
	__u16 request;		/* enum esr_ptrace_request */
	__u16 flags;
	__u32 reserved;
	char target_comm[ESR_COMM_LEN];	/* when the kernel says (attach) */
};

/* A recorded process set up an io_uring, or one of its rings took an
 * operation of a kind it had not taken before. io_uring's opens, connects
 * and the rest bypass the syscalls the other records come from: this says
 * which kinds of operation a session's rings ran, not what on. */
struct esr_io_uring_event {
	struct esr_event_header hdr;
	__u32 ring_fd;		/* the ring, as io_uring_setup returned it */
	__u32 ring_pid;		/* to the process that set it up */
	__u32 sq_entries;	/* setup: the ring's size */
	__u32 setup_flags;	/* setup: IORING_SETUP_* */
	__u8 setup;		/* 1: the ring was set up; 0: opcode was first submitted */
	__u8 opcode;		/* IORING_OP_* */
	__u8 reserved[6];
};

/* Terminal output of a session, in bytes: what its programs wrote is
 * recorded + skipped + lost. */
struct esr_terminal_counts {
	__u64 recorded;		/* sent in records */
	__u64 skipped;		/* beyond the session's budget */
	__u64 lost;		/* the terminal buffer was full */
	__u64 input;		/* keystrokes recorded */
	__u64 tokens;		/* budget left */
	__u64 refilled_ns;	/* when the budget was last refilled */
};

/* One slot per session; user space maps the array and reads it in place. */
struct esr_session_state {
	__u64 session;		/* cookie of the session in this slot, 0 when free */
	__s64 live_tasks;	/* tracked threads still running (anchors excluded) */
	__u64 lost[ESR_BUF_COUNT];	/* records this session could not emit */
	__u64 untracked_forks;	/* children that could not be tracked: the task map was full */
	struct esr_terminal_counts terminal;
};

/* struct esr_task.flags */
#define ESR_TASK_ANCHOR 0x1	/* not recorded itself; what it forks joins the session */
#define ESR_TASK_ANCHOR_CHILD 0x2	/* forked by an anchor, has not exec'd yet */
/* Its reads and writes of pty masters are the session's terminal: sshd's
 * session process (an anchor's child that never execs), or `esr run`
 * relaying the command's pty. */
#define ESR_TASK_TERMINAL 0x4
/* Joined the session by being ptrace-attached by one of its threads; a
 * detach by the session takes it out again. */
#define ESR_TASK_TRACED 0x8

/* Value of the tracked_tasks map, keyed by thread id. */
struct esr_task {
	__u64 session;
	__u32 flags;
	__u32 reserved;
};

#ifndef __bpf__
/* User space: the buffers' names, in index order. */
static const char *const esr_buffer_names[ESR_BUF_COUNT] = {
#define ESR_BUFFER_NAME(upper, lower) [ESR_BUF_##upper] = #lower,
	ESR_BUFFERS(ESR_BUFFER_NAME)
#undef ESR_BUFFER_NAME
};
#endif

#endif /* ESR_EVENTS_H */
