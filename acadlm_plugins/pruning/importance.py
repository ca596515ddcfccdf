"""Activation-based importance of every prunable unit (Minitron, Muralidharan et al. 2024,
arXiv 2407.14679) and one-shot pruning by it.

Minitron ranks the units of a trained model by how strongly they activate on a small calibration
set, with no gradient:

* a query head by the size of its attention output (the head's slice of the output
  projection's input, L2 norm over its ``head_dim`` values per token);
* a KV head by the sum of the scores of the query heads that read it;
* an MLP channel by the size of its activation, ``|silu(w1 x) * w3 x|`` (the down projection's
  input);
* a hidden channel by the size of the normalized residual stream, ``|LN(X)_i|``, summed over
  the two RMSNorms of every layer (``sa_norm``, ``mlp_norm``), the norms NVIDIA's reference
  (TensorRT Model Optimizer's Megatron plugin) scores: the final norm feeds only the output
  head, and its large scales would otherwise outvote the layers;
* a layer by ShortGPT's block influence (Men et al. 2024), ``1 - cos(layer input, layer
  output)`` averaged over tokens: a layer that barely turns the hidden state matters little.

For the activation scores, each sequence's magnitudes are averaged over its positions and the
sequences are combined by an L2 norm: the aggregation Minitron's ablation found best
(batch: L2, sequence: mean).

The scores serve twice: one-shot pruning (keep the best units, slice, done: the baseline every
learned pruning method must beat) and the starting point of Sheared-LLaMA's hard-concrete masks
(:func:`log_alpha_from_scores`), which then begin at the one-shot choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from acadlm_plugins.data.packing import CROSS_ENTROPY_IGNORE_INDEX
from acadlm_plugins.pruning.architecture import Architecture, architecture_of
from acadlm_plugins.pruning.materialize import KeptUnits, materialize_units


@dataclass
class ImportanceScores:
    """Importance per unit (higher = more important), in the shapes of the pruning masks."""

    layer: torch.Tensor          # (L,)         block influence
    kv_head: torch.Tensor        # (L, n_kv)    sum of the group's query-head scores
    head: torch.Tensor           # (L, n_heads)
    hidden: torch.Tensor         # (d,)
    intermediate: torch.Tensor   # (L, d_ff)
    num_sequences: int = 0
    num_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImportanceScores:
        return cls(**values)

    def save(self, path: str | Path) -> Path:
        """Cache the scores (``torch.save``), so a rerun need not measure them again."""
        torch.save(self.to_dict(), path)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ImportanceScores:
        return cls.from_dict(torch.load(path, weights_only=True))


class _Accumulator:
    """Running sums (float64, on the CPU) from which the scores are finished.

    Activation scores keep, per unit, the sum over sequences of the squared per-sequence mean
    (its square root is the L2 over the batch of sequences); block influence keeps the sum of
    ``1 - cos`` over counted tokens.
    """

    def __init__(self, arch: Architecture) -> None:
        L = arch.num_layers
        self.head = torch.zeros(L, arch.num_heads, dtype=torch.float64)
        self.intermediate = torch.zeros(L, arch.intermediate_dim, dtype=torch.float64)
        self.hidden = torch.zeros(2 * L, arch.embed_dim, dtype=torch.float64)  # per layer norm
        self.influence = torch.zeros(L, dtype=torch.float64)
        self.counted = torch.ones(0, 0, dtype=torch.bool)  # (B, S) of the batch being run
        self.sequences = 0
        self.tokens = 0

    def add_mean_squares(self, target: torch.Tensor, values: torch.Tensor) -> None:
        """``values`` (B, S, units): add each sequence's squared mean over counted positions."""
        weight = self.counted.to(values.device, torch.float64)[..., None]
        means = (values.double() * weight).sum(1) / weight.sum(1).clamp(min=1.0)
        target += means.pow(2).sum(0).cpu()

    def add_token_sum(self, target: torch.Tensor, values: torch.Tensor) -> None:
        """``values`` (B, S): add the sum over counted positions."""
        target += values.double()[self.counted.to(values.device)].sum().cpu()


