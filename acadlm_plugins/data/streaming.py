"""Tokenize a corpus onto disk and pack it lazily, so memory does not grow with the corpus.

:func:`stream_tokenize` encodes documents a group at a time and appends them to a flat
``tokens.bin`` (int32) with an ``offsets.npy`` (int64, one entry per document), written into
a hidden folder that is renamed into place when complete: a killed run never leaves a
half-written store that looks finished. Stores are cached under the same content key as
:func:`acadlm_plugins.data.tokenization.load_or_tokenize` (file bytes, tokenizer fingerprint,
text field, BOS/EOS), and read back with ``np.memmap``: the operating system pages tokens in
as packs are read. Memory while tokenizing is one chunk of tokens (``chunk_tokens``) plus
the tokenizer's working memory for one batch of texts (``batch_chars``, or the longest single
document); after, it is a few int64 per document and per pack.

:class:`StreamingPackedSequences` has the interface of
:class:`~acadlm_plugins.data.packing.PackedSequences` (``len``, ``max_seq_len``, ``sample``,
``stats``), so :class:`~acadlm_plugins.data.mixture.PackedDomainCorpus` and the mixture
dataset and sampler use it unchanged, and it yields exactly the samples ``pack_documents``
yields for the same documents. It never copies the tokens: a length filter (``min_tokens``,
``max_tokens``) selects documents, ``piece_tokens`` optionally cuts each selected document into
pieces that pack as documents of their own (ProLong's 64K sequences of long documents), and
packs address the virtual concatenation of the selected documents or pieces. Its :meth:`~StreamingPackedSequences.content_digest` names the packs' content (the store's
content key with the filter and packing), so a resumed run can refuse changed data without
hashing the tokens again. ``split`` packs are computed on demand from the offsets (``np.searchsorted``); ``whole``
packs come from a plan (first/last document and fill of every pack) made in one pass over the
document lengths.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import mmap
import operator
import os
import shutil
import tempfile
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from acadlm_plugins.data.documents import iter_texts
from acadlm_plugins.data.packing import (
    CROSS_ENTROPY_IGNORE_INDEX,
    PackingMode,
    PackingStats,
    PositionMode,
    TokenizedDocuments,
    check_max_seq_len,
    check_token_accounting,
    packed_sample,
)
from acadlm_plugins.data.tokenization import (
    apply_umask_mode,
    corpus_cache_key,
    iter_token_arrays,
)
from acadlm_plugins.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TOKEN_DTYPE = np.dtype("<i4")
TOKENS_FILENAME = "tokens.bin"
OFFSETS_FILENAME = "offsets.npy"
STORE_SUFFIX = ".tokens"
DEFAULT_CHUNK_TOKENS = 1 << 22  # 16 MiB of int32 buffered before each write
DEFAULT_BATCH_CHARS = 1 << 20  # characters per encoding batch (Rust encodings cost ~100 B/token)

_scratch: dict[str, Path] = {}


# ----------------------------------------------------------------------------- token store


def stream_tokenize(files: Sequence[Path], tokenizer, *, text_field: str = "text",
                    cache_dir: str | Path | None = None, add_bos: bool = True,
                    add_eos: bool = True, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                    batch_chars: int = DEFAULT_BATCH_CHARS,
                    desc: str = "tokenizing") -> TokenizedDocuments:
    """Tokenized documents of ``files`` with their tokens memory-mapped from disk.

    The store is reused when ``cache_dir`` already holds one for the same content key.
    ``cache_dir=None`` writes into a private temporary folder removed when the process exits.
    Memory is bounded by ``chunk_tokens`` buffered tokens plus one encoding batch (up to 64
    texts, closed early at ``batch_chars`` characters; a single longer text is one batch).
    """
    return open_token_store(stream_token_store(
        files, tokenizer, text_field=text_field, cache_dir=cache_dir, add_bos=add_bos,
        add_eos=add_eos, chunk_tokens=chunk_tokens, batch_chars=batch_chars, desc=desc))


def stream_token_store(files: Sequence[Path], tokenizer, *, text_field: str = "text",
                       cache_dir: str | Path | None = None, add_bos: bool = True,
                       add_eos: bool = True, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                       batch_chars: int = DEFAULT_BATCH_CHARS,
                       desc: str = "tokenizing") -> Path:
    """The token store of ``files`` (written as :func:`stream_tokenize` says, or reused), named
    ``<content key><STORE_SUFFIX>``: the key (:func:`store_content_key`) is
    :func:`~acadlm_plugins.data.tokenization.corpus_cache_key`, a sha256 of the files' names and
    bytes, the tokenizer's fingerprint, the text field and the BOS/EOS choice."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else _scratch_dir()
    key = corpus_cache_key(files, tokenizer, text_field=text_field, add_bos=add_bos,
                           add_eos=add_eos)
    store = root / f"{key}{STORE_SUFFIX}"
    if token_store_is_complete(store):
        log.info("reusing token store %s", store)
    else:
        arrays = iter_token_arrays(iter_texts(files, text_field=text_field), tokenizer,
                                   add_bos=add_bos, add_eos=add_eos, desc=desc,
                                   batch_chars=batch_chars)
        write_token_store(arrays, store, chunk_tokens=chunk_tokens)
    return store


