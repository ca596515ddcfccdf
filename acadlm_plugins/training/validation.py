"""Per-domain validation loss: the signal dynamic batch loading steers by."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from acadlm_plugins.data.mixture import PackedDomainCorpus
from acadlm_plugins.data.packing import CROSS_ENTROPY_IGNORE_INDEX, collate_packs


def target_token_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
    """Summed cross-entropy and the number of counted tokens, per sequence, against targets
    already aligned with the positions (a sequence-parallel shard's, say); ignored targets
    count for nothing."""
    losses = F.cross_entropy(logits.float().transpose(1, 2), targets,
                             ignore_index=CROSS_ENTROPY_IGNORE_INDEX, reduction="none")
    counted = targets != CROSS_ENTROPY_IGNORE_INDEX
    return losses.sum(dim=1), counted.sum(dim=1)


def shifted_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
    """Summed next-token cross-entropy and the number of counted tokens, per sequence.

    Position t predicts ``labels[t + 1]``; ignored labels count for nothing.
    """
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1],
                                                        CROSS_ENTROPY_IGNORE_INDEX)], dim=1)
    return target_token_losses(logits, targets)


@torch.no_grad()
def evaluate_domain_losses(model: torch.nn.Module, corpus: PackedDomainCorpus, *,
                           batch_size: int, device: torch.device,
                           max_packs_per_domain: int | None = None, rank: int = 0,
                           world_size: int = 1, all_reduce: bool | None = None,
                           forward: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]
                           | None = None,
                           token_losses: Callable[[torch.nn.Module, dict[str, Any]],
                                                  tuple[torch.Tensor, torch.Tensor]]
                           | None = None, block_mask: bool = True) -> dict[str, float]:
    """Token-averaged validation loss of every domain of ``corpus``.

    The same packs are evaluated every time (the first ``max_packs_per_domain`` of each
    domain), so losses are comparable across steps. Packs are split across ranks and the sums
    all-reduced, so every rank returns the same numbers. ``token_losses(model, batch)``, when
    given, replaces ``forward`` + cross-entropy (e.g. a chunked loss that never builds the full
    logits). ``rank``/``world_size`` split the packs; ``all_reduce`` (default: when
    ``world_size > 1``) sums over every process, which sequence parallelism needs even with one
    data-parallel replica, since each rank then holds a shard of every sequence.

    ``block_mask``: whether a batch carries torchtune's document mask (``mask``), which the
    default forward hands the model. A caller whose model does not read it (per-document
    attention, attention without document masking) passes False: without FlexAttention that
    mask is a dense ``[b, S, S]`` boolean, 268 MB per pack at 16K tokens, built for nothing.
    """
    if all_reduce is None:
        all_reduce = world_size > 1
    forward = forward or _default_forward
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(corpus.domain_names), dtype=torch.float64)
    counts = torch.zeros(len(corpus.domain_names), dtype=torch.float64)
    for d, total in enumerate(corpus.num_packs):
        limit = total if max_packs_per_domain is None else min(total, max_packs_per_domain)
        mine = list(range(rank, limit, world_size))
        # Every rank must run the same number of forward passes (a sharded model gathers its
        # weights collectively), so ranks with fewer packs repeat a pack that counts zero.
        per_rank = -(-limit // world_size)
        counted = [True] * len(mine) + [False] * (per_rank - len(mine))
        mine = mine + [0] * (per_rank - len(mine))
        for start in range(0, per_rank, batch_size):
            keys = mine[start:start + batch_size]
            batch = collate_packs([corpus.get(d, p) for p in keys], block_mask=block_mask)
            batch = {k: v.to(device) for k, v in batch.items()}
            if token_losses is not None:
                loss_sum, count = token_losses(model, batch)
            else:
                loss_sum, count = shifted_token_losses(forward(model, batch), batch["labels"])
            keep = torch.tensor(counted[start:start + batch_size], device=loss_sum.device)
            sums[d] += (loss_sum * keep).sum().double().cpu()
            counts[d] += (count * keep).sum().double().cpu()
    if all_reduce and dist.is_available() and dist.is_initialized():
        both = torch.stack([sums, counts]).to(device)
        dist.all_reduce(both)
        sums, counts = both.cpu()
    model.train(was_training)
    return {name: float(sums[d] / counts[d].clamp(min=1))
            for d, name in enumerate(corpus.domain_names)}


def _default_forward(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return model(batch["tokens"], mask=batch.get("mask"), input_pos=batch.get("input_pos"))
