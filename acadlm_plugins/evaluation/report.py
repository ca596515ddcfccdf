"""The per-length view of long-context results: a task x length table and a heatmap.

lm-eval prints one row per (task, metric); for a length sweep the useful picture is a grid with
tasks down and lengths across, plus the average of each length. This module builds it from
lm-eval's results dictionary (in memory or a ``results_*.json`` file) and writes it next to them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AVERAGE_ROW = "average"


@dataclass(frozen=True)
class LengthTable:
    """Scores (0-100) by task and context length; ``None`` where a task has no such length."""

    tasks: list[str]
    lengths: list[int]
    scores: dict[str, dict[int, float]]

    def averages(self) -> dict[int, float]:
        """The mean over tasks at each length (tasks without that length are skipped)."""
        means = {}
        for length in self.lengths:
            values = [row[length] for row in self.scores.values() if length in row]
            means[length] = sum(values) / len(values) if values else math.nan
        return means

    def to_markdown(self) -> str:
        """A Markdown table, one row per task and a final average row."""
        header = "| task | " + " | ".join(str(length) for length in self.lengths) + " |"
        rule = "|---|" + "---:|" * len(self.lengths)
        lines = [header, rule]
        for task in self.tasks:
            cells = [_cell(self.scores[task].get(length)) for length in self.lengths]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        averages = self.averages()
        lines.append(f"| **{AVERAGE_ROW}** | "
                     + " | ".join(_cell(averages[length]) for length in self.lengths) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"lengths": self.lengths,
                "scores": {task: {str(k): v for k, v in row.items()}
                           for task, row in self.scores.items()},
                AVERAGE_ROW: {str(k): v for k, v in self.averages().items()}}


def _cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def length_table(results: dict[str, Any]) -> LengthTable | None:
    """The task x length table of lm-eval ``results`` (the dict simple_evaluate returns, or its
    ``results`` part); None when no task reports length-named metrics."""
    per_task = results.get("results", results)
    groups = set(results.get("groups", {}))
    scores: dict[str, dict[int, float]] = {}
    for task, metrics in per_task.items():
        if task in groups or not isinstance(metrics, dict):
            continue
        row = {}
        for key, value in metrics.items():
            name, _, filter_name = str(key).partition(",")
            if name.isdigit() and filter_name == "none" and isinstance(value, (int, float)):
                row[int(name)] = float(value)
        if row:
            scores[task] = row
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

    rows = [*table.tasks, AVERAGE_ROW]
    averages = table.averages()
    grid = np.array([[table.scores[t].get(length, np.nan) for length in table.lengths]
                     for t in table.tasks] + [[averages[length] for length in table.lengths]])
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
