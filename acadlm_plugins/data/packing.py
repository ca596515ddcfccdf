"""Pack tokenized documents into fixed-length sequences that remember where documents start.

torchtune 0.6.1's ``PackedDataset`` truncates each document to ``max_seq_len`` before packing
(on the Python standard library at 2048 tokens it keeps about a third of the tokens). Here no
token is ever dropped: in ``split`` mode documents are laid end to end and cut at pack
boundaries (a long document continues in the next pack); in ``whole`` mode a document that
fits is never cut and a pack is padded instead (a document longer than a pack is still split,
into full packs and a padded last piece). :class:`PackingStats` says how many tokens went in
and came out (counted from what was placed in the packs, not derived from the tokens in, and
checked against them by :func:`check_token_accounting`), and how many pack boundaries fall
inside documents.

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
        """One log line of the accounting; ``name`` (e.g. ``code/validation``) prefixes it."""
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

    With ``block_mask`` the batch also gets ``mask``, the block-causal document mask
    torchtune's ``packed_block_causal_mask`` describes (a FlexAttention ``BlockMask`` where
    torchtune uses flex attention, built without its dense S x S step, see
    :mod:`~acadlm_plugins.data.document_masks`; else a dense ``[b, S, S]`` boolean); the batch
    is what ``mixture.collate_domain_packs`` returns. Without it the batch is O(S) per pack, for attention that
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
        from acadlm_plugins.data.document_masks import document_causal_mask

        batch["mask"] = document_causal_mask(seq_lens)
    return batch


def check_max_seq_len(max_seq_len: object, *, field: str = "max_seq_len") -> int:
    """``max_seq_len`` as an int >= 2, or a :class:`ConfigError` naming ``field``: a string such
    as ``'2048'`` or a float would otherwise fail deep inside packing with a bare TypeError."""
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, (int, np.integer)):
        raise ConfigError(field, f"is {max_seq_len!r} ({type(max_seq_len).__name__}), not an "
                          "integer.", f"set `{field}` to a whole number of tokens, unquoted "
                          "(e.g. `max_seq_len: 2048`).")
    if max_seq_len < 2:
        raise ConfigError(field, f"must be at least 2, got {max_seq_len}.")
    return int(max_seq_len)


def check_token_accounting(stats: PackingStats) -> None:
    """Raise ``AssertionError`` unless the tokens counted in the packs (``tokens_out``, counted
    from what packing placed, independently of ``tokens_in``) equal the tokens read, and the
    pad count is consistent: packing must never lose or invent a token. An invariant, not a
    user error; it costs O(packs)."""
    positions = stats.packs * stats.max_seq_len
    if stats.tokens_out != stats.tokens_in or stats.pad_tokens != positions - stats.tokens_out \
            or stats.pad_tokens < 0:
        raise AssertionError(f"packing lost or invented tokens: {stats.tokens_in:,} read, "
                             f"{stats.tokens_out:,} placed in {stats.packs} packs of "
                             f"{stats.max_seq_len} with {stats.pad_tokens:,} pad "
                             f"({stats.describe()}). This is a bug in acadlm_plugins.data.")


def pack_documents(docs: TokenizedDocuments, max_seq_len: int, pad_id: int, *,
                   mode: PackingMode = "split") -> PackedSequences:
    """Pack ``docs`` into sequences of ``max_seq_len`` tokens without dropping any token."""
    max_seq_len = check_max_seq_len(max_seq_len)
    if mode == "split":
        packs, segments, pad_start, split = _pack_split(docs, max_seq_len)
    elif mode == "whole":
        packs, segments, pad_start, split = _pack_whole(docs, max_seq_len)
    else:
        raise ConfigError("packing", f"unknown packing mode {mode!r}.", "use 'split' or 'whole'.")
    tokens = np.full((len(packs), max_seq_len), pad_id, dtype=np.int32)
    # Tokens actually copied into each pack: the accounting's count, independent of the
    # packing's own bookkeeping (pad_start, segments), which is checked against it.
    placed_rows = np.zeros(len(packs), dtype=np.int64)
    for row, pieces in enumerate(packs):
        if pieces:
            joined = np.concatenate(pieces)
            tokens[row, : len(joined)] = joined
            placed_rows[row] = len(joined)
    _check_pack_bookkeeping(placed_rows, pad_start, segments, max_seq_len)
    placed = int(placed_rows.sum())
    stats = PackingStats(documents=docs.num_documents, tokens_in=docs.num_tokens,
                         tokens_out=placed, pad_tokens=len(packs) * max_seq_len - placed,
                         packs=len(packs), documents_split=split, max_seq_len=max_seq_len,
                         mode=mode)
    check_token_accounting(stats)
    return PackedSequences(tokens, segments, np.asarray(pad_start, dtype=np.int64), pad_id, stats)


def _check_pack_bookkeeping(placed_rows: np.ndarray, pad_start: Sequence[int],
                            segments: Sequence[np.ndarray], max_seq_len: int) -> None:
    """Raise ``AssertionError`` unless every pack's padding starts where its placed tokens end
    and the segment lengths cover the packs exactly (vectorized: O(packs) in NumPy)."""
    starts = np.asarray(pad_start, dtype=np.int64)
    wrong = np.flatnonzero(starts != placed_rows)
    if len(wrong):
        row = int(wrong[0])
        raise AssertionError(f"pack {row}: {placed_rows[row]} tokens placed but padding from "
                             f"{starts[row]}. This is a bug in acadlm_plugins.data.")
    covered = int(np.concatenate(segments).sum()) if len(segments) else 0
    if covered != len(placed_rows) * max_seq_len:
        raise AssertionError(f"the segment lengths cover {covered} positions of "
                             f"{len(placed_rows)} packs of {max_seq_len}. This is a bug in "
                             "acadlm_plugins.data.")


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
