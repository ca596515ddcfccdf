"""Every acadlm RULER task builds its prompts at 16K, 64K and 128K tokens of the embedded
SmolLM2 tokenizer in time linear in the length, and every prompt fits its length.

``acadlm_niah_multikey_2`` used to loop for ever from 16K on (its distractor keys ran out), and
the others took 7-12 s per 128K prompt with twenty tokenizations each; the bound below would
catch either. The tokenizer is passed as ``tokenizer=`` so that SmolLM2's own 8K maximum does
not refuse the longer lengths (no model is run).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from eval_fixtures import time_limit

from acadlm_plugins.evaluation.lengths import LengthTokenizer, load_length_tokenizer
from acadlm_plugins.evaluation.ruler import (
    NIAH_VARIANTS,
    PromptFrame,
    cwe_dataset,
    fwe_dataset,
    niah_dataset,
    vt_dataset,
)

pytestmark = pytest.mark.integration

BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {
    **{name: partial(niah_dataset, name) for name in NIAH_VARIANTS},
    "acadlm_vt": vt_dataset,
    "acadlm_cwe": cwe_dataset,
    "acadlm_fwe": fwe_dataset,
}
LENGTHS = [16384, 65536, 131072]
SAMPLES = 2
#: Measured on 2 shared, busy CPU cores (two runs, 2 prompts per task and length): 0.017-0.026 s
#: per 1K tokens at every length; the slowest task took 0.32 s per prompt at 16K, 1.37 s at 64K
#: and 3.35 s at 128K (the prose-haystack NIAH variants). The bound is about 5x that, linear in
#: the length: 1.9 s at 16K, 7.7 s at 64K, 15.4 s at 128K.
SECONDS_PER_1K_TOKENS = 0.12


@pytest.fixture(scope="module")
def model_dir() -> str:
    """The embedded model folder; every task built once at 1K first, so that loading the corpus,
    its vocabulary and the tokenizer is not timed."""
    from acadlm_plugins.defaults import require_default_model

    folder = str(require_default_model())
    for builder in BUILDERS.values():
        builder(tokenizer=folder, max_seq_lengths=[1024], num_samples=1)
    return folder


@pytest.fixture(scope="module")
def tokenizer(model_dir: str) -> LengthTokenizer:
    return load_length_tokenizer({"tokenizer": model_dir}, task="t")


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", sorted(BUILDERS))
def test_task_builds_each_prompt_in_linear_time_and_fits(model_dir: str,
                                                         tokenizer: LengthTokenizer, task: str,
                                                         length: int) -> None:
    bound = SECONDS_PER_1K_TOKENS * length / 1024
    started = time.perf_counter()
    with time_limit(int(4 * SAMPLES * bound) + 30):  # a hang fails instead of stalling the suite
        rows = BUILDERS[task](tokenizer=model_dir, max_seq_lengths=[length],
                              num_samples=SAMPLES)["test"].to_list()
    per_prompt = (time.perf_counter() - started) / SAMPLES
    assert per_prompt <= bound, f"{task} @ {length}: {per_prompt:.2f} s per prompt > {bound} s"
    for row in rows:
        prompt = PromptFrame(0).lay_out(row["input"], row["gen_prefix"])
        tokens = len(tokenizer.tokenizer.encode(prompt, add_special_tokens=True).ids)
        assert tokens == row["input_tokens"]  # SmolLM2 adds no BOS
        assert tokens + row["tokens_to_generate"] <= length
        assert tokens >= 0.99 * row["budget_tokens"]
