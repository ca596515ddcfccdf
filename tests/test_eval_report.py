"""The task x length table and heatmap built from lm-eval results."""

from __future__ import annotations

import json
import math

import pytest

from acadlm_plugins.evaluation.report import latest_results_file, length_table, write_report

RESULTS = {
    "results": {
        "acadlm_long": {"alias": "acadlm_long", " ": " "},
        "acadlm_niah_single_1": {"alias": "x", "1024,none": 100.0, "1024_stderr,none": 0.0,
                                 "2048,none": 50.0, "2048_stderr,none": 5.0},
        "acadlm_vt": {"1024,none": 20.0, "2048,none": 0.0, "sample_len": 8},
        "acadlm_rag": {"4096,none": 40.0},
        "arc_easy": {"acc,none": 0.5},
    },
    "groups": {"acadlm_long": {}},
}


def test_length_table_keeps_only_length_metrics_of_tasks() -> None:
    table = length_table(RESULTS)
    assert table is not None
    assert table.tasks == ["acadlm_niah_single_1", "acadlm_rag", "acadlm_vt"]
    assert table.lengths == [1024, 2048, 4096]
    assert table.scores["acadlm_niah_single_1"] == {1024: 100.0, 2048: 50.0}
    averages = table.averages()
    assert averages[1024] == pytest.approx(60.0)
    assert averages[2048] == pytest.approx(25.0)
    assert averages[4096] == pytest.approx(40.0)


def test_markdown_marks_missing_lengths_and_has_average_row() -> None:
    text = length_table(RESULTS).to_markdown()
    lines = text.splitlines()
    assert lines[0] == "| task | 1024 | 2048 | 4096 |"
    assert "| acadlm_rag | - | - | 40.0 |" in lines
    assert lines[-1] == "| **average** | 60.0 | 25.0 | 40.0 |"


def test_no_length_metrics_gives_no_table() -> None:
    assert length_table({"results": {"arc_easy": {"acc,none": 0.5}}}) is None


def test_write_report_writes_table_scores_and_png(tmp_path) -> None:
    paths = write_report(RESULTS, tmp_path / "out", title="tiny")
    assert set(paths) == {"table", "scores", "heatmap"}
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = json.loads(paths["scores"].read_text())
    assert scores["scores"]["acadlm_vt"] == {"1024": 20.0, "2048": 0.0}
    assert not math.isnan(scores["average"]["2048"])
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_latest_results_file_picks_newest(tmp_path) -> None:
    first = tmp_path / "m" / "results_2026-01-01.json"
    first.parent.mkdir()
    first.write_text("{}")
    second = tmp_path / "m" / "results_2026-01-02.json"
    second.write_text("{}")
    import os

    os.utime(first, (1, 1))
    assert latest_results_file(tmp_path) == second
    assert latest_results_file(tmp_path / "empty") is None
