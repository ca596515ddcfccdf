"""lm-eval entry points of the acadlm RULER-style tasks; the logic lives in
:mod:`acadlm_plugins.evaluation.ruler` and :mod:`acadlm_plugins.evaluation.ruler_qa` so it can
be imported and tested on its own."""

from functools import partial

from acadlm_plugins.evaluation.ruler import (  # noqa: F401  (referenced from the YAMLs)
    RulerTask,
    cwe_dataset,
    fwe_dataset,
    niah_dataset,
    vt_dataset,
)
from acadlm_plugins.evaluation.ruler_qa import hotpotqa_dataset, squad_dataset
from acadlm_plugins.evaluation.task_base import (  # noqa: F401  (referenced from the YAMLs)
    LengthSweepTask,
    process_results_match_all,
    process_results_match_part,
)

niah_single_1 = partial(niah_dataset, "acadlm_niah_single_1")
niah_single_2 = partial(niah_dataset, "acadlm_niah_single_2")
niah_single_3 = partial(niah_dataset, "acadlm_niah_single_3")
niah_multikey_1 = partial(niah_dataset, "acadlm_niah_multikey_1")
niah_multikey_2 = partial(niah_dataset, "acadlm_niah_multikey_2")
niah_multikey_3 = partial(niah_dataset, "acadlm_niah_multikey_3")
niah_multivalue = partial(niah_dataset, "acadlm_niah_multivalue")
niah_multiquery = partial(niah_dataset, "acadlm_niah_multiquery")
qa_1 = squad_dataset  # RULER's qa_1: SQuAD, from `squad_path`
qa_2 = hotpotqa_dataset  # RULER's qa_2: HotpotQA, from `hotpotqa_path`
