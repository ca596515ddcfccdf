"""torchao in our recipes: float8 training and quantized exports, from one config block.

Config block (every key optional)::

    torchao:
      float8: null              # tensorwise | rowwise | rowwise_with_gw_hp  (CUDA, sm89+)
      quantized_export: null    # int8_weight_only | int4_weight_only
      group_size: 32            # int4: input channels per scale

* ``float8`` swaps the linear layers for torchao's ``Float8Linear`` once the weights are loaded
  and before FSDP2 shards the model. Without a float8-capable GPU the run stops at configure
  time, naming the field (see ``training/float8.py``).
* ``quantized_export`` writes a weight-only quantized copy of the model the recipe hands over:
  ``<final checkpoint>/model-<scheme>`` for continued pre-training and long-context stages,
  ``pruned_model-<scheme>`` for pruning. Our lm-eval adapter evaluates it
  (``acadlm_plugins/quantization.py``).

Low-bit optimizer states are not here: they are the optimizer's ``_component_``
(``torchao.optim.AdamW8bit``), checked by ``training/optimizers.py`` in every recipe.
Stock torchtune recipes get the quantized export from
``acadlm_plugins.quantization.QuantizedExportCheckpointer`` and float8 from their own
``enable_fp8_training`` (torchtune's distributed recipes).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.hookspecs import hookimpl
from acadlm_plugins.quantization import (
    DEFAULT_GROUP_SIZE,
    check_group_size,
    check_scheme,
    read_quantization,
    write_quantized_copy,
)
from acadlm_plugins.training.float8 import check_float8, convert_to_float8

log = logging.getLogger(__name__)

CONFIG_KEY = "torchao"
KNOWN_KEYS = {"float8", "quantized_export", "group_size"}


class TorchaoPlugin:
    """Applies the ``torchao:`` block (see the module docstring); does nothing without it."""

    config_keys = (CONFIG_KEY,)

    def __init__(self) -> None:
        self.float8: str | None = None
        self.scheme: str | None = None
        self.group_size = DEFAULT_GROUP_SIZE

    @hookimpl
    def acadlm_configure(self, cfg: Any, recipe: str) -> None:
        block = cfg.get(CONFIG_KEY, None)
        if not block:
            return
        unknown = sorted(set(block) - KNOWN_KEYS)
        if unknown:
            raise ConfigError(f"{CONFIG_KEY}.{unknown[0]}", "is not a known key.",
                              f"use only {sorted(KNOWN_KEYS)}.")
        self.scheme = check_scheme(block.get("quantized_export", None),
                                   field=f"{CONFIG_KEY}.quantized_export")
        self.group_size = check_group_size(block.get("group_size", DEFAULT_GROUP_SIZE),
                                           field=f"{CONFIG_KEY}.group_size")
        float8 = block.get("float8", None)
        if float8 not in (None, False, "none", "null"):
            check_float8(str(float8), torch.device(str(cfg.get("device", "cpu"))),
                         field=f"{CONFIG_KEY}.float8")
            self.float8 = str(float8)

    @hookimpl
    def acadlm_prepare_model(self, model: Any, cfg: Any, device: Any) -> None:
        if self.float8 is None:
            return
        swapped = convert_to_float8(model, self.float8)
        if not swapped:
            raise ConfigError(f"{CONFIG_KEY}.float8", "no linear layer of this model has both "
                              "dimensions divisible by 16, which float8 matmuls need.",
                              "set it to null for this model.")
        log.info("float8 training (%s): %d linear layers swapped", self.float8, swapped)

    @hookimpl
    def acadlm_model_exported(self, model_dir: str, recipe: str) -> dict | None:
        if self.scheme is None:
            return None
        dest = write_quantized_copy(model_dir, self.scheme, group_size=self.group_size,
                                    field=f"{CONFIG_KEY}.quantized_export")
        meta = read_quantization(dest)
        log.info("%s copy of %s written to %s (weights %.1f MiB -> %.1f MiB)", self.scheme,
                 model_dir, dest, meta["source_weight_bytes"] / 2**20, meta["weight_bytes"] / 2**20)
        return {"quantized_model": {"path": str(dest), "scheme": self.scheme,
                                    "weight_bytes": meta["weight_bytes"],
                                    "source_weight_bytes": meta["source_weight_bytes"]}}
