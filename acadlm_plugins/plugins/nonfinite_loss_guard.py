"""Stop the run at the first NaN or infinite loss, before it reaches the weights.

One non-finite loss makes every gradient non-finite, and one optimizer step with those
gradients ruins the model for good. This built-in plugin checks the language-model loss and
every extra loss term other plugins add, each step, before backward, and raises
:class:`NonFiniteLossError` with what to try next. A finite loss whose backward overflows is
caught by the recipes themselves: ``training.runtime.clip_and_step`` checks the gradient norm
every step and raises the same error, naming ``grad_norm``, before the optimizer steps. The
recipe never writes a checkpoint after either, so the last checkpoint on disk is intact and the
run can resume from it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from acadlm_plugins.errors import AcadlmError
from acadlm_plugins.hookspecs import hookimpl


class NonFiniteLossError(AcadlmError, FloatingPointError):
    """The training loss, or the gradient norm of a finite loss, became NaN or infinite. The
    message says at which step and what to try."""

    def __init__(self, step: int | None, name: str, value: float) -> None:
        self.step = step
        self.name = name
        self.value = value
        where = f"at step {step}" if step is not None else "at this step"
        if name == "grad_norm":
            cause = ("backward produced NaN or infinite gradients (from a finite loss: an "
                     "overflow); ")
            fixes = ("Fixes to try: with `dtype: fp16`, train in bf16 or fp32 (fp16 overflows "
                     "at 65504); lower `optimizer.lr` (or lengthen the warmup); check the batch "
                     f"{where} and any plugin that changes the loss or the model; then resume "
                     "from the last checkpoint.")
        else:
            cause = ""
            fixes = ("Fixes to try: lower `optimizer.lr` (or lengthen the warmup); enable "
                     "gradient clipping with `clip_grad_norm: 1.0`; check the data of the "
                     f"batch {where} (empty or all-padding sequences, out-of-vocabulary token "
                     "ids); then resume from the last checkpoint.")
        super().__init__(
            f"`{name}` is {value} {where}; {cause}the run was stopped before the optimizer "
            "step, so no weights were changed and the last checkpoint on disk is intact "
            "(nothing is saved after a non-finite loss or gradient). " + fixes
        )


def check_finite(value: Any, *, name: str, step: int) -> None:
    """Raise :class:`NonFiniteLossError` if ``value`` (a number or tensor) is NaN or infinite."""
    if isinstance(value, torch.Tensor):
        values = value.detach().reshape(-1)
        bad = values[~torch.isfinite(values)]  # one small transfer when all is well
        if bad.numel():
            raise NonFiniteLossError(step, name, float(bad[0]))
    elif not math.isfinite(float(value)):
        raise NonFiniteLossError(step, name, float(value))


@hookimpl(wrapper=True, tryfirst=True)
def acadlm_extra_loss(loss: Any, step: int):
    """Check the LM ``loss`` first, then the extra terms the other plugins return.

    A wrapper, so it sees the other plugins' terms too; it adds no term of its own and hands
    their results on unchanged. The hook's ``step`` counts the steps already taken; the error
    names the step in progress as the logs number it (``step + 1``).
    """
    check_finite(loss, name="loss", step=step + 1)
    results = yield
    for terms in results:
        for term_name, term in (terms or {}).items():
            check_finite(term, name=f"loss/{term_name}", step=step + 1)
    return results
