"""`esr bench --ui --smoke`: every figure is produced; how fast is for the
benchmark to print, not for a test to assert."""

from __future__ import annotations

from esr.bench import ui


def test_the_ui_benchmark_reports_every_figure(tmp_path):
    report = ui.measure(50, 20_000, keep=str(tmp_path))
    assert report["index"]["events_read"] == 20_000 and report["index"]["rows"] > 0
    for part in ("search_page", "list_page", "search_query"):
        assert report[part]["n"] > 0 and report[part]["p95_ms"] > 0
    again = ui.measure(50, 20_000, keep=str(tmp_path))
    assert "generate_s" in report and "generate_s" not in again  # the corpus was reused


def test_the_corpus_has_exactly_the_events_asked_for(tmp_path):
    assert sum(ui.Corpus(100, 50_000).sizes()) == 50_000
