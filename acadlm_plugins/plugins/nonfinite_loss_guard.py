"""Stop the run at the first NaN or infinite loss, before it reaches the weights.

One non-finite loss makes every gradient non-finite, and one optimizer step with those
gradients ruins the model for good. This built-in plugin checks the language-model loss and
every extra loss term other plugins add, each step, before backward, and raises
:class:`NonFiniteLossError` with what to try next. A finite loss whose backward overflows is
caught by the recipes themselves: ``training.runtime.clip_and_step`` checks the gradient norm
every step and raises the same error, naming ``grad_norm``, before the optimizer steps. The
recipe never writes a checkpoint after either, so the last checkpoint on disk is intact and the
run can resume from it.

Under ``torch.distributed`` (world size > 1) each rank sees only its own micro-batch, so a NaN
on one rank (a bf16 overflow in its batch alone) would stop that rank while the others went on
into backward and waited in FSDP's collectives for it. So there the guard checks the loss and
every plugin term together, after the other plugins have run, and all-reduces one report per
call: every rank raises the same error (naming the rank that saw it) before backward. In a
single process it runs no collective.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from acadlm_plugins.errors import AcadlmError
from acadlm_plugins.hookspecs import hookimpl
from acadlm_plugins.training.runtime import current_world_size, rows_from_every_rank


class NonFiniteLossError(AcadlmError, FloatingPointError):
    """The training loss, or the gradient norm of a finite loss, became NaN or infinite. The
    message says at which step and what to try."""

    def __init__(self, step: int | None, name: str, value: float, *,
                 ranks: Sequence[int] | None = None, world_size: int | None = None) -> None:
        self.step = step
        self.name = name
        self.value = value
        self.ranks = list(ranks) if ranks is not None else None
        where = f"at step {step}" if step is not None else "at this step"
        seen_on = ""
        if self.ranks:
            of = f" of {world_size}" if world_size else ""
            seen_on = (f" (on rank{'s' if len(self.ranks) > 1 else ''} "
                       f"{', '.join(str(rank) for rank in self.ranks)}{of})")
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
            f"`{name}` is {value} {where}{seen_on}; {cause}the run was stopped before the "
            "optimizer step, so no weights were changed and the last checkpoint on disk is intact "
            "(nothing is saved after a non-finite loss or gradient). " + fixes
        )


def _first_non_finite(value: Any) -> float | None:
    """The first NaN or infinite entry of ``value`` (a number or tensor), or ``None``."""
    if isinstance(value, torch.Tensor):
        values = value.detach().reshape(-1)
        bad = values[~torch.isfinite(values)]  # one small transfer when all is well
        return float(bad[0]) if bad.numel() else None
    number = float(value)
    return None if math.isfinite(number) else number


def check_finite(value: Any, *, name: str, step: int) -> None:
    """Raise :class:`NonFiniteLossError` if ``value`` (a number or tensor) is NaN or infinite."""
    bad = _first_non_finite(value)
    if bad is not None:
        raise NonFiniteLossError(step, name, bad)


def _world_size() -> int:
    """The number of ranks: 1 when ``torch.distributed`` is not initialized."""
    return current_world_size()


def check_finite_on_every_rank(values: Iterable[tuple[str, Any]], *, step: int) -> None:
    """Raise :class:`NonFiniteLossError` on every rank if any rank's ``(name, value)`` pairs
    hold a NaN or infinite value; in a single process, as :func:`check_finite` on each.

    With more than one rank, every rank must call this at the same point with the same names
    in the same order (it runs one all-reduce, whatever the values): each rank reports the
    index and value of its first non-finite entry, the reports of all ranks are gathered into a
    ``world_size x 2`` table (:func:`~acadlm_plugins.training.runtime.rows_from_every_rank`),
    and every rank raises the same error, naming the first rank that saw one, its entry and
    value, and the ranks that saw any."""
    values = list(values)
    world_size = _world_size()
    if world_size == 1:
        for name, value in values:
            check_finite(value, name=name, step=step)
        return
    row = torch.zeros(2, dtype=torch.float64)  # (index + 1, value); 0: finite
    for index, (_, value) in enumerate(values):
        bad = _first_non_finite(value)
        if bad is not None:
            row[0], row[1] = index + 1, bad
            break
    report = rows_from_every_rank(row)
    ranks = [r for r in range(world_size) if report[r, 0] > 0]
    if ranks:
        index = int(report[ranks[0], 0]) - 1
        name = values[index][0] if index < len(values) else "loss/<a plugin term>"
        raise NonFiniteLossError(step, name, float(report[ranks[0], 1]), ranks=ranks,
                                 world_size=world_size)


@hookimpl(wrapper=True, tryfirst=True)
def acadlm_extra_loss(loss: Any, step: int):
    """Check the LM ``loss`` first, then the extra terms the other plugins return.

    A wrapper, so it sees the other plugins' terms too; it adds no term of its own and hands
    their results on unchanged. The hook's ``step`` counts the steps already taken; the error
    names the step in progress as the logs number it (``step + 1``).

    Under ``torch.distributed`` the loss is checked with the terms, after the other plugins ran
    (they may run collectives of their own, which every rank must reach), in one all-reduce
    per call, so every rank stops at the same point if any rank's loss or term is not finite.
    """
    if _world_size() == 1:
        check_finite(loss, name="loss", step=step + 1)
        results = yield
        for term_name, term in _terms(results):
            check_finite(term, name=f"loss/{term_name}", step=step + 1)
        return results
    results = yield
    # one all-reduce on every rank, whatever the plugins returned
    check_finite_on_every_rank(
        [("loss", loss)] + [(f"loss/{term_name}", term) for term_name, term in _terms(results)],
        step=step + 1)
    return results


def _terms(results: Iterable[Any]) -> list[tuple[Any, Any]]:
    """The ``(name, term)`` pairs of the plugins' results. A result that is not a dict is
    skipped here, not checked: ``collect_metrics`` refuses it with a clear error after the hook
    (the plugin manager refuses it earlier still, naming the plugin)."""
    return [item for terms in results if isinstance(terms, dict) for item in terms.items()]
