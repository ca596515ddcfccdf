"""Long/short data mixtures for long-context continued training, as ProLong trains.

ProLong (Gao, Wettig, Yen and Chen, 2024, "How to Train Long-Context Language Models
(Effectively)", arXiv:2410.02660) continues pretraining on a mix of *long* documents (code
repositories concatenated file by file, and books) with *short* high-quality data, packed into
long sequences with document masking: attention never crosses a document boundary. Its stage-1
mix gives 30% of the tokens to code repositories, 30% to books, 3% to textbooks and 37% to
short data spread over several sources; the default corpus has no textbooks, so their 3% go
to the short sources here (40%). Here every source is a set of local files with a
**token share** and a document length filter; the long sources keep only documents of at least
``min_tokens`` tokens (ProLong's long data is selected by length too).

ProLong's 512K stage also trains on long data as 64K-token sequences (``book-65536``,
``thestackv1_concat_by_repo-65536``: documents of at least 64K tokens cut into 64K pieces, 8 of
them packed into a 512K sequence with document masking). A source's ``piece_tokens`` does that
cut: each kept document becomes consecutive pieces of ``piece_tokens`` tokens, each packed and
masked as a document of its own; a last piece shorter than ``min_tokens`` is dropped (ProLong's
packer drops pieces under its ``--min_length``), and the log counts the dropped pieces and
their tokens.

With the default corpus of ``acadlm-defaults build`` the stage-1 mix maps to::

    dataset:
      _component_: acadlm_plugins.data.long_context.long_short_mixture
      max_seq_len: 8192
      cache_dir: ${oc.env:ACADLM_HOME}/token_cache   # stock recipes don't know ${acadlm_home:}
      sources:
        code_repos: {data_files: "${oc.env:ACADLM_HOME}/corpus/long/code_packages.jsonl",
                     share: 0.3}
        books: {data_files: "${oc.env:ACADLM_HOME}/corpus/long/books.jsonl", share: 0.3}
        short_code: {data_files: "${oc.env:ACADLM_HOME}/corpus/code/train.jsonl", share: 0.1}
        short_books: {data_files: "${oc.env:ACADLM_HOME}/corpus/books/train.jsonl", share: 0.1}
        short_scripture: {data_files: "${oc.env:ACADLM_HOME}/corpus/scripture/train.jsonl",
                          share: 0.1}
        short_docs: {data_files: "${oc.env:ACADLM_HOME}/corpus/docs/train.jsonl", share: 0.1}

(one package of ``long/code_packages.jsonl`` is one Python distribution, all its files
concatenated: our stand-in for a code repository; :func:`prolong_stage1_sources` builds this
mapping). Tokens are streamed to a memory-mapped store and packed lazily
(:mod:`acadlm_plugins.data.streaming`), so memory does not grow with the corpus. Every sample
carries ``domain``, the index of its source in ``dataset.domain_names``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf.errors import OmegaConfBaseException

from acadlm_plugins.data.documents import resolve_data_files
from acadlm_plugins.data.mixture import DomainMixtureDataset, PackedDomainCorpus, _pad_id
from acadlm_plugins.data.packing import PackingMode, PositionMode, TokenizedDocuments
from acadlm_plugins.data.streaming import (
    StreamingPackedSequences,
    check_length_bounds,
    check_piece_tokens,
    open_token_store,
    store_content_key,
    stream_token_store,
)
from acadlm_plugins.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SOURCE_KEYS = ("data_files", "share", "min_tokens", "max_tokens", "piece_tokens", "text_field")
PROLONG_STAGE1_SHARES = {"code_repos": 0.3, "books": 0.3, "short_code": 0.1,
                         "short_books": 0.1, "short_scripture": 0.1, "short_docs": 0.1}


def long_short_mixture(tokenizer, *, sources: Mapping[str, Mapping[str, Any]], max_seq_len: int,
                       packing: PackingMode = "split", positions: PositionMode = "continuous",
                       cache_dir: str | Path | None = None, seed: int = 0,
                       num_samples: int | None = None, text_field: str = "text",
                       packed: bool = True, config_key: str = "dataset") -> DomainMixtureDataset:
    """A packed, document-masked mixture of sources drawn by token share.

    Args:
        tokenizer: a torchtune tokenizer with ``encode`` (``encode_batch`` is used if present)
            and ``pad_id``.
        sources: ``{name: {data_files, share, min_tokens=0, max_tokens=None,
            piece_tokens=None, text_field?}}``. ``data_files`` is a path, glob, directory or
            list of them; ``share`` the share of the *tokens* trained on (normalized over
            sources); only documents with ``min_tokens <= length <= max_tokens`` tokens take
            part (``max_tokens`` drops longer documents, it does not cut them);
            ``piece_tokens`` cuts each of them into consecutive pieces of that many tokens,
            each its own document for packing and masking, dropping a last piece shorter than
            ``min_tokens`` (at most ``max_seq_len``). A source with share 0 is not read at all.
        max_seq_len: pack length in tokens.
        packing: ``split`` (documents laid end to end, cut at pack boundaries) or ``whole``
            (a document that fits is never cut; the pack is padded instead).
        positions: ``continuous`` positions over the pack, or ``reset`` at each document.
        cache_dir: where token stores are kept between runs; ``None``: a temporary folder.
        seed: seeds the source schedule and the pack order within each source.
        num_samples: length of the dataset; default the total number of packs.
        text_field: the text field of the data files, unless a source sets its own.
        packed: must be True; stock recipes read it to choose ``padded_collate_packed``.
        config_key: the config key of this block, so that errors name the field the user
            wrote (``validation_dataset.sources.books.share``); a recipe passes it when it
            builds the block.

    A source's packs are drawn with probability proportional to ``share / efficiency``, so
    that its share of the real (non-pad) tokens, not of the packs, is ``share``.
    """
    if not packed:
        raise ConfigError(f"{config_key}.packed", "long/short mixtures are always packed.",
                          "set `packed: True` (stock recipes then use padded_collate_packed).")
    if packing not in ("split", "whole"):
        raise ConfigError(f"{config_key}.packing", f"unknown packing mode {packing!r}.",
                          "use 'split' or 'whole'.")
    if positions not in ("reset", "continuous"):
        raise ConfigError(f"{config_key}.positions", f"unknown mode {positions!r}.",
                          "use 'continuous' (over the pack) or 'reset' (per document).")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ConfigError(f"{config_key}.max_seq_len", f"must be an integer >= 2, got {max_seq_len!r}.")
    specs = _checked_sources(sources, text_field, config_key, max_seq_len)
    pad_id = _pad_id(tokenizer)
    stores: dict[tuple[tuple[str, ...], str], tuple[TokenizedDocuments, str]] = {}
    packs: dict[str, StreamingPackedSequences] = {}
    for name, spec in specs.items():
        key = (tuple(str(f) for f in spec["files"]), spec["text_field"])
        if key not in stores:  # two sources over the same files share one token store
            store = stream_token_store(spec["files"], tokenizer, text_field=spec["text_field"],
                                       cache_dir=cache_dir, desc=f"tokenizing {name}")
            stores[key] = open_token_store(store), store_content_key(store)
        docs, content_key = stores[key]
        # The store's content key gives the packs a digest without reading the tokens again:
        # a resumed run refuses sources whose text changed (DomainBatchSampler).
        packs[name] = StreamingPackedSequences(docs, max_seq_len, pad_id, mode=packing,
                                               min_tokens=spec["min_tokens"],
                                               max_tokens=spec["max_tokens"],
                                               piece_tokens=spec["piece_tokens"],
                                               content_key=content_key)
        _require_documents(name, spec, packs[name], config_key)
    corpus = PackedDomainCorpus(packs, positions=positions)
    shares = np.asarray([specs[n]["share"] for n in corpus.domain_names])
    shares = shares / shares.sum()
    efficiency = np.asarray([packs[n].stats.efficiency for n in corpus.domain_names])
    weights = shares / efficiency
    weights = weights / weights.sum()
    dataset = DomainMixtureDataset(corpus, weights, num_samples=num_samples, seed=seed)
    _log_mixture(dataset, shares)
    return dataset


def mixture_efficiency(dataset: DomainMixtureDataset) -> float:
    """Expected share of real (non-pad) tokens among the positions of a drawn pack."""
    packs = [dataset.corpus.packs(name) for name in dataset.domain_names]
    return float(sum(w * p.stats.efficiency for w, p in zip(dataset.weights, packs)))


def prolong_stage1_sources(corpus_dir: str | Path | None = None, *,
                           long_min_tokens: int = 0) -> dict[str, dict[str, Any]]:
    """``sources`` for ProLong's stage-1 mix over the default corpus (see the module doc).

    ``long_min_tokens`` keeps only long-source documents of at least that many tokens.
    """
    if corpus_dir is None:
        from acadlm_plugins.defaults.paths import default_corpus_dir

        corpus_dir = default_corpus_dir()
    root = Path(corpus_dir).expanduser()
    files = {"code_repos": root / "long" / "code_packages.jsonl",
             "books": root / "long" / "books.jsonl",
             "short_code": root / "code" / "train.jsonl",
             "short_books": root / "books" / "train.jsonl",
             "short_scripture": root / "scripture" / "train.jsonl",
             "short_docs": root / "docs" / "train.jsonl"}
    return {name: {"data_files": str(path), "share": PROLONG_STAGE1_SHARES[name],
                   "min_tokens": long_min_tokens if name in ("code_repos", "books") else 0}
            for name, path in files.items()}


def _checked_sources(sources: Mapping[str, Mapping[str, Any]], text_field: str,
                     config_key: str = "dataset",
                     max_seq_len: int | None = None) -> dict[str, dict[str, Any]]:
    """Validate every source's settings and resolve its files, before any tokenization."""
    checked = check_source_settings(sources, text_field, config_key, max_seq_len)
    for name in [n for n, s in checked.items() if s["share"] == 0]:
        log.info("source %r has share 0: not read", name)
        del checked[name]
    for name, spec in checked.items():
        spec["data_files"] = sources[name]["data_files"]
        spec["files"] = resolve_data_files(spec["data_files"],
                                           field=f"{config_key}.sources.{name}.data_files")
    return checked


