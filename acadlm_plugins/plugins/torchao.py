"""torchao in our recipes: float8 training and quantized exports, from one config block.

The recipes that run this plugin are continued pre-training, long-context and pruning
(``acadlm_plugins/{continued_pretrain,long_context,prune}_recipe``); the others refuse the
block as an unknown key, and stock torchtune recipes ignore it.

Config block (every key optional)::

    torchao:
      float8: null              # tensorwise | rowwise | rowwise_with_gw_hp  (CUDA, sm89+)
      quantized_export: null    # int8_weight_only | int4_weight_only
      group_size: 32            # int4: input channels per scale

* ``float8`` swaps the linear layers for torchao's ``Float8Linear`` once the weights are loaded
  and before FSDP2 shards the model. Without a float8-capable GPU the run stops at configure
  time, naming the field (see ``training/float8.py``).
* ``quantized_export`` writes a weight-only quantized copy of the model the recipe hands over
  (an int4 ``group_size`` that fits none of its linear layers is refused before training):
  ``<final checkpoint>/model-<scheme>`` for continued pre-training and long-context stages,
  ``pruned_model-<scheme>`` for pruning. Our lm-eval adapter evaluates it
  (``acadlm_plugins/quantization.py``).

Low-bit optimizer states are not here: they are the optimizer's ``_component_``
(``torchao.optim.AdamW8bit``), checked by ``training/optimizers.py`` in every recipe.
Stock torchtune recipes get the quantized export from
``acadlm_plugins.quantization.QuantizedExportCheckpointer``; float8 training is ours only
(torchtune 0.6.1's recipes have no float8 option).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.hookspecs import hookimpl
from acadlm_plugins.quantization import (
    DEFAULT_GROUP_SIZE,
    check_group_size,
    check_int4_fit,
    check_scheme,
    linear_shapes,
    read_quantization,
    write_quantized_copy,
)
from acadlm_plugins.training.float8 import RECIPES as FLOAT8_RECIPES
from acadlm_plugins.training.float8 import check_float8, convert_to_float8

log = logging.getLogger(__name__)

CONFIG_KEY = "torchao"
KNOWN_KEYS = {"float8", "quantized_export", "group_size"}
FLOAT8_OFF = ("none", "null")  # as strings; null and false are off too


def check_block(block: Any) -> Mapping:
    """The ``torchao:`` block as a mapping; a ConfigError naming ``torchao`` otherwise.

    ``torchao=tensorwise`` on the command line makes the block a string, whose characters
    were then reported as unknown keys (``torchao.e``)."""
    if not isinstance(block, Mapping):
        raise ConfigError(CONFIG_KEY, f"is {block!r}, not a block of settings.",
                          f"set its keys ({sorted(KNOWN_KEYS)}) one by one, e.g. "
                          f"`{CONFIG_KEY}.float8=tensorwise` on the command line, or "
                          f"`{CONFIG_KEY}: {{float8: tensorwise}}` in YAML.")
    return block


def float8_recipe(value: Any, *, field: str) -> str | None:
    """``torchao.float8`` as a recipe name, or None for "off" (null, false, "none", "null").

    Anything else that is not a string is refused naming ``field``: ``0`` equals ``False`` in
    Python, so it used to switch float8 off silently, and ``true`` names no recipe."""
    if value is None or value is False:
        return None
    if not isinstance(value, str):
        raise ConfigError(field, f"is {value!r}, not a float8 recipe name.",
                          f"use one of {list(FLOAT8_RECIPES)}, or null (or false) for no "
                          "float8 training.")
    return None if value.strip().lower() in FLOAT8_OFF else value


def pruned_linear_shapes(model: torch.nn.Module, cfg: Any) -> dict[str, tuple[int, int]]:
    """``(input, output)`` widths of the linear layers of the model pruning will export: the
    source ``model`` with ``pruning.target``'s dims (names as in the torchtune decoder)."""
    from acadlm_plugins.pruning.architecture import architecture_of, resolve_target

    target = resolve_target(architecture_of(model), dict(cfg.pruning.target))
    hidden, heads = target.embed_dim, target.num_heads * target.head_dim
    kv, inner = target.num_kv_heads * target.head_dim, target.intermediate_dim
    shapes: dict[str, tuple[int, int]] = {}
    for index in range(target.num_layers):
        layer = f"layers.{index}."
        shapes |= {layer + "attn.q_proj": (hidden, heads), layer + "attn.k_proj": (hidden, kv),
                   layer + "attn.v_proj": (hidden, kv), layer + "attn.output_proj": (heads, hidden),
                   layer + "mlp.w1": (hidden, inner), layer + "mlp.w3": (hidden, inner),
                   layer + "mlp.w2": (inner, hidden)}
    if not target.tie_word_embeddings:
        shapes["output"] = (hidden, target.vocab_size)
    return shapes


