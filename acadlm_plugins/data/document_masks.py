"""Block-causal document masks for packed sequences, without an S x S step on the way.

torchtune's ``packed_block_causal_mask`` gives, where it uses FlexAttention, a ``BlockMask``
from torch's ``create_block_mask``. Uncompiled, that function first evaluates the mask at every
(query, key) pair into a dense ``[b, 1, S, S]`` boolean (with intermediates, about 10 bytes per
pair), and only then compresses it: 40 GiB at 64K tokens and terabytes at 512K, on every rank,
whatever the GPU. :func:`document_block_mask` builds the same ``BlockMask`` from the document
boundaries directly, per 128 x 128 block, in O(b x (S / 128)^2) memory (16 MiB of block
flags per sequence at 512K). Without FlexAttention the dense boolean is what SDPA needs, and
:func:`document_causal_mask` returns torchtune's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: FlexAttention's default block size (``torch.nn.attention.flex_attention``).
BLOCK_SIZE = 128


def document_ids(seq_lens: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[b, S]`` index of the segment each position belongs to; every row's segment lengths
    must sum to the same S (a pack's padding is a segment of its own)."""
    rows = [torch.repeat_interleave(torch.arange(len(lens)), torch.as_tensor(lens).long())
            for lens in seq_lens]
    if len({len(row) for row in rows}) != 1:
        raise ValueError(f"the packs' segment lengths sum to different totals "
                         f"{sorted({len(row) for row in rows})}; every pack must have one length")
    return torch.stack(rows)


def document_block_mask(seq_lens: Sequence[torch.Tensor], *, device: torch.device | str,
                        block_size: int = BLOCK_SIZE) -> Any:
    """The FlexAttention ``BlockMask`` that lets a position see the positions up to itself in
    its own document: the mask torchtune's ``packed_block_causal_mask`` describes, built from
    the segment boundaries without evaluating every (query, key) pair.

    A block of queries against a block of keys is skipped when it lies above the diagonal or
    the documents of the two do not overlap, computed without a mask when both lie in one
    document below the diagonal, and masked per pair (by the same rule) otherwise.
    """
    from torch.nn.attention.flex_attention import BlockMask

    ids = document_ids(seq_lens).to(device)
    length = ids.shape[1]
    blocks = -(-length // block_size)
    starts = torch.arange(blocks, device=device) * block_size
    ends = torch.clamp(starts + block_size, max=length) - 1
    first, last = ids[:, starts], ids[:, ends]  # [b, blocks]: documents are contiguous
    q_first, q_last = first[:, :, None], last[:, :, None]
    k_first, k_last = first[:, None, :], last[:, None, :]
    index = torch.arange(blocks, device=device)
    below = index[None, :, None] > index[None, None, :]
    on_diagonal = index[None, :, None] == index[None, None, :]
    overlapping = (below & (q_first <= k_last)) | on_diagonal
    whole = ((q_first == q_last) & (k_first == k_last) & (q_first == k_first) & below)
    if length % block_size:  # the last block is cut short: let the mask rule decide there
        whole[:, -1, :] = False
        whole[:, :, -1] = False
    partial = overlapping & ~whole

    def as_kv_blocks(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = chosen.sum(dim=-1, dtype=torch.int32)
        # the chosen key blocks first, in increasing order, then the rest (ignored)
        order = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[:, None], order[:, None]

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                 kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx >= kv_idx) & (ids[b, q_idx] == ids[b, kv_idx])

    kv_num_blocks, kv_indices = as_kv_blocks(partial)
    full_num_blocks, full_indices = as_kv_blocks(whole)
    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, full_num_blocks, full_indices,
                                    BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(length, length))


def document_causal_mask(seq_lens: Sequence[torch.Tensor]) -> Any:
    """The block-causal document mask our recipes hand the model: a ``BlockMask`` on CUDA where
    torchtune uses FlexAttention (:func:`document_block_mask`), else torchtune's dense
    ``[b, S, S]`` boolean for SDPA."""
    from torchtune.modules.attention_utils import create_block_causal_mask
    from torchtune.utils._import_guard import _SUPPORTS_FLEX_ATTENTION

    if _SUPPORTS_FLEX_ATTENTION:
        return document_block_mask(seq_lens, device="cuda")
    return create_block_causal_mask(seq_lens=list(seq_lens))
