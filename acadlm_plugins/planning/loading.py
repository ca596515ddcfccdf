"""Read a recipe config exactly as ``tune run`` would, and find which recipe and how many
processes it is meant for.

The overrides are merged by torchtune's own ``_merge_yaml_and_cli_args`` (the function behind
``@config.parse``, reached through :mod:`acadlm_plugins._compat`), so ``key=value``, ``~key``
and ``model=<builder>`` mean what they mean on a ``tune run`` line. Every config under
``configs/`` opens with the command that runs it; the recipe and ``--nproc_per_node`` are read
from that line unless the caller says otherwise.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

import acadlm_plugins.defaults  # noqa: F401  (registers the ${acadlm_home:} resolver)
from acadlm_plugins._compat import merge_yaml_and_cli_args
from acadlm_plugins.errors import ConfigError

# What acadlm-plan knows how to plan, and the command that runs each.
RECIPES: dict[str, str] = {
    "prune": "tune run acadlm_plugins/prune_recipe",
    "continued_pretrain": "tune run acadlm_plugins/continued_pretrain_recipe",
    "long_context": "tune run acadlm_plugins/long_context_recipe",
    "rater": "tune run acadlm_plugins/rater_recipe",
    "sft": "tune run full_finetune_distributed (torchtune's stock recipe)",
    "select": "acadlm-qurating-select",
}
# The command may follow environment assignments (`PYTHONPATH=tests tune run ...`).
_COMMAND_LINE = re.compile(r"^\s*#\s*(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*"
                           r"((?:tune run|acadlm-qurating-select)\b.*)$", re.MULTILINE)


@dataclass(frozen=True)
class LaunchLine:
    """The command a config's opening comment gives for running it."""

    text: str
    recipe: str | None          # one of RECIPES, or None for a recipe acadlm-plan does not plan
    recipe_path: str | None     # the recipe as written, e.g. acadlm_plugins/prune_recipe
    processes: int | None       # --nnodes x --nproc_per_node, when given


def launch_line(config_text: str) -> LaunchLine | None:
    """The first ``tune run`` (or ``acadlm-qurating-select``) command in a config's comments."""
    match = _COMMAND_LINE.search(config_text)
    if match is None:
        return None
    text = match.group(1).rstrip("\\ ").strip()
    if text.startswith("acadlm-qurating-select"):
        return LaunchLine(text, "select", "acadlm-qurating-select", None)
    text_words = text.replace("[", " ").replace("]", " ")  # `tune run [--nproc_per_node N] ...`
    try:
        words = shlex.split(text_words)[2:]
    except ValueError:
        words = text_words.split()[2:]
    options: dict[str, str] = {}
    recipe_path = None
    index = 0
    while index < len(words):
        word = words[index]
        if word.startswith("--"):
            name, _, value = word[2:].partition("=")
            if not value and index + 1 < len(words):
                index += 1
                value = words[index]
            options[name.replace("-", "_")] = value
        elif recipe_path is None:
            recipe_path = word
        index += 1
    processes = None
    if "nproc_per_node" in options and options["nproc_per_node"].isdigit():
        processes = int(options["nproc_per_node"]) * int(options.get("nnodes", "1") or 1)
    return LaunchLine(text, _recipe_of_path(recipe_path), recipe_path, processes)


def _recipe_of_path(path: str | None) -> str | None:
    if path is None:
        return None
    name = path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".py")
    if name.startswith("full_finetune"):
        return "sft"
    name = name.removesuffix("_recipe")
    return name if name in RECIPES else None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The config at ``path`` with ``key=value`` overrides, merged as ``tune run`` merges them."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"{path} is not a file.", "give the path of a YAML config.")
    try:
        yaml_config = OmegaConf.load(path)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError("--config", f"{path} is not valid YAML{line}: "
                          f"{getattr(err, 'problem', None) or err}.",
                          "fix the YAML syntax there.") from err
    if not isinstance(yaml_config, DictConfig):
        raise ConfigError("--config", f"{path} is not a mapping of keys to values.")
    if "config" in yaml_config:
        raise ConfigError("config", "is reserved by `tune run` for the config path.",
                          "rename the key.")
    values = OmegaConf.to_container(yaml_config, resolve=False)
    try:
        return merge_yaml_and_cli_args(values, overrides)
    except ValueError as err:
        raise ConfigError("overrides", str(err), "write them as key=value (or ~key).") from err


def detect_recipe(cfg: DictConfig, line: LaunchLine | None) -> tuple[str, str]:
    """The recipe a config is for, and how that was decided: the config's own command line
    first, then the blocks only one recipe reads."""
    if line is not None and line.recipe is not None:
        return line.recipe, f"the config's `{line.recipe_path}` line"
    if line is not None and line.recipe_path is not None:
        raise ConfigError("--recipe", f"the config is run with `{line.recipe_path}`, which "
                          "acadlm-plan does not plan.", f"plan one of {sorted(RECIPES)}, or pass "
                          "--recipe if the config is really for one of them.")
    keys = set(cfg)
    for recipe, needs in (("long_context", {"long_context"}),
                          ("rater", {"backbone_dir", "judgments"}),
                          ("select", {"scores_dir", "criteria"}),
                          ("prune", {"pruning"}),
                          ("sft", {"epochs"}),
                          ("continued_pretrain", {"model", "dataset", "max_steps"})):
        if needs <= keys:
            return recipe, f"its {'/'.join(sorted(needs))} key{'s' * (len(needs) > 1)}"
    raise ConfigError("--recipe", "the config names no recipe acadlm-plan knows (no `tune run` "
                      "line in its comments, and none of the blocks one recipe alone reads).",
                      f"pass --recipe {{{','.join(RECIPES)}}}.")
