"""Turn a masked model into the genuinely smaller model of the target architecture.

The final gates keep exactly the target's units (top-k by log_alpha, query heads chosen within
their KV group); every kept gate's soft value is folded into the weights that produce what the
gate scales, so the materialized model computes what the masked model computes in eval mode,
with no mask left at run time.

The slicing itself (:func:`materialize_units`) only sees index sets and per-unit values, so the
same code builds the one-shot model of importance pruning, where every value is 1.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from acadlm_plugins.models.decoder import decoder
from acadlm_plugins.pruning.architecture import Architecture
from acadlm_plugins.pruning.masks import PruningMasks


@dataclass
class KeptUnits:
    """Indices (ascending) and folded gate values of what survives, per layer where it applies."""

    layers: list[int]
    layer_values: list[float]
    hidden: torch.Tensor
    hidden_values: torch.Tensor
    kv_heads: dict[int, torch.Tensor]
    heads: dict[int, torch.Tensor]
    head_values: dict[int, torch.Tensor]
    intermediate: dict[int, torch.Tensor]
    intermediate_values: dict[int, torch.Tensor]

    @classmethod
    def unscaled(cls, layers: list[int], hidden: torch.Tensor, kv_heads: dict[int, torch.Tensor],
                 heads: dict[int, torch.Tensor],
                 intermediate: dict[int, torch.Tensor]) -> KeptUnits:
        """Plain index sets with every value 1: the kept weights are copied, not rescaled."""
        return cls(
            layers=list(layers), layer_values=[1.0] * len(layers),
            hidden=hidden, hidden_values=torch.ones(len(hidden)),
            kv_heads=kv_heads, heads=heads,
            head_values={layer: torch.ones(len(index)) for layer, index in heads.items()},
            intermediate=intermediate,
            intermediate_values={layer: torch.ones(len(index))
                                 for layer, index in intermediate.items()})


@torch.no_grad()
def kept_units(masks: PruningMasks) -> KeptUnits:
    """What the final (target-sized) gates keep."""
    gates = masks.deterministic_gates(masks.target_row_counts())
    src = masks.source

    def kept(values: torch.Tensor | None, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if values is None:
            return torch.arange(size), torch.ones(size)
        index = torch.nonzero(values > 0).flatten()
        return index, values[index].float()

    layers, layer_values = kept(gates.get("layer"), src.num_layers)
    hidden, hidden_values = kept(gates.get("hidden"), src.embed_dim)
    units = KeptUnits(layers.tolist(), layer_values.tolist(), hidden, hidden_values,
                      {}, {}, {}, {}, {})
    for layer in units.layers:
        kv = gates.get("kv_head")
        units.kv_heads[layer], _ = kept(kv[layer] if kv is not None else None, src.num_kv_heads)
        factor = masks.head_factor(gates, layer)
        units.heads[layer], units.head_values[layer] = kept(factor, src.num_heads)
        inter = gates.get("intermediate")
        units.intermediate[layer], units.intermediate_values[layer] = kept(
            inter[layer] if inter is not None else None, src.intermediate_dim)
    return units


@torch.no_grad()
def materialize(model: nn.Module, masks: PruningMasks) -> tuple[nn.Module, Architecture]:
    """Build the target-size model with the masked model's (eval-mode) function.

    ``model`` is the unsharded source model whose weights the masks were trained with (any
    mask hooks on it are irrelevant: only its parameters are read).
    """
    return materialize_units(model, kept_units(masks), masks.source, masks.target), masks.target


@torch.no_grad()
def materialize_units(model: nn.Module, units: KeptUnits, src: Architecture,
                      tgt: Architecture) -> nn.Module:
    """Slice ``model`` (of shape ``src``) down to ``units``, folding each kept unit's value into
    the weights that produce what it scales; the result has shape ``tgt``.

    Within every kept layer the kept query heads must list, in ascending order, the heads of
    the kept KV groups (``tgt.heads_per_kv`` each): materialized head i then reads KV head
    ``i // tgt.heads_per_kv``, as the source head did.

    Nothing about the family is assumed: q/k/v biases (Qwen2) are sliced with their rows when
    the source has them, and the RoPE module is a copy of the source's own (its class, θ and
    scaling: Llama 3.1's scaled RoPE, Qwen2's half-split RoPE), since heads keep their size.
    """
    _check_units(units, src, tgt)
    _check_sliceable(model)
    hd = src.head_dim
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    h_idx, h_val = units.hidden, units.hidden_values
    new: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": state["tok_embeddings.weight"][:, h_idx] * h_val,
        "norm.scale": state["norm.scale"][h_idx],
    }
    if "output.weight" in state:
        new["output.weight"] = state["output.weight"][:, h_idx] * h_val
    for new_index, (old, layer_value) in enumerate(zip(units.layers, units.layer_values)):
        p, q = f"layers.{old}.", f"layers.{new_index}."
        heads, kv = units.heads[old], units.kv_heads[old]
        head_rows = _rows_of_heads(heads, hd)
        kv_rows = _rows_of_heads(kv, hd)
        residual_scale = (h_val * layer_value)[:, None]
        inter, inter_val = units.intermediate[old], units.intermediate_values[old]
        # The masked per-layer norms multiply their output by the hidden gates: their values
        # go into the norms' scales (the final norm's go into the output projection above).
        new[q + "sa_norm.scale"] = state[p + "sa_norm.scale"][h_idx] * h_val
        new[q + "mlp_norm.scale"] = state[p + "mlp_norm.scale"][h_idx] * h_val
        for name, rows in (("q_proj", head_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            new[q + f"attn.{name}.weight"] = state[p + f"attn.{name}.weight"][rows][:, h_idx]
            if p + f"attn.{name}.bias" in state:
                new[q + f"attn.{name}.bias"] = state[p + f"attn.{name}.bias"][rows]
        head_scale = units.head_values[old].repeat_interleave(hd)
        new[q + "attn.output_proj.weight"] = (
            state[p + "attn.output_proj.weight"][h_idx][:, head_rows] * head_scale * residual_scale)
        new[q + "mlp.w1.weight"] = state[p + "mlp.w1.weight"][inter][:, h_idx]
        new[q + "mlp.w3.weight"] = state[p + "mlp.w3.weight"][inter][:, h_idx]
        new[q + "mlp.w2.weight"] = (state[p + "mlp.w2.weight"][h_idx][:, inter]
                                    * inter_val * residual_scale)
    attn = model.layers[0].attn
    pruned = decoder(
        vocab_size=src.vocab_size, num_layers=tgt.num_layers, num_heads=tgt.num_heads,
        num_kv_heads=tgt.num_kv_heads, embed_dim=tgt.embed_dim,
        intermediate_dim=tgt.intermediate_dim, head_dim=hd, max_seq_len=model.max_seq_len,
        rope=copy.deepcopy(attn.pos_embeddings).cpu(), norm_eps=model.norm.eps,
        tie_word_embeddings=src.tie_word_embeddings,
        attention_bias=attn.q_proj.bias is not None)
    missing, unexpected = pruned.load_state_dict(new, strict=False)
    if unexpected or [k for k in missing if not k.startswith("output.")]:
        raise AssertionError(f"materialized weights do not fit: {missing} {unexpected}")
    return pruned


def _check_sliceable(model: nn.Module) -> None:
    """Refuse modules the slicing does not carry over (they would be silently dropped)."""
    for index, layer in enumerate(model.layers):
        attn, extra = layer.attn, []
        if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
            extra.append("q/k norms")
        if attn.output_proj.bias is not None:
            extra.append("an output-projection bias")
        if any(getattr(layer.mlp, name).bias is not None for name in ("w1", "w2", "w3")):
            extra.append("MLP biases")
        if extra:
            raise ValueError(f"layer {index} has {' and '.join(extra)}, which materialization "
                             "does not slice; see docs/models.md for the supported families.")


def _check_units(units: KeptUnits, src: Architecture, tgt: Architecture) -> None:
    """Refuse index sets that do not describe ``tgt`` (a wrong count or a head outside its
    group would otherwise produce a model that loads but computes something else)."""
    problems = []
    if len(units.layers) != tgt.num_layers:
        problems.append(f"{len(units.layers)} layers kept, target has {tgt.num_layers}")
    if len(units.hidden) != tgt.embed_dim:
        problems.append(f"{len(units.hidden)} hidden channels kept, target has {tgt.embed_dim}")
    for layer in units.layers:
        kv, heads = units.kv_heads[layer], units.heads[layer]
        if len(kv) != tgt.num_kv_heads or len(heads) != tgt.num_heads:
            problems.append(f"layer {layer}: {len(kv)} KV / {len(heads)} query heads kept, "
                            f"target has {tgt.num_kv_heads} / {tgt.num_heads}")
        elif not torch.equal(heads // src.heads_per_kv,
                             kv.repeat_interleave(tgt.heads_per_kv)):
            problems.append(f"layer {layer}: query heads {heads.tolist()} are not "
                            f"{tgt.heads_per_kv} per kept KV group {kv.tolist()} in order")
        if len(units.intermediate[layer]) != tgt.intermediate_dim:
            problems.append(f"layer {layer}: {len(units.intermediate[layer])} MLP channels kept, "
                            f"target has {tgt.intermediate_dim}")
    if problems:
        raise ValueError("kept units do not fit the target architecture: " + "; ".join(problems))


def _rows_of_heads(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
