"""Lagrangian constraints that pull the expected shape to the target architecture.

Sheared-LLaMA (Xia et al. 2023, eq. 2) as its reference code computes it: for each mask type
and each of its rows r (a layer's KV heads, a KV group's query heads, a layer's MLP channels,
or the single row of the layer and hidden masks), with expected kept fraction e_r and the
target fraction t (ramped linearly over the warm-up steps),

    L_type = mean_r [ lambda_1 * (e_r - t) + lambda_2 * (e_r - t) ** 2 ]

The masks and the model minimize the sum over types; the multipliers maximize it (gradient
ascent), so a multiplier grows for as long as its rows stay above target and the pressure on
the masks rises until every row's expected shape meets the target. Constraining rows, not
totals, keeps the per-layer shapes at the target's, which is what the final per-row top-k cuts.

One deliberate difference from the reference: the ramp starts at the expected fraction of the
first step (the reference starts at 1, the full model). With uniformly initialized gates the
two agree to 0.2% (P(z > 0) = 0.998 at log_alpha = ln 99); with importance-initialized gates,
whose less important units start lower, a ramp from 1 would first push those units back *up*.
"""

from __future__ import annotations

import torch
from torch import nn

from acadlm_plugins.pruning.masks import ExpectedShape


def ramped_target_fraction(final_fraction: float, step: int, warmup_steps: int,
                           start_fraction: float = 1.0) -> float:
    """Target remaining fraction at ``step``: ``start_fraction`` at step 0, ``final_fraction``
    after warm-up (1.0, the full model, is Sheared-LLaMA's start)."""
    if warmup_steps <= 0:
        return final_fraction
    progress = min(1.0, step / warmup_steps)
    return start_fraction - (start_fraction - final_fraction) * progress


class LagrangeMultipliers(nn.Module):
    """(lambda_1, lambda_2) per mask type, trained by gradient ascent."""

    def __init__(self, mask_types: list[str]) -> None:
        super().__init__()
        self.multipliers = nn.ParameterDict({t: nn.Parameter(torch.zeros(2)) for t in mask_types})
        # Expected fraction per type at the first step: where the target ramp starts. NaN until
        # then; a buffer, so it is checkpointed with the multipliers.
        self.register_buffer("ramp_start", torch.full((len(mask_types),), float("nan")))

    def loss(self, shape: ExpectedShape, step: int, warmup_steps: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """The summed Lagrangian term and, per type, the expected (mean over rows) and target
        fractions and the spread of the rows."""
        total = torch.zeros(())
        report: dict[str, float] = {}
        if torch.isnan(self.ramp_start).any():
            with torch.no_grad():
                self.ramp_start.copy_(torch.stack([
                    shape.fraction(t).detach().float() for t in self.multipliers]))
        for index, (mask_type, lambdas) in enumerate(self.multipliers.items()):
            rows = shape.rows[mask_type]
            start = max(float(self.ramp_start[index]), shape.target_fraction(mask_type))
            target = ramped_target_fraction(shape.target_fraction(mask_type), step,
                                            warmup_steps, start)
            gap = rows - target
            total = total + (lambdas[0] * gap + lambdas[1] * gap.pow(2)).mean()
            report[f"pruning/expected/{mask_type}"] = float(rows.detach().mean())
            report[f"pruning/row_gap_max/{mask_type}"] = float(gap.detach().abs().max())
            report[f"pruning/target/{mask_type}"] = target
            report[f"pruning/lambda_1/{mask_type}"] = float(lambdas[0].detach())
            report[f"pruning/lambda_2/{mask_type}"] = float(lambdas[1].detach())
        return total, report
