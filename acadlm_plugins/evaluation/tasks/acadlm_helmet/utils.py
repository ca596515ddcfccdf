"""lm-eval entry points of the acadlm HELMET-style tasks; the logic lives in
:mod:`acadlm_plugins.evaluation.helmet` (and ``helmet_longdoc`` for HELMET's long-document
datasets) so it can be imported and tested on its own.

lm-eval calls ``custom_dataset`` with the task's metadata (``--metadata`` merged with
``--model_args``) as keyword arguments.
"""

from functools import partial
from typing import Any

from acadlm_plugins.evaluation import helmet, helmet_longdoc
from acadlm_plugins.evaluation.helmet import (  # noqa: F401  (referenced from the YAMLs)
    AsqaTask,
    IclTask,
    LongQATask,
    QampariTask,
    RagTask,
    RecallTask,
    RerankTask,
    SummTask,
    process_results_cite,
    process_results_document_qa,
    process_results_document_summary,
    process_results_label,
    process_results_ndcg,
    process_results_substring_em,
)
from acadlm_plugins.evaluation.helmet_frame import HelmetTask  # noqa: F401
from acadlm_plugins.evaluation.helmet_longdoc import (  # noqa: F401
    InfBenchChoiceTask,
    InfBenchQATask,
    InfBenchSumTask,
    MultiLexSumTask,
    NarrativeQATask,
    process_results_longdoc,
)
from acadlm_plugins.evaluation.task_base import process_results_match_all  # noqa: F401


def json_kv(**metadata: Any) -> dict[str, Any]:
    """Dataset of ``acadlm_json_kv``."""
    return helmet.json_kv_dataset("acadlm_json_kv", metadata)


def helmet_needle(task: str, **metadata: Any) -> dict[str, Any]:
    """Dataset of ``task``, one of RULER's needle tasks as HELMET's recall runs them
    (:data:`acadlm_plugins.evaluation.helmet.HELMET_NEEDLE_TASKS`)."""
    return helmet.helmet_needle_dataset(task, metadata)


# RULER's MK2, MK3 and MV as HELMET's recall runs them, one entry point per task's YAML.
helmet_niah_multikey_2 = partial(helmet_needle, "acadlm_helmet_niah_multikey_2")
helmet_niah_multikey_3 = partial(helmet_needle, "acadlm_helmet_niah_multikey_3")
helmet_niah_multivalue = partial(helmet_needle, "acadlm_helmet_niah_multivalue")


def rag(**metadata: Any) -> dict[str, Any]:
    """Dataset of ``acadlm_rag``."""
    return helmet.rag_dataset("acadlm_rag", metadata)


def rerank(**metadata: Any) -> dict[str, Any]:
    """Dataset of ``acadlm_rerank``."""
    return helmet.rerank_dataset("acadlm_rerank", metadata)


def icl(**metadata: Any) -> dict[str, Any]:
    """Dataset of ``acadlm_icl``."""
    return helmet.icl_dataset("acadlm_icl", metadata)


def longqa(**metadata: Any) -> dict[str, Any]:
    """Dataset of ``acadlm_longqa``."""
    return helmet.longqa_dataset("acadlm_longqa", metadata)


def summ(**metadata: Any) -> dict[str, Any]:
    """Dataset of ``acadlm_summ``."""
    return helmet.summ_dataset("acadlm_summ", metadata)


def cite_asqa(**metadata: Any) -> dict[str, Any]:
    """Dataset of ``acadlm_cite_asqa``."""
    return helmet.cite_dataset("acadlm_cite_asqa", helmet.ASQA, metadata)


def cite_qampari(**metadata: Any) -> dict[str, Any]:
    """Dataset of ``acadlm_cite_qampari``."""
    return helmet.cite_dataset("acadlm_cite_qampari", helmet.QAMPARI, metadata)


def narrativeqa(**metadata: Any) -> dict[str, Any]:
    """Dataset of ``acadlm_narrativeqa``."""
    return helmet_longdoc.longdoc_dataset(helmet_longdoc.NARRATIVEQA, metadata)


def infbench_qa(**metadata: Any) -> dict[str, Any]:
    """Dataset of ``acadlm_infbench_qa``."""
    return helmet_longdoc.longdoc_dataset(helmet_longdoc.INFBENCH_QA, metadata)


def infbench_choice(**metadata: Any) -> dict[str, Any]:
    """Dataset of ``acadlm_infbench_choice``."""
    return helmet_longdoc.longdoc_dataset(helmet_longdoc.INFBENCH_CHOICE, metadata)


def infbench_sum(**metadata: Any) -> dict[str, Any]:
    """Dataset of ``acadlm_infbench_sum``."""
    return helmet_longdoc.longdoc_dataset(helmet_longdoc.INFBENCH_SUM, metadata)


def multi_lexsum(**metadata: Any) -> dict[str, Any]:
    """Dataset of ``acadlm_multi_lexsum``."""
    return helmet_longdoc.longdoc_dataset(helmet_longdoc.MULTI_LEXSUM, metadata)
