"""Next-token loss without the full ``length x vocabulary`` logits.

At 16K tokens SmolLM2's logits alone take 16,384 x 49,152 x 4 bytes = 3.2 GB per sequence, and
autograd keeps them for the backward pass. torchtune's ``set_num_output_chunks`` splits the
output projection but still returns (and keeps) every chunk. Here the projection and the cross
entropy run one chunk of positions at a time under activation checkpointing: the forward pass
keeps only the hidden states, and the backward pass recomputes one chunk's logits at a time, so
the logits never take more than ``chunk_tokens x vocabulary`` floats.

The loss is computed inside the decoder's own forward (its ``unembed`` step is swapped for the
duration of one call), so wrappers that act around ``forward`` -- FSDP2 gathering the root
parameters, activation checkpointing of the layers -- see an ordinary call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from acadlm_plugins.data.packing import CROSS_ENTROPY_IGNORE_INDEX


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` moved one position left (position t predicts label t + 1); the last position
    predicts nothing."""
    pad = torch.full_like(labels[:, :1], CROSS_ENTROPY_IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, output) -> torch.Tensor:
    logits = output(hidden).float()
    return F.cross_entropy(logits.transpose(1, 2), targets,
                           ignore_index=CROSS_ENTROPY_IGNORE_INDEX, reduction="none").sum(dim=1)


def projected_token_losses(hidden: torch.Tensor, targets: torch.Tensor, output: Any, *,
                           chunk_tokens: int) -> torch.Tensor:
    """Summed float32 cross-entropy per sequence of final (normalized) hidden states, projected
    by ``output`` ``chunk_tokens`` positions at a time; with gradients, each chunk is
    recomputed in the backward pass, so one chunk's logits exist at a time."""
    total = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
    for start in range(0, hidden.shape[1], chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, hidden[:, piece], targets[:, piece], output,
                                       use_reentrant=False)
        else:
            total = total + _chunk_loss(hidden[:, piece], targets[:, piece], output)
    return total


def chunked_token_losses(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor, *,
                         chunk_tokens: int, mask: torch.Tensor | None = None,
                         input_pos: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and counted targets per sequence of a torchtune decoder.

    ``targets`` are already aligned with the positions (see :func:`shifted_targets`); ignored
    targets count for nothing. ``chunk_tokens`` positions are projected onto the vocabulary at
    a time.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")

    def loss_head(hidden: torch.Tensor) -> torch.Tensor:
        return projected_token_losses(model.norm(hidden), targets, model.output,
                                      chunk_tokens=chunk_tokens)

    model.unembed = loss_head  # an instance attribute shadows the method for this call only
    try:
        losses = model(tokens, mask=mask, input_pos=input_pos)
    finally:
        del model.unembed
    counted = (targets != CROSS_ENTROPY_IGNORE_INDEX).sum(dim=1)
    return losses, counted
