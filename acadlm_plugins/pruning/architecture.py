"""Model shapes: the source architecture, the target a user names, and what they cost in
parameters. Every impossible target is refused here, before any training starts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.models.families import hf_model_spec
from acadlm_plugins.training.config_checks import config_value

PRUNABLE_DIMS = ("num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim")


@dataclass(frozen=True)
class Architecture:
    """The shape of a Llama-style decoder (every layer alike); ``attention_bias``: q/k/v have
    biases (Qwen2)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = True
    attention_bias: bool = False

    @property
    def heads_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def non_embedding_params(self) -> int:
        """Parameters outside the token embedding / output head (norms included)."""
        attn = 2 * self.embed_dim * self.num_heads * self.head_dim
        attn += 2 * self.embed_dim * self.num_kv_heads * self.head_dim
        mlp = 3 * self.embed_dim * self.intermediate_dim
        norms = 2 * self.embed_dim
        if self.attention_bias:
            attn += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        return self.num_layers * (attn + mlp + norms) + self.embed_dim  # + final norm

    def total_params(self) -> int:
        embeddings = self.vocab_size * self.embed_dim
        head = 0 if self.tie_word_embeddings else embeddings
        return self.non_embedding_params() + embeddings + head

    def describe(self) -> str:
        return (f"{self.num_layers} layers, {self.num_heads} heads / {self.num_kv_heads} KV heads "
                f"of {self.head_dim}, hidden {self.embed_dim}, MLP {self.intermediate_dim} "
                f"({self.non_embedding_params() / 1e6:.1f}M non-embedding params)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: int) -> Architecture:
        return Architecture(**{**asdict(self), **changes})


def architecture_of(model: nn.Module) -> Architecture:
    """Read the architecture of a torchtune ``TransformerDecoder`` built from Llama layers."""
    layer = model.layers[0]
    attn = layer.attn
    return Architecture(
        num_layers=len(model.layers), num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads,
        embed_dim=model.tok_embeddings.embedding_dim,
        intermediate_dim=layer.mlp.w1.out_features, head_dim=attn.head_dim,
        vocab_size=model.tok_embeddings.num_embeddings,
        tie_word_embeddings=not isinstance(model.output, nn.Linear),
        attention_bias=attn.q_proj.bias is not None)


def architecture_from_hf_config(path: str | Path) -> Architecture:
    """Read a Hugging Face ``config.json`` (a file or the model directory) of a supported
    family; others are refused by the family layer (``models.families``)."""
    spec = hf_model_spec(path)
    return Architecture(
        num_layers=spec.num_layers, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
        embed_dim=spec.embed_dim, intermediate_dim=spec.intermediate_dim,
        head_dim=spec.head_dim, vocab_size=spec.vocab_size,
        tie_word_embeddings=spec.tie_word_embeddings,
        attention_bias=spec.family.attention_bias)


def resolve_target(source: Architecture, target: Mapping[str, Any], *,
                   field: str = "pruning.target") -> Architecture:
    """The target architecture: the source with the user's dims replaced, checked.

    A source without grouped-query attention (as many KV heads as query heads, e.g. Llama-2-7B
    with 32 and 32) gives every query head its own KV head, and pruning removes the two
    together: there ``num_heads`` alone (or ``num_kv_heads`` alone) sets both.

    Refused with a :class:`ConfigError` naming the field: unknown keys, a dim that is not an
    integer (``abc``, ``64.7``), larger than the source's or below 1, query heads not a
    multiple of the KV heads (GQA needs equal groups),
    more query heads per KV group than the source has (heads only move within their group),
    on a source without GQA different query and KV head counts.
    """
    unknown = sorted(set(target) - set(PRUNABLE_DIMS))
    if unknown:
        raise ConfigError(f"{field}.{unknown[0]}", "is not a prunable dimension.",
                          f"use {list(PRUNABLE_DIMS)}.")
    values = {k: config_value(target[k], f"{field}.{k}", int) if k in target
              else getattr(source, k) for k in PRUNABLE_DIMS}
    if source.num_kv_heads == source.num_heads:
        _follow_query_heads(source, target, values, field)
    for key, value in values.items():
        limit = getattr(source, key)
        if value < 1:
            raise ConfigError(f"{field}.{key}", f"must be at least 1, got {value}.")
        if value > limit:
            raise ConfigError(f"{field}.{key}", f"{value} is larger than the source model's "
                              f"{limit}; pruning only removes units.",
                              f"choose a value <= {limit}.")
    heads, kv = values["num_heads"], values["num_kv_heads"]
    if heads % kv:
        raise ConfigError(f"{field}.num_heads", f"{heads} query heads cannot be split evenly "
                          f"over {kv} KV heads (grouped-query attention needs equal groups).",
                          f"use a multiple of {kv}, e.g. {kv * max(1, heads // kv)}.")
    if heads // kv > source.heads_per_kv:
        raise ConfigError(f"{field}.num_heads", f"{heads // kv} query heads per KV head is more "
                          f"than the source's {source.heads_per_kv}; a query head cannot move "
                          "to another KV group.",
                          f"keep num_heads <= {source.heads_per_kv} * num_kv_heads "
                          f"({source.heads_per_kv * kv}).")
    if values["embed_dim"] % heads:
        fits = [d for d in range(values["embed_dim"], 0, -1) if d % heads == 0][:1]
        raise ConfigError(f"{field}.embed_dim", f"{values['embed_dim']} is not a multiple of "
                          f"the {heads} query heads; torchtune's MultiHeadAttention requires it.",
                          f"choose a multiple of {heads} (e.g. {fits[0] if fits else heads}), or "
                          "another head count.")
    return source.replace(**values)


def _follow_query_heads(source: Architecture, target: Mapping[str, Any],
                        values: dict[str, int], field: str) -> None:
    """On a source without GQA, make the target's KV heads equal its query heads (whichever of
    the two the user gave), or refuse two different counts: a KV head cannot serve a second
    query head that it never served in the source."""
    given = [k for k in ("num_heads", "num_kv_heads") if k in target]
    if len(given) == 1:
        values["num_heads"] = values["num_kv_heads"] = values[given[0]]
    elif values["num_heads"] != values["num_kv_heads"]:
        raise ConfigError(f"{field}.num_kv_heads",
                          f"is {values['num_kv_heads']} with num_heads {values['num_heads']}, but "
                          f"the source has no grouped-query attention ({source.num_heads} query "
                          f"heads, {source.num_kv_heads} KV heads): every query head keeps its "
                          "own KV head, and pruning removes them together.",
                          f"set num_kv_heads: {values['num_heads']} (or leave it out).")


def architecture_fields() -> list[str]:
    return [f.name for f in fields(Architecture)]
