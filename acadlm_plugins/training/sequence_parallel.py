"""Ulysses sequence parallelism for torchtune decoders, with document (block-causal) masks.

Training on sequences longer than one device holds splits every sequence into ``degree``
contiguous shards, one per rank of a sequence-parallel process group. Everything in a decoder
layer except attention works token by token, so each rank runs it on its own shard. Attention
needs the whole sequence: following DeepSpeed-Ulysses (the scheme ProLong trained with), the
query, key and value heads of the local shard go through an all-to-all that trades "all heads,
my tokens" for "my heads, all tokens", every rank attends over the full sequence with its
``num_heads / degree`` heads, and a second all-to-all brings the output back to "all heads, my
tokens". Because each rank sees whole rows of the attention matrix, any mask over the full
sequence works unchanged, in particular the per-document block-causal mask of packed
sequences, which torchtune's own context parallelism cannot combine with.

A training step, per rank of the group (sketch)::

    sp = enable_ulysses(model, group)                    # once, after the model is built
    shard = shard_batch(batch, sp.rank, sp.degree)       # per batch
    sp.set_mask(shard["global_mask"])                    # or sp.set_seq_lens(seq_lens)
    logits = model(shard["tokens"], input_pos=shard["input_pos"])   # mask stays None here
    result = sequence_parallel_loss(logits, shard["targets"], group)
    result.loss.backward()                               # collective: every rank calls it
    sum_gradients(model, group)                          # plain replicated parameters only
    optimizer.step()

The decoder must be called with ``mask=None``: torchtune checks a mask's shape against the
local shard length, so the full-sequence mask lives on the handle instead, and it stays there
(until the next :meth:`UlyssesAttention.set_mask`) so activation checkpointing can recompute
attention during the backward pass.

Gradients: every rank holds the same parameters, and after ``result.loss.backward()`` each
rank's gradient is its share of the gradient of the group's token-mean loss (the all-to-all
carries gradients between ranks). The full gradient is their **sum** over the group:

* plain replicated parameters: call :func:`sum_gradients` after the backward pass;
* DDP or FSDP2 over a mesh that includes the sequence-parallel ranks: those *average* over
  ranks, so back-propagate ``result.loss * degree`` instead (the sum over the group, averaged
  over the data-parallel replicas).

Limits: training only (no KV cache). Key and value heads are exchanged before torchtune's
grouped-query expansion, so ``degree`` must divide ``num_kv_heads`` too. A bool mask is a full
``[b, S, S]`` tensor on every rank; at lengths where that hurts, pass a flex-attention
``BlockMask`` (what :func:`document_mask` builds on CUDA, from the document boundaries in
O((S / 128)^2) memory), which the wrapper hands unchanged to torchtune's attention call. An attention call already replaced by per-document attention
(training/document_attention.py) is wrapped the same way, and then no mask is needed at all.
Tested on CPU with gloo: the SDPA bool-mask and per-document paths; the flex path has not been
run on a GPU.

The long-context recipe uses all of this when ``sequence_parallel.degree`` is above 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from acadlm_plugins.errors import ConfigError

DEGREE_FIELD = "sequence_parallel.degree"
IGNORE_INDEX = -100


# --------------------------------------------------------------------------- config checks


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from torchtune.modules import MultiHeadAttention

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, MultiHeadAttention)]


def check_sequence_parallel(model: nn.Module, degree: int) -> None:
    """Raise :class:`ConfigError` (field ``sequence_parallel.degree``) unless ``degree`` ranks
    can split every attention layer of ``model`` by heads.

    Each rank attends with ``num_heads / degree`` query heads and ``num_kv_heads / degree``
    key-value heads, so ``degree`` must divide both, in every layer (a pruned model may differ
    per layer). Needs only the architecture: a model on the meta device will do.
    """
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ConfigError(DEGREE_FIELD, f"is {degree!r}; it must be a positive integer.",
                          "set 1 to train without sequence parallelism.")
    if degree == 1:
        return
    layers = _attention_modules(model)
    if not layers:
        raise ConfigError(DEGREE_FIELD, f"is {degree}, but the model has no torchtune "
                          "MultiHeadAttention layer whose heads could be split.",
                          "set 1 for this model.")
    for name, attn in layers:
        heads, kv_heads = attn.num_heads, attn.num_kv_heads
        usable = [d for d in range(1, kv_heads + 1) if heads % d == 0 and kv_heads % d == 0]
        fix = f"use a degree that divides both head counts: one of {usable}."
        if heads % degree:
            raise ConfigError(DEGREE_FIELD, f"{degree} does not divide num_heads={heads} "
                              f"(attention `{name}`): every rank needs whole query heads.", fix)
        if kv_heads % degree:
            raise ConfigError(DEGREE_FIELD, f"{degree} does not divide num_kv_heads={kv_heads} "
                              f"(attention `{name}`, num_heads={heads}): every rank needs whole "
                              "key-value heads.", fix)


def check_sequence_length(seq_len: int, degree: int, *,
                          field: str = "dataset.max_seq_len") -> None:
    """Raise :class:`ConfigError` naming ``field`` unless ``seq_len`` splits into ``degree``
    equal shards (sequence parallelism gives every rank the same number of tokens)."""
    if seq_len % degree:
        lower = seq_len - seq_len % degree
        nearest = f"{lower} or {lower + degree}" if lower else f"{degree}"
        raise ConfigError(field, f"{seq_len} tokens do not split into {degree} equal "
                          f"sequence-parallel shards.",
                          f"use a multiple of {DEGREE_FIELD}={degree}, e.g. {nearest}.")


def new_sequence_parallel_group(degree: int) -> dist.ProcessGroup | None:
    """The sequence-parallel group of this rank: consecutive blocks of ``degree`` ranks
    (0..degree-1, degree..2*degree-1, ...). Every rank must call it (group creation is
    collective). Returns ``None`` (no group needed) when ``degree`` is 1."""
    if degree == 1:
        return None
    world = dist.get_world_size()
    if world % degree:
        raise ConfigError(DEGREE_FIELD, f"{degree} does not divide the {world} processes.",
                          "launch a multiple of the degree (`--nproc_per_node`).")
    mine = None
    for start in range(0, world, degree):
        group = dist.new_group(list(range(start, start + degree)))
        if start <= dist.get_rank() < start + degree:
            mine = group
    return mine


# --------------------------------------------------------------------------- all-to-all


def _group_size(group: dist.ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _exchange(x: torch.Tensor, scatter_dim: int, gather_dim: int,
              group: dist.ProcessGroup | None) -> torch.Tensor:
    """Cut ``x`` into ``P`` pieces along ``scatter_dim``, send piece ``j`` to rank ``j``, and
    join the pieces received, in rank order, along ``gather_dim``."""
    parts = _group_size(group)
    outgoing = torch.stack(x.chunk(parts, dim=scatter_dim)).contiguous()
    incoming = torch.empty_like(outgoing)
    dist.all_to_all_single(incoming, outgoing, group=group)
    return torch.cat(incoming.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """:func:`_exchange` with a gradient: the adjoint of a permutation of pieces is the
    inverse permutation, i.e. the same exchange with the two dimensions swapped."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scatter_dim: int, gather_dim: int,
                group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.dims = (scatter_dim, gather_dim)
        ctx.group = group
        return _exchange(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        scatter_dim, gather_dim = ctx.dims
        return _exchange(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int,
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Differentiable all-to-all over ``group``: ``x`` is split along ``scatter_dim`` (which
    the group size must divide) and the received pieces concatenated along ``gather_dim``.
    The identity when the group has one rank."""
    if _group_size(group) == 1:
        return x
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


# --------------------------------------------------------------------------- attention wrapper


class _UlyssesCall:
    """Replacement for one attention module's ``_attention_call`` (torchtune's SDPA-or-flex
    function): q, k, v arrive as the local shard ``[b, heads, S/P, head_dim]``, attention runs
    over the full sequence with ``heads/P`` heads and the handle's global mask."""

    def __init__(self, original: Any, num_heads: int, num_kv_heads: int,
                 handle: UlyssesAttention) -> None:
        self.original = original
        self.queries_per_kv = num_heads // num_kv_heads
        self.handle = handle

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any,
                 dropout_p: float, is_causal: bool) -> torch.Tensor:
        if mask is not None:
            raise ValueError("sequence parallelism: call the model with mask=None and give the "
                             "full-sequence mask to UlyssesAttention.set_mask (a mask passed to "
                             "the model only covers this rank's shard).")
        group, full_mask = self.handle.group, self.handle.mask
        causal = is_causal and full_mask is None
        if self.handle.degree == 1:
            return self.original(q, k, v, mask=full_mask, dropout_p=dropout_p, is_causal=causal)
        # torchtune has already repeated every key-value head queries_per_kv times; send one
        # copy (the first of each run) and repeat after the exchange, which keeps the repeated
        # heads next to the query heads that use them.
        g = self.queries_per_kv
        if g > 1:
            k, v = k[:, ::g], v[:, ::g]
        q, k, v = (all_to_all(t, scatter_dim=1, gather_dim=2, group=group) for t in (q, k, v))
        if g > 1:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        out = self.original(q, k, v, mask=full_mask, dropout_p=dropout_p, is_causal=causal)
        return all_to_all(out, scatter_dim=2, gather_dim=1, group=group)


