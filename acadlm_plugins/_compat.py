"""The few places where we lean on torchtune 0.6.1 internals, kept together.

torchtune 0.6.1 is its last release and is no longer maintained, so we pin it
(``TORCHTUNE_VERSION``); if a future version moves one of these, only this module changes.
The private helpers are looked up when first used, so a torchtune without them fails with a
:class:`TorchtuneInternalMissing` that names the helper and the version it comes from, not an
``ImportError`` deep inside a recipe.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from argparse import Namespace
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from acadlm_plugins.errors import AcadlmError, DataError

# The torchtune release whose private helpers this module calls (pyproject.toml pins it).
TORCHTUNE_VERSION = "0.6.1"


class TorchtuneInternalMissing(AcadlmError, ImportError):
    """The installed torchtune lacks a private helper that acadlm-plugins calls."""


class ComponentPathError(AcadlmError, ImportError):
    """A dotted ``_component_`` path that does not import; ``reason`` says why in one line."""

    def __init__(self, component: str, reason: str) -> None:
        super().__init__(f"cannot import {component!r}: {reason}")
        self.component, self.reason = component, reason


def torchtune_internal(module: str, name: str) -> Any:
    """``module.name`` from the installed torchtune, or :class:`TorchtuneInternalMissing`
    naming it, the version it is taken from and the fix."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        try:
            installed = importlib.import_module("torchtune").__version__
        except (ImportError, AttributeError):
            installed = "unknown"
        raise TorchtuneInternalMissing(
            f"acadlm-plugins calls torchtune's private `{module}.{name}` (as in torchtune "
            f"{TORCHTUNE_VERSION}), which the installed torchtune {installed} does not have "
            f"({err}). Fix: pip install torchtune=={TORCHTUNE_VERSION}, the version "
            "acadlm-plugins pins.") from err


def component_from_path(path: str) -> Any:
    """The object a dotted ``_component_`` path names, found as ``config.instantiate`` finds
    it (torchtune's ``config._utils._get_component_from_path``), without calling it. A path
    that does not import raises :class:`ComponentPathError` with torchtune's reason."""
    locate = torchtune_internal("torchtune.config._utils", "_get_component_from_path")
    instantiation_error = torchtune_internal("torchtune.config._errors", "InstantiationError")
    try:
        return locate(path)
    except instantiation_error as err:
        lines = str(err).splitlines()
        raise ComponentPathError(path, lines[1] if len(lines) > 1 else str(err)) from err


def merge_yaml_and_cli_args(values: Mapping[str, Any], overrides: Sequence[str]) -> DictConfig:
    """A config's top-level ``values`` (unresolved) with ``key=value`` / ``~key`` overrides
    merged exactly as ``tune run`` merges them (torchtune's
    ``config._utils._merge_yaml_and_cli_args``, the function behind ``@config.parse``)."""
    merge = torchtune_internal("torchtune.config._utils", "_merge_yaml_and_cli_args")
    return merge(Namespace(**dict(values)), list(overrides))


def save_hf_model_dir(checkpointer: Any, model_state: dict[str, torch.Tensor], dest: Path) -> Path:
    """Write ``model_state`` as a Hugging Face model directory at ``dest`` (not yet existing).

    torchtune's ``FullModelHFCheckpointer`` converts the weights to HF names, shards them like
    the source checkpoint and copies config/tokenizer files, but always writes into
    ``<its output_dir>/epoch_<n>``. We point it at a staging folder beside ``dest`` and move
    the result into place, so the caller decides the layout (and atomicity) of checkpoints.
    """
    dest = Path(dest)
    staging = dest.parent / f".{dest.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    original = checkpointer._output_dir
    checkpointer._output_dir = staging
    try:
        checkpointer.save_checkpoint({"model": dict(model_state)}, epoch=0,
                                     intermediate_checkpoint=False)
    finally:
        checkpointer._output_dir = original
    os.replace(staging / "epoch_0", dest)
    shutil.rmtree(staging, ignore_errors=True)
    return dest


def complete_checkpointer_config(checkpointer: Any, defaults: Mapping[str, Any]) -> None:
    """Fill in ``defaults`` for the config.json keys that the folder leaves out (or null) in
    the copy of config.json a ``FullModelHFCheckpointer`` has read (its private ``_config``).

    torchtune 0.6.1 reads e.g. ``num_key_value_heads`` with ``config[key]``, so a config that
    relies on transformers' default for it (Llama 1 style: as many as query heads) fails to
    load with a bare ``KeyError``. The file itself is not changed.
    """
    config = checkpointer._config
    for key, value in defaults.items():
        if config.get(key) is None:
            config[key] = value


# Where an HF model folder keeps its weights, in the order transformers looks for them: an
# index's weight map, else the shard files by name. Other weight-like files in a model folder
# are not the model's HF weights: Mistral's repos ship ``consolidated.safetensors`` (Mistral's
# own names) beside them, torchtune's LoRA runs write ``adapter_model.safetensors``, and the HF
# Trainer leaves ``training_args.bin``; none of them matches these names.
_WEIGHT_LAYOUTS = (("model.safetensors.index.json", ("model*.safetensors",)),
                   ("pytorch_model.bin.index.json", ("pytorch_model*.bin", "model*.bin")))


def hf_checkpoint_files(model_dir: Path) -> list[str]:
    """The weight files of an HF model directory, as torchtune's checkpointer wants them.

    The files an index (``model.safetensors.index.json``) maps the weights to; without one,
    ``model*.safetensors`` (one file or ``model-0000i-of-0000n`` shards); else the same for
    ``pytorch_model*.bin``. An empty list when the folder holds none of these. A malformed index,
    or one naming a shard the folder lacks, raises :class:`DataError` naming the index file.
    """
    folder = Path(model_dir)
    for index_name, patterns in _WEIGHT_LAYOUTS:
        index = folder / index_name
        if index.is_file():
            return _indexed_files(index)
        files = sorted({p.name for pattern in patterns for p in folder.glob(pattern)
                        if p.is_file()})
        if files:
            return files
    return []


def _indexed_files(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(name, str) for name in weight_map.values()):
            raise TypeError("`weight_map` is not a mapping of weight names to file names")
        files = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{index}: not a weight index ({type(err).__name__}: {err}); it must "
                        "be a JSON object whose `weight_map` maps each weight name to its file. "
                        "Fix: download or export the model folder again.") from None
    missing = [name for name in files if not (index.parent / name).is_file()]
    if missing or not files:
        raise DataError(f"{index}: maps the weights to {missing or 'no file'}, which "
                        f"{index.parent} does not hold. Fix: download the missing shards, or "
                        "export the model folder again.")
    return files
