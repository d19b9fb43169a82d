"""`esr bench --smoke`: a few thousand events per run, every consumer;
asserts only that the accounting is exact and every figure is produced."""

from __future__ import annotations

import json
import subprocess

import pytest

from esr import bench
from helpers import ESR, ROOT

pytestmark = pytest.mark.usefixtures("bpf")


def test_bench_smoke_accounts_for_every_event():
    r = subprocess.run(
        [ESR, "bench", "--smoke", "--json"], capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    runs = report["runs"]
    modes = {x["mode"] for x in runs}
    assert {"none", "outside", "beside", "esr", "floor"} <= modes
    # make installs bcc: its peer must build and run, not only be skipped.
    bcc = subprocess.run(["/usr/bin/python3", "-c", "import bcc"], capture_output=True)
    if bcc.returncode == 0:
        assert {"bcc", "bcc-wk64"} <= modes
    for run in runs:
        if run["error"]:
            assert run["mode"].startswith("bcc") and bcc.returncode != 0, run
            continue
        assert run["ops_per_s"] > 0
        assert run["rate"] != 0 or run["process_ns_per_op"] > 0
        if run["mode"] == "outside" and run["workload"] in ("open", "connect", "exec"):
            # With no session, a process's opens and connects run none of
            # esr's programs; its fork, exec and exit run one each.
            want = 3 if run["workload"] == "exec" else 0
            assert want <= run["bpf_runs_per_op"] < want + 0.1, run
        if run["mode"] in bench.UNRECORDED:  # nothing of the generator recorded
            continue
        assert run["generated"] == run["recorded"] + run["lost_kernel"] + run["lost_user"], run
        assert run["peak_rss_mb"] > 0
        if run["workload"] == "write":  # to /dev/null: nothing to record
            assert run["generated"] == 0
            continue
        assert run["generated"] > 0 and run["recorder_ns_per_event"] > 0
    assert {x["workload"] for x in runs} == {"open", "exec", "connect", "mixed", "tty", "write"}
    # The terminal is counted in bytes, each recorded or accounted for.
    assert all(
        x["generated"] % 4096 == 0 for x in runs if x["workload"] == "tty" and x["mode"] == "esr"
    )
    assert report["offline"]["ns_per_event"]["decode"] > 0
    assert "[1/" in r.stderr  # progress was shown


def test_bench_says_when_pinned_programs_are_attached_to_the_none_runs(daemon):
    r = subprocess.run(
        [
            ESR,
            "bench",
            "--json",
            "--workloads",
            "open",
            "--rates",
            "0",
            "--modes",
            "none",
            "--seconds",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    [note] = [n for n in json.loads(r.stdout)["notes"] if "pinned in" in n]
    assert f"pinned in {daemon.pin_dir} " in note and "'none' runs are not free of BPF" in note


def test_a_baseline_checkout_records_as_esr_does():
    # This checkout as its own baseline: the other recorder's side of the pipe.
    r = subprocess.run(
        [
            ESR,
            "bench",
            "--json",
            "--workloads",
            "connect",
            "--rates",
            "0",
            "--modes",
            "esr,baseline",
            "--seconds",
            "0.5",
            "--baseline",
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    runs = {x["mode"]: x for x in json.loads(r.stdout)["runs"]}
    base = runs["baseline"]
    assert base["error"] is None, base
    assert base["generated"] > 0
    assert base["generated"] == base["recorded"] + base["lost_kernel"] + base["lost_user"], base
    assert "baseline_vs_esr" in json.dumps(json.loads(r.stdout)["summary"])