class UlyssesAttention:
    """Handle on a decoder whose attention layers run Ulysses sequence parallelism.

    Holds the group, this rank's place in it, and the mask over the **full** sequence of the
    current batch (``None``: plain causal attention over the full sequence).
    """

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.degree = _group_size(group)
        self.rank = dist.get_rank(group) if self.degree > 1 else 0
        check_sequence_parallel(model, self.degree)
        self.mask: Any = None
        self._wrapped: list[tuple[nn.Module, Any]] = []
        layers = [attn for _, attn in _attention_modules(model)]
        if any(isinstance(attn._attention_call, _UlyssesCall) for attn in layers):
            raise RuntimeError("sequence parallelism is already enabled on this model; call "
                               "remove() on its handle first.")
        for attn in layers:
            original = attn._attention_call
            attn._attention_call = _UlyssesCall(original, attn.num_heads, attn.num_kv_heads, self)
            self._wrapped.append((attn, original))

    def set_mask(self, mask: Any) -> None:
        """Use ``mask`` for every attention layer until the next call: a bool tensor
        ``[b, S, S]`` (True = may attend, e.g. ``padded_collate_packed``'s ``"mask"`` on CPU),
        a flex-attention ``BlockMask`` over the full length, or ``None`` for causal."""
        self.mask = mask

    def set_seq_lens(self, seq_lens: Sequence[torch.Tensor]) -> None:
        """Use the block-causal document mask of ``seq_lens`` (per sample, the lengths of its
        segments; they sum to the full sequence length), built as torchtune builds it."""
        self.mask = document_mask(seq_lens)

    def remove(self) -> None:
        """Give every attention layer its original attention call back."""
        for attn, original in self._wrapped:
            attn._attention_call = original
        self._wrapped.clear()


