"""Checks every recipe makes on its config before it loads anything, and the log routing they
share: a misspelled key gets the closest known key as a suggestion instead of being ignored."""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from acadlm_plugins.errors import ConfigError

_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false"}


def config_value(value: object, key: str, kind: type, *, minimum: float | None = None,
                 above: float | None = None, allow_none: bool = False) -> object:
    """``value`` (read from config key ``key``) as ``kind`` (int, float or bool), or a
    :class:`ConfigError` naming ``key``: a typo such as ``lr=3e-4x`` or ``top_k=maybe`` must stop
    the run before it loads anything, not surface as a bare ``ValueError`` mid-run or, worse,
    be read as something else (``bool("maybe")`` is True). ``minimum`` is inclusive, ``above``
    exclusive; ``allow_none`` passes None through (an unset optional key)."""
    if value is None:
        if allow_none:
            return None
        raise ConfigError(key, "is null.", f"set `{key}` to {_KIND_NAMES[kind]}.")
    converted: object
    if kind is bool:
        if isinstance(value, bool):
            converted = value
        elif isinstance(value, str) and value.strip().lower() in ("true", "false"):
            converted = value.strip().lower() == "true"
        else:
            raise ConfigError(key, f"is {value!r}, not true or false.",
                              f"set `{key}` to true or false.")
        return converted
    if isinstance(value, bool):
        raise ConfigError(key, f"is {value!r}, not {_KIND_NAMES[kind]}.",
                          f"set `{key}` to {_KIND_NAMES[kind]}.")
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"is {value!r}, not {_KIND_NAMES[kind]}.",
                          f"set `{key}` to {_KIND_NAMES[kind]}.") from None
    if kind is int and isinstance(value, float) and value != converted:
        raise ConfigError(key, f"is {value!r}, not a whole number.", f"set `{key}` to an integer.")
    if kind is float and math.isnan(converted):
        raise ConfigError(key, "is nan.", f"set `{key}` to a number.")
    if minimum is not None and converted < minimum:
        raise ConfigError(key, f"is {value!r}, below its minimum {minimum}.",
                          f"set `{key}` to {minimum} or more.")
    if above is not None and not converted > above:
        raise ConfigError(key, f"is {value!r}; it must be above {above}.",
                          f"set `{key}` to a value above {above}.")
    return converted


SEED_MAX = 2**32 - 1  # torchtune's set_seed takes seeds in [0, 2**32 - 1]


def checked_seed(value: object, world_size: int = 1) -> int | None:
    """The config's ``seed`` as torchtune's ``set_seed`` takes it (None: a random seed),
    refused naming ``seed`` where ``set_seed`` would raise mid-setup (``abc``, -1, 1.5, or
    above 2**32 - world_size: every rank seeds with seed + rank)."""
    seed = config_value(value, "seed", int, minimum=0, allow_none=True)
    highest = SEED_MAX + 1 - max(1, world_size)
    if seed is not None and seed > highest:
        raise ConfigError("seed", f"is {value!r}, above its maximum {highest} for "
                          f"{world_size} process{'es' if world_size > 1 else ''}.",
                          f"set `seed` to an integer in [0, {highest}].")
    return seed


def reject_unknown_keys(keys: Iterable[object], known: Iterable[str], *, recipe: str,
                        prefix: str = "", problem: str | None = None) -> None:
    """Raise :class:`ConfigError` for the first key of ``keys`` not in ``known``, naming it (with
    ``prefix`` for nested blocks, e.g. ``"pairs."``) and the closest known key. ``problem``
    replaces the default "is not a key the <recipe> recipe reads."."""
    known = sorted(known)
    for key in keys:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f"did you mean `{prefix}{close[0]}`?" if close else f"known keys: {known}."
        raise ConfigError(f"{prefix}{key}",
                          problem or f"is not a key the {recipe} recipe reads.", hint)


def check_config_keys(cfg: DictConfig, *, known: Iterable[str], required: Iterable[str],
                      recipe: str, example: str) -> None:
    """Reject unknown top-level keys (see :func:`reject_unknown_keys`), then raise
    :class:`ConfigError` for the first ``required`` key that is absent or ``???``, pointing at
    the ``example`` config, so a recipe fails on its config before it loads anything."""
    reject_unknown_keys(cfg, known, recipe=recipe)
    for key in required:
        if key not in cfg or OmegaConf.is_missing(cfg, key):
            raise ConfigError(key, f"is required by the {recipe} recipe.",
                              f"see {example} for an example.")


def route_package_logs() -> None:
    """Show our library modules' INFO lines (packing accounting, retries, resuming) next to
    torchtune's, once per process."""
    package_logger = logging.getLogger("acadlm_plugins")
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s: %(message)s"))
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)
        package_logger.propagate = False


def check_output_dir(path: Path, key: str = "output_dir") -> None:
    """``path`` must be a folder this process can write, or not exist yet under a folder it can
    create it in; checked before anything is loaded, so a typo costs seconds, not a model load."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(key, f"{path} is a file, not a folder.",
                          f"point `{key}` at a folder (it is created if missing).")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, f"{existing} (a parent of {path}) is a file.",
                          f"choose another `{key}`.")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "" if existing == path else f" (its nearest existing parent {existing})"
        raise ConfigError(key, f"{path}{what} is not writable by this user.",
                          f"choose a writable `{key}`, or fix the folder's permissions.")
