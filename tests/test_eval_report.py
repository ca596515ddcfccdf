"""The task x length table and heatmap built from lm-eval results, with HELMET's category-first
averaging checked on hand-computed values."""

from __future__ import annotations

import json
import math

import pytest

from acadlm_plugins.evaluation.report import (
    HELMET_CATEGORIES,
    is_ruler_task,
    latest_results_file,
    length_table,
    write_report,
)

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
    assert "| **helmet: rag** | - | - | 40.0 |" in lines
    assert "| **ruler** | 60.0 | 25.0 | - |" in lines
    assert lines[-1] == "| **average** | 60.0 | 25.0 | 40.0 |"


def test_no_length_metrics_gives_no_table() -> None:
    assert length_table({"results": {"arc_easy": {"acc,none": 0.5}}}) is None


def test_only_the_none_filter_is_read() -> None:
    """lm-eval names a metric "<name>,<filter>"; another filter's score of the same length
    (here take_first) is not the task's score."""
    table = length_table({"results": {"t": {"4096,none": 50, "4096,take_first": 10}}})
    assert table.scores == {"t": {4096: 50.0}}


def test_write_report_writes_table_scores_and_png(tmp_path) -> None:
    paths = write_report(RESULTS, tmp_path / "out", title="tiny")
    assert set(paths) == {"table", "scores", "heatmap"}
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = json.loads(paths["scores"].read_text())
    assert scores["scores"]["acadlm_vt"] == {"1024": 20.0, "2048": 0.0}
    assert not math.isnan(scores["average"]["2048"])
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_latest_results_file_picks_newest(tmp_path) -> None:
    """By modification time, in any subfolder: the name order says the opposite here."""
    import os

    older = tmp_path / "m" / "results_2026-01-02.json"
    older.parent.mkdir()
    older.write_text("{}")
    newer = tmp_path / "m" / "sub" / "results_2026-01-01.json"
    newer.parent.mkdir()
    newer.write_text("{}")
    os.utime(older, (1, 1))
    assert latest_results_file(tmp_path) == newer
    assert latest_results_file(older) == older  # a file is its own answer
    assert latest_results_file(tmp_path / "empty") is None


#: A HELMET run with recall and cite holding several rows, next to RULER tasks, at one length.
#: Recall: json_kv 90, HELMET's runs of MK2 60 and MK3 20 -> 170/3 (RULER's own MK2 and MK3
#: are not part of it). RAG 40. Cite: ASQA's STR-EM 60, its citation recall 20 (an NLI model
#: scored it), QAMPARI's recall-top5 40 -> 40 (QAMPARI's F1 and ASQA's STR-HIT are not part of
#: the category). HELMET overall: (170/3 + 40 + 40) / 3. RULER: the plain mean of its tasks
#: (single_1 100, MK2 50, MK3 30) -> 60.
HELMET_RESULTS = {
    "results": {
        "acadlm_helmet": {"1024,none": 99.0},
        "acadlm_helmet_cite": {"1024,none": 50.0},
        "acadlm_json_kv": {"1024,none": 90.0},
        "acadlm_helmet_niah_multikey_2": {"1024,none": 60.0},
        "acadlm_helmet_niah_multikey_3": {"1024,none": 20.0},
        "acadlm_niah_multikey_2": {"1024,none": 50.0},
        "acadlm_niah_multikey_3": {"1024,none": 30.0},
        "acadlm_niah_single_1": {"1024,none": 100.0},
        "acadlm_rag": {"1024,none": 40.0, "1024_stderr,none": 3.0},
        "acadlm_cite_asqa": {"1024,none": 60.0, "1024_str_hit,none": 10.0,
                             "1024_citation_rec,none": 20.0,
                             "1024_citation_rec_stderr,none": 1.0},
        "acadlm_cite_qampari": {"1024,none": 40.0, "1024_qampari_f1,none": 5.0},
    },
    "groups": {"acadlm_helmet": {}, "acadlm_helmet_cite": {}},
}


def test_helmet_overall_is_the_mean_of_category_means() -> None:
    table = length_table(HELMET_RESULTS)
    assert table is not None
    assert table.tasks == ["acadlm_cite_asqa", "acadlm_cite_asqa:citation_rec",
                           "acadlm_cite_qampari", "acadlm_helmet_niah_multikey_2",
                           "acadlm_helmet_niah_multikey_3", "acadlm_json_kv",
                           "acadlm_niah_multikey_2", "acadlm_niah_multikey_3",
                           "acadlm_niah_single_1", "acadlm_rag"]
    categories = table.categories()
    assert categories == {"recall": {1024: pytest.approx(170 / 3)}, "rag": {1024: 40.0},
                          "cite": {1024: pytest.approx(40.0)}}
    helmet = (170 / 3 + 40 + 40) / 3
    suites = table.suites()
    assert suites["helmet"][1024] == pytest.approx(helmet)
    assert suites["ruler"][1024] == pytest.approx(60.0)
    assert table.averages()[1024] == pytest.approx((helmet + 60) / 2)
    # Not the flat mean of the rows, which would weigh recall and cite by their task counts.
    flat = sum(row[1024] for row in table.scores.values()) / len(table.scores)
    assert abs(flat - suites["helmet"][1024]) > 1


