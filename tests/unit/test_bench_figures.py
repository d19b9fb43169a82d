"""`esr bench --repeat`: medians, spreads and ratios from the runs, without
running anything."""

from __future__ import annotations

from esr.bench.harness import (
    Result,
    aggregate,
    low_decile,
    ratios_table,
    run_order,
    summarize,
    table,
)


def run(mode: str, repeat: int, ns: float | None, op: int, workload: str = "exec") -> Result:
    recorded = None if mode in ("none", "outside") else 1000
    return Result(
        workload,
        0,
        mode,
        repeat,
        generated=recorded or 0,
        recorded=recorded,
        lost_kernel=None if recorded is None else 0,
        lost_user=None if recorded is None else 0,
        accounted=None if recorded is None else True,
        events_per_s=10_000,
        recorder_ns_per_event=ns,
        process_ns_per_op=op,
        bytes_per_event=None if recorded is None else 7.5,
    )


RUNS = [
    r
    for k, (esr, floor, wk64, bcc, none, outside) in enumerate(
        [
            (1000, 100, 4000, 30_000, 80_000, 84_000),
            (1500, 150, 6000, 20_000, 100_000, 101_000),  # a noisy minute for everyone
            (1100, 110, 4400, 22_000, 81_000, 82_000),
        ]
    )
    for r in (
        run("none", k, None, none),
        run("outside", k, None, outside),
        run("esr", k, esr, 90_000),
        run("floor", k, floor, 88_000),
        run("bcc-wk64", k, wk64, 91_000),
        run("bcc", k, bcc, 99_000),
    )
]


def test_each_figure_is_the_median_of_its_runs_with_their_range():
    rows = {r["mode"]: r for r in aggregate(RUNS)}
    assert list(rows) == ["none", "outside", "esr", "floor", "bcc-wk64", "bcc"]
    esr = rows["esr"]
    assert esr["runs"] == 3 and esr["accounted"] and esr["lost"] == 0
    assert esr["recorder_ns_per_event"] == {"median": 1100, "min": 1000, "max": 1500}
    assert rows["none"]["accounted"] is None and rows["none"]["recorder_ns_per_event"] is None


def test_ratios_come_from_the_medians_and_the_overhead_from_neighbouring_runs():
    summary = summarize(RUNS, aggregate(RUNS))
    assert summary["ratios"]["exec"] == {
        "esr_vs_floor": 10.0,
        "bcc-wk64_vs_esr": 4.0,
        "bcc_vs_esr": 20.0,
    }
    # 5 %, 1 % and 1.2 % against the none run of the same repeat: the noisy
    # none run of the second repeat does not make outside look cheaper.
    assert summary["outside_session_overhead"]["exec"]["overhead_pct"] == {
        "median": 1.2,
        "min": 1.0,
        "max": 5.0,
    }
    targets = summary["targets"]
    assert targets["exec_bcc-wk64_vs_esr"]["met"] and targets["exec_bcc_vs_esr"]["met"]
    assert targets["exec_outside_pct"] == {"value": 1.2, "target": 5, "met": True}
    assert targets["exec_no_loss_flat_out"]["met"] and targets["exec_bytes_per_event"]["met"]


def test_the_tables_show_medians_and_ranges():
    rows = aggregate(RUNS)
    text = table(rows)
    assert "1100 [1000-1500]" in text
    ratios = ratios_table(summarize(RUNS, rows))
    assert "esr_vs_floor" in ratios and "1.2 [1-5]" in ratios


def test_a_baseline_is_compared_with_the_same_peers_and_with_esr():
    runs = [*RUNS, *(run("baseline", k, ns, 90_000) for k, ns in enumerate([5000, 5600, 5200]))]
    ratios = summarize(runs, aggregate(runs))["ratios"]["exec"]
    assert ratios["baseline_vs_esr"] == round(5200 / 1100, 2)
    assert ratios["bcc-wk64_vs_baseline"] == round(4400 / 5200, 2)
    assert ratios["baseline_vs_floor"] == round(5200 / 110, 2)


def test_the_outside_overhead_compares_the_runs_least_disturbed_windows():
    # Each run: twenty 100 ms windows, two of them slowed by others' work.
    # Outside costs 2 % per op; the noisy second none run's mean says
    # outside is cheaper, its windows do not.
    def windows(ns: int, noise: int) -> list[int]:
        return [ns + 50 * i for i in range(18)] + [ns + noise] * 2

    none = [windows(80_000, 1000), windows(80_000, 60_000), windows(80_000, 1000)]
    outside = [windows(81_600, 1000)] * 3
    runs = []
    for k in range(3):
        for mode, w in (("none", none[k]), ("outside", outside[k])):
            r = run(mode, k, None, round(sum(w) / len(w)))
            r.process_ns_per_op_low = low_decile(w)
            runs.append(r)
    overhead = summarize(runs, aggregate(runs))["outside_session_overhead"]["exec"]
    assert overhead["figure"] == "process_ns_per_op_low"
    assert overhead["overhead_pct"] == {"median": 2.0, "min": 2.0, "max": 2.0}
    assert overhead["overhead_pct_of_means"]["min"] < 0
    assert low_decile([1.0] * 9) is None


def test_each_outside_run_is_compared_with_the_none_runs_on_both_sides():
    # The host slows by 2.5 % a run; outside costs 1 % per op. Against the
    # none run before it alone, outside would look 3.5 % slower.
    modes = run_order(["none", "outside", "esr"], 0, 3)
    assert modes == ["none", "outside", "none", "outside", "none", "outside", "esr"]
    runs = []
    for i, mode in enumerate([*modes, *run_order(["none", "outside", "esr"], 1, 3)]):
        ns = 80_000 * 1.025**i
        runs.append(
            run(
                mode,
                i // 7,
                1000 if mode == "esr" else None,
                round(ns * 1.01) if mode == "outside" else round(ns),
            )
        )
    overhead = summarize(runs, aggregate(runs))["outside_session_overhead"]["exec"]
    assert overhead["figure"] == "process_ns_per_op"
    # The end runs of a block have one none run beside them: -1.5 and 3.5 %.
    assert overhead["overhead_pct"] == {"median": 1.0, "min": -1.5, "max": 3.5}


def test_repeats_run_the_unrecorded_modes_in_turn_and_every_other_repeat_in_reverse():
    modes = ["none", "outside", "beside", "esr", "floor"]
    assert run_order(modes, 0, 2) == [
        "none",
        "outside",
        "beside",
        "none",
        "outside",
        "beside",
        "esr",
        "floor",
    ]
    assert run_order(modes, 1, 2) == [
        "floor",
        "esr",
        "beside",
        "outside",
        "none",
        "beside",
        "outside",
        "none",
    ]
    # Without a none run there is nothing to compare them with: once each.
    assert run_order(["outside", "esr"], 0, 3) == ["outside", "esr"]


def test_the_kernels_count_of_esr_programs_per_op_is_shown_beside_the_overhead():
    runs = [*RUNS]
    for r in runs:
        if r.mode == "outside":
            r.bpf_runs_per_op, r.bpf_ns_per_op = 3.0, 400.0
    summary = summarize(runs, aggregate(runs))
    overhead = summary["outside_session_overhead"]["exec"]
    assert (overhead["bpf_runs_per_op"], overhead["bpf_ns_per_op"]) == (3.0, 400.0)
    assert "3 runs, 400 ns" in ratios_table(summary)
