"""`esr bench`: each workload at each rate, generated inside a recorded
session, with each consumer in turn, and the figures side by side.

Every run accounts for every event: the generator knows exactly how many
records its operations produce, and generated = recorded + lost in the
kernel + lost in user space must hold.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import IO, cast

from esr import __version__, schema
from esr.bench import offline
from esr.bench.consumers import start_esr, start_program
from esr.config import Config
from esr.errors import BenchError

# What the bcc peer records; it has no terminal stream.
BCC_BUFFERS = ("command", "disk", "network")

TARGETS = {
    "recorder_ns_per_event": 400,
    "open_cost_vs_floor": 1.15,
    "bytes_per_open": 20,
    "vs_bcc": 20,
    "vs_bcc-wk64": 6,
}


@dataclass
class Result:
    workload: str
    rate: int
    mode: str
    seconds: float = 0.0
    generated: int = 0
    recorded: int | None = None
    lost_kernel: int | None = None
    lost_user: int | None = None
    accounted: bool | None = None
    events_per_s: float = 0.0
    ops_per_s: float = 0.0
    recorder_ns_per_event: float | None = None
    peak_rss_mb: float | None = None
    process_ns_per_op: float | None = None  # flat-out runs only: paced ones busy-wait
    bytes_per_event: float | None = None
    error: str | None = None
    detail: dict = field(default_factory=dict)


def tools() -> dict:
    """Where the generator, the C floor and the bcc peer are."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [
        os.environ.get("ESR_BENCH_TOOLS", ""),
        os.path.join(here, "..", "..", "build", "bench"),
        "/usr/lib/esr/bench",
    ]
    for d in filter(None, candidates):
        if os.path.exists(os.path.join(d, "gen")):
            found = {name: os.path.join(d, name) for name in ("gen", "nop", "floor")}
            peer = [
                p
                for p in (
                    os.path.join(d, "bcc", "bccpeer.py"),
                    os.path.join(here, "..", "..", "bench", "bcc", "bccpeer.py"),
                )
                if os.path.exists(p)
            ]
            found["bccpeer"] = peer[0] if peer else ""
            return found
    raise BenchError(
        "the benchmark's programs (gen, nop, floor) are missing: run `make build`, "
        "or point ESR_BENCH_TOOLS at them"
    )


def _bcc_missing() -> str | None:
    r = subprocess.run(["/usr/bin/python3", "-c", "import bcc"], capture_output=True, check=False)
    return None if r.returncode == 0 else "python3-bpfcc is not installed"