def store_content_key(store: str | Path) -> str:
    """The content key of a store made by :func:`stream_token_store` (its folder's name): the
    same key, the same tokens."""
    return Path(store).name.removesuffix(STORE_SUFFIX)


def write_token_store(documents: Iterable[np.ndarray], directory: str | Path, *,
                      chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Path:
    """Write ``documents`` (one array of token ids each) as a token store at ``directory``.

    At most ``chunk_tokens`` tokens (plus one document) are held before they are appended to
    ``tokens.bin``; the folder appears under its name only once both files are complete.
    """
    if chunk_tokens < 1:
        raise ConfigError("chunk_tokens", f"must be >= 1, got {chunk_tokens}.")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.exists() and not token_store_is_complete(directory):
        shutil.rmtree(directory)  # left by something else than this writer: start over
    partial = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.",
                                    suffix=".partial"))
    try:
        lengths = array("q")
        pending: list[np.ndarray] = []
        pending_tokens = 0
        with open(partial / TOKENS_FILENAME, "wb") as out:
            for ids in documents:
                pending.append(np.asarray(ids, dtype=TOKEN_DTYPE))
                lengths.append(len(ids))
                pending_tokens += len(ids)
                if pending_tokens >= chunk_tokens:
                    _append(out, pending)
                    pending, pending_tokens = [], 0
            _append(out, pending)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(np.asarray(lengths, dtype=np.int64), out=offsets[1:])
        np.save(partial / OFFSETS_FILENAME, offsets)
        apply_umask_mode(partial)  # mkdtemp made it 0700; a shared cache_dir needs the umask's
        try:
            os.rename(partial, directory)
        except OSError:
            if not token_store_is_complete(directory):  # not a concurrent writer's store
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return directory


def open_token_store(directory: str | Path) -> TokenizedDocuments:
    """The documents of a token store, tokens memory-mapped read-only, offsets in memory."""
    directory = Path(directory)
    if not token_store_is_complete(directory):
        raise DataError(f"{directory}: not a complete token store (tokens.bin and offsets.npy "
                        "of matching sizes). Fix: delete it; it is rebuilt on the next run.")
    offsets = np.load(directory / OFFSETS_FILENAME)
    total = int(offsets[-1])
    if total == 0:  # an empty file cannot be memory-mapped
        return TokenizedDocuments(np.zeros(0, dtype=TOKEN_DTYPE), offsets)
    tokens = np.memmap(directory / TOKENS_FILENAME, dtype=TOKEN_DTYPE, mode="r", shape=(total,))
    return TokenizedDocuments(tokens, offsets)


def token_store_is_complete(directory: str | Path) -> bool:
    """Whether ``directory`` holds both files of a token store, consistent with each other."""
    directory = Path(directory)
    tokens, offsets = directory / TOKENS_FILENAME, directory / OFFSETS_FILENAME
    if not (tokens.is_file() and offsets.is_file()):
        return False
    try:
        last = int(np.load(offsets, mmap_mode="r")[-1])
    except (ValueError, OSError, IndexError):
        return False
    return tokens.stat().st_size == last * TOKEN_DTYPE.itemsize


