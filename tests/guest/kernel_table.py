"""The kernel test table, run inside a guest by test_kernels.py: each row
records real processes with the esr binary copied into the guest and checks
the recording. Stdlib only (it runs on the guest's python3).

    python3 kernel_table.py ESR GEN URING_OPS

prints one JSON object: row name -> [ok, what was seen]. A daemon records
the rows' sessions, so the programs are loaded once; the lost-record row
records itself with buffers small enough to overflow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ESR, GEN, URING_OPS = sys.argv[1], sys.argv[2], sys.argv[3]
WORK = tempfile.mkdtemp(prefix="esr-kernel-table-")
DATA = os.path.join(WORK, "data")
CONFIG = os.path.join(WORK, "esr.yaml")
SOCKET = os.path.join(WORK, "esr.sock")
ENV = dict(os.environ, ESR_DATA_DIR=DATA)

# x86_64 system call numbers of the opens libc no longer makes.
SYS_OPEN, SYS_CREAT, SYS_OPENAT2 = 2, 85, 437


def run(*argv: str, config: str = CONFIG, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [ESR, "run", "--config", config, "--", *argv],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"esr run exited {r.returncode}: {r.stderr.strip()[-300:]}")
    return r


def events(r: subprocess.CompletedProcess) -> list[dict]:
    sid = next(
        line.split()[3] for line in r.stderr.splitlines() if line.startswith("esr: recording")
    )
    out = subprocess.run(
        [ESR, "show", sid], capture_output=True, text=True, env=ENV, check=True
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


def commands(evs: list[dict]) -> list[dict]:
    return [e for e in evs if e["event"] == "session.command"]


def executed(evs: list[dict]) -> list[list[str]]:
    return [[e["path"], *e["argv"]] for e in commands(evs) if e["return_code"] == 0]


def row_exec() -> str:
    r = run("sh", "-c", "/bin/true one two; /no/such/program --flag; exit 0")
    evs = events(r)
    assert ["/bin/true", "one", "two"] in executed(evs), executed(evs)
    [failed] = [c for c in commands(evs) if c["path"] == "/no/such/program"]
    assert (failed["return_code"], failed["argv"]) == (-2, ["--flag"]), failed
    return f"{len(commands(evs))} execs, the failed one with -ENOENT"


def row_argv_limits() -> str:
    args = ["y" * 1000] * 40  # 40,000 bytes: more than the 16 KiB kept
    [true] = [c for c in commands(events(run("/bin/true", *args))) if c["path"] == "/bin/true"]
    assert true["argv_truncated"] and true["argv_cut_args"] + len(true["argv"]) == 40, true
    assert true["argv_cut_bytes"] == len(b"/bin/true\0") + 40 * 1001 - 20480, true
    return f"{len(true['argv'])} of 40 arguments kept, {true['argv_cut_bytes']} bytes cut"


def row_opens() -> str:
    paths = {name: os.path.join(WORK, name) for name in ("open", "openat", "openat2", "creat")}
    script = (
        "import ctypes, os, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "p = {k: v.encode() for k, v in zip(sys.argv[1::2], sys.argv[2::2])}\n"
        f"libc.syscall({SYS_OPEN}, p['open'], os.O_CREAT | os.O_WRONLY, 0o600)\n"
        "os.open(p['openat'], os.O_CREAT | os.O_WRONLY, 0o600)\n"
        "how = (ctypes.c_uint64 * 3)(os.O_CREAT | os.O_WRONLY, 0o600, 0)\n"
        f"libc.syscall({SYS_OPENAT2}, -100, p['openat2'], how, 24)\n"
        f"libc.syscall({SYS_CREAT}, p['creat'], 0o600)\n"
    )
    argv = [a for kv in paths.items() for a in kv]
    evs = events(run("python3", "-c", script, *argv))
    opened = {e["path"]: e for e in evs if e["event"] == "session.disk"}
    missing = [name for name, path in paths.items() if path not in opened]
    assert not missing, f"not recorded: {missing}"
    assert all(opened[p]["return_code"] >= 0 for p in paths.values())
    return "open, openat, openat2 and creat recorded with their fds"


def _listener(family: int, host: str) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(8)

    def accept():
        while True:
            try:
                s.accept()[0].close()
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return s


def _closed_port(family: int, host: str) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def row_connect() -> str:
    v4, v6 = _listener(socket.AF_INET, "127.0.0.1"), _listener(socket.AF_INET6, "::1")
    targets = [
        ("127.0.0.1", v4.getsockname()[1], 0),
        ("127.0.0.1", _closed_port(socket.AF_INET, "127.0.0.1"), -111),
        ("::1", v6.getsockname()[1], 0),
        ("::1", _closed_port(socket.AF_INET6, "::1"), -111),
    ]
    script = (
        "import socket, sys\n"
        "for host, port in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    fam = socket.AF_INET6 if ':' in host else socket.AF_INET\n"
        "    socket.socket(fam).connect_ex((host, int(port)))\n"
    )
    argv = [str(a) for host, port, _rc in targets for a in (host, port)]
    evs = events(run("python3", "-c", script, *argv))
    seen = {(e["dst_addr"], e["dst_port"]): e for e in evs if e["event"] == "session.network"}
    for host, port, rc in targets:
        e = seen.get((host, port))
        assert e is not None, f"no connect to {host} {port}: {list(seen)}"
        assert e["return_code"] == rc and e["version"] == (6 if ":" in host else 4), e
    return "v4 and v6, accepted and refused (-ECONNREFUSED)"


def row_fork() -> str:
    marker = os.path.join(WORK, "double-forked")
    r = run(
        "sh",
        "-c",
        f"setsid sh -c 'sleep 0.5; touch {marker}' </dev/null >/dev/null 2>&1 & "
        "(sh -c 'sleep 0.3; head -c1 /etc/hostname' >/dev/null 2>&1 &) ; exit 0",
    )
    evs = events(r)
    assert ["/usr/bin/touch", marker] in executed(evs), executed(evs)
    assert ["/usr/bin/head", "-c1", "/etc/hostname"] in executed(evs), executed(evs)
    assert evs[-1]["event"] == "session.end" and evs[-1]["reason"] == "exited"
    return "setsid and a double fork followed until their last exec"


def row_cgroup_escape() -> str:
    cgroup = next(
        line.split()[1] for line in open("/proc/self/mounts") if line.split()[2] == "cgroup2"
    )
    escape = os.path.join(cgroup, f"esr-escape-{os.getpid()}")
    os.mkdir(escape)
    try:
        evs = events(run("sh", "-c", f"echo $$ > {escape}/cgroup.procs && cat /etc/hostname"))
        cgroup_id = os.stat(escape).st_ino
    finally:
        os.rmdir(escape)
    [cat] = [c for c in commands(evs) if c["program"] == "cat"]
    assert cat["cgroup_id"] == cgroup_id, cat
    return "a process that moved to another cgroup stays recorded"


def row_lost() -> str:
    small = os.path.join(WORK, "small.yaml")
    with open(small, "w") as f:
        f.write(
            "control_socket: /nonexistent/esr.sock\nenhanced_recording:\n  disk_buffer_size: 2\n"
        )
    r = run("sh", "-c", f"echo go | {GEN} open 1 0 --cpu -1", config=small)
    generated = json.loads(r.stdout.splitlines()[-1])["events"]["disk"]
    evs = events(r)
    lost = [e for e in evs if e["event"] == "session.lost"]
    end = evs[-1]
    assert lost and end["lost"]["disk"] == sum(e["lost"]["disk"] for e in lost) > 0, end
    recorded = sum(1 for e in evs if e["event"] == "session.disk" and e["path"] == "/etc/hostname")
    # It opens once more before it starts, to warm up.
    assert recorded + end["lost"]["disk"] == generated + 1, (recorded, end["lost"], generated)
    return f"{generated} opens: {recorded - 1} recorded + {end['lost']['disk']} counted lost"


def row_terminal() -> str:
    # script(1) gives esr run a terminal: it gives the command a pty of its own.
    out = subprocess.run(
        [
            "script",
            "-qec",
            f"{ESR} run --config {CONFIG} -- sh -c 'echo hello-from-the-pty'",
            "/dev/null",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    sid = out.stdout.split("esr: recording session ")[1].split()[0]
    evs = [
        json.loads(line)
        for line in subprocess.run(
            [ESR, "show", sid, "--type", "terminal"], capture_output=True, text=True, env=ENV
        ).stdout.splitlines()
    ]
    shown = "".join(e.get("data", "") for e in evs if e["event"] == "terminal.output")
    assert "hello-from-the-pty" in shown, shown
    return f"{len(evs)} terminal events, the output included"


def row_ptrace_io_uring() -> str:
    # A process of no session: the tracer's own children are in its session already.
    stranger = subprocess.Popen(["sleep", "30"])
    script = (
        "import ctypes, os, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "pid = int(sys.argv[1])\n"
        "assert libc.ptrace(16, pid, None, None) == 0, ctypes.get_errno()\n"
        "os.waitpid(pid, 0)\n"
        "assert libc.ptrace(17, pid, None, None) == 0, ctypes.get_errno()\n"
    )
    port = _listener(socket.AF_INET, "127.0.0.1").getsockname()[1]
    try:
        evs = events(
            run(
                "sh",
                "-c",
                'python3 -c "$0" "$1" && "$2" /etc/hostname "$3"',
                script,
                str(stranger.pid),
                URING_OPS,
                str(port),
            )
        )
    finally:
        stranger.kill()
        stranger.wait()
    traced = [(e["request"], e["return_code"]) for e in evs if e["event"] == "session.ptrace"]
    assert traced == [("attach", 0), ("detach", 0)], traced
    [attach] = [e for e in evs if e["event"] == "session.ptrace" and e["request"] == "attach"]
    assert attach["target_pid"] == stranger.pid and attach["followed"], attach
    rings = {e["operation"] for e in evs if e["event"] == "session.io_uring"}
    assert {"setup", "openat", "connect"} <= rings, rings
    return f"attach and detach, the tracee followed; io_uring {', '.join(sorted(rings))}"


ROWS = {
    "exec": row_exec,
    "argv limits": row_argv_limits,
    "open syscalls": row_opens,
    "connect v4 and v6": row_connect,
    "fork tracking": row_fork,
    "cgroup escape": row_cgroup_escape,
    "lost records": row_lost,
    "terminal": row_terminal,
    "ptrace and io_uring": row_ptrace_io_uring,
}


def main() -> None:
    with open(CONFIG, "w") as f:
        f.write(f"data_dir: {DATA}\ncontrol_socket: {SOCKET}\npin_dir: ''\n")
    results: dict[str, list] = {}
    daemon = subprocess.Popen(
        [ESR, "daemon", "--config", CONFIG], stderr=subprocess.PIPE, text=True, env=ENV
    )
    try:
        for _ in range(600):
            if os.path.exists(SOCKET) or daemon.poll() is not None:
                break
            time.sleep(0.1)
        if daemon.poll() is not None:
            why = daemon.stderr.read().strip().splitlines()
            results = {name: [False, f"no daemon: {why[-1] if why else '?'}"] for name in ROWS}
        else:
            for name, row in ROWS.items():
                t0 = time.monotonic()
                try:
                    results[name] = [True, row()]
                except Exception as err:  # a row's failure is its result
                    results[name] = [False, f"{type(err).__name__}: {err}"[:2000]]
                results[name][1] += f" ({time.monotonic() - t0:.1f} s)"
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
        shutil.rmtree(WORK, ignore_errors=True)
    print(json.dumps(results))


main()