class Bench:
    def __init__(self, seconds: float, pages: tuple[int, ...]):
        self.seconds = seconds
        self.pages = pages
        self.tools = tools()
        self.tmp = tempfile.mkdtemp(prefix="esr-bench-")
        self.notes: list[str] = []
        self.bcc_missing = _bcc_missing()
        if self.bcc_missing:
            self.notes.append(f"bcc peer not run: {self.bcc_missing}")
        self.runs = 0

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _consumer(self, mode: str, workload: str):
        pages = ",".join(map(str, self.pages))
        if mode in ("esr", "outside"):
            return start_esr(self.pages, os.path.join(self.tmp, f"data{self.runs}"))
        if mode == "floor":
            with resources.as_file(resources.files("esr.bpf").joinpath("esr.bpf.o")) as obj:
                return start_program("C floor", [self.tools["floor"], str(obj), "--pages", pages])
        if mode in ("bcc", "bcc-wk64"):
            if self.bcc_missing or not self.tools["bccpeer"]:
                raise BenchError(self.bcc_missing or "bench/bcc/bccpeer.py is missing")
            return start_program(
                mode,
                [
                    "/usr/bin/python3",
                    self.tools["bccpeer"],
                    "--pages",
                    # It records commands, files and connections, not terminals.
                    ",".join(str(self.pages[schema.BUFFERS.index(b)]) for b in BCC_BUFFERS),
                    "--wakeup-events",
                    "64" if mode == "bcc-wk64" else "1",
                ],
            )
        return None

    def run(self, workload: str, rate: int, mode: str) -> Result:
        self.runs += 1
        result = Result(workload, rate, mode)
        try:
            consumer = self._consumer(mode, workload)
        except BenchError as err:
            result.error = str(err)
            return result
        gen = subprocess.Popen(
            [
                self.tools["gen"],
                workload,
                str(self.seconds),
                str(rate),
                "--cpu",
                "1",
                "--nop",
                self.tools["nop"],
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        # Pipes, both: asked for above.
        stdin, stdout = cast(IO[str], gen.stdin), cast(IO[str], gen.stdout)
        try:
            ready = stdout.readline().split()
            if ready[:1] != ["ready"]:
                raise BenchError(f"gen {workload} did not start")
            # The process reading the pty's master, for the tty workload.
            terminal = int(ready[1].split("=")[1]) if len(ready) > 1 else 0
            if consumer is not None and mode != "outside":
                consumer.track(gen.pid, terminal)
            stdin.write("go\n")
            generated = json.loads(stdout.readline())
            gen.wait()
            consumed = consumer.stop() if consumer is not None else None
        except (BenchError, ValueError) as err:
            result.error = str(err)
            return result
        finally:
            if gen.poll() is None:
                gen.kill()
            if consumer is not None:
                consumer.kill()
        return self._figures(result, generated, consumed)

    def _figures(self, result: Result, gen: dict, consumed: dict | None) -> Result:
        events = sum(gen["events"].values())
        cpu = gen["user_s"] + gen["sys_s"] + gen["children_user_s"] + gen["children_sys_s"]
        result.seconds = gen["seconds"]
        result.generated = events if result.mode not in ("none", "outside") else 0
        if gen["seconds"]:
            result.events_per_s = round(events / gen["seconds"])
            result.ops_per_s = round(gen["ops"] / gen["seconds"])
        if result.rate == 0 and gen["ops"]:
            result.process_ns_per_op = round(cpu / gen["ops"] * 1e9)
        result.detail["generator"] = gen
        if consumed is None or result.mode == "outside":
            return result
        result.detail["consumer"] = consumed
        # What the generator counts is what the consumer must account for:
        # records per type, or for a terminal, bytes.
        recorded = sum(consumed["records"].get(k, 0) for k in gen["events"])
        result.recorded = recorded
        result.lost_kernel = sum(consumed["lost"].get(k, 0) for k in gen["events"])
        result.lost_user = consumed.get("lost_user", 0)
        result.accounted = events == recorded + result.lost_kernel + result.lost_user
        if recorded:
            # A tty run counts bytes: a fraction of a ns each.
            result.recorder_ns_per_event = round(
                (consumed["user_s"] + consumed["sys_s"]) / recorded * 1e9, 2
            )
            if "bytes" in consumed:
                result.bytes_per_event = round(consumed["bytes"] / recorded, 2)
        result.peak_rss_mb = round(consumed["max_rss_kb"] / 1024, 1)
        if "headers" in consumed:
            note = f"bcc compiled against {consumed['headers']}"
            if note not in self.notes:
                self.notes.append(note)
        return result


def summarize(results: list[Result]) -> dict:
    by = {(r.workload, r.rate, r.mode): r for r in results}
    summary: dict = {
        "highest_rate_without_loss": {},
        "outside_session_overhead": {},
        "recorded_process_cost": {},
        "targets": {},
    }
    for w in {r.workload for r in results}:
        clean = [
            r.events_per_s
            for r in results
            if r.workload == w
            and r.mode == "esr"
            and r.accounted
            and r.lost_kernel == 0
            and r.lost_user == 0
        ]
        summary["highest_rate_without_loss"][w] = max(clean, default=0)
        none, outside = by.get((w, 0, "none")), by.get((w, 0, "outside"))
        if none and outside and none.process_ns_per_op and outside.process_ns_per_op:
            summary["outside_session_overhead"][w] = {
                "no_bpf_ns_per_op": none.process_ns_per_op,
                "outside_session_ns_per_op": outside.process_ns_per_op,
                "overhead_pct": round(
                    (outside.process_ns_per_op / none.process_ns_per_op - 1) * 100, 1
                ),
            }
        row = {
            m: by[(w, 0, m)].process_ns_per_op for m in ("none", "esr", "floor") if (w, 0, m) in by
        }
        if row:
            summary["recorded_process_cost"][w] = row
    esr_open = by.get(("open", 0, "esr"))
    floor_open = by.get(("open", 0, "floor"))
    targets = summary["targets"]
    if esr_open and esr_open.recorded:
        lost = (esr_open.lost_kernel or 0) + (esr_open.lost_user or 0)
        targets["no_loss_flat_out_open"] = _target(lost, 0, lost == 0)
        ns, want = esr_open.recorder_ns_per_event, TARGETS["recorder_ns_per_event"]
        targets["recorder_ns_per_event"] = _target(ns, want, (ns or 1e9) <= want)
        size, want = esr_open.bytes_per_event, TARGETS["bytes_per_open"]
        targets["bytes_per_open"] = _target(size, want, (size or 1e9) <= want)
        if floor_open and floor_open.process_ns_per_op and esr_open.process_ns_per_op:
            ratio = round(esr_open.process_ns_per_op / floor_open.process_ns_per_op, 3)
            want = TARGETS["open_cost_vs_floor"]
            targets["open_cost_vs_floor"] = _target(ratio, want, ratio <= want)
        for peer in ("bcc", "bcc-wk64"):
            other = by.get(("open", 0, peer))
            if other and other.recorder_ns_per_event and ns:
                ratio, want = other.recorder_ns_per_event / ns, TARGETS[f"vs_{peer}"]
                targets[f"vs_{peer}"] = _target(round(ratio, 1), want, ratio >= want)
    return summary


def _target(value, target, met: bool) -> dict:
    return {"value": value, "target": target, "met": met}


def table(results: list[Result]) -> str:
    head = (
        f"{'workload':8} {'rate':>7} {'consumer':13} {'events/s':>9} {'generated':>10} "
        f"{'recorded':>10} {'lost(k)':>8} {'lost(u)':>7} {'exact':>5} {'rec ns/ev':>9} "
        f"{'RSS MiB':>7} {'proc ns/op':>10} {'B/ev':>6}"
    )
    lines = [head, "-" * len(head)]

    def f(v, fmt="{}"):
        return "-" if v is None else fmt.format(v)

    for r in results:
        rate = "max" if r.rate == 0 else f"{r.rate // 1000}k"
        if r.error:
            lines.append(f"{r.workload:8} {rate:>7} {r.mode:13} skipped: {r.error}")
            continue
        lines.append(
            f"{r.workload:8} {rate:>7} {r.mode:13} {r.events_per_s:>9} "
            f"{f(r.generated or None):>10} "
            f"{f(r.recorded):>10} {f(r.lost_kernel):>8} {f(r.lost_user):>7} "
            f"{f(None if r.accounted is None else ('yes' if r.accounted else 'NO')):>5} "
            f"{f(r.recorder_ns_per_event):>9} {f(r.peak_rss_mb):>7} {f(r.process_ns_per_op):>10} "
            f"{f(r.bytes_per_event):>6}"
        )
    return "\n".join(lines)


def main(
    workloads, rates, modes, seconds: float, as_json: bool, smoke: bool, config: Config
) -> int:
    if os.geteuid() != 0:
        raise BenchError(
            "the benchmark loads BPF programs: run it as root (`esr bench --offline` needs no root)"
        )

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    bench = Bench(seconds, config.buffer_pages())
    plan = [
        (w, r, m)
        for w in workloads
        for r in rates
        for m in modes
        if not (w == "tty" and m.startswith("bcc"))  # the peer records no terminal
    ]
    results = []
    started = time.monotonic()
    try:
        for i, (w, r, m) in enumerate(plan, 1):
            res = bench.run(w, r, m)
            results.append(res)
            what = (
                f"skipped ({res.error})"
                if res.error
                else f"{res.events_per_s} ev/s, lost {res.lost_kernel or 0}+{res.lost_user or 0}, "
                f"{res.recorder_ns_per_event or '-'} ns/ev recorder, "
                f"{res.process_ns_per_op or '-'} ns/op"
            )
            say(f"[{i}/{len(plan)}] {w} @ {'max' if r == 0 else r} {m}: {what}")
    finally:
        bench.close()
    say("[offline] decode -> msgpack -> zstd -> write")
    micro = offline.measure(20_000 if smoke else 200_000, config.compression_level)
    report = {
        "esr": __version__,
        "host": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
        "seconds_per_run": seconds,
        "buffer_pages": schema.by_buffer(list(config.buffer_pages())),
        "runs": [asdict(r) for r in results],
        "summary": summarize(results),
        "offline": micro,
        "notes": bench.notes,
        "wall_s": round(time.monotonic() - started, 1),
    }
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        print(table(results))
        print()
        print(
            json.dumps(
                {"summary": report["summary"], "offline": micro, "notes": bench.notes}, indent=1
            )
        )
    if smoke:
        return _smoke_verdict(results, say, bcc_installed=not bench.bcc_missing)
    return 0


def _smoke_verdict(results: list[Result], say, bcc_installed: bool) -> int:
    """--smoke asserts only exact accounting and that every figure is there,
    the bcc peer's too where bcc is installed."""
    bad = []
    for r in results:
        if r.error:
            if r.mode.startswith("bcc") and not bcc_installed:
                continue  # the report's notes say so
            bad.append(f"{r.workload}/{r.mode}: {r.error}")
            continue
        if not r.ops_per_s or (r.rate == 0 and not r.process_ns_per_op):
            bad.append(f"{r.workload}/{r.mode}: no generator figures")
        if r.mode in ("none", "outside"):
            continue
        if not r.accounted:
            bad.append(
                f"{r.workload}/{r.mode}: generated {r.generated} != recorded {r.recorded} "
                f"+ lost {r.lost_kernel} + {r.lost_user}"
            )
        if r.peak_rss_mb is None or (r.generated and r.recorder_ns_per_event is None):
            bad.append(f"{r.workload}/{r.mode}: missing figures")
        if r.mode.startswith("esr") and r.generated and r.bytes_per_event is None:
            bad.append(f"{r.workload}/{r.mode}: no bytes per event")
    for line in bad:
        say(f"smoke: FAILED {line}")
    return 1 if bad else 0
