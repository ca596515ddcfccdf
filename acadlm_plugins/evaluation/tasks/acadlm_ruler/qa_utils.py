"""lm-eval entry points of ``acadlm_ruler_qa``; the logic lives in
:mod:`acadlm_plugins.evaluation.qa`."""

from typing import Any

from acadlm_plugins.evaluation.qa import ruler_qa_dataset
from acadlm_plugins.evaluation.task_base import (  # noqa: F401  (referenced from the YAML)
    LengthSweepTask,
    process_results_match_part,
)


def ruler_qa(**metadata: Any) -> dict[str, Any]:
    """Dataset of ``acadlm_ruler_qa``."""
    return ruler_qa_dataset("acadlm_ruler_qa", metadata)