def _append(out, arrays: list[np.ndarray]) -> None:
    if arrays:
        np.concatenate(arrays).tofile(out)


def _scratch_dir() -> Path:
    """A per-process temporary folder for token stores, removed at exit by its creator."""
    if "dir" not in _scratch:
        path = Path(tempfile.mkdtemp(prefix="acadlm_tokens_"))
        owner = os.getpid()

        def remove() -> None:
            if os.getpid() == owner:  # not from a forked data-loader worker
                shutil.rmtree(path, ignore_errors=True)

        atexit.register(remove)
        _scratch["dir"] = path
    return _scratch["dir"]


# ----------------------------------------------------------------------------- lazy packing


@dataclass
class LengthFilterStats:
    """Which documents a length filter let through, what they weigh, and, when the documents
    are cut into pieces (``piece_tokens``), how many pieces were packed and what was dropped.

    Every token of the store is accounted for: ``tokens_total`` = ``tokens_kept`` (packed) +
    ``tokens_filtered_out`` (documents outside the length bounds) + ``tokens_dropped_in_pieces``
    (last pieces shorter than ``min_tokens``); :meth:`check` asserts it.
    """

    documents_total: int
    documents_kept: int
    tokens_total: int
    tokens_kept: int
    longest: int
    min_tokens: int
    max_tokens: int | None
    tokens_filtered_out: int = 0
    piece_tokens: int | None = None
    pieces_kept: int = 0
    pieces_dropped: int = 0
    tokens_dropped_in_pieces: int = 0

    def check(self) -> None:
        """Raise unless the kept, filtered-out and dropped tokens add up to the store's."""
        accounted = self.tokens_kept + self.tokens_filtered_out + self.tokens_dropped_in_pieces
        if accounted != self.tokens_total:
            raise AssertionError(f"the length filter accounts for {accounted:,} of "
                                 f"{self.tokens_total:,} tokens. This is a bug in "
                                 "acadlm_plugins.data.")

    def describe(self, name: str = "") -> str:
        """One log line: what the length filter kept and, with pieces, how many pieces were
        packed and dropped, each count followed by its tokens in all (never per piece)."""
        prefix = f"[{name}] " if name else ""
        bounds = f">= {self.min_tokens}" + (f" and <= {self.max_tokens}"
                                             if self.max_tokens is not None else "")
        if self.piece_tokens is None:
            return (f"{prefix}length filter ({bounds} tokens) kept {self.documents_kept} of "
                    f"{self.documents_total} documents, {self.tokens_kept:,} of "
                    f"{self.tokens_total:,} tokens (longest document: {self.longest:,} tokens)")
        kept_documents_tokens = self.tokens_kept + self.tokens_dropped_in_pieces
        return (f"{prefix}length filter ({bounds} tokens) kept {self.documents_kept} of "
                f"{self.documents_total} documents, {kept_documents_tokens:,} of "
                f"{self.tokens_total:,} tokens (longest document: {self.longest:,} tokens); cut "
                f"into pieces of {self.piece_tokens:,} tokens: {self.pieces_kept} pieces packed "
                f"({self.tokens_kept:,} tokens), {self.pieces_dropped} last pieces shorter "
                f"than {max(self.min_tokens, 1):,} tokens dropped "
                f"({self.tokens_dropped_in_pieces:,} tokens)")


