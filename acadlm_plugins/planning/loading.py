"""Read a recipe config exactly as ``tune run`` would, and find which recipe and how many
processes it is meant for.

The overrides are merged by torchtune's own ``_merge_yaml_and_cli_args`` (the function behind
``@config.parse``, reached through :mod:`acadlm_plugins._compat`), so ``key=value``, ``~key``
and ``model=<builder>`` mean what they mean on a ``tune run`` line. Every config under
``configs/`` opens with the command that runs it; the recipe and ``--nproc_per_node`` are read
from that line unless the caller says otherwise.
"""

from __future__ import annotations

import copy
import difflib
import io
import re
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    InterpolationToMissingValueError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

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
    """The config at ``path`` with ``key=value`` overrides, merged as ``tune run`` merges them.
    A file that is missing or not a YAML mapping, and an override torchtune cannot merge (not
    ``key=value``, ``~key`` for a key the config lacks, a value that is not YAML, a list given
    where the config holds a mapping), are refused naming the file or override and the fix."""
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError("--config", f"{path} {problem}.", "give the path of a YAML config "
                          "(this package's are under configs/).")
    try:
        yaml_config = OmegaConf.load(io.StringIO(path.read_text(encoding="utf-8")))
    except UnicodeDecodeError as err:
        raise ConfigError("--config", f"{path} is not UTF-8 text (byte {err.start}).",
                          "save it as UTF-8.") from err
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError("--config", f"{path} is not valid YAML{line}: "
                          f"{getattr(err, 'problem', None) or err}.",
                          "fix the YAML syntax there.") from err
    if not isinstance(yaml_config, DictConfig):  # (an empty file is an empty mapping)
        raise ConfigError("--config", f"{path} is a list, not a mapping of keys to values.",
                          "give the path of a YAML config.")
    if "config" in yaml_config:
        raise ConfigError("config", "is reserved by `tune run` for the config path.",
                          "rename the key.")
    values = OmegaConf.to_container(yaml_config, resolve=False)
    return merge_overrides(values, overrides)


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


#: What torchtune's merge raises for an override it cannot apply.
_MERGE_ERRORS = (ValueError, TypeError, OmegaConfBaseException, yaml.YAMLError)


class OverrideError(ConfigError):
    """An override torchtune cannot merge; ``override`` is the override as given."""

    def __init__(self, override: str, key: str, problem: str, fix: str = "") -> None:
        self.override = override
        super().__init__(key, problem, fix)


def merge_overrides(values: dict[str, Any], overrides: Sequence[str]) -> DictConfig:
    """A config's unresolved top-level ``values`` with ``overrides`` merged as ``tune run``
    merges them; the first override it cannot merge (each is tried on top of the ones before
    it, in the order ``tune run`` applies them) is an :class:`OverrideError` naming it, the key
    and the fix."""
    try:
        return merge_yaml_and_cli_args(copy.deepcopy(values), overrides)  # `~a.b` edits in place
    except _MERGE_ERRORS:
        pass
    for count, override in enumerate(overrides, start=1):
        try:
            merge_yaml_and_cli_args(copy.deepcopy(values), overrides[:count])
        except _MERGE_ERRORS as err:
            raise _override_error(override, values, err) from None
    raise OverrideError("", "overrides", "torchtune could not merge them with the config.",
                        "check each `key=value`.")


