"""Hard-concrete (L0) gates: differentiable stand-ins for keeping or removing a unit.

Louizos et al. 2018, "Learning Sparse Neural Networks through L0 Regularization", section 3,
as used by Sheared-LLaMA: a unit's gate is a stretched, clamped binary-concrete variable

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = clamp(s * (r - l) + l, 0, 1)

with temperature beta = 2/3 and stretch limits (l, r) = (-0.1, 1.1), so z is exactly 0 or 1 with
positive probability. The probability that a gate is non-zero, the expected L0 "score", has a
closed form: P(z > 0) = sigmoid(log_alpha - beta * log(-l / r)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

TEMPERATURE = 2.0 / 3.0
LIMIT_LEFT = -0.1
LIMIT_RIGHT = 1.1
LOG_ALPHA_MIN = math.log(1e-2)
LOG_ALPHA_MAX = math.log(1e2)
# Sheared-LLaMA's deterministic gates squash log_alpha a little more than the temperature does.
_DETERMINISTIC_SHARPNESS = 0.8
_EPS = 1e-6


def initial_log_alpha(droprate_init: float = 0.01) -> float:
    """log_alpha whose gate starts (almost) open: ln((1 - p) / p), about 4.6 for p = 0.01."""
    return math.log(1.0 - droprate_init) - math.log(droprate_init)


class HardConcreteGates(nn.Module):
    """``shape`` independent gates with learnable ``log_alpha``."""

    def __init__(self, shape: int | tuple[int, ...], *, droprate_init: float = 0.01,
                 init_noise: float = 1e-2, generator: torch.Generator | None = None) -> None:
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        log_alpha = torch.empty(shape).normal_(initial_log_alpha(droprate_init), init_noise,
                                               generator=generator)
        self.log_alpha = nn.Parameter(log_alpha)

    @property
    def num_units(self) -> int:
        return self.log_alpha.numel()

    def scores(self) -> torch.Tensor:
        """P(gate > 0) for every gate: the expected L0 norm contribution, differentiable."""
        shift = TEMPERATURE * math.log(-LIMIT_LEFT / LIMIT_RIGHT)
        return torch.sigmoid(self.log_alpha - shift)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One stochastic draw of the gates (training); gradients flow into ``log_alpha``."""
        u = torch.rand(self.log_alpha.shape, generator=generator, dtype=torch.float32)
        u = u.clamp(_EPS, 1 - _EPS).to(self.log_alpha.device)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / TEMPERATURE)
        return (s * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT).clamp(0.0, 1.0)

    def soft_values(self) -> torch.Tensor:
        """The value a kept gate takes in deterministic mode (folded into weights at the end)."""
        return torch.sigmoid(self.log_alpha / TEMPERATURE * _DETERMINISTIC_SHARPNESS)

    def deterministic(self, keep: int | torch.Tensor) -> torch.Tensor:
        """Gates with exactly ``keep`` units open per row (top-k by log_alpha), soft-valued.

        ``keep`` is one count for a 1-d gate vector, or a count per row for a 2-d one.
        """
        log_alpha = self.log_alpha.detach()
        flat = log_alpha.reshape(-1, log_alpha.shape[-1])
        keeps = torch.as_tensor(keep).reshape(-1).expand(flat.shape[0])
        out = torch.zeros_like(flat)
        soft = self.soft_values().detach().reshape(flat.shape)
        for row, k in enumerate(keeps.tolist()):
            if k > 0:
                top = torch.topk(flat[row], int(k)).indices
                out[row, top] = soft[row, top]
        return out.reshape(log_alpha.shape)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep log_alpha in [ln 0.01, ln 100] after each optimizer step, as the reference does."""
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
