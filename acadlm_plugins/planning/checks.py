"""The refusals a recipe makes before it loads anything, made here through the recipe's own
code: its known and required keys, its plugins' ``acadlm_configure`` checks, the family layer,
every ``_component_`` block's import path and argument names, the optimizer and the schedule.

Only checks that need files or hardware the planning machine does not have are left out (they
are listed in the plan as not checked): weight files, data files, the tokenizer, ``device:
cuda`` and float8 support, and whether ``output_dir`` is writable there.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.training.components import check_component, instantiate_optional
from acadlm_plugins.training.config_checks import check_config_keys

# Top-level blocks of each recipe that are built with `config.instantiate`.
COMPONENT_KEYS = ("model", "tokenizer", "checkpointer", "dataset", "validation_dataset",
                  "optimizer", "lr_scheduler", "metric_logger", "loss")


def recipe_keys(recipe: str) -> tuple[frozenset[str], tuple[str, ...], str] | None:
    """The recipe's known keys, required keys and example config, imported from the recipe
    itself; None for torchtune's stock SFT recipe (which reads what it reads)."""
    if recipe in ("prune", "continued_pretrain"):
        from acadlm_plugins.continued_pretrain_recipe import ContinuedPretrainRecipe

        example = ("configs/smollm2/135M_to_85M_prune.yaml" if recipe == "prune"
                   else ContinuedPretrainRecipe.example_config)
        return (ContinuedPretrainRecipe.known_keys, ContinuedPretrainRecipe.required_keys,
                example)
    if recipe == "long_context":
        from acadlm_plugins.long_context_recipe import LongContextRecipe

        return (LongContextRecipe.known_keys, LongContextRecipe.required_keys,
                LongContextRecipe.example_config)
    if recipe == "rater":
        from acadlm_plugins import rater_recipe

        return (frozenset(rater_recipe.KNOWN_KEYS), tuple(rater_recipe.REQUIRED_KEYS),
                "configs/smollm2/qurating_rater.yaml")
    return None


def check_unset_keys(cfg: DictConfig) -> None:
    """Refuse a top-level value left at ``???`` (``model_dir``, say) with the key to set,
    instead of the interpolation error the first use of it would raise."""
    for key in cfg:
        if OmegaConf.is_missing(cfg, str(key)):
            raise ConfigError(str(key), "is not set (`???` in the config).",
                              f"pass `{key}=...` after --config.")


def configure_plugins(cfg: DictConfig, recipe: str) -> Any:
    """The run's plugin manager after every plugin's ``acadlm_configure`` check (which may fill
    in defaults on ``cfg``, as in the recipe). A valid float8 recipe name is set aside when this
    machine has no CUDA device (whether the training GPU supports it cannot be checked here);
    any other value is checked as the recipe checks it."""
    from acadlm_plugins.plugin_manager import build_plugin_manager
    from acadlm_plugins.training.float8 import RECIPES as FLOAT8_RECIPES

    block = cfg.get("torchao", None)
    # Only a valid name is set aside: a typo is still refused by the plugin, as in the recipe.
    if isinstance(block, DictConfig) and block.get("float8", None) in FLOAT8_RECIPES and \
            not torch.cuda.is_available():
        OmegaConf.update(cfg, "torchao.float8", None)
    pm = build_plugin_manager(cfg.get("plugins", None) or [])  # the manager normalises it
    pm.hook.acadlm_configure(cfg=cfg, recipe=recipe)
    return pm


def check_keys(cfg: DictConfig, recipe: str, pm: Any | None) -> bool:
    """Unknown top-level keys (beyond the recipe's and its plugins') and missing required
    ones, refused as the recipe refuses them; False when the recipe has no such check."""
    keys = recipe_keys(recipe)
    if keys is None:
        return False
    known, required, example = keys
    allowed = set(known)
    if pm is not None:
        for plugin in pm.get_plugins():
            allowed.update(getattr(plugin, "config_keys", ()))
    check_config_keys(cfg, known=allowed, required=required, recipe=recipe, example=example)
    return True


def check_components(cfg: DictConfig, keys: tuple[str, ...] = COMPONENT_KEYS) -> list[str]:
    """Every ``_component_`` block among ``keys``: its path imports and it has a parameter for
    each argument (``dataset.weigths`` is refused with the closest name). Returns the keys
    checked."""
    checked = []
    for key in keys:
        node = cfg.get(key, None)
        if not isinstance(node, DictConfig) or "_component_" not in node:
            continue
        check_component(node, key)
        checked.append(key)
    return checked


def check_optimizer(cfg: DictConfig, params: list[torch.Tensor], *, world_size: int) -> None:
    """The recipe's optimizer checks (torchao present, CPU offload on a GPU and one process,
    parameters a low-bit optimizer can hold) on the meta-device parameters."""
    from acadlm_plugins.training.optimizers import check_optimizer as check

    device = torch.device(str(cfg.get("device", "cpu") or "cpu").split(":")[0])
    check(cfg, [{"params": params}], device=device, distributed=world_size > 1)


def check_schedule(cfg: DictConfig, steps: int) -> bool:
    """Build ``lr_scheduler`` over a one-value optimizer for a run of ``steps`` steps, as the
    recipe does (warm-up longer than the run, a bad ratio ... are refused); False when the
    config has none."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return instantiate_optional(cfg, "lr_scheduler", optimizer,
                                num_training_steps=max(1, steps)) is not None
