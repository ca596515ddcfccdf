"""A dry run of a recipe config: what it will build, train on and need, without weights or data.

:func:`plan_config` resolves the config as ``tune run`` does (:mod:`.loading`), finds the
recipe and the number of processes, and hands the config to that recipe's planner
(:mod:`.loop_recipes` for prune / continued_pretrain / long_context, :mod:`.other_recipes` for
the rater, torchtune's stock SFT and QuRating's selection). A planner makes the recipe's own
refusals (:mod:`.checks`), builds the model on the meta device (:mod:`.model_shape`), derives
steps and tokens as the recipe derives them and estimates the memory per GPU (:mod:`.memory`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.planning.checks import check_unset_keys
from acadlm_plugins.planning.loading import detect_recipe, launch_line, load_config
from acadlm_plugins.planning.loop_recipes import plan_loop_recipe
from acadlm_plugins.planning.other_recipes import plan_rater, plan_selection, plan_sft
from acadlm_plugins.planning.results import TrainingPlan

PLANNERS = {"prune": plan_loop_recipe, "continued_pretrain": plan_loop_recipe,
            "long_context": plan_loop_recipe, "rater": plan_rater, "sft": plan_sft,
            "select": plan_selection}


def plan_config(path: str | Path, overrides: Sequence[str] = (), *, recipe: str | None = None,
                world_size: int | None = None) -> TrainingPlan:
    """Plan the run of the config at ``path`` with ``key=value`` ``overrides``.

    ``recipe`` and ``world_size`` default to the config's own ``tune run [--nproc_per_node N]``
    line (then to the blocks only one recipe reads, and to one process). Raises
    :class:`~acadlm_plugins.errors.ConfigError` naming the key for everything the recipe
    itself refuses before it trains.
    """
    cfg = load_config(path, overrides)
    line = launch_line(Path(path).read_text())
    if recipe is not None:
        if recipe not in PLANNERS:
            raise ConfigError("--recipe", f"unknown recipe {recipe!r}.",
                              f"use one of {sorted(PLANNERS)}.")
        if line is not None and line.recipe is not None and line.recipe != recipe:
            raise ConfigError("--recipe", f"is {recipe}, but the config is written for the "
                              f"{line.recipe} recipe (its `{line.recipe_path}` line); the "
                              f"{recipe} recipe would refuse or misread its keys.",
                              f"drop --recipe, or plan a config written for {recipe}.")
        recipe_from = "--recipe"
    else:
        recipe, recipe_from = detect_recipe(cfg, line)
    if world_size is not None:
        world_from = "--world-size"
    elif line is not None and line.processes is not None:
        world_size, world_from = line.processes, "the config's --nproc_per_node"
    else:
        world_size, world_from = 1, "default: one process"
    if world_size < 1:
        raise ConfigError("--world-size", f"is {world_size}; it must be at least 1.")
    plan = TrainingPlan(config=str(path), recipe=recipe, recipe_from=recipe_from,
                        world_size=world_size, world_size_from=world_from,
                        device=str(cfg.get("device", "cpu") or "cpu"))
    check_unset_keys(cfg)
    PLANNERS[recipe](plan, cfg)
    return plan