def test_summary_rows_in_the_table_and_the_scores_file(tmp_path) -> None:
    table = length_table(HELMET_RESULTS)
    lines = table.to_markdown().splitlines()
    assert "| **helmet: recall** | 56.7 |" in lines
    assert "| **helmet: cite** | 40.0 |" in lines
    assert lines[-3:] == ["| **helmet** | 45.6 |", "| **ruler** | 60.0 |",
                          "| **average** | 52.8 |"]
    paths = write_report(HELMET_RESULTS, tmp_path)
    scores = json.loads(paths["scores"].read_text())
    assert scores["categories"]["recall"]["1024"] == pytest.approx(170 / 3)
    assert scores["suites"]["ruler"] == {"1024": 60.0}
    assert scores["average"]["1024"] == pytest.approx(((170 / 3 + 80) / 3 + 60) / 2)


def test_ruler_tasks_are_recognised_by_name() -> None:
    assert all(is_ruler_task(t) for t in ("acadlm_niah_single_1", "acadlm_vt", "acadlm_cwe",
                                          "acadlm_fwe", "acadlm_ruler_qa", "acadlm_ruler_qa_2"))
    assert not any(is_ruler_task(t) for t in ("acadlm_rag", "acadlm_json_kv", "arc_easy"))


def test_tasks_of_neither_suite_are_averaged_as_their_own() -> None:
    table = length_table({"results": {"my_task": {"2048,none": 10.0},
                                      "acadlm_icl": {"2048,none": 70.0}}})
    assert table.suites() == {"helmet": {2048: 70.0}, "other": {2048: 10.0}}
    assert table.averages() == {2048: 40.0}


def test_recall_counts_helmets_plain_runs_of_rulers_tasks_never_rulers_own() -> None:
    """HELMET's recall is JSON KV and its plain-text runs of RULER's MK2, MK3 and MV
    (acadlm_helmet_niah_*): RULER's own tasks, which follow the run's chat template and
    RULER's generation length, count for RULER only (they used to join HELMET's recall, and
    HELMET's runs of them fell into "other"). Recall (90 + 60 + 20 + 70) / 4 = 60; RULER's
    mean (100 + 0 + 0 + 0) / 4 = 25."""
    table = length_table({"results": {
        "acadlm_json_kv": {"4096,none": 90.0},
        "acadlm_helmet_niah_multikey_2": {"4096,none": 60.0},
        "acadlm_helmet_niah_multikey_3": {"4096,none": 20.0},
        "acadlm_helmet_niah_multivalue": {"4096,none": 70.0},
        "acadlm_niah_single_1": {"4096,none": 100.0},
        "acadlm_niah_multikey_2": {"4096,none": 0.0},
        "acadlm_niah_multikey_3": {"4096,none": 0.0},
        "acadlm_niah_multivalue": {"4096,none": 0.0},
    }})
    assert table is not None
    assert table.categories() == {"recall": {4096: 60.0}}
    assert table.suites() == {"helmet": {4096: 60.0}, "ruler": {4096: 25.0}}
    assert not any(is_ruler_task(task) for task in HELMET_CATEGORIES["recall"])


def test_a_ruler_run_is_averaged_as_ruler_does() -> None:
    """RULER's MK2 is no part of HELMET's recall: a RULER run keeps RULER's plain mean over its
    tasks and has no HELMET category."""
    table = length_table({"results": {"acadlm_niah_single_1": {"1024,none": 100.0},
                                      "acadlm_niah_multikey_2": {"1024,none": 40.0},
                                      "acadlm_vt": {"1024,none": 10.0}}})
    assert table.categories() == {} and set(table.suites()) == {"ruler"}
    assert table.averages()[1024] == pytest.approx(50.0)
    assert table.to_markdown().splitlines()[-1] == "| **average** | 50.0 |"


def test_long_document_categories_are_helmets_datasets_with_the_judge_when_computed() -> None:
    """LongQA = NarrativeQA, En.QA, En.MC; Summ = En.Sum, Multi-LexSum, each task counted by its
    metric named by the length, which is the judge's score when a judge computed it (here
    NarrativeQA's 50 next to its ROUGE-L 10, En.Sum's F1 30 next to its ROUGE-Lsum 20). The
    stand-ins acadlm_longqa and acadlm_summ, which ran too, do not count."""
    results = {"results": {
        "acadlm_narrativeqa": {"8192,none": 50.0, "8192_judge_score,none": 50.0,
                               "8192_rougeL_f1,none": 10.0},
        "acadlm_infbench_qa": {"8192,none": 20.0, "8192_rougeL_f1,none": 20.0},
        "acadlm_infbench_choice": {"8192,none": 80.0, "8192_exact_match,none": 80.0},
        "acadlm_infbench_sum": {"8192,none": 30.0, "8192_judge_f1,none": 30.0,
                                "8192_rougeLsum_f1,none": 20.0},
        "acadlm_multi_lexsum": {"8192,none": 40.0, "8192_rougeLsum_f1,none": 40.0},
        "acadlm_longqa": {"8192,none": 100.0}, "acadlm_summ": {"8192,none": 0.0},
    }}
    table = length_table(results)
    assert table is not None and "acadlm_narrativeqa:judge_score" not in table.scores
    categories = table.categories()
    assert categories == {"longqa": {8192: pytest.approx(50.0)}, "summ": {8192: 35.0}}
    assert table.suites() == {"helmet": {8192: pytest.approx(42.5)}}