def check_references_resolve(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first value whose ``${...}`` reference (to another
    key, or through a resolver) cannot be resolved, naming the key and what it refers to. A
    reference to a ``???`` value (no default) is left to the reader, which names that key when
    it reads it."""
    for key, reference in _references(OmegaConf.to_container(cfg, resolve=False)):
        try:
            OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
        except (MissingMandatoryValue, InterpolationToMissingValueError):
            continue
        except OmegaConfBaseException as err:
            raise ConfigError(key, f"is `{reference}`, which cannot be resolved "
                              f"({_first_line(err)}).", _reference_fix(key, reference, cfg)
                              ) from None


def _reference_fix(key: str, reference: str, cfg: DictConfig) -> str:
    """How to mend an unresolvable ``reference`` at ``key`` with what torchtune accepts."""
    if "${oc.env:" in reference:
        fix = ("set the environment variable it reads, or give it a default "
               "(`${oc.env:NAME,default}`)")
    elif re.search(r"\$\{[\w.]+:", reference):
        fix = "check the resolver's name (an unknown one is not registered)"
    else:
        fix = "refer to a key the config has (`${other.key}`)"
    parts = key.split(".")
    outer = next((".".join(parts[:depth]) for depth in range(1, len(parts))
                  if isinstance(OmegaConf.select(cfg, ".".join(parts[:depth]),
                                                 throw_on_resolution_failure=False),
                                ListConfig)), None)
    value = f"`{outer}=[...]` (an override cannot set one item of a list)" if outer \
        else f"`{key}=<value>`"
    return f"{fix}, or give the value itself: {value}."


def _references(node: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, value) of every string value that holds a ``${...}`` reference."""
    entries = node.items() if isinstance(node, dict) else \
        enumerate(node) if isinstance(node, list) else ()
    for name, value in entries:
        key = f"{prefix}{name}"
        if isinstance(value, (dict, list)):
            yield from _references(value, key + ".")
        elif isinstance(value, str) and "${" in value:
            yield key, value


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _override_error(override: str, values: dict[str, Any], err: BaseException) -> OverrideError:
    """Why torchtune cannot merge ``override``, as a problem that reads after the key's name,
    and a fix torchtune accepts."""
    reason = _first_line(err)

    def refused(key: str, problem: str, fix: str) -> OverrideError:
        return OverrideError(override, key, problem, fix)

    if override.startswith("~"):
        key = override[1:].split("=")[0]
        block = key.removesuffix("._component_")
        if block != key or _has_component(_lookup(values, block)) or (
                _lookup(values, key) is not None and "Removing components" in reason):
            return refused(block, "holds a `_component_` (or would leave an empty block that "
                           "does), and torchtune does not remove components from the command "
                           "line.", "edit a copy of the YAML file instead; to swap the "
                           f"builder, set `{block}=<dotted.path>` and its arguments.")
        if _lookup(values, key) is not None:
            return refused(key, f"could not be removed by `{override}` ({reason}).",
                           "edit a copy of the YAML file instead.")
        return refused(key, f"is not in the config, so `{override}` cannot remove it.",
                       _spelling_fix(key, values, "remove the override"))
    if override.count("=") != 1:
        if "=" not in override:
            return refused(override, "is not a `key=value` override.",
                           "write it as `key=value` (or `~key` to remove a key).")
        return refused(override, "holds more than one `=`: torchtune splits an override at "
                       "every `=`, so a value cannot contain one.",
                       "put that value in the YAML file instead.")
    key, value = override.split("=")
    if not _value_parses(value):
        return refused(key, f"has the value `{value}`, which is not valid YAML ({reason}).",
                       "quote it, or correct it.")
    parts = key.split(".")
    for depth in range(1, len(parts)):
        outer = ".".join(parts[:depth])
        if isinstance(_lookup(values, outer), list):
            return refused(key, f"is inside `{outer}`, a list in the config, and an override "
                           f"cannot set one item of a list ({reason}).",
                           f"give the whole list: `{outer}=[...]`.")
    existing = _lookup(values, key)
    if isinstance(existing, list):
        return refused(key, f"is a list in the config, and `{override}` cannot be merged "
                       f"into it ({reason}).", f"give a list: `{key}=[...]`.")
    if isinstance(existing, dict):
        if _has_component(existing):
            return refused(key, f"is a component block in the config, and `{override}` "
                           f"cannot be merged into it ({reason}).",
                           f"set its entries one by one (`{key}.<name>=...`), or give the "
                           f"builder's dotted path: `{key}=<dotted.path>`.")
        return refused(key, f"is a mapping in the config, and `{override}` cannot be merged "
                       f"into it ({reason}).", f"set its entries one by one "
                       f"(`{key}.<name>=...`), or remove the config's mapping first: "
                       f"`~{key} {override}`.")
    return refused(key, f"cannot take the override `{override}` ({reason}).",
                   "correct the override.")


def _has_component(value: Any) -> bool:
    return isinstance(value, dict) and "_component_" in value


def _value_parses(value: str) -> bool:
    try:
        OmegaConf.from_dotlist([f"probe={value}"])
    except (yaml.YAMLError, OmegaConfBaseException, ValueError):
        return False
    return True


def _lookup(values: Any, dotted: str) -> Any:
    """The value at ``a.b.c`` in the unresolved config, None where a level is absent."""
    for part in dotted.split("."):
        if isinstance(values, dict) and part in values:
            values = values[part]
        elif isinstance(values, list) and part.isdigit() and int(part) < len(values):
            values = values[int(part)]
        else:
            return None
    return values


def _spelling_fix(key: str, values: dict[str, Any], otherwise: str) -> str:
    parent, _, name = key.rpartition(".")
    siblings = _lookup(values, parent) if parent else values
    names = [str(k) for k in siblings] if isinstance(siblings, dict) else []
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        return f"did you mean `~{parent + '.' if parent else ''}{close[0]}`?"
    return f"{otherwise} (the keys there: {', '.join(names) or 'none'})."
