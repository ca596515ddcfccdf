"""Learning-rate schedules torchtune 0.6.1 lacks.

ProLong decays its learning rate with a cosine to 10% of the peak, not to zero, after a warm-up
of 10% of the steps (5% in SFT); torchtune's ``get_cosine_schedule_with_warmup`` ends at 0 and
takes the warm-up as a step count, which a recipe that derives its steps from a token budget
does not know when the config is written.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from acadlm_plugins.errors import ConfigError


def cosine_schedule_with_min_lr(optimizer: Optimizer, num_training_steps: int, *,
                                num_warmup_steps: int | None = None,
                                warmup_ratio: float | None = None, min_lr_ratio: float = 0.1,
                                last_epoch: int = -1) -> LambdaLR:
    """Linear warm-up, then a half cosine from the peak learning rate down to
    ``min_lr_ratio`` x the peak at ``num_training_steps``.

    The warm-up is ``num_warmup_steps`` steps, or ``warmup_ratio`` of ``num_training_steps``
    (rounded), not both. Its first step already trains (at 1/(warm-up + 1) of the peak), so a
    short run never spends a step at learning rate 0. Use it as a config's ``lr_scheduler``::

        lr_scheduler:
          _component_: acadlm_plugins.training.lr_schedules.cosine_schedule_with_min_lr
          warmup_ratio: 0.1
          min_lr_ratio: 0.1
    """
    if num_warmup_steps is not None and warmup_ratio is not None:
        raise ConfigError("lr_scheduler.warmup_ratio", "is set together with num_warmup_steps.",
                          "give one of the two.")
    if warmup_ratio is not None and not 0.0 <= float(warmup_ratio) < 1.0:
        raise ConfigError("lr_scheduler.warmup_ratio", f"is {warmup_ratio}, outside [0, 1).",
                          "use a fraction of the steps such as 0.1.")
    if not 0.0 <= float(min_lr_ratio) <= 1.0:
        raise ConfigError("lr_scheduler.min_lr_ratio", f"is {min_lr_ratio}, outside [0, 1].",
                          "use a fraction of the peak such as 0.1 (ProLong), or 0 for torchtune's "
                          "cosine to zero.")
    total = max(1, int(num_training_steps))
    warmup = (round(float(warmup_ratio) * total) if warmup_ratio is not None
              else int(num_warmup_steps or 0))
    if not 0 <= warmup < total:
        raise ConfigError("lr_scheduler.num_warmup_steps", f"is {warmup} for a run of {total} "
                          "steps.", "warm up for fewer steps than the run has.")
    floor = float(min_lr_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor, last_epoch)
