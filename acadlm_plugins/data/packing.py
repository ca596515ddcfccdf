"""Pack tokenized documents into fixed-length sequences that remember where documents start.

torchtune 0.6.1's ``PackedDataset`` truncates each document to ``max_seq_len`` before packing
(on the Python standard library at 2048 tokens it keeps about a third of the tokens). Here no
token is ever dropped: in ``split`` mode documents are laid end to end and cut at pack
boundaries (a long document continues in the next pack); in ``whole`` mode a document that
fits is never cut and a pack is padded instead (a document longer than a pack is still split,
into full packs and a padded last piece). :class:`PackingStats` says how many tokens went in
and came out, and how many pack boundaries fall inside documents.

Every pack carries its segment lengths, so attention can be masked per document (torchtune's
``padded_collate_packed`` turns them into a block-causal mask) and the loss never crosses a
document boundary: the label at the first token of every segment is ignored.

:func:`collate_packs` batches packs with the segment lengths only, and builds the mask only
when asked: without FlexAttention torchtune's mask is a dense ``[b, S, S]`` boolean tensor
(268 MB per pack at 16K tokens), which attention that masks by document itself never reads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from acadlm_plugins.errors import ConfigError

log = logging.getLogger(__name__)

CROSS_ENTROPY_IGNORE_INDEX = -100
PackingMode = Literal["split", "whole"]
PositionMode = Literal["reset", "continuous"]


@dataclass
class TokenizedDocuments:
    """Documents as one flat token array plus ``offsets`` (document i is tokens[o[i]:o[i+1]])."""

    tokens: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        # asanyarray: a np.memmap stays a memmap (no copy), so tokens may live on disk.
        self.tokens = np.asanyarray(self.tokens, dtype=np.int32)
        self.offsets = np.asanyarray(self.offsets, dtype=np.int64)

    @classmethod
    def from_lists(cls, docs: Sequence[Sequence[int]]) -> TokenizedDocuments:
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.fromiter((t for d in docs for t in d), dtype=np.int32, count=int(offsets[-1]))
        return cls(flat, offsets)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


@dataclass
class PackingStats:
    """Token accounting of one packing: nothing may disappear unseen."""

    documents: int
    tokens_in: int
    tokens_out: int
    pad_tokens: int
    packs: int
    # Pack boundaries that fall inside a document (it continues in the next pack), in either
    # mode: a document cut into k pieces counts k - 1.
    documents_split: int
    max_seq_len: int
    mode: str

    @property
    def efficiency(self) -> float:
        """Share of non-pad tokens among all pack positions."""
        total = self.tokens_out + self.pad_tokens
        return self.tokens_out / total if total else 0.0

    def describe(self, name: str = "") -> str:
        prefix = f"[{name}] " if name else ""
        return (f"{prefix}packed {self.documents} documents: {self.tokens_in:,} tokens in, "
                f"{self.tokens_out:,} tokens out, {self.pad_tokens:,} pad, {self.packs} packs of "
                f"{self.max_seq_len} ({self.efficiency:.2%} efficiency, mode={self.mode}, "
                f"{self.documents_split} cuts inside documents)")


@dataclass
class PackedSequences:
    """Fixed-length packs of tokens with the length of every segment inside each pack.

    ``segment_lens[i]`` sums to ``max_seq_len``; a trailing pad run is its own segment, as in
    torchtune's ``PackedDataset``, so ``padded_collate_packed`` can build the mask directly.
    ``pad_start[i]`` is where padding begins in pack i (``max_seq_len`` if there is none).
    """

    tokens: np.ndarray
    segment_lens: list[np.ndarray]
    pad_start: np.ndarray
    pad_id: int
    stats: PackingStats = field(repr=False)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.tokens.shape[1]

    def sample(self, index: int, *, positions: PositionMode = "reset",
               ignore_index: int = CROSS_ENTROPY_IGNORE_INDEX) -> dict[str, torch.Tensor]:
        """The pack at ``index`` as a torchtune packed sample (tokens, labels, input_pos, seq_lens).

        Labels equal the tokens (the recipe shifts them) except at the first token of every
        segment and on padding, where they are ``ignore_index``: after the shift, the last
        token of a document is never trained to predict the next document's first token.
        """
        return packed_sample(self.tokens[index], self.segment_lens[index],
                             int(self.pad_start[index]), positions=positions,
                             ignore_index=ignore_index)


def packed_sample(tokens: np.ndarray, segment_lens: np.ndarray, pad_start: int, *,
                  positions: PositionMode = "reset",
                  ignore_index: int = CROSS_ENTROPY_IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """One pack's tokens and segment lengths as a torchtune packed sample.

    Shared by every packed source (in memory or on disk), so they all label, mask and
    position a pack the same way; see :meth:`PackedSequences.sample`.
    """
    max_seq_len = len(tokens)
    tokens = torch.from_numpy(np.asarray(tokens).astype(np.int64))
    seq_lens = torch.from_numpy(np.asarray(segment_lens).astype(np.int64))
    starts = torch.cumsum(seq_lens, 0) - seq_lens
    labels = tokens.clone()
    labels[starts] = ignore_index
    labels[pad_start:] = ignore_index
    if positions == "reset":
        input_pos = torch.arange(max_seq_len) - torch.repeat_interleave(starts, seq_lens)
    elif positions == "continuous":
        input_pos = torch.arange(max_seq_len)
    else:
        raise ConfigError("positions", f"unknown mode {positions!r}.",
                          "use 'reset' (per document) or 'continuous'.")
    return {"tokens": tokens, "labels": labels, "input_pos": input_pos, "seq_lens": seq_lens}


def collate_packs(samples: Sequence[Mapping[str, Any]], *,
                  block_mask: bool = False) -> dict[str, torch.Tensor]:
    """Batch packed samples: ``tokens``, ``labels``, ``input_pos`` (``[b, S]``), ``seq_lens``
    (``[b, most segments]``, zero-padded) and ``domain`` when the samples carry one.

    With ``block_mask`` the batch also gets ``mask``, torchtune's block-causal document mask
    (``packed_block_causal_mask``: a FlexAttention ``BlockMask`` where torchtune uses flex
    attention, else a dense ``[b, S, S]`` boolean); the batch then equals
    ``mixture.collate_domain_packs``. Without it the batch is O(S) per pack, for attention that
    needs no mask (per-document attention, or plain causal attention over the pack).
    """
    if not samples:
        raise ValueError("collate_packs needs at least one sample")
    batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
             for key in ("tokens", "labels", "input_pos")}
    seq_lens = [torch.as_tensor(s["seq_lens"], dtype=torch.long) for s in samples]
    batch["seq_lens"] = torch.nn.utils.rnn.pad_sequence(seq_lens, batch_first=True)
    if all("domain" in s for s in samples):
        batch["domain"] = torch.tensor([int(s["domain"]) for s in samples], dtype=torch.long)
    if block_mask:
        from torchtune.modules.attention_utils import packed_block_causal_mask

        batch["mask"] = packed_block_causal_mask(seq_lens=seq_lens)
    return batch


def pack_documents(docs: TokenizedDocuments, max_seq_len: int, pad_id: int, *,
                   mode: PackingMode = "split") -> PackedSequences:
    """Pack ``docs`` into sequences of ``max_seq_len`` tokens without dropping any token."""
    if max_seq_len < 2:
        raise ConfigError("max_seq_len", f"must be at least 2, got {max_seq_len}.")
    if mode == "split":
        packs, segments, pad_start, split = _pack_split(docs, max_seq_len)
    elif mode == "whole":
        packs, segments, pad_start, split = _pack_whole(docs, max_seq_len)
    else:
        raise ConfigError("packing", f"unknown packing mode {mode!r}.", "use 'split' or 'whole'.")
    tokens = np.full((len(packs), max_seq_len), pad_id, dtype=np.int32)
    for row, pieces in enumerate(packs):
        if pieces:
            joined = np.concatenate(pieces)
            tokens[row, : len(joined)] = joined
    tokens_out = int(sum(int(p) for p in pad_start))
    stats = PackingStats(documents=docs.num_documents, tokens_in=docs.num_tokens,
                         tokens_out=tokens_out, pad_tokens=len(packs) * max_seq_len - tokens_out,
                         packs=len(packs), documents_split=split, max_seq_len=max_seq_len,
                         mode=mode)
    if stats.tokens_out != stats.tokens_in:  # an invariant, not a user error
        raise AssertionError(f"packing lost tokens: {stats.describe()}")
    return PackedSequences(tokens, segments, np.asarray(pad_start, dtype=np.int64), pad_id, stats)


def _pack_split(docs: TokenizedDocuments, max_seq_len: int):
    total = docs.num_tokens
    num_packs = -(-total // max_seq_len)
    doc_starts = docs.offsets[:-1][docs.offsets[:-1] < docs.offsets[1:]]  # skip empty docs
    packs, segments, pad_start = [], [], []
    split = 0
    for row in range(num_packs):
        begin, end = row * max_seq_len, min((row + 1) * max_seq_len, total)
        inner = doc_starts[(doc_starts > begin) & (doc_starts < end)]
        cuts = np.concatenate([[begin], inner, [end]])
        lens = np.diff(cuts)
        if end < total and not np.any(doc_starts == end):
            split += 1  # the last document of this pack continues in the next one
        filled = end - begin
        if filled < max_seq_len:
            lens = np.concatenate([lens, [max_seq_len - filled]])
        packs.append([docs.tokens[begin:end]])
        segments.append(lens)
        pad_start.append(filled)
    return packs, segments, pad_start, split


def _pack_whole(docs: TokenizedDocuments, max_seq_len: int):
    packs, segments, pad_start = [], [], []
    split = 0
    current: list[np.ndarray] = []
    lens: list[int] = []
    used = 0

    def close() -> None:
        nonlocal current, lens, used
        if not current:
            return
        seg = lens + ([max_seq_len - used] if used < max_seq_len else [])
        packs.append(current)
        segments.append(np.asarray(seg, dtype=np.int64))
        pad_start.append(used)
        current, lens, used = [], [], 0

    for i in range(docs.num_documents):
        doc = docs.document(i)
        if len(doc) == 0:
            continue
        if len(doc) > max_seq_len:
            split += (len(doc) - 1) // max_seq_len  # ceil(len / S) pieces, one cut between each
            close()
            for begin in range(0, len(doc), max_seq_len):
                piece = doc[begin : begin + max_seq_len]
                current, lens, used = [piece], [len(piece)], len(piece)
                close()
            continue
        if used + len(doc) > max_seq_len:
            close()
        current.append(doc)
        lens.append(len(doc))
        used += len(doc)
    close()
    return packs, segments, pad_start, split
