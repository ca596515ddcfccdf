"""The per-length view of long-context results: a task x length table and a heatmap, with the
category and overall scores computed as the suites do.

lm-eval prints one row per (task, metric); for a length sweep the useful picture is a grid with
tasks down and lengths across. Below the tasks come the summary rows, at each length:

* HELMET's categories (recall, RAG, re-ranking, citations, ICL, long-document QA,
  summarization), each the mean of its tasks' scores, and ``helmet``, the mean of the
  categories present: HELMET's overall score (Yen et al. 2024, §2; its
  ``scripts/collect_results.py``) averages each category first, so that a category with
  several datasets weighs as much as one with one. Recall is HELMET's four datasets: JSON KV
  and RULER's MK2, MK3 and MV as HELMET runs them (``acadlm_helmet_niah_*``: plain text,
  HELMET's generation lengths), never RULER's own tasks of ours, whose prompts follow the run's
  chat template. The citation category counts ALCE's citation recall/precision next to the
  answer scores when an NLI model computed them.
  Long-document QA is NarrativeQA, InfiniteBench En.QA and En.MC, summarization InfiniteBench
  En.Sum and Multi-LexSum; a task's score is its metric named by the length, which is the
  judge's (NarrativeQA's judge score, the summaries' judge F1) whenever a judge computed it, as
  HELMET's category uses the model-based score. The offline stand-ins ``acadlm_longqa`` and
  ``acadlm_summ`` count for their category only when none of HELMET's own datasets of it ran;
* ``ruler``: the plain mean of the RULER-style tasks, as RULER averages them;
* ``other``: the mean of any other task with per-length metrics;
* ``average``: the mean of the suite rows present (``helmet``, ``ruler``, ``other``), which is
  the suite's own overall score when only one suite was run.

This module builds all of it from lm-eval's results dictionary (in memory or a
``results_*.json`` file) and writes it next to them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from acadlm_plugins.evaluation import TASKS_DIR

AVERAGE_ROW = "average"
#: HELMET's categories and the rows (tasks, or ``task:measure`` for a further measure of a
#: task) of ours that stand for its datasets in each. Cite's citation measures exist only when
#: an NLI model scored them.
HELMET_CATEGORIES: dict[str, tuple[str, ...]] = {
    "recall": ("acadlm_json_kv", "acadlm_helmet_niah_multikey_2",
               "acadlm_helmet_niah_multikey_3", "acadlm_helmet_niah_multivalue"),
    "rag": ("acadlm_rag",),
    "rerank": ("acadlm_rerank",),
    "cite": ("acadlm_cite_asqa", "acadlm_cite_asqa:citation_rec",
             "acadlm_cite_asqa:citation_prec", "acadlm_cite_qampari",
             "acadlm_cite_qampari:citation_rec", "acadlm_cite_qampari:citation_prec"),
    "icl": ("acadlm_icl",),
    "longqa": ("acadlm_narrativeqa", "acadlm_infbench_qa", "acadlm_infbench_choice"),
    "summ": ("acadlm_infbench_sum", "acadlm_multi_lexsum"),
}
#: Offline stand-ins of a category (built from the embedded corpus or the user's documents),
#: counted only when none of HELMET's own datasets of that category ran.
CATEGORY_STAND_INS: dict[str, tuple[str, ...]] = {
    "longqa": ("acadlm_longqa",),
    "summ": ("acadlm_summ",),
}
#: Further measures (``<length>_<measure>`` metrics) that become rows of their own.
CATEGORY_MEASURES = frozenset(row.split(":", 1)[1] for rows in HELMET_CATEGORIES.values()
                              for row in rows if ":" in row)
_HELMET_ROWS = frozenset(row for table in (HELMET_CATEGORIES, CATEGORY_STAND_INS)
                         for rows in table.values() for row in rows)
_RULER_NAMES = ("acadlm_niah_", "acadlm_vt", "acadlm_cwe", "acadlm_fwe", "acadlm_ruler_qa",
                "acadlm_qa_")


#: A key lm-eval (0.4.13, ``Group.aggregate``) writes into a group's row of ``results`` and
#: never into a task's: the number of samples behind each aggregated metric.
GROUP_ONLY_KEYS = frozenset({"sample_count"})


@lru_cache(maxsize=1)
def suite_groups() -> frozenset[str]:
    """The names of our task groups (``acadlm_ruler``, ``acadlm_helmet``, its categories,
    ``acadlm_long``, ...): the ``group:`` of each YAML in the tasks folder, read as text (the
    YAMLs hold lm-eval's ``!function`` tags)."""
    pattern = re.compile(r"^group:\s*(\S+)", re.MULTILINE)
    return frozenset(name for path in TASKS_DIR.rglob("*.yaml")
                     for name in pattern.findall(path.read_text(encoding="utf-8")))


def _is_group(name: str, row: Mapping[str, Any], listed: set[str]) -> bool:
    """Whether a row of lm-eval's ``results`` is a group's (its mean of tasks), not a task's:
    named in the results' ``groups`` or ``group_subtasks`` (``listed``), one of our suites'
    groups, or carrying a key only group rows have."""
    return name in listed or name in suite_groups() or not GROUP_ONLY_KEYS.isdisjoint(row)


def is_ruler_task(task: str) -> bool:
    """Whether ``task`` belongs to our RULER-style suite (``acadlm_ruler``)."""
    return task.startswith(_RULER_NAMES)


def mean_by_length(rows: Iterable[Mapping[int, float]], lengths: Iterable[int]) -> dict[int, float]:
    """The mean of ``rows`` at each length, over the rows that have it (lengths no row has are
    left out)."""
    listed = list(rows)
    means = {}
    for length in lengths:
        values = [row[length] for row in listed if length in row]
        if values:
            means[length] = sum(values) / len(values)
    return means


@dataclass(frozen=True)
class LengthTable:
    """Scores (0-100) by row (a task, or ``task:measure``) and context length; a row has no
    entry at a length its task was not run at."""

    tasks: list[str]
    lengths: list[int]
    scores: dict[str, dict[int, float]]

    def categories(self) -> dict[str, dict[int, float]]:
        """HELMET's category scores (the mean of each category's rows; a stand-in's row only
        when none of HELMET's own datasets of the category ran), for the categories that have
        rows. No RULER task is a row of a category, so a RULER run has none."""
        found = {}
        for name, members in HELMET_CATEGORIES.items():
            rows = [self.scores[row] for row in members if row in self.scores] or [
                self.scores[row] for row in CATEGORY_STAND_INS.get(name, ())
                if row in self.scores]
            if rows:
                found[name] = mean_by_length(rows, self.lengths)
        return found

    def suites(self) -> dict[str, dict[int, float]]:
        """``helmet`` (the mean of its categories), ``ruler`` and ``other`` (plain means of
        their tasks), for the suites that have rows."""
        ruler = [self.scores[t] for t in self.tasks if is_ruler_task(t)]
        other = [self.scores[t] for t in self.tasks
                 if t not in _HELMET_ROWS and not is_ruler_task(t)]
        found = {}
        categories = self.categories()
        if categories:
            found["helmet"] = mean_by_length(categories.values(), self.lengths)
        if ruler:
            found["ruler"] = mean_by_length(ruler, self.lengths)
        if other:
            found["other"] = mean_by_length(other, self.lengths)
        return found

    def averages(self) -> dict[int, float]:
        """The overall score at each length: the mean of the suites present (NaN where none
        has the length)."""
        means = mean_by_length(self.suites().values(), self.lengths)
        return {length: means.get(length, math.nan) for length in self.lengths}

    def summary_rows(self) -> dict[str, dict[int, float]]:
        """The rows below the tasks, in order: categories, suites (when more than one, else
        the average says it), the average."""
        rows = {f"helmet: {name}": scores for name, scores in self.categories().items()}
        suites = self.suites()
        if len(suites) > 1:
            rows.update(suites)
        rows[AVERAGE_ROW] = self.averages()
        return rows

    def to_markdown(self) -> str:
        """A Markdown table, one row per task, then the category, suite and average rows."""
        header = "| task | " + " | ".join(str(length) for length in self.lengths) + " |"
        rule = "|---|" + "---:|" * len(self.lengths)
        lines = [header, rule]
        for task in self.tasks:
            cells = [_cell(self.scores[task].get(length)) for length in self.lengths]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        for name, scores in self.summary_rows().items():
            cells = [_cell(scores.get(length)) for length in self.lengths]
            lines.append(f"| **{name}** | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Lengths, rows, categories, suites and the average, with lengths as string keys."""

        def keyed(rows: Mapping[str, Mapping[int, float]]) -> dict[str, dict[str, float]]:
            return {name: {str(k): v for k, v in row.items()} for name, row in rows.items()}

        return {"lengths": self.lengths, "scores": keyed(self.scores),
                "categories": keyed(self.categories()), "suites": keyed(self.suites()),
                AVERAGE_ROW: {str(k): v for k, v in self.averages().items()}}


def _cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def _length_metric(key: str) -> tuple[int, str] | None:
    """(length, measure) of an lm-eval result key named by length: ``"4096,none"`` is
    (4096, ""), ``"4096_citation_rec,none"`` is (4096, "citation_rec"); None otherwise."""
    name, _, filter_name = key.partition(",")
    length, _, measure = name.partition("_")
    if filter_name != "none" or not length.isdigit() or measure.endswith("stderr") \
            or measure == "stderr":
        return None
    return int(length), measure


def length_table(results: dict[str, Any]) -> LengthTable | None:
    """The task x length table of lm-eval ``results`` (the dict simple_evaluate returns, or its
    ``results`` part); None when no task reports length-named metrics. Besides each task's
    main metric (named by the length alone), the measures a category counts
    (:data:`CATEGORY_MEASURES`) become ``task:measure`` rows. Group rows (lm-eval's means of
    their tasks) are left out, from either form: the whole dict names them, and the ``results``
    part alone is read with our suites' group names and the keys only group rows carry
    (:func:`_is_group`), so both give the same table."""
    per_task = results.get("results", results)
    listed = set(results.get("groups", {})) | {
        name for name, members in results.get("group_subtasks", {}).items() if members}
    scores: dict[str, dict[int, float]] = {}
    for task, metrics in per_task.items():
        if not isinstance(metrics, dict) or _is_group(task, metrics, listed):
            continue
        for key, value in metrics.items():
            parsed = _length_metric(str(key))
            if parsed is None or not isinstance(value, (int, float)):
                continue
            length, measure = parsed
            if measure and measure not in CATEGORY_MEASURES:
                continue
            scores.setdefault(f"{task}:{measure}" if measure else task, {})[length] = float(value)
    if not scores:
        return None
    lengths = sorted({length for row in scores.values() for length in row})
    return LengthTable(sorted(scores), lengths, scores)


def plot_heatmap(table: LengthTable, path: Path, title: str = "") -> Path:
    """Write a task x length heatmap (0-100, annotated) as PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    summary = table.summary_rows()
    rows = [*table.tasks, *summary]
    grid = np.array([[table.scores[t].get(length, np.nan) for length in table.lengths]
                     for t in table.tasks]
                    + [[row.get(length, np.nan) for length in table.lengths]
                       for row in summary.values()])
    height = 1.2 + 0.38 * len(rows)
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * len(table.lengths), height))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(table.lengths)), [str(length) for length in table.lengths])
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("context length (tokens)")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center",
                    color="white" if value < 60 else "black", fontsize=8)
    fig.colorbar(image, ax=ax, label="score")
    ax.set_title(title or "long-context scores by length")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(results: dict[str, Any], output_dir: Path, *, stem: str = "acadlm_long",
                 title: str = "") -> dict[str, Path]:
    """Write ``<stem>_table.md``, ``<stem>_scores.json`` and ``<stem>_heatmap.png`` into
    ``output_dir``; returns the paths (empty when the results hold no per-length metrics)."""
    table = length_table(results)
    if table is None:
        return {}
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"table": output_dir / f"{stem}_table.md", "scores": output_dir / f"{stem}_scores.json",
             "heatmap": output_dir / f"{stem}_heatmap.png"}
    _atomic_write(paths["table"], table.to_markdown() + "\n")
    _atomic_write(paths["scores"], json.dumps(table.to_dict(), indent=2) + "\n")
    plot_heatmap(table, paths["heatmap"], title=title)
    return paths


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def latest_results_file(output_path: Path) -> Path | None:
    """The newest ``results_*.json`` lm-eval wrote under ``output_path`` (a file or folder)."""
    if output_path.is_file():
        return output_path
    found = sorted(output_path.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None
