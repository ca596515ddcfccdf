"""An example third-party acadlm plugin: the z-loss auxiliary term.

The z-loss (Chowdhery et al. 2022, "PaLM", section 5) penalises the squared log of the softmax
normaliser, ``coefficient * mean(logsumexp(logits) ** 2)``, which keeps the logits from
drifting large and makes bf16 training more stable. The recipe adds the term to the loss and
logs it as ``loss/z_loss``; this plugin also logs the mean ``log Z`` after each optimizer step
and counts the steps it has penalised, a count that survives checkpoint and resume.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from acadlm_plugins import hookimpl
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.training.config_checks import config_value

__all__ = ["ZLossPlugin"]

STATE_KEY = "acadlm_example_plugin.z_loss"


class ZLossPlugin:
    """Adds ``z_loss`` to the training loss. Set ``z_loss_coefficient`` in the config (1e-4)."""

    # Top-level config keys this plugin reads; recipes reject keys that nobody claims.
    config_keys = ("z_loss_coefficient",)

    def __init__(self) -> None:
        self.coefficient = 1e-4
        self.steps_penalised = 0
        self._last_log_z: float | None = None

    @hookimpl
    def acadlm_configure(self, cfg: Any) -> None:
        # Checked before anything is built: a typo (`abc`), a boolean, a negative or infinite
        # value stops the run with a ConfigError naming the key, not a bare ValueError.
        value = cfg.get("z_loss_coefficient", self.coefficient)
        coefficient = config_value(value, "z_loss_coefficient", float, minimum=0)
        if not math.isfinite(coefficient):
            raise ConfigError(
                "z_loss_coefficient",
                f"must be a finite number >= 0, got {coefficient}.",
                "use a small value such as 1.0e-4, or 0 to switch the term off.",
            )
        self.coefficient = coefficient

    @hookimpl
    def acadlm_extra_loss(self, logits: Any, step: int) -> dict | None:
        if self.coefficient == 0:
            return None
        # torchtune may hand the logits over in chunks along the sequence.
        chunks = logits if isinstance(logits, (list, tuple)) else [logits]
        log_z = torch.cat([chunk.float().logsumexp(dim=-1).reshape(-1) for chunk in chunks])
        self._last_log_z = float(log_z.detach().mean())
        self.steps_penalised += 1
        return {"z_loss": self.coefficient * log_z.pow(2).mean()}

    @hookimpl
    def acadlm_after_optimizer_step(self, step: int) -> dict | None:
        if self._last_log_z is None:
            return None
        return {"z_loss/mean_log_z": self._last_log_z, "z_loss/steps": self.steps_penalised}

    @hookimpl
    def acadlm_state_dict(self) -> dict:
        return {STATE_KEY: {"steps_penalised": self.steps_penalised}}

    @hookimpl
    def acadlm_load_state_dict(self, states: dict) -> None:
        state = states.get(STATE_KEY)
        if state is not None:
            self.steps_penalised = int(state["steps_penalised"])
