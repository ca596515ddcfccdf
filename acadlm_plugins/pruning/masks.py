"""Pruning masks over a torchtune Llama decoder, applied through hooks (no module surgery).

Mask types (each present only when the target shrinks that dimension):

``layer``        (L,)          a whole transformer block; scales both sublayer outputs
``kv_head``      (L, n_kv)     a KV head and, with it, its whole group of query heads (GQA)
``head``         (L, n_heads)  a query head, within its KV group
``hidden``       (d,)          a residual-stream channel, shared by every layer
``intermediate`` (L, d_ff)     an MLP channel

Where masks act: head gates (times their group's KV gate) scale each head's output before the
attention output projection; intermediate gates scale the MLP's down-projection input; layer
and hidden gates scale what each sublayer writes into the residual stream and the embeddings;
every RMSNorm (both per-layer norms and the final one) averages over the kept hidden channels
only and has its output scaled by the hidden gates, as LLM-Shearing's ``LlamaRMSNorm`` does with
``hidden_z``. With gates fixed to 0/1-times-soft-values this is exactly the smaller model
:mod:`materialize` builds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from acadlm_plugins.pruning.architecture import Architecture
from acadlm_plugins.pruning.hard_concrete import HardConcreteGates

MASK_TYPES = ("layer", "kv_head", "head", "hidden", "intermediate")
#: What the gates keep when the model is evaluated during pruning: exactly the target's units
#: (``target``), or, in every row, as many as the gates expect to keep now (``current``: the
#: reference's ``eval_target_model: false``, which its released pruning script uses).
EVAL_SHAPES = ("target", "current")


@dataclass(frozen=True)
class ExpectedShape:
    """Expected kept fraction of every *row* of each mask type, differentiable in log_alpha.

    A row is what the final top-k acts on: the one row of a 1-d mask (layers, hidden channels),
    a layer of a 2-d mask (its KV heads, its MLP channels), a KV group for query heads. As in
    LLM-Shearing's L0 module, each row is constrained toward the target on its own, so the
    expected shape of every layer (not just the total) moves to the target's shape.
    """

    rows: dict[str, torch.Tensor]         # expected kept fraction per row, per mask type
    targets: dict[str, float]             # the target's kept fraction (the same for each row)

    def fraction(self, mask_type: str) -> torch.Tensor:
        """The mean over rows: what is logged and plotted."""
        return self.rows[mask_type].mean()

    def target_fraction(self, mask_type: str) -> float:
        return self.targets[mask_type]


class PruningMasks(nn.Module):
    """Hard-concrete gates for every dimension that the target shrinks."""

    def __init__(self, source: Architecture, target: Architecture, *,
                 droprate_init: float = 0.01, seed: int = 0, eval_shape: str = "target") -> None:
        super().__init__()
        if eval_shape not in EVAL_SHAPES:
            raise ValueError(f"eval_shape must be one of {EVAL_SHAPES}, got {eval_shape!r}")
        self.source, self.target = source, target
        self.eval_shape = eval_shape
        self.droprate_init = droprate_init
        init = torch.Generator().manual_seed(seed)
        L = source.num_layers
        shapes = {
            "layer": ((L,), target.num_layers < L),
            "kv_head": ((L, source.num_kv_heads), target.num_kv_heads < source.num_kv_heads),
            "head": ((L, source.num_heads), target.heads_per_kv < source.heads_per_kv),
            "hidden": ((source.embed_dim,), target.embed_dim < source.embed_dim),
            "intermediate": ((L, source.intermediate_dim),
                             target.intermediate_dim < source.intermediate_dim),
        }
        self.gates = nn.ModuleDict({
            name: HardConcreteGates(shape, droprate_init=droprate_init, generator=init)
            for name, (shape, pruned) in shapes.items() if pruned})
        self._sampler = torch.Generator().manual_seed(seed + 1)
        self._sampled: dict[str, torch.Tensor] = {}
        self._deterministic: dict[str, torch.Tensor] | None = None
        self.hooked_modules = 0

    # ------------------------------------------------------------------ gate values
    @property
    def mask_types(self) -> list[str]:
        return list(self.gates)

    def resample(self) -> None:
        """Draw fresh stochastic gates for the next training forward pass."""
        self._sampled = {name: gate.sample(self._sampler) for name, gate in self.gates.items()}
        self._deterministic = None

    def invalidate(self) -> None:
        """Forget cached deterministic gates (after the gates' optimizer step)."""
        self._deterministic = None

    def use_final_gates(self) -> None:
        """Evaluate with the final gates: exactly the target's units kept."""
        self._deterministic = self.deterministic_gates()

    def deterministic_gates(self, counts: Mapping[str, int | torch.Tensor] | None = None
                            ) -> dict[str, torch.Tensor]:
        """Gates with a fixed number of units kept, GQA-consistent.

        ``counts`` maps mask type to units kept per row (per layer for 2-d gates, per KV group
        for query heads), one count for every row or a tensor of one per row; by default the
        target's, the shape materialization cuts. The query heads kept are the best of each
        KV group.
        """
        counts = dict(counts) if counts is not None else self.target_row_counts()
        out: dict[str, torch.Tensor] = {}
        for name, gate in self.gates.items():
            if name == "head":
                out[name] = self._deterministic_heads(gate, counts[name])
            else:
                out[name] = gate.deterministic(counts[name])
        return out

    @torch.no_grad()
    def kept_sets(self) -> dict[str, torch.Tensor]:
        """Which units the final gates keep, per mask type (boolean, on the CPU)."""
        return {name: (gates > 0).cpu() for name, gates in self.deterministic_gates().items()}

    def target_row_counts(self) -> dict[str, int]:
        """Units kept per row at the end: exactly the target architecture."""
        t = self.target
        return {"layer": t.num_layers, "kv_head": t.num_kv_heads, "head": t.heads_per_kv,
                "hidden": t.embed_dim, "intermediate": t.intermediate_dim}

    @torch.no_grad()
    def expected_row_counts(self) -> dict[str, torch.Tensor]:
        """Units each row keeps now: its width less the expected number of closed gates,
        rounded (LLM-Shearing's ``eval_target_model: false``), so an evaluation measures the
        model the gates describe at this step rather than the target's cut of it."""
        counts = {}
        for name, rows in self.expected_shape().rows.items():
            width = self._row_width(name)
            closed = torch.round(width * (1.0 - rows.detach().double()))
            counts[name] = (width - closed).long().cpu()
        return counts

    def _row_width(self, name: str) -> int:
        src = self.source
        return {"layer": src.num_layers, "kv_head": src.num_kv_heads, "head": src.heads_per_kv,
                "hidden": src.embed_dim, "intermediate": src.intermediate_dim}[name]

    def _deterministic_heads(self, gate: HardConcreteGates,
                             keep_per_group: int | torch.Tensor) -> torch.Tensor:
        hpk = self.source.heads_per_kv
        log_alpha = gate.log_alpha.detach().reshape(-1, hpk)
        soft = gate.soft_values().detach().reshape(-1, hpk)
        out = torch.zeros_like(soft)
        if isinstance(keep_per_group, int):
            top = torch.topk(log_alpha, keep_per_group, dim=-1).indices
            out.scatter_(-1, top, soft.gather(-1, top))
        else:  # a count per KV group
            for group, keep in enumerate(keep_per_group.reshape(-1).tolist()):
                top = torch.topk(log_alpha[group], int(keep)).indices
                out[group, top] = soft[group, top]
        return out.reshape(gate.log_alpha.shape)

    def current(self, training: bool) -> dict[str, torch.Tensor]:
        """The gates in force: sampled while training, deterministic in eval mode."""
        if training:
            if not self._sampled:
                self.resample()
            return self._sampled
        if self._deterministic is None:
            self._deterministic = self.deterministic_gates(
                self.expected_row_counts() if self.eval_shape == "current" else None)
        return self._deterministic

    # ------------------------------------------------------- per-site factors for hooks
    def head_factor(self, gates: Mapping[str, torch.Tensor], layer: int) -> torch.Tensor | None:
        head = gates.get("head")
        kv = gates.get("kv_head")
        factor = head[layer] if head is not None else None
        if kv is not None:
            group = kv[layer].repeat_interleave(self.source.heads_per_kv)
            factor = group if factor is None else factor * group
        return factor

    @staticmethod
    def residual_factor(gates: Mapping[str, torch.Tensor], layer: int) -> torch.Tensor | None:
        """What a sublayer's output is scaled by before it joins the residual stream."""
        hidden, layer_gate = gates.get("hidden"), gates.get("layer")
        if layer_gate is None:
            return hidden
        if hidden is None:
            return layer_gate[layer]
        return hidden * layer_gate[layer]

    # ---------------------------------------------------------------- expected shape
    def expected_shape(self, gates: Mapping[str, torch.Tensor] | None = None) -> ExpectedShape:
        """Expected kept fraction of each row of each mask type (differentiable in log_alpha).

        Each mask type is counted on its own scores, P(z > 0), as LLM-Shearing does: a layer's
        KV heads are not weighted by that layer's own gate. ``gates`` replaces the scores by
        given values (e.g. 0/1 indicators), which turns the same formula into exact fractions
        for a fixed mask.
        """
        rows, targets = {}, {}
        for name, gate in self.gates.items():
            scores = gates[name] if gates is not None else gate.scores()
            width = self._row_width(name)
            rows[name] = scores.reshape(-1, width).sum(-1) / width
            targets[name] = self.target_row_counts()[name] / width
        return ExpectedShape(rows, targets)

    def expected_non_embedding_params(self, gates: Mapping[str, torch.Tensor] | None = None
                                      ) -> torch.Tensor:
        """Expected parameters outside the embeddings, from products of unit scores.

        Per layer: layer score x (attention rows x hidden + MLP channels x hidden + 2 norms,
        plus the q/k/v biases of a model that has them), with hidden = the expected number of
        kept residual channels.
        """
        s = self._unit_scores(gates)
        hd = self.source.head_dim
        hidden = s["hidden"].sum()
        heads = (s["head"] * s["kv_head"].repeat_interleave(self.source.heads_per_kv, 1)).sum(1)
        kv = s["kv_head"].sum(1)
        inter = s["intermediate"].sum(1)
        per_layer = 2 * hidden * hd * heads + 2 * hidden * hd * kv + 3 * hidden * inter + 2 * hidden
        if self.source.attention_bias:
            per_layer = per_layer + (heads + 2 * kv) * hd
        return (s["layer"] * per_layer).sum() + hidden

    def _unit_scores(self, gates: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        src = self.source
        L = src.num_layers
        ones = {"layer": torch.ones(L), "kv_head": torch.ones(L, src.num_kv_heads),
                "head": torch.ones(L, src.num_heads), "hidden": torch.ones(src.embed_dim),
                "intermediate": torch.ones(L, src.intermediate_dim)}
        out = {}
        for name, default in ones.items():
            if name in self.gates:
                out[name] = gates[name] if gates is not None else self.gates[name].scores()
            else:
                out[name] = default.to(self._device())
        return out

    def _device(self) -> torch.device:
        return next(self.parameters()).device if len(self.gates) else torch.device("cpu")

    @torch.no_grad()
    def clamp_(self) -> None:
        for gate in self.gates.values():
            gate.clamp_()


def choice_changes(initial: Mapping[str, torch.Tensor], final: Mapping[str, torch.Tensor]
                   ) -> dict[str, dict[str, int]]:
    """Per mask type, how many units the final gates keep and how many of those were not kept
    by ``initial`` (both from :meth:`PruningMasks.kept_sets`).

    Started from the importance ranking, ``changed`` counts what mask training chose
    differently from one-shot pruning: 0 everywhere means the run kept the one-shot units and
    only trained them through the gates.
    """
    return {name: {"kept": int(kept.sum()), "changed": int((kept & ~initial[name]).sum())}
            for name, kept in final.items() if name in initial}


class MaskHooks:
    """Installs :class:`PruningMasks` on a torchtune decoder with forward hooks; ``remove()``
    restores the plain model. Module structure and state-dict keys are untouched.

    ``active=False`` installs the hooks switched off: the model computes exactly what the
    source computes until ``active`` is set (the prune recipe's step-0 evaluation is thereby
    the source model's, which dynamic batch loading takes as its reference losses)."""

    def __init__(self, model: nn.Module, masks: PruningMasks, *, active: bool = True) -> None:
        self.masks = masks
        self.active = active
        self._handles = []
        hook = self._handles.append
        hook(model.tok_embeddings.register_forward_hook(self._scale_hidden))
        for index, layer in enumerate(model.layers):
            hook(layer.sa_norm.register_forward_hook(self._masked_rms_norm))
            hook(layer.mlp_norm.register_forward_hook(self._masked_rms_norm))
            hook(layer.attn.output_proj.register_forward_pre_hook(self._head_hook(index)))
            hook(layer.mlp.w2.register_forward_pre_hook(self._intermediate_hook(index)))
            hook(layer.sa_scale.register_forward_hook(self._residual_hook(index)))
            hook(layer.mlp_scale.register_forward_hook(self._residual_hook(index)))
        hook(model.norm.register_forward_hook(self._masked_rms_norm))
        masks.hooked_modules = len(self._handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _gates(self, module: nn.Module) -> Mapping[str, torch.Tensor]:
        if not self.active:
            return {}
        return self.masks.current(module.training)

    def _scale_hidden(self, module, inputs, output):
        hidden = self._gates(module).get("hidden")
        return output if hidden is None else output * hidden.to(output.dtype)

    def _masked_rms_norm(self, module, inputs, output):
        """An RMSNorm under the hidden mask, as LLM-Shearing's ``LlamaRMSNorm(x, hidden_z)``.

        The mean square is taken over the kept channels only: the reference selects them
        (``index_select`` on ``hidden_z != 0``) before the mean; here the input's dropped
        channels are exactly 0 (everything written into the residual stream is gated), so the
        sum over all channels divided by the kept count is the same statistic. The output is
        then multiplied by the gates, so a channel's soft gate value scales what every sublayer
        reads, not only what it writes; materialization folds the deterministic value into the
        norm's scale (see :func:`~acadlm_plugins.pruning.materialize.materialize_units`).
        """
        hidden = self._gates(module).get("hidden")
        if hidden is None:
            return output
        x = inputs[0].float()
        kept = (hidden > 0).sum().clamp(min=1)
        normed = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / kept + module.eps)
        return (normed * module.scale.float() * hidden.float()).to(output.dtype)

    def _head_hook(self, layer: int):
        def hook(module, inputs):
            factor = self.masks.head_factor(self._gates(module), layer)
            if factor is None:
                return None
            x = inputs[0]
            head_dim = self.masks.source.head_dim
            scaled = x * factor.repeat_interleave(head_dim).to(x.dtype)
            return (scaled, *inputs[1:])
        return hook

    def _intermediate_hook(self, layer: int):
        def hook(module, inputs):
            gates = self._gates(module).get("intermediate")
            if gates is None:
                return None
            return (inputs[0] * gates[layer].to(inputs[0].dtype), *inputs[1:])
        return hook

    def _residual_hook(self, layer: int):
        def hook(module, inputs, output):
            factor = self.masks.residual_factor(self._gates(module), layer)
            return output if factor is None else output * factor.to(output.dtype)
        return hook
