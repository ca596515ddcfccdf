"""``config.instantiate`` with errors that name the config key, for every recipe."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from torchtune import config

from acadlm_plugins._compat import ComponentPathError, component_from_path
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.training.config_checks import reject_unknown_keys


def instantiate_component(cfg: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any:
    """Build ``cfg[key]`` through its ``_component_`` path; a bad path names ``key``. A builder
    with a ``config_key`` parameter is told ``key``, so that its own errors name the block
    (``validation_dataset.max_seq_len`` rather than ``max_seq_len``)."""
    node = cfg.get(key, None)
    if node is None:
        raise ConfigError(key, "is missing.", f"add a `{key}:` block with a `_component_` path.")
    if not isinstance(node, DictConfig) or "_component_" not in node:
        raise ConfigError(f"{key}._component_", "is missing.",
                          "give the dotted path of the builder, e.g. "
                          "`_component_: torch.optim.AdamW`.")
    check_component(node, key)
    builder = component_from_path(str(node._component_))
    if "config_key" not in node and "config_key" not in kwargs and _takes(builder, "config_key"):
        kwargs["config_key"] = key
    return config.instantiate(node, *args, **kwargs)


def _takes(builder: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(builder).parameters
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        return False


def check_component(node: DictConfig, key: str) -> None:
    """Check the ``_component_`` block ``node`` (at config key ``key``) without building it:
    the dotted path imports, every other key is a parameter of what it names, and, where the
    builder has a ``check_arguments(arguments, key)`` attribute, the arguments pass it (the
    settings nested inside an argument, which a signature cannot show)."""
    try:
        builder = component_from_path(str(node._component_))
    except ComponentPathError as err:
        raise ConfigError(f"{key}._component_", f"cannot import {node._component_!r} "
                          f"({err.reason}).",
                          "check the dotted path and that its package is installed.") from err
    check_component_arguments(builder, [k for k in node if k != "_component_"], key=key,
                              component=str(node._component_))
    check_scalar_argument_types(builder, node, key=key)
    check_arguments = getattr(builder, "check_arguments", None)
    if callable(check_arguments):
        check_arguments(node, key)  # reads only what it checks: other values may be `???`


def check_component_blocks(cfg: DictConfig, keys: Iterable[str]) -> None:
    """:func:`check_component` for each of ``keys`` that is a ``_component_`` block of ``cfg``.

    Run before a resumed run's config is compared with its checkpoint's, so that a misspelled
    argument (``dataset.weigths``) is named as a typo with the parameter meant, not as a
    setting that "differs from the checkpoint"."""
    for key in keys:
        node = cfg.get(key, None) if "." not in key else None
        if isinstance(node, DictConfig) and "_component_" in node:
            check_component(node, key)


def check_component_arguments(builder: Callable[..., Any], keys: list[str], *, key: str,
                              component: str) -> None:
    """Refuse a key of a ``_component_`` block that ``builder`` has no parameter for (a typo
    such as ``dataset.weigths``), naming it with the closest parameter, instead of the raw
    TypeError the call would raise; builders that take ``**kwargs`` accept anything."""
    try:
        parameters = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature to read
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = [p.name for p in parameters
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              inspect.Parameter.KEYWORD_ONLY)]
    reject_unknown_keys(keys, accepted, recipe="", prefix=f"{key}.",
                        problem=f"is not a parameter of `{component}`.")


_SCALAR_TYPES = (bool, int, float, str)


def _scalar_type(annotation: Any) -> tuple[type, ...] | None:
    """The plain scalar types an annotation allows (``int``, ``float | None``), or None when
    it is anything else (a container, a class, ``Any``): only those are checked."""
    if annotation in _SCALAR_TYPES:
        return (annotation,)
    members = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and members:
        kept = tuple(m for m in members if m is not type(None))
        if kept and all(m in _SCALAR_TYPES for m in kept):
            return kept
    return None


def _fits(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    if isinstance(value, float):  # a whole float (YAML's `1.0e6`) serves an int parameter
        return float in allowed or (int in allowed and value.is_integer())
    return isinstance(value, str) and str in allowed


def check_scalar_argument_types(builder: Callable[..., Any], node: DictConfig, *,
                                key: str) -> None:
    """Refuse a scalar value of a ``_component_`` block whose builder parameter is annotated
    with a plain scalar type it is not (``model.vocab_size: abc`` for an ``int``), naming the
    key, instead of the error the builder would raise deep inside (torch's ``empty(): argument
    'size'``). An int is accepted for a float, a whole float for an int; null for an optional
    one; for a class, the parameters of its ``__init__`` are checked; unannotated
    parameters, containers and values not yet resolvable are left to the builder."""
    # a class is built through its __init__, whose parameters are the block's keys
    target = builder.__init__ if inspect.isclass(builder) else builder
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # noqa: BLE001  (unresolvable annotations: nothing to check against)
        return
    for name in node:
        if name == "_component_" or name not in hints:
            continue
        allowed = _scalar_type(hints[name])
        if allowed is None:
            continue
        try:
            value = node[name]
        except OmegaConfBaseException:  # a `???` or an interpolation not resolvable yet
            value = None
        if value is None or not isinstance(value, _SCALAR_TYPES) or _fits(value, allowed):
            continue
        wanted = " or ".join(t.__name__ for t in allowed)
        raise ConfigError(f"{key}.{name}", f"is {value!r} ({type(value).__name__}), but "
                          f"`{node._component_}` takes {wanted}.",
                          f"give `{key}.{name}` a value of type {wanted} (YAML: unquoted).")


def instantiate_optional(cfg: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any | None:
    """:func:`instantiate_component` for a block the config may leave out or null (such as
    ``lr_scheduler``): None then."""
    if not cfg.get(key, None):
        return None
    return instantiate_component(cfg, key, *args, **kwargs)
