"""QuRating stage 5: train on the selection with torchtune's own recipes.

:func:`quality_selected_dataset` reads a folder written by ``acadlm-qurating-select``
(``<selection_dir>/<domain>/train.jsonl`` + ``selection.json``) through
:func:`acadlm_plugins.data.mixture.domain_mixture_dataset`: packed without dropping a token,
with per-document attention masks, every domain at its share of the selection. A stock recipe
uses it by ``_component_`` path::

    dataset:
      _component_: acadlm_plugins.qurating.dataset.quality_selected_dataset
      selection_dir: outputs/smollm2_qurating_select/selected
      max_seq_len: 2048
      packed: True

:func:`quality_weighted_dataset` skips the selection step: it draws documents straight from the
annotation shards, with replacement, with probability proportional to ``exp(s / tau)``, when the
dataset is built.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from acadlm_plugins.data.mixture import DomainMixtureDataset, _pad_id, domain_mixture_dataset
from acadlm_plugins.data.packing import (
    PackedSequences,
    PackingMode,
    PositionMode,
    TokenizedDocuments,
    pack_documents,
)
from acadlm_plugins.data.tokenization import tokenize_texts
from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.qurating.selection import (
    REPORT_NAME,
    SCORE_PREFIX,
    TOKENS_COLUMN,
    ScoreShards,
    SelectionConfig,
    check_sampling,
    combined_score,
    scan_corpus,
)

log = logging.getLogger(__name__)


def quality_selected_dataset(tokenizer, *, selection_dir: str, max_seq_len: int = 2048,
                             weights: Mapping[str, float] | None = None,
                             packing: PackingMode = "split", positions: PositionMode = "reset",
                             num_samples: int | None = None, seed: int = 0,
                             text_field: str = "text", cache_dir: str | None = None,
                             packed: bool = True) -> DomainMixtureDataset:
    """The packed documents of a QuRating selection, as a dataset for stock torchtune recipes.

    Args:
        tokenizer: a torchtune tokenizer with ``encode`` and ``pad_id``.
        selection_dir: a folder written by ``acadlm-qurating-select`` (``output_dir`` or
            ``uniform_output_dir`` of its config).
        max_seq_len: pack length in tokens.
        weights: ``{domain folder: weight}``; default (None) is each domain's share of the
            selection's packs, i.e. what the selection chose.
        packing, positions, num_samples, seed, text_field, cache_dir, packed: as in
            :func:`acadlm_plugins.data.mixture.domain_mixture_dataset`.
    """
    root = Path(selection_dir).expanduser()
    report = root / REPORT_NAME
    if not report.is_file():
        raise ConfigError("dataset.selection_dir", f"{root} is not a QuRating selection (no "
                          f"{REPORT_NAME}).",
                          "run `acadlm-qurating-select --config configs/smollm2/"
                          "qurating_select.yaml` first and point `selection_dir` at its "
                          "`output_dir`.")
    summary = json.loads(report.read_text(encoding="utf-8"))
    log.info("QuRating selection %s: %s documents, %s tokens (%s)", root,
             f"{summary['selected']['documents']:,}", f"{summary['selected']['tokens']:,}",
             summary["settings"]["mode"])
    return domain_mixture_dataset(tokenizer, data_dir=str(root), weights=weights, split="train",
                                  max_seq_len=max_seq_len, packing=packing, positions=positions,
                                  num_samples=num_samples, seed=seed, text_field=text_field,
                                  cache_dir=cache_dir, packed=packed)


class WeightedDocumentDataset(Dataset):
    """Packs of documents drawn by quality weight; a torchtune packed sample per index."""

    packed = True  # tells stock recipes to use padded_collate_packed

    def __init__(self, packs: PackedSequences, *, positions: PositionMode = "reset",
                 draws: int = 0, unique_documents: int = 0) -> None:
        self.packs = packs
        self.positions = positions
        self.draws = draws
        self.unique_documents = unique_documents

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self.packs):
            raise IndexError(index)
        return self.packs.sample(index, positions=self.positions)


def document_probabilities(shards: ScoreShards, criteria: Mapping[str, float], tau: float | str,
                           *, batch_size: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Global rows of the non-empty documents and their probabilities ``∝ exp(s / tau)``.

    ``s`` is the weighted sum of the criteria's z-scores, as in the selection. Holds one float64
    and one int64 per document (the whole corpus's weights are needed to draw from them).
    """
    config = SelectionConfig(scores_dir="", output_dir="", criteria=dict(criteria), tau=tau,
                             noise_key="row")
    sampling = check_sampling(config, shards.score_criteria(in_every_shard=False))
    shards.require(list(criteria), need_id=False)
    stats = scan_corpus(shards, list(sampling.weights), list(sampling.weights),
                        batch_size=batch_size)
    columns = [TOKENS_COLUMN, *(SCORE_PREFIX + c for c in sampling.weights)]
    rows, logits = [], []
    for _shard, start, batch in shards.iter_batches(columns, batch_size):
        live = batch.column(TOKENS_COLUMN).to_numpy() > 0
        rows.append(np.arange(start, start + batch.num_rows, dtype=np.int64)[live])
        if math.isinf(sampling.tau):
            logits.append(np.zeros(int(live.sum())))
        else:
            logits.append(combined_score(stats, batch, sampling.weights)[live] / sampling.tau)
    logit = np.concatenate(logits)
    weights = np.exp(logit - logit.max())
    return np.concatenate(rows), weights / weights.sum()


