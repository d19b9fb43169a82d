# Declarations of bpf/esr_events.h, the records shared with the BPF programs.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t

cdef extern from "<linux/types.h>":
    pass

cdef extern from "esr_events.h":
    enum:
        ESR_BUF_COMMAND
        ESR_BUF_DISK
        ESR_BUF_NETWORK
        ESR_BUF_TERMINAL
        ESR_BUF_COUNT
        ESR_ARGV_MAX
        ESR_EVENT_TYPE_END
        ESR_EVENT_COMMAND
        ESR_EVENT_DISK
        ESR_EVENT_NETWORK
        ESR_EVENT_TERMINAL_OUTPUT
        ESR_EVENT_TERMINAL_INPUT
        ESR_EVENT_TERMINAL_WRITE
        ESR_EVENT_TERMINAL_RESIZE
        ESR_EVENT_PTRACE
        ESR_EVENT_IO_URING
        ESR_PTRACE_FOLLOWED
        ESR_PTRACE_LEFT
        ESR_PTRACE_AS_NAMED
        ESR_TERMINAL_CHUNK
        ESR_ARGV_INCOMPLETE
        ESR_ARGV_UNREADABLE
        ESR_COMMAND_TTY
        ESR_COMMAND_MEMFD
        ESR_EXE_INCOMPLETE
        ESR_TASK_ANCHOR
        ESR_TASK_ANCHOR_CHILD
        ESR_TASK_TERMINAL

    struct esr_event_header:
        uint64_t ts_boot_ns
        uint64_t session
        uint64_t cgroup_id
        uint32_t pid
        uint16_t type
        char comm[16]

    struct esr_command_event:
        esr_event_header hdr
        uint32_t ppid
        uint32_t uid
        uint32_t gid
        int32_t return_code
        uint32_t argc
        uint32_t argv_size
        uint32_t argv_len
        uint16_t path_len
        uint16_t flags
        uint16_t interpreter_args
        uint16_t exe_len
        uint64_t exe_dev
        uint64_t exe_ino
        char data[1]

    struct esr_disk_event:
        esr_event_header hdr
        int32_t flags
        int32_t return_code
        uint16_t path_len
        uint16_t path_truncated
        char path[1]

    struct esr_network_event:
        esr_event_header hdr
        int32_t return_code
        uint16_t family
        uint16_t src_port
        uint16_t dst_port
        uint8_t src_addr[16]
        uint8_t dst_addr[16]

    struct esr_terminal_data_event:
        esr_event_header hdr
        uint64_t skipped
        uint32_t tty
        uint32_t len
        char data[1]

    struct esr_terminal_write_event:
        esr_event_header hdr
        uint32_t tty
        uint32_t major
        int64_t bytes

    struct esr_terminal_resize_event:
        esr_event_header hdr
        uint32_t tty
        uint16_t rows
        uint16_t cols

    struct esr_ptrace_event:
        esr_event_header hdr
        int64_t return_code
        uint32_t target_pid
        uint32_t target_tgid
        uint16_t request
        uint16_t flags
        char target_comm[16]

    struct esr_io_uring_event:
        esr_event_header hdr
        uint32_t ring_fd
        uint32_t ring_pid
        uint32_t sq_entries
        uint32_t setup_flags
        uint8_t setup
        uint8_t opcode

    struct esr_terminal_counts:
        uint64_t recorded
        uint64_t skipped
        uint64_t lost
        uint64_t input

    struct esr_session_state:
        uint64_t session
        int64_t live_tasks
        uint64_t lost[ESR_BUF_COUNT]
        uint64_t untracked_forks
        esr_terminal_counts terminal

    struct esr_task:
        uint64_t session
        uint32_t flags
        uint32_t reserved

    const char *esr_buffer_names[]
