"""Checks every recipe makes on its config before it loads anything, and the log routing they
share: a misspelled key gets the closest known key as a suggestion instead of being ignored."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable

from omegaconf import DictConfig, OmegaConf

from acadlm_plugins.errors import ConfigError


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