def _read_rows(shards: ScoreShards, rows: np.ndarray, column: str) -> dict[int, Any]:
    """``{global row: value of column}`` for sorted unique ``rows``, reading only their groups."""
    out: dict[int, Any] = {}
    for shard in shards.shards:
        reader = pq.ParquetFile(shard.path)
        group_start = shard.first_row
        for group, group_rows in enumerate(shard.row_group_rows):
            lo, hi = np.searchsorted(rows, [group_start, group_start + group_rows])
            if hi > lo:
                table = reader.read_row_group(group, columns=[column])
                local = rows[lo:hi] - group_start
                values = table.column(column).take(pa.array(local)).to_pylist()
                out.update(zip(rows[lo:hi].tolist(), values))
            group_start += group_rows
    return out


def quality_weighted_dataset(tokenizer, *, scores_dir: str, criteria: Mapping[str, float],
                             tau: float | str = 2.0, max_seq_len: int = 2048,
                             num_samples: int = 1000, seed: int = 0,
                             packing: PackingMode = "split", positions: PositionMode = "reset",
                             text_field: str = "text", packed: bool = True,
                             ) -> WeightedDocumentDataset:
    """``num_samples`` packs of documents drawn with replacement ``∝ exp(s / tau)`` from shards.

    No selection folder is needed: the probabilities come from the annotation shards, the
    documents are drawn (seeded) until their tokens fill ``num_samples`` packs, only the drawn
    documents' texts are read and tokenized, and they are packed in draw order (a document drawn
    twice appears twice). Unlike the selection, this is sampling *with* replacement, so a high
    ``s / tau`` repeats the best documents; ``tau: inf`` draws uniformly.

    Args:
        tokenizer: a torchtune tokenizer with ``encode`` and ``pad_id``.
        scores_dir: folder of the annotation shards ``scores-*.parquet``.
        criteria: ``{criterion: weight}`` as in the selection config.
        tau: temperature > 0, or ``inf`` for uniform.
        max_seq_len: pack length in tokens.
        num_samples: number of packs (the dataset's length).
        seed: seeds the draws.
        packing, positions: as in :func:`acadlm_plugins.data.packing.pack_documents`.
        text_field: the text column of the shards.
        packed: must be True; stock recipes read it to choose the collate.
    """
    if not packed:
        raise ConfigError("dataset.packed", "quality-weighted packs are always packed.",
                          "set `packed: True`.")
    if int(num_samples) < 1:
        raise ConfigError("dataset.num_samples", f"must be >= 1, got {num_samples}.")
    shards = ScoreShards.discover(scores_dir)
    if not shards.has_column(text_field):
        raise DataError(f"the shards in {scores_dir} have no `{text_field}` column. Fix: set "
                        "`dataset.text_field` to the text column.")
    rows, probs = document_probabilities(shards, criteria, tau)
    rng = np.random.default_rng(seed)
    wanted = int(num_samples) * max_seq_len
    drawn: list[np.ndarray] = []
    token_ids: dict[int, np.ndarray] = {}
    total = 0
    while total < wanted:
        # Draw about enough documents for the missing tokens (mean tokenized length so far).
        mean_len = total / sum(len(d) for d in drawn) if drawn else 256.0
        count = max(16, int(1.1 * (wanted - total) / max(mean_len, 1.0)) + 1)
        batch = rows[rng.choice(len(rows), size=count, p=probs)]
        new = np.setdiff1d(batch, np.fromiter(token_ids, dtype=np.int64, count=len(token_ids)))
        texts = _read_rows(shards, new, text_field)
        encoded = tokenize_texts((str(texts[r] or "") for r in new.tolist()), tokenizer,
                                 desc="tokenizing drawn documents")
        for i, r in enumerate(new.tolist()):
            token_ids[r] = encoded.document(i)
        drawn.append(batch)
        total += sum(len(token_ids[r]) for r in batch.tolist())
    sequence = np.concatenate(drawn)
    docs = TokenizedDocuments.from_lists([token_ids[int(r)] for r in sequence])
    packs = pack_documents(docs, max_seq_len, _pad_id(tokenizer), mode=packing)
    if len(packs) > num_samples:
        packs = _first_packs(packs, int(num_samples))
    log.info("quality-weighted: %d packs from %d draws of %d distinct documents",
             len(packs), len(sequence), len(token_ids))
    return WeightedDocumentDataset(packs, positions=positions, draws=len(sequence),
                                   unique_documents=len(token_ids))


def _first_packs(packs: PackedSequences, count: int) -> PackedSequences:
    return PackedSequences(tokens=packs.tokens[:count], segment_lens=packs.segment_lens[:count],
                           pad_start=packs.pad_start[:count], pad_id=packs.pad_id,
                           stats=packs.stats)


__all__ = ["WeightedDocumentDataset", "document_probabilities", "quality_selected_dataset",
           "quality_weighted_dataset"]