def _counted_segment_starts(counted: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """The first position of every segment (``seq_lens``: per row, zero-padded) that has some
    other counted position: a real document's start, not padding's."""
    starts = torch.zeros_like(counted)
    for row, lengths in enumerate(seq_lens.tolist()):
        offset = 0
        for length in lengths:
            if length > 0 and bool(counted[row, offset:offset + length].any()):
                starts[row, offset] = True
            offset += max(int(length), 0)
    return starts


@torch.no_grad()
def importance_scores(model: nn.Module, batches: Iterable[dict[str, Any]], *,
                      max_sequences: int | None = None,
                      every_token: bool = False) -> ImportanceScores:
    """Importance of every head, KV group, MLP channel, hidden channel and layer of ``model``.

    ``batches`` are collated packs: ``tokens`` (B, S) and optionally ``mask``/``input_pos``
    (document masking), passed to the model as they are. Every position counts, except where a
    ``labels`` key holds the ignore index (-100): that is how collation marks padding, and also
    the first token of every segment (a document, or the part of one a pack continues), whose
    label is ignored so that no document predicts across a boundary (and, in instruction data,
    prompt tokens, which are then left out too). With ``every_token`` (Minitron's rule: every
    real token) those first tokens count too: a segment's first position counts when some
    other position of the segment does, which leaves out only padding (and one-token
    segments). At most ``max_sequences`` sequences are used (the last batch is cut). The model
    runs in eval mode and is returned to the mode it was in; the measuring hooks are removed
    whatever happens.
    """
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"max_sequences must be at least 1, got {max_sequences}.")
    arch = architecture_of(model)
    acc = _Accumulator(arch)
    handles = []
    was_training = model.training
    model.eval()
    try:
        for index, layer in enumerate(model.layers):
            handles += [
                layer.attn.output_proj.register_forward_pre_hook(_head_hook(acc, index, arch)),
                layer.mlp.w2.register_forward_pre_hook(_intermediate_hook(acc, index)),
                layer.sa_norm.register_forward_hook(_hidden_hook(acc, 2 * index)),
                layer.mlp_norm.register_forward_hook(_hidden_hook(acc, 2 * index + 1)),
                layer.register_forward_hook(_influence_hook(acc, index)),
            ]
        for batch in batches:
            if max_sequences is not None:
                batch = _first_sequences(batch, max_sequences - acc.sequences)
            tokens = batch["tokens"]
            labels = batch.get("labels")
            acc.counted = (torch.ones_like(tokens, dtype=torch.bool) if labels is None
                           else labels != CROSS_ENTROPY_IGNORE_INDEX)
            if every_token and labels is not None and batch.get("seq_lens") is not None:
                acc.counted = acc.counted | _counted_segment_starts(acc.counted,
                                                                    batch["seq_lens"])
            model(tokens, mask=batch.get("mask"), input_pos=batch.get("input_pos"))
            acc.sequences += tokens.shape[0]
            acc.tokens += int(acc.counted.sum())
            if max_sequences is not None and acc.sequences >= max_sequences:
                break  # before asking the iterator for a batch that would not be used
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if acc.sequences == 0:
        raise ValueError("no calibration sequences: the batches were empty.")
    head = acc.head.sqrt()
    return ImportanceScores(
        layer=(acc.influence / max(acc.tokens, 1)).float(),
        kv_head=head.reshape(arch.num_layers, arch.num_kv_heads, arch.heads_per_kv)
        .sum(-1).float(),
        head=head.float(),
        hidden=acc.hidden.sqrt().sum(0).float(),
        intermediate=acc.intermediate.sqrt().float(),
        num_sequences=acc.sequences, num_tokens=acc.tokens)


def _first_sequences(batch: dict[str, Any], count: int) -> dict[str, Any]:
    """The batch cut to its first ``count`` sequences (tensors and flex-attention block masks
    are indexed by sequence first; anything else is kept as it is)."""
    if batch["tokens"].shape[0] <= count:
        return batch
    return {key: value[:count] if isinstance(value, (torch.Tensor, BlockMask)) else value
            for key, value in batch.items()}


def _head_hook(acc: _Accumulator, layer: int, arch: Architecture) -> Callable:
    def hook(module: nn.Module, inputs: tuple) -> None:
        heads = inputs[0]  # (B, S, n_heads * head_dim): every head's output, before mixing
        per_head = heads.unflatten(-1, (arch.num_heads, arch.head_dim)).float().norm(dim=-1)
        acc.add_mean_squares(acc.head[layer], per_head)
    return hook


