"""The consumers the benchmark compares, all driven the same way over a pipe:
they print `ready`, take `track PID [TERMINAL_PID]` (answer `tracking`;
TERMINAL_PID reads the session's pty master) and `stop` (answer
one JSON line of counts, losses and their own CPU since `track`).

esr's own recorder runs in a forked child of `esr bench`, through the same
Recorder class as `esr daemon`; the C floor and the bcc peer are programs.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import selectors
import subprocess
import tempfile

from esr import loader, schema
from esr._fast.probe import run_stats
from esr.config import Config, EnhancedRecording, Terminal
from esr.datadir import DataDir
from esr.errors import BenchError, ProbeError
from esr.loop import RecordingLoop
from esr.recorder import Recorder


class Consumer:
    """A consumer process behind two pipes."""

    def __init__(self, name: str, pid: int, input, output, stderr=None):
        self.name = name
        self.pid = pid
        self.input = input
        self.output = output
        self.stderr = stderr  # a file the program's stderr goes to, for its reasons
        self._expect("ready", timeout=120)

    def _expect(self, prefix: str, timeout: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.output, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.kill()
            raise BenchError(f"{self.name}: no '{prefix}' within {timeout:g} s")
        line = self.output.readline().strip()
        if not line.startswith(prefix):
            self.kill()
            detail = line
            try:
                detail = json.loads(line).get("error", line)
            except (ValueError, AttributeError):
                pass
            if not detail and self.stderr is not None:
                self.stderr.seek(0)
                said = self.stderr.read().decode(errors="replace").strip().splitlines()
                detail = said[-1] if said else ""
            raise BenchError(f"{self.name}: {detail or 'exited'}")
        return line

    def track(self, pid: int, terminal_pid: int = 0) -> None:
        self.input.write(f"track {pid} {terminal_pid}\n" if terminal_pid else f"track {pid}\n")
        self._expect("tracking", timeout=30)

    def stop(self) -> dict:
        self.input.write("stop\n")
        result = json.loads(self._expect("{", timeout=120))
        self.wait()
        if "error" in result:
            raise BenchError(f"{self.name}: {result['error']}")
        return result

    def wait(self) -> None:
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self.input.close()
        self.output.close()

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass


def start_program(name: str, argv: list[str]) -> Consumer:
    # Kept open until the consumer is done with: its last words are the reason it failed.
    stderr = tempfile.TemporaryFile()  # noqa: SIM115
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1
    )
    return Consumer(name, proc.pid, proc.stdin, proc.stdout, stderr)


def start_esr(
    pages: tuple[int, ...], data_dir: str, cpu: int = 0, count_runs: bool = False
) -> Consumer:
    """esr's recorder in a forked child (works the same from a venv and from
    the single binary, which can't run `python -m`). With count_runs, the
    kernel counts its programs' runs and their time, which the reply gives
    (`bpf_runs`, `bpf_ns`): the kernel's timing adds to every program run,
    so only where esr records no one."""
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(down_w)
            os.close(up_r)
            status = _serve(
                os.fdopen(down_r, "rb"),
                os.fdopen(up_w, "w", buffering=1),
                pages,
                data_dir,
                cpu,
                count_runs,
            )
        except BaseException as err:  # the parent reads the reason as the reply
            try:
                os.write(
                    up_w, (json.dumps({"error": str(err) or type(err).__name__}) + "\n").encode()
                )
            except OSError:
                pass
        finally:
            os._exit(status)
    os.close(down_r)
    os.close(up_w)
    return Consumer("esr", pid, os.fdopen(down_w, "w", buffering=1), os.fdopen(up_r, "r"))


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def _peak_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> None:
    """Count the peak RSS from now on; where clear_refs can't be written, it
    stays the whole process's peak, as in the C floor and the bcc peer."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _serve(commands, replies, pages, data_dir, cpu, count_runs=False) -> int:
    # count_runs has a default: a baseline checkout is served by harness._BASELINE
    # of this one, which passes only what every checkout takes.
    os.sched_setaffinity(0, {cpu})
    stats = None
    if count_runs:
        try:
            stats = run_stats()
        except ProbeError:  # before Linux 5.8: the run goes on without the counts
            pass
    r = EnhancedRecording(**{f"{name}_buffer_size": n for name, n in zip(schema.BUFFERS, pages)})
    # Every terminal byte recorded: the benchmark measures what that costs.
    terminal = Terminal(max_bytes_per_second=0)
    config = Config(enhanced_recording=r, terminal=terminal, data_dir=data_dir, max_sessions=64)
    recorder = Recorder(config, loader.load(config), DataDir(data_dir))
    loop = RecordingLoop(recorder)
    replies.write("ready\n")
    try:
        result = loop.run(_consume(recorder, loop, commands, replies, stats is not None))
    finally:
        recorder.close()
        loop.close()
        if stats is not None:
            os.close(stats)
    replies.write(json.dumps(result) + "\n")
    return 0


async def _consume(
    recorder: Recorder, loop: RecordingLoop, commands, replies, count_runs: bool
) -> dict:
    """Follow the commands on the pipe: "track PID [TERMINAL_PID]" opens the
    session the figures are about, "stop" (or the pipe's end) ends it."""
    runs_before = recorder.probe.program_runs() if count_runs else (0, 0)
    reader = asyncio.StreamReader()
    await loop.loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), commands)
    session = None
    start_cpu = (0.0, 0.0)
    while True:
        words = (await reader.readline()).decode().split()
        if words[:1] == ["track"]:
            session = recorder.open_session(
                login="bench",
                user="bench",
                seed_pid=int(words[1]),
                terminal_pid=int(words[2]) if len(words) > 2 else 0,
            )
            _reset_peak_rss()
            start_cpu = _cpu()
            replies.write("tracking\n")
        elif words[:1] == ["stop"] or not words:
            break
    recorder.flush()
    end_cpu = _cpu()
    result = {
        "records": schema.by_buffer([0] * len(schema.BUFFERS)),
        "lost": schema.by_buffer([0] * len(schema.BUFFERS)),
        "bytes": 0,
        "lost_user": recorder.lost_in_user_space + recorder.orphans,
        "user_s": end_cpu[0] - start_cpu[0],
        "sys_s": end_cpu[1] - start_cpu[1],
        "max_rss_kb": _peak_rss_kb(),
    }
    if count_runs:
        runs, ns = recorder.probe.program_runs()
        result["bpf_runs"], result["bpf_ns"] = runs - runs_before[0], ns - runs_before[1]
    if session is not None:  # none when recording what runs outside sessions
        if session.sid in recorder.registry.by_sid:
            recorder.end(session, "exited")
        recorded, skipped, lost, _input = session.terminal
        result["records"] = {**schema.by_buffer(session.records), "terminal_bytes": recorded}
        result["lost"] = {**schema.by_buffer(session.lost), "terminal_bytes": skipped + lost}
        result["bytes"] = os.path.getsize(session.path)
    return result