def test_stand_ins_count_when_helmets_own_datasets_did_not_run() -> None:
    table = length_table({"results": {"acadlm_longqa": {"4096,none": 70.0},
                                      "acadlm_summ": {"4096,none": 10.0},
                                      "acadlm_rag": {"4096,none": 40.0}}})
    assert table.categories() == {"rag": {4096: 40.0}, "longqa": {4096: 70.0},
                                  "summ": {4096: 10.0}}
    assert table.suites() == {"helmet": {4096: 40.0}}
    # One of HELMET's summarization datasets ran: it replaces the stand-in in its category.
    table = length_table({"results": {"acadlm_summ": {"4096,none": 10.0},
                                      "acadlm_multi_lexsum": {"4096,none": 60.0}}})
    assert table.categories() == {"summ": {4096: 60.0}}


#: What lm-eval 0.4.13 returns for a run of ``acadlm_long``, cut down: task rows (name, alias,
#: sample_len), group rows (their means, with ``sample_count``), ``acadlm_long`` with no
#: metric of its own, and the ``groups`` / ``group_subtasks`` that name the groups.
LONG_RUN = {
    "results": {
        "acadlm_niah_single_1": {"name": "acadlm_niah_single_1", "alias": " - x",
                                 "sample_len": 1, "4096,none": 100.0},
        "acadlm_json_kv": {"name": "acadlm_json_kv", "alias": "  - x", "sample_len": 1,
                           "4096,none": 50.0},
        "acadlm_rag": {"name": "acadlm_rag", "alias": "  - x", "sample_len": 1,
                       "4096,none": 0.0},
        "acadlm_ruler": {"name": "acadlm_ruler", "alias": " - acadlm_ruler", "sample_len": 1,
                         "sample_count": {"4096,none": 1}, "4096,none": 100.0},
        "acadlm_helmet_recall": {"name": "acadlm_helmet_recall", "alias": " - r",
                                 "sample_len": 1, "sample_count": {"4096,none": 1},
                                 "4096,none": 50.0},
        "acadlm_helmet_rag": {"name": "acadlm_helmet_rag", "alias": " - r", "sample_len": 1,
                              "sample_count": {"4096,none": 1}, "4096,none": 0.0},
        "acadlm_helmet": {"name": "acadlm_helmet", "alias": " - acadlm_helmet",
                          "sample_len": 2, "sample_count": {"4096,none": 2}, "4096,none": 25.0},
        "acadlm_long": {"name": "acadlm_long", "alias": "acadlm_long"},
    },
    "groups": {name: {} for name in ("acadlm_ruler", "acadlm_helmet_recall",
                                     "acadlm_helmet_rag", "acadlm_helmet")},
    "group_subtasks": {"acadlm_long": ["acadlm_ruler", "acadlm_helmet"],
                       "acadlm_ruler": ["acadlm_niah_single_1"],
                       "acadlm_helmet": ["acadlm_helmet_recall", "acadlm_helmet_rag"],
                       "acadlm_helmet_recall": ["acadlm_json_kv"],
                       "acadlm_helmet_rag": ["acadlm_rag"]},
}


def test_the_results_part_alone_gives_the_same_table_as_the_whole_dict() -> None:
    """length_table takes the dict simple_evaluate returns or its ``results`` part; the part
    alone does not say which rows are groups, which were counted as tasks of an "other" suite
    (the reviewer's run: average 43.06 instead of 56.25). Our suites' group names and the
    ``sample_count`` only group rows carry leave them out."""
    whole, part = length_table(LONG_RUN), length_table(LONG_RUN["results"])
    assert whole is not None and part is not None
    assert whole.tasks == part.tasks == ["acadlm_json_kv", "acadlm_niah_single_1", "acadlm_rag"]
    assert whole.summary_rows() == part.summary_rows()
    assert set(part.suites()) == {"helmet", "ruler"}
    assert part.averages() == {4096: pytest.approx((25.0 + 100.0) / 2)}
    # A group of someone else's, known only by the key its row carries.
    results = {**LONG_RUN["results"], "my_group": {"alias": "my_group", "4096,none": 10.0,
                                                   "sample_count": {"4096,none": 3}}}
    assert length_table(results).tasks == part.tasks
    # A task run alone is no group, even where lm-eval lists it with no subtasks.
    alone = {"results": {"my_task": {"2048,none": 10.0, "sample_len": 2}},
             "group_subtasks": {"my_task": []}}
    assert length_table(alone).tasks == ["my_task"]
