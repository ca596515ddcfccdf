"""Evaluation through lm-eval: an ``acadlm`` model adapter for our checkpoints and offline
RULER-/HELMET-style long-context tasks whose metrics are named by context length."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).parent / "tasks"


def task_manager(metadata: dict[str, Any] | None = None, include_defaults: bool = True) -> Any:
    """An lm-eval ``TaskManager`` that knows our tasks by name (``acadlm_long`` and its parts)
    as well as lm-eval's own."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults,
                       metadata=metadata or {})
