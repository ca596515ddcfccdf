"""Converters from the real RULER/HELMET datasets, downloaded elsewhere in their published
formats, to the jsonl schemas our long-context tasks read (``docs/evaluation_data.md``).

``acadlm-eval-data convert <dataset> <file>`` (:mod:`.cli`) or :func:`convert_file` from Python.
One module per kind of data: :mod:`.rag` (KILT, SQuAD, HotpotQA), :mod:`.rerank` (MS MARCO),
:mod:`.icl` (TREC, BANKING77, CLINC150, NLU), :mod:`.longdoc` (NarrativeQA, InfiniteBench,
Multi-LexSum), :mod:`.alce` (ASQA, QAMPARI); :mod:`.reading` and :mod:`.writing` hold the
streaming readers with ``file:line`` errors and the atomic writer they share.
"""

from acadlm_plugins.evaluation.converters.base import DatasetSpec, Options, SourceError
from acadlm_plugins.evaluation.converters.catalog import DATASETS, Report, convert_file

__all__ = ["DATASETS", "DatasetSpec", "Options", "Report", "SourceError", "convert_file"]