def check_source_settings(sources: Mapping[str, Mapping[str, Any]], text_field: str = "text",
                          config_key: str = "dataset",
                          max_seq_len: int | None = None) -> dict[str, dict[str, Any]]:
    """Every source's settings checked (known keys, a share, length bounds, pieces, text
    field), without looking for its files: what ``acadlm-plan`` can refuse before any data
    exists. ``max_seq_len`` (when known) bounds ``piece_tokens``."""
    if not isinstance(sources, Mapping) or not sources:
        raise ConfigError(f"{config_key}.sources", f"must map source names to settings, got "
                          f"{sources!r}.", "e.g. `sources: {books: {data_files: books.jsonl, "
                          "share: 0.3}, ...}`.")
    checked: dict[str, dict[str, Any]] = {}
    for name, spec in sources.items():
        field = f"{config_key}.sources.{name}"
        if not isinstance(spec, Mapping):
            raise ConfigError(field, f"must be a mapping with `data_files` and `share`, got "
                              f"{spec!r}.")
        unknown = sorted(set(spec) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(field, f"unknown keys {unknown}.", f"use only {list(SOURCE_KEYS)}.")
        for required in ("data_files", "share"):
            if required not in spec:
                raise ConfigError(f"{field}.{required}", "is missing.",
                                  "every source needs `data_files` and a token `share`.")
        share = spec["share"]
        share = math.nan if isinstance(share, bool) else share  # `true` is not a share
        try:
            share = float(share)
        except (TypeError, ValueError):
            share = math.nan
        if not math.isfinite(share) or share < 0:
            raise ConfigError(f"{field}.share", f"must be a finite number >= 0, got "
                              f"{spec['share']!r}.")
        min_tokens, max_tokens = spec.get("min_tokens", 0), spec.get("max_tokens")
        check_length_bounds(min_tokens, max_tokens, field=field)
        piece_tokens = spec.get("piece_tokens")
        check_piece_tokens(piece_tokens, min_tokens, max_seq_len, field=field)
        if not isinstance(spec.get("text_field", text_field), str):
            raise ConfigError(f"{field}.text_field", f"is {spec['text_field']!r}, not a field "
                              "name.", "name the text field of the data files, e.g. `text`.")
        checked[name] = {"share": share, "min_tokens": int(min_tokens),
                         "max_tokens": None if max_tokens is None else int(max_tokens),
                         "piece_tokens": None if piece_tokens is None else int(piece_tokens),
                         "text_field": spec.get("text_field", text_field)}
    if sum(s["share"] for s in checked.values()) <= 0:
        raise ConfigError(f"{config_key}.sources.{next(iter(checked))}.share",
                          f"every source has share 0 ({sorted(checked)}).",
                          "give at least one source a positive share.")
    return checked


def _check_mixture_arguments(arguments: Mapping[str, Any], key: str) -> None:
    """:func:`long_short_mixture`'s settings as a plan checks them (no file is read)."""
    if "sources" in arguments:  # the files are not looked at (nor a `???` among them read)
        check_source_settings(arguments["sources"], arguments.get("text_field", "text"), key,
                              _known_length(arguments))


def _known_length(arguments: Mapping[str, Any]) -> int | None:
    """``max_seq_len`` of a mixture's arguments when it resolves to an integer, else None (an
    interpolation a plan cannot resolve, or `???`: the run checks it when it builds)."""
    try:
        length = arguments.get("max_seq_len")
    except OmegaConfBaseException:
        return None
    if isinstance(length, bool) or not isinstance(length, int):
        return None
    return length


long_short_mixture.check_arguments = _check_mixture_arguments  # type: ignore[attr-defined]


def _require_documents(name: str, spec: Mapping[str, Any], packs: StreamingPackedSequences,
                       config_key: str = "dataset") -> None:
    kept = packs.filter_stats
    if kept.documents_kept:
        return
    field = f"{config_key}.sources.{name}"
    files = [str(f) for f in spec["files"]]
    if kept.documents_total == 0:
        raise DataError(f"`{field}.data_files`: {files} hold no document with text in field "
                        f"{spec['text_field']!r}. Fix: give the source data, or set its "
                        "`text_field`.")
    if kept.longest < spec["min_tokens"]:
        raise ConfigError(f"{field}.min_tokens",
                          f"no document of {files} has {spec['min_tokens']:,} tokens or more; "
                          f"the longest has {kept.longest:,}.",
                          f"lower `min_tokens` to at most {kept.longest}, or add longer "
                          "documents to `data_files`.")
    raise ConfigError(f"{field}.max_tokens",
                      f"no document of {files} has between {spec['min_tokens']:,} and "
                      f"{spec['max_tokens']:,} tokens.",
                      "raise `max_tokens` or lower `min_tokens`.")


def _log_mixture(dataset: DomainMixtureDataset, shares: np.ndarray) -> None:
    positions = tokens = 0
    for name, share, weight in zip(dataset.domain_names, shares, dataset.weights):
        packs = dataset.corpus.packs(name)
        log.info(packs.filter_stats.describe(name))
        log.info(packs.stats.describe(name))
        log.info("[%s] token share %.1f%% -> drawn for %.1f%% of the packs", name, 100 * share,
                 100 * weight)
        tokens += packs.stats.tokens_out
        positions += packs.stats.packs * packs.stats.max_seq_len
    log.info("long/short mixture of %d sources: %.2f%% of all pack positions hold tokens; "
             "%.2f%% of a drawn pack does on average (mixture efficiency)",
             len(dataset.domain_names), 100 * tokens / positions,
             100 * mixture_efficiency(dataset))


__all__ = ["PROLONG_STAGE1_SHARES", "long_short_mixture", "mixture_efficiency",
           "prolong_stage1_sources"]
