"""Lagrangian constraints that pull the expected shape to the target architecture.

Sheared-LLaMA (Xia et al. 2023, eq. 2): for each mask type with expected remaining fraction e
and target fraction t (ramped linearly from 1, the full model, over the warm-up steps),

    L_type = lambda_1 * (e - t) + lambda_2 * (e - t) ** 2

The masks and the model minimize the sum; the multipliers maximize it (gradient ascent), so a
multiplier grows for as long as its mask type stays above target and the pressure on the masks
rises until the expected shape meets the target.
"""

from __future__ import annotations

import torch
from torch import nn

from acadlm_plugins.pruning.masks import ExpectedShape


def ramped_target_fraction(final_fraction: float, step: int, warmup_steps: int) -> float:
    """Target remaining fraction at ``step``: 1.0 at step 0, ``final_fraction`` after warm-up."""
    if warmup_steps <= 0:
        return final_fraction
    progress = min(1.0, step / warmup_steps)
    return 1.0 - (1.0 - final_fraction) * progress


class LagrangeMultipliers(nn.Module):
    """(lambda_1, lambda_2) per mask type, trained by gradient ascent."""

    def __init__(self, mask_types: list[str]) -> None:
        super().__init__()
        self.multipliers = nn.ParameterDict({t: nn.Parameter(torch.zeros(2)) for t in mask_types})

    def loss(self, shape: ExpectedShape, step: int, warmup_steps: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """The summed Lagrangian term and, per type, the expected and target fractions."""
        total = torch.zeros(())
        report: dict[str, float] = {}
        for mask_type, lambdas in self.multipliers.items():
            expected = shape.fraction(mask_type)
            target = ramped_target_fraction(shape.target_fraction(mask_type), step, warmup_steps)
            gap = expected - target
            total = total + lambdas[0] * gap + lambdas[1] * gap.pow(2)
            report[f"pruning/expected/{mask_type}"] = float(expected.detach())
            report[f"pruning/target/{mask_type}"] = target
            report[f"pruning/lambda_1/{mask_type}"] = float(lambdas[0].detach())
            report[f"pruning/lambda_2/{mask_type}"] = float(lambdas[1].detach())
        return total, report
