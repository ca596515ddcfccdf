"""Exact block-causal attention for packed sequences, one document at a time.

torchtune masks cross-document attention with a FlexAttention block mask on GPUs that have it;
elsewhere it hands SDPA an explicit ``[b, s, s]`` boolean mask. That mask cannot skip the masked
blocks: measured on CPU (benchmarks/document_masking.py, 9 heads x 64, documents of 100-2000
tokens) it costs 2.1x the time of plain causal attention and 3.4x / 7x its memory at 8K / 16K,
although only 8-14% of the causal work lies inside documents. Running causal attention on each
document's slice instead gives the same result (to float rounding) at 0.2-0.3x the time of plain
causal attention.

:class:`DocumentAttention` swaps every attention module's ``_attention_call`` for that loop. The
caller gives it the segment lengths of the current batch (:meth:`DocumentAttention.set_seq_lens`)
and calls the model *without* a mask; the lengths stay set until the next batch, so activation
checkpointing recomputes the same attention in the backward pass.

:func:`without_document_masking` is the other arm of ProLong's document-masking ablation
(Gao et al. 2024; ``--single_seq`` in their code, which drops the document boundaries of a
pack): each pack is one causal sequence, so a token attends to the documents before it in the
pack.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "_attention_call")]


def segment_bounds(seq_lens: torch.Tensor) -> list[list[tuple[int, int]]]:
    """``[(start, end), ...]`` per sample from a ``[b, n]`` tensor of segment lengths (zeros are
    padding of the segment list, not segments)."""
    bounds = []
    for row in seq_lens.tolist():
        start, spans = 0, []
        for length in row:
            if length > 0:
                spans.append((start, start + int(length)))
                start += int(length)
        bounds.append(spans)
    return bounds


def without_document_masking(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` as plain causal language-model input over each whole pack: no ``mask`` and
    positions ``0 .. S-1``, whatever the pack's documents.

    Positions run on across documents because ProLong's model does so even with document
    masking (its RoPE is applied over the whole flattened pack, only attention is cut by
    document), and a pack read as one sequence then has nothing to restart at. Labels are left
    as they are: the first token of every document stays unscored, so both arms of the
    ablation train and validate on the same targets. (ProLong's ``--single_seq`` also scores
    that one token per document, the prediction of a new document's first token.)
    """
    out = {k: v for k, v in batch.items() if k != "mask"}
    tokens = batch["tokens"]
    out["input_pos"] = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return out


class DocumentAttention:
    """Per-document causal attention on every attention module of ``model``."""

    def __init__(self, model: nn.Module) -> None:
        self._modules = _attention_modules(model)
        if not self._modules:
            raise ValueError("the model has no torchtune attention modules to wrap")
        self._originals: list[Callable] = []
        self._bounds: list[list[tuple[int, int]]] | None = None
        for module in self._modules:
            self._originals.append(module._attention_call)
            module._attention_call = self._attend

    def set_seq_lens(self, seq_lens: torch.Tensor) -> None:
        """The segment lengths (``[b, n]``, zero-padded) of the batch the next calls see."""
        self._bounds = segment_bounds(seq_lens)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None,
                dropout_p: float = 0.0, is_causal: bool = True) -> torch.Tensor:
        if mask is not None:
            raise ValueError("DocumentAttention masks by document itself: call the model with "
                             "mask=None after set_seq_lens().")
        if self._bounds is None or len(self._bounds) != q.shape[0]:
            raise ValueError("DocumentAttention.set_seq_lens() was not given this batch's "
                             "segment lengths.")
        rows = []
        for b, spans in enumerate(self._bounds):
            if spans[-1][1] != q.shape[2]:
                raise ValueError(f"segment lengths cover {spans[-1][1]} tokens, the sequence "
                                 f"has {q.shape[2]}")
            pieces = [F.scaled_dot_product_attention(
                q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                dropout_p=dropout_p, is_causal=True) for s, e in spans]
            rows.append(torch.cat(pieces, dim=2))
        return torch.cat(rows, dim=0)

    def remove(self) -> None:
        """Put the original attention calls back."""
        for module, original in zip(self._modules, self._originals):
            module._attention_call = original
        self._bounds = None
