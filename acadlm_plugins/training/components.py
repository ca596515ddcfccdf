"""``config.instantiate`` with errors that name the config key, for every recipe."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from torchtune import config
from torchtune.config._errors import InstantiationError

from acadlm_plugins.errors import ConfigError


def instantiate_component(cfg: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any:
    """Build ``cfg[key]`` through its ``_component_`` path; a bad path names ``key``."""
    node = cfg.get(key, None)
    if node is None:
        raise ConfigError(key, "is missing.", f"add a `{key}:` block with a `_component_` path.")
    if not isinstance(node, DictConfig) or "_component_" not in node:
        raise ConfigError(f"{key}._component_", "is missing.",
                          "give the dotted path of the builder, e.g. "
                          "`_component_: torch.optim.AdamW`.")
    try:
        return config.instantiate(node, *args, **kwargs)
    except InstantiationError as err:
        raise ConfigError(f"{key}._component_", f"cannot import {node._component_!r} "
                          f"({str(err).splitlines()[1] if len(str(err).splitlines()) > 1 else err}).",
                          "check the dotted path and that its package is installed.") from err


def instantiate_optional(cfg: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any | None:
    """:func:`instantiate_component` for a block the config may leave out or null (such as
    ``lr_scheduler``): None then."""
    if not cfg.get(key, None):
        return None
    return instantiate_component(cfg, key, *args, **kwargs)
