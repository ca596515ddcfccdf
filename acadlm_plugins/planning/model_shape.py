"""The model a config builds, built on the meta device: shapes and parameter counts without a
byte of weights.

Building through the config's own ``model._component_`` (with the arguments the recipe adds,
such as a long-context stage's θ and length) means the plan counts the tensors the recipe will
train, whatever builder the config names; torch's meta device gives every tensor its shape and
dtype and allocates nothing, so a Llama-3.1-8B builds in milliseconds on a laptop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torchtune import training

from acadlm_plugins.models.rope import RopeSettings, rope_settings_of
from acadlm_plugins.pruning.architecture import Architecture, architecture_of

EMBEDDING_PREFIXES = ("tok_embeddings.", "output.")


@dataclass(frozen=True)
class ModelSummary:
    """A built decoder's shape, RoPE and parameter counts (counted from its tensors)."""

    architecture: Architecture
    rope: RopeSettings | None
    max_seq_len: int | None
    total_params: int
    non_embedding_params: int

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture.to_dict(),
                "rope": None if self.rope is None else asdict(self.rope),
                "rope_description": None if self.rope is None else self.rope.describe(),
                "max_seq_len": self.max_seq_len, "total_params": self.total_params,
                "non_embedding_params": self.non_embedding_params}


def build_on_meta(build: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    """``build()`` under ``dtype`` on the meta device: every tensor has its shape, none has
    storage."""
    with training.set_default_dtype(dtype), torch.device("meta"):
        return build()


def decoder_of(model: nn.Module) -> nn.Module:
    """The torchtune decoder inside ``model`` (the model itself, or a rater's backbone)."""
    return getattr(model, "backbone", model)


def summarize(model: nn.Module) -> ModelSummary:
    """Shape, RoPE and parameter counts of a torchtune decoder (or a model wrapping one as
    ``backbone``); tied embeddings are counted once, as ``model.parameters()`` yields them."""
    decoder = decoder_of(model)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for name, p in decoder.named_parameters()
                    if name.startswith(EMBEDDING_PREFIXES))
    return ModelSummary(architecture=architecture_of(decoder), rope=_rope_of(decoder),
                        max_seq_len=getattr(decoder, "max_seq_len", None), total_params=total,
                        non_embedding_params=total - embedding)


def _rope_of(decoder: nn.Module) -> RopeSettings | None:
    module = getattr(decoder.layers[0].attn, "pos_embeddings", None)
    try:
        return None if module is None else rope_settings_of(module)
    except ValueError:  # a RoPE module the family layer does not know: shown as unknown
        return None


def target_counts(target: Architecture) -> dict[str, int]:
    """Total and non-embedding parameters of a pruning target (from its shape)."""
    return {"total_params": target.total_params(),
            "non_embedding_params": target.non_embedding_params()}


def pruning_state_numel(source: Architecture, target: Architecture, *,
                        droprate_init: float, seed: int) -> int:
    """Values the pruning plugin trains beside the model: the hard-concrete gates of every
    dimension the target shrinks and their Lagrange multipliers (built for real: a few
    thousand values even for a 7B source)."""
    from acadlm_plugins.pruning.lagrangian import LagrangeMultipliers
    from acadlm_plugins.pruning.masks import PruningMasks

    masks = PruningMasks(source, target, droprate_init=droprate_init, seed=seed)
    multipliers = LagrangeMultipliers(masks.mask_types)
    return sum(p.numel() for p in masks.parameters()) + sum(
        p.numel() for p in multipliers.parameters())
