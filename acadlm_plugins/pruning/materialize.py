"""Turn a masked model into the genuinely smaller model of the target architecture.

The final gates keep exactly the target's units (top-k by log_alpha, query heads chosen within
their KV group); every kept gate's soft value is folded into the weights that produce what the
gate scales, so the materialized model computes what the masked model computes in eval mode,
with no mask left at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from acadlm_plugins.models.llama import llama_decoder
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
    units = kept_units(masks)
    src, tgt = masks.source, masks.target
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
        new[q + "sa_norm.scale"] = state[p + "sa_norm.scale"][h_idx]
        new[q + "mlp_norm.scale"] = state[p + "mlp_norm.scale"][h_idx]
        new[q + "attn.q_proj.weight"] = state[p + "attn.q_proj.weight"][head_rows][:, h_idx]
        new[q + "attn.k_proj.weight"] = state[p + "attn.k_proj.weight"][kv_rows][:, h_idx]
        new[q + "attn.v_proj.weight"] = state[p + "attn.v_proj.weight"][kv_rows][:, h_idx]
        head_scale = units.head_values[old].repeat_interleave(hd)
        new[q + "attn.output_proj.weight"] = (
            state[p + "attn.output_proj.weight"][h_idx][:, head_rows] * head_scale * residual_scale)
        new[q + "mlp.w1.weight"] = state[p + "mlp.w1.weight"][inter][:, h_idx]
        new[q + "mlp.w3.weight"] = state[p + "mlp.w3.weight"][inter][:, h_idx]
        new[q + "mlp.w2.weight"] = (state[p + "mlp.w2.weight"][h_idx][:, inter]
                                    * inter_val * residual_scale)
    attn = model.layers[0].attn
    pruned = llama_decoder(
        vocab_size=src.vocab_size, num_layers=tgt.num_layers, num_heads=tgt.num_heads,
        num_kv_heads=tgt.num_kv_heads, embed_dim=tgt.embed_dim,
        intermediate_dim=tgt.intermediate_dim, head_dim=hd, max_seq_len=model.max_seq_len,
        rope_base=attn.pos_embeddings.base, norm_eps=model.norm.eps,
        tie_word_embeddings=src.tie_word_embeddings)
    missing, unexpected = pruned.load_state_dict(new, strict=False)
    if unexpected or [k for k in missing if not k.startswith("output.")]:
        raise AssertionError(f"materialized weights do not fit: {missing} {unexpected}")
    return pruned, tgt


def _rows_of_heads(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
