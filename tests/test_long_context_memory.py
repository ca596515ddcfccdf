"""The long-context memory knobs on the embedded SmolLM2-135M at 4K tokens of real text.

One training step with every knob (activation checkpointing, the chunked loss, per-document
attention: what long_context_recipe runs on CPU with the stage configs) against the plain step
(full logits, torchtune's explicit SDPA mask), each in a fresh process: the knobs must cut the
step's own peak memory by a clear margin and leave the loss and the gradient unchanged.

The model keeps the first 6 of its 30 decoder layers (real weights, the whole vocabulary): a
full-depth step at 4K takes 2-3 minutes on one busy CPU core, this one about 1. The knobs act
per layer and on the logits alike, so the comparison is the same kind; the full model, the
configurations in between and 8K are in benchmarks/long_context_memory.py (full model at 4K:
0.10x the plain step's growth; step_probe allocates AdamW's moments before the step, so the
growth is the step's own gradients and activations).
"""

from __future__ import annotations

import os

import pytest

from acadlm_plugins.training.step_probe import (
    Knobs,
    StepResult,
    available_memory,
    packed_text_batch,
    probe_step,
)

pytestmark = pytest.mark.integration

SEQ_LEN = 4096
LAYERS = 6
# The knobs' step growth over the plain step's must stay below this. Measured here, AdamW's
# moments allocated before the step: 796 / 3859 MiB = 0.21 (6 layers), 0.10 (all 30, the
# benchmark); about 2x room for other allocators and machines.
GROWTH_LIMIT = 0.4
AGREEMENT_TOL = 1e-4  # relative; the same step computed in another order


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def test_knobs_cut_the_step_memory_at_4k_and_keep_the_step():
    from acadlm_plugins.defaults import require_default_corpus, require_default_model
    from acadlm_plugins.models import smollm2_tokenizer

    # a missing embedded default fails this integration test, naming the build command
    model_dir = require_default_model()
    text_file = require_default_corpus() / "books" / "train.jsonl"
    assert text_file.is_file(), f"{text_file} is missing: rebuild with `acadlm-defaults build`"

    batch = packed_text_batch(text_file, SEQ_LEN, smollm2_tokenizer())
    assert int((batch["seq_lens"] > 0).sum()) > 1  # several documents, so masking matters
    threads = min(2, os.cpu_count() or 1)
    limit = available_memory() - 2 * 2**30  # fail in the probe, not through the OOM killer
    plain = probe_step(model_dir, batch, Knobs(), threads=threads, memory_limit=limit,
                       layers=LAYERS)
    knobs = probe_step(model_dir, batch, Knobs(activation_checkpointing=True,
                                               chunked_loss_tokens=1024,
                                               document_attention=True),
                       threads=threads, memory_limit=limit, layers=LAYERS)
    assert isinstance(plain, StepResult), f"plain step: {plain}"
    assert isinstance(knobs, StepResult), f"step with the knobs: {knobs}"

    for step in (plain, knobs):  # the probe resets the peak after loading: the step's own
        assert step.peak_rss > step.rss_after_load
    ratio = knobs.step_growth / plain.step_growth
    assert ratio < GROWTH_LIMIT, (f"knobs: {knobs.step_growth / 2**20:.0f} MiB, plain: "
                                  f"{plain.step_growth / 2**20:.0f} MiB ({ratio:.2f}x)")
    assert relative_difference(plain.loss, knobs.loss) <= AGREEMENT_TOL, (plain.loss, knobs.loss)
    assert relative_difference(plain.grad_norm, knobs.grad_norm) <= AGREEMENT_TOL, (
        plain.grad_norm, knobs.grad_norm)