class TorchaoPlugin:
    """Applies the ``torchao:`` block (see the module docstring); does nothing without it."""

    config_keys = (CONFIG_KEY,)

    def __init__(self) -> None:
        self.float8: str | None = None
        self.scheme: str | None = None
        self.group_size = DEFAULT_GROUP_SIZE
        self.recipe: str | None = None

    @hookimpl
    def acadlm_configure(self, cfg: Any, recipe: str) -> None:
        block = cfg.get(CONFIG_KEY, None)
        if block is None or block is False:
            return
        block = check_block(block)
        self.recipe = recipe
        unknown = sorted(set(block) - KNOWN_KEYS)
        if unknown:
            raise ConfigError(f"{CONFIG_KEY}.{unknown[0]}", "is not a known key.",
                              f"use only {sorted(KNOWN_KEYS)}.")
        self.scheme = check_scheme(block.get("quantized_export", None),
                                   field=f"{CONFIG_KEY}.quantized_export")
        self.group_size = check_group_size(block.get("group_size", DEFAULT_GROUP_SIZE),
                                           field=f"{CONFIG_KEY}.group_size")
        float8 = float8_recipe(block.get("float8", None), field=f"{CONFIG_KEY}.float8")
        if float8 is not None:
            check_float8(float8, torch.device(str(cfg.get("device", "cpu"))),
                         field=f"{CONFIG_KEY}.float8")
            self.float8 = float8

    @hookimpl
    def acadlm_prepare_model(self, model: Any, cfg: Any, device: Any) -> None:
        if self.scheme == "int4_weight_only":
            self.check_int4_export(model, cfg)
        if self.float8 is None:
            return
        swapped = convert_to_float8(model, self.float8)
        if not swapped:
            raise ConfigError(f"{CONFIG_KEY}.float8", "no linear layer of this model has both "
                              "dimensions divisible by 16, which float8 matmuls need.",
                              "set it to null for this model.")
        log.info("float8 training (%s): %d linear layers swapped", self.float8, swapped)

    def check_int4_export(self, model: torch.nn.Module, cfg: Any) -> None:
        """Before training (and in ``acadlm-plan``, on the meta model): refuse a group size
        that fits none of the exported model's linear layers (the export would fail only after
        the run), warn when it skips some.

        The exported model is this one, except for pruning, which exports the model with
        ``pruning.target``'s dims."""
        if self.recipe == "prune" and (cfg.get("pruning", None) or {}).get("target", None):
            shapes, which = pruned_linear_shapes(model, cfg), "pruned model (pruning.target)"
        else:
            shapes, which = linear_shapes(model), "model"
        # the copy is written on the CPU (acadlm_model_exported), in torchao's CPU int4 layout
        skipped = check_int4_fit(shapes, self.group_size, field=f"{CONFIG_KEY}.group_size",
                                 model=which, cpu_layout=True)
        if skipped:
            log.warning("%s.group_size=%d: the int4_weight_only copy will keep %d of %d linear "
                        "layers of the %s unquantized (input widths not multiples of %d, or "
                        "output widths not multiples of 16), e.g. %s; quantization.json and the "
                        "summary list them", CONFIG_KEY, self.group_size, len(skipped),
                        len(shapes), which, self.group_size, ", ".join(skipped[:3]))

    @hookimpl
    def acadlm_model_exported(self, model_dir: str, recipe: str) -> dict | None:
        if self.scheme is None:
            return None
        dest = write_quantized_copy(model_dir, self.scheme, group_size=self.group_size,
                                    field=f"{CONFIG_KEY}.quantized_export")
        meta = read_quantization(dest)
        log.info("%s copy of %s written to %s (weights %.1f MiB -> %.1f MiB)", self.scheme,
                 model_dir, dest, meta["source_weight_bytes"] / 2**20, meta["weight_bytes"] / 2**20)
        if meta["skipped_linears"]:
            log.warning("%d linear layers kept unquantized in %s: %s",
                        len(meta["skipped_linears"]), dest, meta["skipped_linears"])
        return {"quantized_model": {"path": str(dest), "scheme": self.scheme,
                                    "weight_bytes": meta["weight_bytes"],
                                    "source_weight_bytes": meta["source_weight_bytes"],
                                    "quantized_linears": meta["quantized_linears"],
                                    "skipped_linears": meta["skipped_linears"]}}
