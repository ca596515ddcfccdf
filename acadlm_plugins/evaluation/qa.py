"""RULER's QA task (Hsieh et al. 2024) over local files: a question whose gold passage is hidden
among the passages of other questions, scored by string match (any answer found).

RULER draws its questions from SQuAD and HotpotQA; ours come from a local jsonl in the schema of
:mod:`acadlm_plugins.evaluation.local_data` (``qa_path``; by default the shipped example, the
same file ``acadlm_rag`` uses). Unlike the RAG task the distractors are not the question's own
hard negatives but the other questions' passages, and the gold passage goes at a random place,
as in RULER.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from acadlm_plugins.evaluation.helmet import PassageStyle, passage_qa_dataset

RULER_QA_STYLE = PassageStyle(
    head=("Read the documents below, then answer the question that follows them. Reply with the "
          "answer alone, without any other words.\n\nThe documents:\n\n"),
    tail=("\n\nRead the documents above, then answer the question. Reply with the answer alone, "
          "without any other words.\n\nQuestion: {question}\nAnswer:"),
    document="Document {i}:\n{title}\n{text}",
    spread_depth=False, hard_negatives=False, key="qa_path")


def ruler_qa_dataset(task: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset of ``acadlm_ruler_qa``, from ``qa_path`` or the shipped example."""
    return passage_qa_dataset(task, RULER_QA_STYLE, metadata)