def _intermediate_hook(acc: _Accumulator, layer: int) -> Callable:
    def hook(module: nn.Module, inputs: tuple) -> None:
        acc.add_mean_squares(acc.intermediate[layer], inputs[0].float().abs())
    return hook


def _hidden_hook(acc: _Accumulator, norm: int) -> Callable:
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        acc.add_mean_squares(acc.hidden[norm], output.float().abs())
    return hook


def _influence_hook(acc: _Accumulator, layer: int) -> Callable:
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        cosine = F.cosine_similarity(inputs[0].float(), output.float(), dim=-1)  # (B, S)
        acc.add_token_sum(acc.influence[layer], 1.0 - cosine)
    return hook


# ------------------------------------------------------------------------------ ranking
def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring positions of a 1-d tensor, ascending (ties: lower index)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def keep_indices(scores: ImportanceScores, source: Architecture,
                 target: Architecture) -> KeptUnits:
    """The units one-shot pruning keeps (all values 1), every index list ascending.

    The ``target.num_layers`` layers of highest block influence, the best ``target.embed_dim``
    hidden channels, and per kept layer its best ``target.intermediate_dim`` MLP channels and
    its best ``target.num_kv_heads`` KV groups, within each of which its best
    ``target.heads_per_kv`` query heads: a query head cannot move to another group, so
    materialized head i reads KV head ``i // target.heads_per_kv``.
    """
    group = source.heads_per_kv
    layers = top_indices(scores.layer, target.num_layers).tolist()
    kv_heads, heads, intermediate = {}, {}, {}
    for layer in layers:
        kv_heads[layer] = top_indices(scores.kv_head[layer], target.num_kv_heads)
        heads[layer] = torch.cat([
            g * group + top_indices(scores.head[layer, g * group:(g + 1) * group],
                                    target.heads_per_kv)
            for g in kv_heads[layer].tolist()])
        intermediate[layer] = top_indices(scores.intermediate[layer], target.intermediate_dim)
    return KeptUnits.unscaled(layers, top_indices(scores.hidden, target.embed_dim), kv_heads,
                              heads, intermediate)


@torch.no_grad()
def one_shot_prune(model: nn.Module, scores: ImportanceScores,
                   target: Architecture) -> tuple[nn.Module, Architecture]:
    """Minitron's one-shot pruning: the ``target``-shaped model made of ``model``'s most
    important units, their weights copied without any rescaling."""
    source = architecture_of(model)
    return materialize_units(model, keep_indices(scores, source, target), source, target), target


def log_alpha_from_scores(scores: torch.Tensor, keep_per_row: int, *, high: float,
                          low: float, gap: float = 0.0) -> torch.Tensor:
    """Initial hard-concrete log_alpha from importance, row by row (a 1-d tensor is one row).

    The ``keep_per_row`` best units of each row start at ``high`` (where uniform gates start);
    the others follow in importance order, evenly spaced from just below ``high - gap`` down to
    ``low - gap``. So the top-k by log_alpha is the importance top-k, and the Lagrangian's
    pressure closes the least important units first. With ``gap = 0`` every gate starts open
    (the masked model begins as the source); a gap of about 7 starts the units outside the
    top-k mostly closed (the masked model begins near the one-shot cut, the expected shape near
    the target).
    """
    width = scores.shape[-1]
    if not 0 <= keep_per_row <= width:
        raise ValueError(f"keep_per_row must be between 0 and {width}, got {keep_per_row}.")
    if not low < high:
        raise ValueError(f"low ({low}) must be below high ({high}).")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}.")
    rows = scores.reshape(-1, width).float()
    by_rank = torch.cat([torch.full((keep_per_row,), float(high)),
                         torch.linspace(high - gap, low - gap, width - keep_per_row + 1)[1:]])
    order = torch.sort(rows, dim=-1, descending=True, stable=True).indices
    out = torch.empty_like(rows).scatter_(-1, order, by_rank.expand_as(rows).contiguous())
    return out.reshape(scores.shape)