class StreamingPackedSequences:
    """Fixed-length packs read on demand from (memory-mapped) tokenized documents.

    A drop-in for :class:`~acadlm_plugins.data.packing.PackedSequences`: ``sample(i)`` equals
    what ``pack_documents`` gives for the documents the length filter keeps (documents with
    ``min_tokens <= length <= max_tokens``; empty documents never take part), and ``stats``
    accounts for those documents; ``filter_stats`` says what the filter kept of all of them.

    ``piece_tokens``: cut every kept document into consecutive pieces of ``piece_tokens``
    tokens, each packed as a document of its own (its own segment: attention and the loss
    never cross from one piece into the next), as ProLong trains on long documents cut into
    64K-token sequences. A last piece shorter than ``max(min_tokens, 1)`` is dropped, as
    ProLong's packer drops pieces under its ``--min_length``; ``filter_stats`` counts the
    dropped pieces and their tokens. Later pieces start mid-document (no BOS is inserted: the
    tokens are never copied). ``piece_tokens`` must lie in ``[max(min_tokens, 1), max_seq_len]``.
    With ``min_tokens == piece_tokens`` every piece has exactly ``piece_tokens`` tokens, so when
    that divides ``max_seq_len``, ``split`` packs hold whole pieces only; a shorter last piece
    may straddle a ``split`` pack boundary like any document (``whole`` never cuts one).

    ``content_key``: a key that changes whenever ``docs``' tokens do (a token store's
    :func:`store_content_key`); :meth:`content_digest` rests on it, or, without one, on a hash of
    the tokens.
    """

    def __init__(self, docs: TokenizedDocuments, max_seq_len: int, pad_id: int, *,
                 mode: PackingMode = "split", min_tokens: int = 0,
                 max_tokens: int | None = None, piece_tokens: int | None = None,
                 content_key: str | None = None) -> None:
        max_seq_len = check_max_seq_len(max_seq_len)
        if mode not in ("split", "whole"):
            raise ConfigError("packing", f"unknown packing mode {mode!r}.",
                              "use 'split' or 'whole'.")
        check_length_bounds(min_tokens, max_tokens)
        check_piece_tokens(piece_tokens, min_tokens, max_seq_len)
        self.pad_id = int(pad_id)
        self.mode = mode
        self._docs = docs
        self._content_key = content_key
        self._digest: str | None = None
        self._min_tokens, self._max_tokens = min_tokens, max_tokens
        self._piece_tokens = None if piece_tokens is None else int(piece_tokens)
        self._max_seq_len = int(max_seq_len)
        lengths = np.diff(docs.offsets)
        keep = lengths >= max(min_tokens, 1)
        if max_tokens is not None:
            keep &= lengths <= max_tokens
        kept = np.flatnonzero(keep)
        starts = docs.offsets[:-1][kept]
        kept_lengths = lengths[kept]
        pieces_dropped = tokens_dropped = 0
        if self._piece_tokens is not None:
            starts, kept_lengths, pieces_dropped, tokens_dropped = _cut_into_pieces(
                starts, kept_lengths, self._piece_tokens, max(int(min_tokens), 1))
        self._phys_starts = starts  # where each kept document (or piece) lies on disk
        self._virt_offsets = np.zeros(len(starts) + 1, dtype=np.int64)  # in the concatenation
        np.cumsum(kept_lengths, out=self._virt_offsets[1:])
        self.filter_stats = LengthFilterStats(
            documents_total=docs.num_documents, documents_kept=len(kept),
            tokens_total=docs.num_tokens, tokens_kept=int(self._virt_offsets[-1]),
            longest=int(lengths.max()) if len(lengths) else 0, min_tokens=int(min_tokens),
            max_tokens=None if max_tokens is None else int(max_tokens),
            tokens_filtered_out=int(lengths[~keep].sum()), piece_tokens=self._piece_tokens,
            pieces_kept=len(starts) if self._piece_tokens is not None else 0,
            pieces_dropped=pieces_dropped, tokens_dropped_in_pieces=tokens_dropped)
        self.filter_stats.check()
        if mode == "split":
            self._plan = None
            num_packs, cuts_inside = self._count_split_packs()
            # What the packs cover of the concatenation (pack i holds [i*S, (i+1)*S)): less
            # than the kept tokens if too few packs were counted.
            tokens_out = min(num_packs * self._max_seq_len, int(self._virt_offsets[-1]))
        else:
            self._plan = _plan_whole_packs(kept_lengths, self._max_seq_len)
            num_packs = len(self._plan[0])
            # ceil(length / S) pieces per document, one cut between each (as pack_documents)
            cuts_inside = int(((kept_lengths - 1) // self._max_seq_len).sum())
            if int(self._plan[3].sum()) != int(self._virt_offsets[-1]):  # an invariant
                raise AssertionError("whole packing plan lost tokens")
            tokens_out = self._whole_plan_tokens()
        self._num_packs = num_packs
        self.stats = PackingStats(documents=len(starts), tokens_in=int(self._virt_offsets[-1]),
                                  tokens_out=tokens_out,
                                  pad_tokens=num_packs * self._max_seq_len - tokens_out,
                                  packs=num_packs, documents_split=cuts_inside,
                                  max_seq_len=self._max_seq_len, mode=mode)
        check_token_accounting(self.stats)

    def content_digest(self) -> str:
        """A sha256 that changes whenever the packs' tokens may have: over the documents'
        content key (else their tokens and offsets, read once) and the length filter, pieces
        and packing that select and lay them out. What a resumed run checks its data against (see
        :meth:`~acadlm_plugins.data.mixture.PackedDomainCorpus.content_digests`)."""
        if self._digest is None:
            digest = hashlib.sha256()
            if self._content_key is not None:
                digest.update(f"store {self._content_key}".encode())
            else:
                digest.update(np.ascontiguousarray(self._docs.offsets, dtype="<i8").data)
                tokens = self._docs.tokens
                block = 1 << 24
                for start in range(0, len(tokens), block):
                    digest.update(np.ascontiguousarray(tokens[start : start + block],
                                                       dtype=TOKEN_DTYPE).data)
            digest.update(f"|{self.mode}|{self._max_seq_len}|{self._min_tokens}|"
                          f"{self._max_tokens}".encode())
            if self._piece_tokens is not None:  # absent: the digests of earlier runs hold
                digest.update(f"|pieces {self._piece_tokens}".encode())
            self._digest = digest.hexdigest()
        return self._digest

    @property
    def documents(self) -> TokenizedDocuments:
        """The underlying documents (all of them; the filter only selects)."""
        return self._docs

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    def __len__(self) -> int:
        return self._num_packs

    def pack(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Pack ``index`` as (tokens of length ``max_seq_len``, segment lengths, pad start)."""
        index = operator.index(index)
        if index < 0:
            index += self._num_packs
        if not 0 <= index < self._num_packs:
            raise IndexError(f"pack {index} of {self._num_packs}")
        if self._plan is None:
            starts, lengths = self._split_pieces(index)
        else:
            starts, lengths = self._whole_pieces(index)
        row = np.full(self._max_seq_len, self.pad_id, dtype=np.int32)
        filled = self._gather(starts, lengths, row)
        segments = lengths if filled == self._max_seq_len else np.append(
            lengths, self._max_seq_len - filled)
        return row, segments, filled

    def sample(self, index: int, *, positions: PositionMode = "reset",
               ignore_index: int = CROSS_ENTROPY_IGNORE_INDEX) -> dict[str, torch.Tensor]:
        """Pack ``index`` as a torchtune packed sample, exactly as
        :meth:`PackedSequences.sample` builds it."""
        row, segments, filled = self.pack(index)
        return packed_sample(row, segments, filled, positions=positions,
                             ignore_index=ignore_index)

    def _count_split_packs(self) -> tuple[int, int]:
        total = int(self._virt_offsets[-1])
        num_packs = -(-total // self._max_seq_len)
        # A pack boundary cuts a document unless a kept document starts exactly there.
        inner_starts = self._virt_offsets[1:-1]
        aligned = int(np.count_nonzero(inner_starts % self._max_seq_len == 0))
        return num_packs, max(num_packs - 1 - aligned, 0)

    def _whole_plan_tokens(self) -> int:
        """The tokens the ``whole`` plan places, counted as :meth:`_whole_pieces` reads them
        (the kept documents a pack spans, or the one piece of a too-long document), for the
        accounting check: O(packs), no token is read."""
        first, stop, _, filled = self._plan
        spans = self._virt_offsets[stop] - self._virt_offsets[first]
        placed = np.where(stop - first == 1, np.minimum(filled, spans), spans)
        if len(placed) and int(placed.max()) > self._max_seq_len:
            raise AssertionError(f"a whole-mode pack plans {int(placed.max())} tokens, more than "
                                 f"{self._max_seq_len}. This is a bug in acadlm_plugins.data.")
        return int(placed.sum())

    def _split_pieces(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        offsets = self._virt_offsets
        begin = index * self._max_seq_len
        end = min(begin + self._max_seq_len, int(offsets[-1]))
        first = int(np.searchsorted(offsets, begin, side="right")) - 1
        stop = int(np.searchsorted(offsets, end, side="left"))
        lo = np.maximum(offsets[first:stop], begin)
        hi = np.minimum(offsets[first + 1 : stop + 1], end)
        return self._phys_starts[first:stop] + (lo - offsets[first:stop]), hi - lo

    def _whole_pieces(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        first_doc, stop_doc, skip, filled = (int(a[index]) for a in self._plan)
        if stop_doc - first_doc == 1:  # one document, or one piece of a too-long one
            return self._phys_starts[first_doc : first_doc + 1] + skip, np.array([filled])
        return (self._phys_starts[first_doc:stop_doc],
                np.diff(self._virt_offsets[first_doc : stop_doc + 1]))

    def _gather(self, starts: np.ndarray, lengths: np.ndarray, row: np.ndarray) -> int:
        """Copy the pieces into ``row``, one slice per run of pieces adjacent on disk."""
        if len(starts) == 0:
            return 0
        ends = starts + lengths
        breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1
        run_starts = starts[np.concatenate([[0], breaks])]
        run_ends = ends[np.concatenate([breaks - 1, [len(starts) - 1]])]
        tokens = self._docs.tokens
        position = 0
        for a, b in zip(run_starts.tolist(), run_ends.tolist()):
            row[position : position + b - a] = tokens[a:b]
            position += b - a
        return position

    def __getstate__(self) -> dict[str, Any]:
        # A memory map pickles as a full copy of the tokens; send where to reopen it instead
        # (data-loader workers started with "spawn" then map the same file).
        state = self.__dict__.copy()
        tokens = self._docs.tokens
        if isinstance(tokens, np.memmap) and isinstance(tokens.base, mmap.mmap) \
                and tokens.filename is not None:
            state["_docs"] = (tokens.filename, int(tokens.offset), len(tokens),
                              self._docs.offsets)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        docs = state["_docs"]
        if isinstance(docs, tuple):
            filename, offset, size, offsets = docs
            tokens = np.memmap(filename, dtype=TOKEN_DTYPE, mode="r", offset=offset,
                               shape=(size,))
            state["_docs"] = TokenizedDocuments(tokens, offsets)
        self.__dict__.update(state)


def check_length_bounds(min_tokens: int, max_tokens: int | None, *,
                        field: str = "") -> None:
    """Raise :class:`ConfigError` unless ``0 <= min_tokens <= max_tokens`` (max optional)."""
    prefix = f"{field}." if field else ""
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, (int, np.integer)) \
            or min_tokens < 0:
        raise ConfigError(f"{prefix}min_tokens", f"must be an integer >= 0, got {min_tokens!r}.")
    if max_tokens is None:
        return
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) \
            or max_tokens < max(min_tokens, 1):
        raise ConfigError(f"{prefix}max_tokens",
                          f"must be an integer >= max(min_tokens, 1) = {max(min_tokens, 1)}, "
                          f"got {max_tokens!r}.", "raise it, or leave it out for no upper bound.")


def check_piece_tokens(piece_tokens: int | None, min_tokens: int,
                       max_seq_len: int | None = None, *, field: str = "") -> None:
    """Raise :class:`ConfigError` (naming ``<field>.piece_tokens``) unless ``piece_tokens`` is
    None or an integer with ``max(min_tokens, 1) <= piece_tokens <= max_seq_len``.

    Below ``min_tokens`` every piece would be dropped as too short; above the sequence length a
    piece would be cut again by packing, so it would no longer be one document of a sequence.
    So with pieces ``min_tokens`` itself must fit a sequence: when it does not, the error names
    ``<field>.min_tokens`` (no ``piece_tokens`` could satisfy both bounds, and advice about
    ``piece_tokens`` would send the user from one bound to the other). ``max_seq_len=None``
    (not known yet, as when a plan reads an unresolved config) skips the upper bounds.
    """
    if piece_tokens is None:
        return
    key = f"{field}.piece_tokens" if field else "piece_tokens"
    if isinstance(piece_tokens, bool) or not isinstance(piece_tokens, (int, np.integer)) \
            or piece_tokens < 1:
        raise ConfigError(key, f"must be a positive integer (tokens per piece), got "
                          f"{piece_tokens!r}.", "e.g. `piece_tokens: 65536`, or leave it out to "
                          "pack whole documents.")
    if max_seq_len is not None and min_tokens > max_seq_len:
        raise ConfigError(f"{field}.min_tokens" if field else "min_tokens",
                          f"is {min_tokens:,}, longer than a sequence ({max_seq_len:,} tokens), "
                          "with piece_tokens set: a piece is at most a sequence long, so every "
                          "piece would be shorter than min_tokens and dropped.",
                          f"lower min_tokens to at most {max_seq_len} (ProLong: min_tokens and "
                          "piece_tokens both 65536), or leave piece_tokens out to pack whole "
                          "documents.")
    if piece_tokens < min_tokens:
        raise ConfigError(key, f"is {piece_tokens:,}, below min_tokens ({min_tokens:,}): every "
                          "piece would be shorter than min_tokens and dropped.",
                          "set piece_tokens >= min_tokens, or lower min_tokens, both at most "
                          "the sequence length (ProLong: both 65536).")
    if max_seq_len is not None and piece_tokens > max_seq_len:
        raise ConfigError(key, f"is {piece_tokens:,}, longer than a sequence ({max_seq_len:,} "
                          "tokens): packing would cut the pieces again.",
                          f"set piece_tokens <= {max_seq_len}, or leave it out to pack whole "
                          "documents.")


def _cut_into_pieces(starts: np.ndarray, lengths: np.ndarray, piece_tokens: int,
                     shortest: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Documents at ``starts`` of ``lengths`` cut into consecutive pieces of ``piece_tokens``.

    A last piece shorter than ``shortest`` is dropped. Returns the pieces' starts and lengths
    (in order, document by document), the number of dropped pieces and their tokens. Memory:
    a few int64 per piece.
    """
    full = lengths // piece_tokens
    rest = lengths - full * piece_tokens
    keep_rest = rest >= shortest  # shortest >= 1, so an empty rest is never a piece
    dropped = (rest > 0) & ~keep_rest
    counts = full + keep_rest
    total = int(counts.sum())
    document = np.repeat(np.arange(len(lengths)), counts)
    first = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(counts[:-1], out=first[1:])
    within = (np.arange(total, dtype=np.int64) - first[document]) * piece_tokens
    piece_starts = starts[document] + within
    piece_lengths = np.minimum(piece_tokens, lengths[document] - within)
    return (piece_starts.astype(np.int64), piece_lengths.astype(np.int64),
            int(dropped.sum()), int(rest[dropped].sum()))


def _plan_whole_packs(lengths: np.ndarray, max_seq_len: int) -> tuple[np.ndarray, ...]:
    """Greedy ``whole`` packing of documents of ``lengths``, in order, in one pass.

    Returns, per pack: first document, one past its last document, tokens skipped at the
    start of the first document (non-zero only for later pieces of a document longer than a
    pack) and tokens filled. A document that fits is never cut: when it does not fit in the
    current pack, that pack is closed (padded) and the document opens the next one.
    """
    first, stop, skip, filled = array("q"), array("q"), array("q"), array("q")
    open_first, used = -1, 0

    def close(next_doc: int) -> None:
        nonlocal open_first, used
        if used:
            first.append(open_first)
            stop.append(next_doc)
            skip.append(0)
            filled.append(used)
        open_first, used = -1, 0

    block = 1 << 16  # Python ints for one block of lengths at a time
    for base in range(0, len(lengths), block):
        for doc, length in enumerate(lengths[base : base + block].tolist(), start=base):
            if length > max_seq_len:
                close(doc)
                for begin in range(0, length, max_seq_len):
                    first.append(doc)
                    stop.append(doc + 1)
                    skip.append(begin)
                    filled.append(min(max_seq_len, length - begin))
                continue
            if used + length > max_seq_len:
                close(doc)
            if open_first < 0:
                open_first = doc
            used += length
    close(len(lengths))
    return tuple(np.asarray(a, dtype=np.int64) for a in (first, stop, skip, filled))


__all__ = ["LengthFilterStats", "StreamingPackedSequences", "check_length_bounds",
           "check_piece_tokens", "open_token_store", "store_content_key", "stream_token_store", "stream_tokenize",
           "token_store_is_complete", "write_token_store"]
