"""`esr bench`: each workload at each rate, generated inside a recorded
session, with each consumer in turn, and the figures side by side.

Every run accounts for every event: the generator knows exactly how many
records its operations produce, and generated = recorded + lost in the
kernel + lost in user space must hold.

With repeats, each (workload, rate) runs its consumers in turn, then again
in reverse order, and so on, so that a noisy minute spreads over every
consumer rather than deciding one figure; each figure is the median of its
runs, with their spread, and the ratios between consumers are those of the
medians.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import IO, cast

from esr import __version__, loader, schema
from esr.bench import UNRECORDED, offline
from esr.bench.consumers import start_esr, start_program
from esr.config import Config
from esr.errors import BenchError

# What the bcc peer records; it has no terminal stream.
BCC_BUFFERS = ("command", "disk", "network")

# Flat out, from the medians: per workload, the most esr's recorder CPU
# per event may be, as a multiple of the floor's, and the least bcc's may
# be as a multiple of esr's; what running outside a session may cost an
# operation; and what the recorded open() may cost against the floor.
TARGETS: dict[str, dict[str, float]] = {
    "open": {"esr_vs_floor": 5, "bcc-wk64_vs_esr": 8, "bcc_vs_esr": 20, "outside_pct": 3},
    "exec": {"bcc-wk64_vs_esr": 4, "bcc_vs_esr": 20, "outside_pct": 5},
    "connect": {"bcc-wk64_vs_esr": 4, "bcc_vs_esr": 20, "outside_pct": 5},
}
OPEN_COST_VS_FLOOR = 1.15
BYTES_PER_EVENT = 20
# Figures of a run that get a median and a spread.
FIGURES = (
    "events_per_s",
    "recorder_ns_per_event",
    "process_ns_per_op",
    "process_ns_per_op_low",
    "bpf_runs_per_op",
    "bpf_ns_per_op",
    "bytes_per_event",
    "peak_rss_mb",
)
# Whose recorder CPU is compared with the floor's and bcc's.
RECORDERS = ("esr", "baseline")
# A consumer's start and end leave the host slower for a moment: in the
# 0.7 s after esr's recorder was ready, an exec storm's 100 ms windows cost
# 9-16 % more than before it loaded. Each flat-out run waits this long
# after its consumer is ready (or, with none, after the last one went).
SETTLE_S = 1.0
# What a process outside every session pays is a few % against runs that
# move by ±10 %: each repeat runs the modes that record no generator this
# many times, in turn, where there is a none run to compare them with.
UNRECORDED_CYCLES = 5


@dataclass
class Result:
    workload: str
    rate: int
    mode: str
    repeat: int = 0
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
    # Its run's least disturbed tenth of 100 ms windows: see low_decile.
    process_ns_per_op_low: float | None = None
    # Outside and beside: esr's programs' runs per op and their time, as the
    # kernel counts them (every process's, the generator's above all).
    bpf_runs_per_op: float | None = None
    bpf_ns_per_op: float | None = None
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


def baseline_python(checkout: str) -> str:
    """The Python of another esr checkout (`make build` there), whose own
    recorder the baseline mode runs."""
    python = os.path.join(checkout, ".venv", "bin", "python")
    if not os.access(python, os.X_OK) or not os.path.isdir(os.path.join(checkout, "esr")):
        raise BenchError(f"{checkout}: not an esr checkout built with `make build` (no .venv)")
    return python


# The baseline's recorder: esr.bench.consumers of its own checkout, on this
# pipe's protocol. -P: its esr, not the one in the current directory.
_BASELINE = """
import json, sys
from esr.bench.consumers import _serve
pages = tuple(json.loads(sys.argv[1]))
sys.exit(_serve(sys.stdin.buffer, open(1, "w", buffering=1), pages, sys.argv[2], 0))
"""


def pinned_recorders() -> list[str]:
    """Pin dirs of esr recorders on the host's bpf filesystems: their
    programs stay attached with no process running, so every syscall
    already takes the traced path."""
    with open("/proc/self/mountinfo") as f:
        points = [x[4] for x in map(str.split, f) if x[x.index("-") + 1] == "bpf"]
    found = []
    for point in dict.fromkeys(points):
        for root, dirs, _files in os.walk(point):
            if "links" in dirs:
                if os.listdir(os.path.join(root, "links")):
                    found.append(root)
                dirs.clear()
    return found


class Bench:
    def __init__(
        self,
        seconds: float,
        pages: tuple[int, ...],
        baseline: str | None = None,
        settle: float = SETTLE_S,
    ):
        self.seconds = seconds
        self.settle = settle
        self.pages = pages
        self.baseline = baseline
        self.tools = tools()
        self.tmp = tempfile.mkdtemp(prefix="esr-bench-")
        self.notes: list[str] = []
        self.bcc_missing = _bcc_missing()
        if self.bcc_missing:
            self.notes.append(f"bcc peer not run: {self.bcc_missing}")
        for path in pinned_recorders():
            self.notes.append(
                f"esr programs pinned in {path} are attached: the 'none' runs are not free "
                "of BPF, and 'outside' shows only one more recorder's share"
            )
        self.runs = 0

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _consumer(self, mode: str, workload: str):
        pages = ",".join(map(str, self.pages))
        if mode in ("esr", "outside", "beside"):
            return start_esr(
                self.pages,
                os.path.join(self.tmp, f"data{self.runs}"),
                count_runs=mode in UNRECORDED,
            )
        if mode == "baseline":
            if self.baseline is None:
                raise BenchError("baseline: no --baseline checkout given")
            return start_program(
                "baseline",
                [
                    baseline_python(self.baseline),
                    "-P",
                    "-c",
                    _BASELINE,
                    json.dumps(list(self.pages)),
                    os.path.join(self.tmp, f"data{self.runs}"),
                ],
            )
        if mode == "floor":
            with resources.as_file(resources.files("esr.bpf").joinpath("esr.bpf.o")) as obj:
                return start_program(
                    "C floor",
                    [
                        self.tools["floor"],
                        str(obj),
                        "--pages",
                        pages,
                        "--raw-tracepoints",
                        "1" if loader.raw_tracepoints() is None else "0",
                    ],
                )
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

    def run(self, workload: str, rate: int, mode: str, repeat: int = 0) -> Result:
        self.runs += 1
        result = Result(workload, rate, mode, repeat)
        try:
            consumer = self._consumer(mode, workload)
        except BenchError as err:
            result.error = str(err)
            return result
        if rate == 0:
            time.sleep(self.settle)
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
        sleeper = None
        # Pipes, both: asked for above.
        stdin, stdout = cast(IO[str], gen.stdin), cast(IO[str], gen.stdout)
        try:
            ready = stdout.readline().split()
            if ready[:1] != ["ready"]:
                raise BenchError(f"gen {workload} did not start")
            # The process reading the pty's master, for the tty workload.
            terminal = int(ready[1].split("=")[1]) if len(ready) > 1 else 0
            if mode == "beside":
                sleeper = subprocess.Popen(["sleep", "3600"])
                consumer.track(sleeper.pid, 0)
            elif consumer is not None and mode != "outside":
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
            if sleeper is not None:
                sleeper.kill()
                sleeper.wait()
            if consumer is not None:
                consumer.kill()
        return self._figures(result, generated, consumed)

    def _figures(self, result: Result, gen: dict, consumed: dict | None) -> Result:
        events = sum(gen["events"].values())
        cpu = gen["user_s"] + gen["sys_s"] + gen["children_user_s"] + gen["children_sys_s"]
        result.seconds = gen["seconds"]
        result.generated = events if result.mode not in UNRECORDED else 0
        if gen["seconds"]:
            result.events_per_s = round(events / gen["seconds"])
            result.ops_per_s = round(gen["ops"] / gen["seconds"])
        if result.rate == 0 and gen["ops"]:
            result.process_ns_per_op = round(cpu / gen["ops"] * 1e9)
            result.process_ns_per_op_low = low_decile(gen.get("window_ns_per_op", []))
        result.detail["generator"] = gen
        if consumed is not None and "bpf_runs" in consumed and gen["ops"]:
            result.bpf_runs_per_op = round(consumed["bpf_runs"] / gen["ops"], 2)
            result.bpf_ns_per_op = round(consumed["bpf_ns"] / gen["ops"], 1)
        if consumed is None or result.mode in UNRECORDED:
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


def low_decile(windows: list[float]) -> float | None:
    """The tenth percentile of a run's per-window costs of an op. Others'
    work on a shared host only ever adds to a window, while what BPF adds to
    each op is in every window: low windows compare runs with less of
    others' work. None under ten windows."""
    if len(windows) < 10:
        return None
    return sorted(windows)[len(windows) // 10]


def spread(values: list[float]) -> dict | None:
    """The median of values, and their range."""
    if not values:
        return None
    return {"median": round(statistics.median(values), 2), "min": min(values), "max": max(values)}


def aggregate(results: list[Result]) -> list[dict]:
    """One row per workload, rate and consumer, in the order they first
    ran: how many runs, their accounting, and the median and spread of each
    figure over them."""
    groups: dict[tuple[str, int, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.workload, r.rate, r.mode), []).append(r)
    rows = []
    for (workload, rate, mode), runs in groups.items():
        ok = [r for r in runs if not r.error]
        row: dict = {
            "workload": workload,
            "rate": rate,
            "mode": mode,
            "runs": len(ok),
            "errors": sorted({r.error for r in runs if r.error}),
            "generated": sum(r.generated for r in ok),
            "lost": sum((r.lost_kernel or 0) + (r.lost_user or 0) for r in ok),
            "accounted": None if mode in UNRECORDED or not ok else all(r.accounted for r in ok),
        }
        for figure in FIGURES:
            row[figure] = spread([v for r in ok if (v := getattr(r, figure)) is not None])
        rows.append(row)
    return rows


def _neighbour(runs: list[Result], i: int, step: int, figure: str) -> float | None:
    """The figure of the none run nearest runs[i] in direction step, with
    only runs that record no generator between them."""
    j = i + step
    while 0 <= j < len(runs) and runs[j].mode in UNRECORDED:
        if runs[j].mode == "none":
            return getattr(runs[j], figure)
        j += step
    return None


def _overhead_pct(runs: list[Result], mode: str, figure: str) -> dict | None:
    """Each run of mode against the none runs right before and after it
    (their mean, where both are there), so that the host drifting over the
    three cancels: the median and spread of how much slower an operation
    was, in %. runs: one workload's flat-out runs, in the order they ran."""
    pcts = []
    for i, r in enumerate(runs):
        if r.mode != mode or (ns := getattr(r, figure)) is None:
            continue
        around = [v for step in (-1, 1) if (v := _neighbour(runs, i, step, figure)) is not None]
        if around:
            pcts.append(round((ns / statistics.mean(around) - 1) * 100, 1))
    return spread(pcts)


def summarize(results: list[Result], rows: list[dict]) -> dict:
    """Flat out, from the medians of one invocation: the outside-session
    overhead, the recorded process's cost, the ratios between consumers'
    recorder CPU, and the targets."""
    by = {(r["workload"], r["rate"], r["mode"]): r for r in rows}

    def median(workload: str, mode: str, figure: str) -> float | None:
        row = by.get((workload, 0, mode))
        return row[figure]["median"] if row and row[figure] else None

    summary: dict = {
        "highest_rate_without_loss": {},
        "outside_session_overhead": {},
        "recorded_process_cost": {},
        "ratios": {},
        "targets": {},
    }
    targets = summary["targets"]
    for w in dict.fromkeys(r.workload for r in results):
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
        # Compared by their low windows where every run has them.
        flat = [r for r in results if r.workload == w and r.rate == 0]
        measured = [r for r in flat if r.mode in UNRECORDED and r.process_ns_per_op]
        figure = (
            "process_ns_per_op_low"
            if all(r.process_ns_per_op_low for r in measured)
            else "process_ns_per_op"
        )
        overhead = _overhead_pct(flat, "outside", figure)
        beside = _overhead_pct(flat, "beside", figure)
        if overhead or beside:
            summary["outside_session_overhead"][w] = {
                "figure": figure,
                "no_bpf_ns_per_op": median(w, "none", figure),
                "outside_session_ns_per_op": median(w, "outside", figure),
                "overhead_pct": overhead,
                "bpf_runs_per_op": median(w, "outside", "bpf_runs_per_op"),
                "bpf_ns_per_op": median(w, "outside", "bpf_ns_per_op"),
                "beside_session_ns_per_op": median(w, "beside", figure),
                "beside_bpf_runs_per_op": median(w, "beside", "bpf_runs_per_op"),
                "beside_bpf_ns_per_op": median(w, "beside", "bpf_ns_per_op"),
                "beside_overhead_pct": beside,
                # The same pairs by their runs' means, noisier.
                "overhead_pct_of_means": _overhead_pct(flat, "outside", "process_ns_per_op"),
                "beside_overhead_pct_of_means": _overhead_pct(flat, "beside", "process_ns_per_op"),
            }
        cost = {
            m: v
            for m in ("none", "esr", "baseline", "floor")
            if (v := median(w, m, "process_ns_per_op")) is not None
        }
        if cost:
            summary["recorded_process_cost"][w] = cost
        ratios = {}
        floor = median(w, "floor", "recorder_ns_per_event")
        for recorder in RECORDERS:
            ns = median(w, recorder, "recorder_ns_per_event")
            if not ns:
                continue
            if floor:
                ratios[f"{recorder}_vs_floor"] = round(ns / floor, 2)
            for peer in ("bcc-wk64", "bcc"):
                if peer_ns := median(w, peer, "recorder_ns_per_event"):
                    ratios[f"{peer}_vs_{recorder}"] = round(peer_ns / ns, 2)
        esr_ns, before = (
            median(w, "esr", "recorder_ns_per_event"),
            median(w, "baseline", "recorder_ns_per_event"),
        )
        if esr_ns and before:
            ratios["baseline_vs_esr"] = round(before / esr_ns, 2)
        if ratios:
            summary["ratios"][w] = ratios
        for key, want in TARGETS.get(w, {}).items():
            if key == "outside_pct":
                value = overhead["median"] if overhead else None
                met = value is not None and value <= want
            else:
                value = ratios.get(key)
                met = value is not None and (
                    value <= want if key.endswith("_floor") else value >= want
                )
            if value is not None:
                targets[f"{w}_{key}"] = _target(value, want, met)
        esr_row = by.get((w, 0, "esr"))
        if esr_row and esr_row["runs"]:
            targets[f"{w}_no_loss_flat_out"] = _target(esr_row["lost"], 0, esr_row["lost"] == 0)
            size = median(w, "esr", "bytes_per_event")
            if size is not None and w != "tty":  # a tty run counts bytes, not events
                targets[f"{w}_bytes_per_event"] = _target(
                    size, BYTES_PER_EVENT, size <= BYTES_PER_EVENT
                )
    esr_op, floor_op = (
        median("open", "esr", "process_ns_per_op"),
        median("open", "floor", "process_ns_per_op"),
    )
    if esr_op and floor_op:
        ratio = round(esr_op / floor_op, 3)
        targets["open_cost_vs_floor"] = _target(
            ratio, OPEN_COST_VS_FLOOR, ratio <= OPEN_COST_VS_FLOOR
        )
    return summary


def _target(value, target, met: bool) -> dict:
    return {"value": value, "target": target, "met": met}


def _num(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _cell(figure: dict | None, runs: int) -> str:
    """A median, and with repeats, its range."""
    if figure is None:
        return "-"
    if runs < 2:
        return _num(figure["median"])
    return f"{_num(figure['median'])} [{_num(figure['min'])}-{_num(figure['max'])}]"


def table(rows: list[dict]) -> str:
    head = (
        f"{'workload':8} {'rate':>5} {'consumer':9} {'runs':>4} {'events/s':>24} {'lost':>6} "
        f"{'exact':>5} {'rec ns/ev':>20} {'proc ns/op':>22} {'RSS MiB':>16} {'B/ev':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        rate = "max" if r["rate"] == 0 else f"{r['rate'] // 1000}k"
        lead = f"{r['workload']:8} {rate:>5} {r['mode']:9}"
        if not r["runs"]:
            lines.append(f"{lead} skipped: {'; '.join(r['errors'])}")
            continue
        n = r["runs"]
        exact = "-" if r["accounted"] is None else ("yes" if r["accounted"] else "NO")
        lost = "-" if r["accounted"] is None else str(r["lost"])
        lines.append(
            f"{lead} {n:>4} {_cell(r['events_per_s'], n):>24} {lost:>6} {exact:>5} "
            f"{_cell(r['recorder_ns_per_event'], n):>20} {_cell(r['process_ns_per_op'], n):>22} "
            f"{_cell(r['peak_rss_mb'], n):>16} {_cell(r['bytes_per_event'], n):>15}"
        )
    return "\n".join(lines)


def ratios_table(summary: dict) -> str:
    """Flat out, per workload: recorder CPU as ratios of the medians, and
    the outside-session overhead."""
    keys = [
        "esr_vs_floor",
        "bcc-wk64_vs_esr",
        "bcc_vs_esr",
        "baseline_vs_floor",
        "bcc-wk64_vs_baseline",
        "bcc_vs_baseline",
        "baseline_vs_esr",
    ]
    shown = [k for k in keys if any(k in r for r in summary["ratios"].values())]
    head = (
        f"{'workload':8} "
        + " ".join(f"{k:>20}" for k in shown)
        + f" {'outside vs none %':>24} {'beside vs none %':>24} {'outside: esr BPF/op':>22}"
    )
    lines = [head, "-" * len(head)]
    for w in dict.fromkeys([*summary["ratios"], *summary["outside_session_overhead"]]):
        ratios = summary["ratios"].get(w, {})
        cells = [f"{ratios[k]:>20}" if k in ratios else f"{'-':>20}" for k in shown]
        outside = summary["outside_session_overhead"].get(w, {})
        pcts = [
            _cell(outside[k], 2) if outside.get(k) else "-"
            for k in ("overhead_pct", "beside_overhead_pct")
        ]
        bpf = (
            f"{_num(outside['bpf_runs_per_op'])} runs, {_num(outside['bpf_ns_per_op'])} ns"
            if outside.get("bpf_runs_per_op") is not None
            else "-"
        )
        lines.append(
            f"{w:8} " + " ".join(cells) + "".join(f" {p:>24}" for p in pcts) + f" {bpf:>22}"
        )
    return "\n".join(lines)


def run_order(modes: list[str], k: int, cycles: int) -> list[str]:
    """Repeat k's runs. The consumers in turn: a noisy minute spreads over
    all of them. The modes that record no generator first, cycles times in
    turn when none is among them, so that an outside run has a none run on
    both sides (the last of a block, on one side). Every other repeat in
    reverse, so that a drift over the repeats favours no consumer over its
    neighbour."""
    unrecorded = [m for m in modes if m in UNRECORDED]
    if "none" not in unrecorded or len(unrecorded) < 2:
        cycles = 1
    order = unrecorded * cycles + [m for m in modes if m not in UNRECORDED]
    return order if k % 2 == 0 else order[::-1]


def main(
    workloads,
    rates,
    modes,
    seconds: float,
    as_json: bool,
    smoke: bool,
    config: Config,
    repeat: int = 1,
    baseline: str | None = None,
) -> int:
    if os.geteuid() != 0:
        raise BenchError(
            "the benchmark loads BPF programs: run it as root (`esr bench --offline` needs no root)"
        )
    if baseline is not None:
        baseline_python(baseline)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    # --smoke checks the accounting, not the figures those serve.
    bench = Bench(seconds, config.buffer_pages(), baseline, settle=0 if smoke else SETTLE_S)
    cycles = 1 if smoke else UNRECORDED_CYCLES
    plan = [
        (w, r, k, m)
        for w in workloads
        for r in rates
        for k in range(repeat)
        for m in run_order(modes, k, cycles if r == 0 else 1)
        if not (w == "tty" and m.startswith("bcc"))  # the peer records no terminal
    ]
    results = []
    started = time.monotonic()
    try:
        for i, (w, r, k, m) in enumerate(plan, 1):
            res = bench.run(w, r, m, k)
            results.append(res)
            what = (
                f"skipped ({res.error})"
                if res.error
                else f"{res.events_per_s} ev/s, lost {res.lost_kernel or 0}+{res.lost_user or 0}, "
                f"{res.recorder_ns_per_event or '-'} ns/ev recorder, "
                f"{res.process_ns_per_op or '-'} ns/op"
            )
            again = f" #{k + 1}" if repeat > 1 else ""
            say(f"[{i}/{len(plan)}] {w} @ {'max' if r == 0 else r} {m}{again}: {what}")
    finally:
        bench.close()
    say("[offline] decode -> zstd -> write -> audit, every record type")
    micro = offline.measure(20_000 if smoke else 200_000, config.compression_level)
    rows = aggregate(results)
    summary = summarize(results, rows)
    report = {
        "esr": __version__,
        "host": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
        "seconds_per_run": seconds,
        "repeat": repeat,
        "baseline": baseline,
        "buffer_pages": schema.by_buffer(list(config.buffer_pages())),
        "runs": [asdict(r) for r in results],
        "figures": rows,
        "summary": summary,
        "offline": micro,
        "notes": bench.notes,
        "wall_s": round(time.monotonic() - started, 1),
    }
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        print(table(rows))
        print()
        print(ratios_table(summary))
        print()
        print(json.dumps({"summary": summary, "offline": micro, "notes": bench.notes}, indent=1))
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
        if r.mode in UNRECORDED:
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