def enable_ulysses(model: nn.Module,
                   group: dist.ProcessGroup | None = None) -> UlyssesAttention:
    """Switch every torchtune attention layer of ``model`` to Ulysses sequence parallelism over
    ``group`` (default: all processes; without ``torch.distributed`` one rank, which changes
    nothing but where the mask comes from). Raises :class:`ConfigError` if the group size does
    not divide the head counts."""
    return UlyssesAttention(model, group)


def document_mask(seq_lens: Sequence[torch.Tensor]) -> Any:
    """Block-causal mask of packed documents over the full sequence: a flex-attention
    ``BlockMask`` where torchtune uses flex attention (CUDA; built without a dense S x S
    step), else a bool ``[b, S, S]``."""
    from acadlm_plugins.data.document_masks import document_causal_mask

    return document_causal_mask(seq_lens)


# --------------------------------------------------------------------------- batch and loss


def shard_batch(batch: Mapping[str, Any], rank: int, degree: int, *,
                ignore_index: int = IGNORE_INDEX) -> dict[str, Any]:
    """This rank's contiguous share of a packed batch.

    Returns ``tokens``, ``input_pos`` and ``targets`` for positions
    ``[rank * S/degree, (rank + 1) * S/degree)``. ``targets`` are the labels already shifted
    over the **full** sequence (position t predicts ``labels[t + 1]``; the last position
    predicts nothing), so the target across a shard border is counted exactly once; compute
    the loss with :func:`sequence_parallel_loss`, never with a second shift. ``labels`` is
    therefore not returned. Position ids are always given (made ``0..S-1`` if the batch has
    none), since RoPE would otherwise restart at 0 on every shard. A ``mask`` (over the full
    sequence) is returned as ``global_mask`` so it cannot reach the model by accident; other
    keys (``seq_lens``, ``domain``, ...) are passed through unchanged.
    """
    if not 0 <= rank < degree:
        raise ValueError(f"rank {rank} is outside a sequence-parallel group of {degree}.")
    tokens, labels = batch["tokens"], batch["labels"]
    length = tokens.shape[1]
    check_sequence_length(length, degree)
    input_pos = batch.get("input_pos")
    if input_pos is None:
        input_pos = torch.arange(length, device=tokens.device).expand_as(tokens)
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)
    span = length // degree
    mine = slice(rank * span, (rank + 1) * span)
    shard = {k: v for k, v in batch.items() if k not in ("tokens", "labels", "input_pos", "mask")}
    shard.update(tokens=tokens[:, mine].contiguous(), input_pos=input_pos[:, mine].contiguous(),
                 targets=targets[:, mine].contiguous())
    if "mask" in batch:
        shard["global_mask"] = batch["mask"]
    return shard


