"""``acadlm-lm-eval``: lm-eval's own command line, with our model and tasks known by name.

lm-eval 0.4.13 has no entry-point group for models and looks ``--model`` up before it imports any
task code, so a plain ``lm_eval --model acadlm`` cannot find a model from another package. This
command is ``lm_eval`` itself (same arguments, same output files) run after two things: the
``acadlm`` model is registered, and our task folder is added to every TaskManager's include path
(next to any ``--include_path`` you give). When the results carry per-length metrics it prints the
task x length table and, with ``--output_path``, writes the table and a heatmap PNG next to
lm-eval's ``results_*.json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from acadlm_plugins.evaluation import TASKS_DIR
from acadlm_plugins.evaluation.report import latest_results_file, length_table, write_report


def include_our_tasks() -> None:
    """Make every lm-eval TaskManager created from now on in this process index our tasks."""
    import lm_eval.tasks

    original = lm_eval.tasks.TaskManager
    if getattr(original, "_acadlm_tasks_included", False):
        return

    class TaskManagerWithAcadlmTasks(original):  # type: ignore[misc, valid-type]
        _acadlm_tasks_included = True

        def __init__(self, *args: Any, include_path: Any = None, **kwargs: Any) -> None:
            paths = [] if include_path is None else (
                list(include_path) if isinstance(include_path, (list, tuple)) else [include_path])
            if str(TASKS_DIR) not in [str(p) for p in paths]:
                paths.append(str(TASKS_DIR))
            super().__init__(*args, include_path=paths, **kwargs)

    lm_eval.tasks.TaskManager = TaskManagerWithAcadlmTasks


def _option(argv: list[str], name: str) -> str | None:
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI with ``argv`` (default: this process's arguments)."""
    import lm_eval
    from lm_eval.__main__ import cli_evaluate

    from acadlm_plugins.evaluation.registry import register_lm_eval_model

    register_lm_eval_model()
    include_our_tasks()
    argv = list(sys.argv[1:] if argv is None else argv)
    captured: list[dict[str, Any]] = []
    original_evaluate = lm_eval.simple_evaluate

    def evaluate_and_keep(*args: Any, **kwargs: Any) -> Any:
        results = original_evaluate(*args, **kwargs)
        if results is not None:
            captured.append(results)
        return results

    started = time.time()
    lm_eval.simple_evaluate = evaluate_and_keep
    saved_argv = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved_argv
        lm_eval.simple_evaluate = original_evaluate
    if not captured:
        return
    table = length_table(captured[-1])
    if table is None:
        return
    print("\nScores by context length (0-100):\n" + table.to_markdown())
    output_path = _option(argv, "--output_path") or _option(argv, "-o")
    if output_path:
        newest = latest_results_file(Path(output_path))
        if newest is not None and newest.stat().st_mtime >= started - 1:
            paths = write_report(captured[-1], newest.parent, stem=newest.stem.replace(
                "results_", "acadlm_long_"))
            for kind, path in paths.items():
                print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
