"""``acadlm-plan``: check a recipe config and see what it will cost before any GPU time.

:func:`plan_config` resolves a config as ``tune run`` does, makes the recipe's own refusals,
builds the model on the meta device and returns a :class:`TrainingPlan`: source and target
shapes, parameter counts, tokens per step and in total, and the memory per GPU. See
docs/planning.md.
"""

from acadlm_plugins.planning.plan import plan_config
from acadlm_plugins.planning.results import TokenBudget, TrainingPlan

__all__ = ["TokenBudget", "TrainingPlan", "plan_config"]