class SequenceParallelLoss(NamedTuple):
    """``loss``: back-propagate this on every rank (this rank's summed token losses divided by
    the group's token count, so the ranks' losses add up to the token mean); ``mean``: the
    group's token-mean loss, detached, the same on every rank (log this); ``num_tokens``: the
    group's counted tokens."""

    loss: torch.Tensor
    mean: torch.Tensor
    num_tokens: int


def sequence_parallel_loss(logits: torch.Tensor | Sequence[torch.Tensor],
                           targets: torch.Tensor,
                           group: dist.ProcessGroup | None = None, *,
                           ignore_index: int = IGNORE_INDEX) -> SequenceParallelLoss:
    """Token-mean cross-entropy over a sequence-parallel group, from each rank's shard.

    ``logits`` is ``[b, s, vocab]`` (or torchtune's list of output chunks along the sequence)
    and ``targets`` the already-shifted shard targets of :func:`shard_batch`. The sums and
    counts are all-reduced, so ``mean`` equals the one-process token-mean loss of the whole
    batch; with one rank this is plain token-mean cross-entropy.
    """
    if not isinstance(logits, torch.Tensor):
        logits = torch.cat(list(logits), dim=1)
    summed = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                             ignore_index=ignore_index, reduction="sum")
    counted = (targets != ignore_index).sum()
    totals = torch.stack([summed.detach().double(), counted.double()])
    if _group_size(group) > 1:
        dist.all_reduce(totals, group=group)
    tokens = totals[1].clamp(min=1)
    return SequenceParallelLoss(loss=summed / tokens.to(summed.dtype),
                                mean=(totals[0] / tokens).float(), num_tokens=int(totals[1]))


def sum_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum the gradients of ``model``'s (replicated, not DDP/FSDP-managed) parameters over the
    sequence-parallel group, one collective per dtype, after every rank's backward pass."""
    if _group_size(group) == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in model.parameters():
        if param.grad is not None:
            by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        for grad, summed in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(summed.view_as(grad))


__all__ = ["SequenceParallelLoss", "UlyssesAttention", "all_to_all", "check_sequence_length",
           "check_sequence_parallel", "document_mask", "enable_ulysses",
           "new_sequence_parallel_group", "sequence_parallel_loss", "shard_batch",
           "sum_gradients"]
