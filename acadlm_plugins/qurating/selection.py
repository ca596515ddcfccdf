"""QuRating stage 4: choose documents to a token budget, sampling by quality.

A document with z-normalised score ``s`` (a weighted sum of the per-criterion z-scores) is
drawn with probability proportional to ``exp(s / tau)``, without replacement, until the
selected documents hold the token budget. This is done with the Gumbel top-k trick: every
document gets the key ``s / tau + g`` with ``g`` standard Gumbel noise, and the documents are
taken in decreasing key order. Taking the first ``k`` keys is distributed exactly like ``k``
sequential draws without replacement with probabilities proportional to ``exp(s / tau)``
(Plackett-Luce), so a budget in tokens becomes "take keys in order until the budget is full".
``tau -> 0`` (``top_k: true``) is deterministic top-k by ``s``; ``tau = inf`` drops the score
and is a uniform random sample of documents (the baseline of the paper's comparisons).

**Per-domain budgets** (``domain_field``). QuRating's selection script can split the budget by
domain (``data_tools/select_subset.py --domain_field``): each domain gets the share of the budget
that it has of the corpus's tokens, and the sampling runs inside each domain up to that share.
The selection then keeps the corpus's domain mixture and only the documents within a domain
compete on quality. ``domain_field`` names the column whose values are the domains (a dotted
name such as ``meta.domain`` reads a field of a struct column); ``domain_weights`` replaces the
corpus shares with given ones. Each domain's share is rounded to whole tokens by largest
remainder, so the shares add up to the budget exactly. The documents keep their global keys (the
same noise as without strata), so a corpus of one domain gives the global selection, and the
uniform baseline is split the same way. Without ``domain_field`` the budget is filled from the
whole corpus, which lets the domain mixture drift towards the domains that score high.

The annotation shards are read three times with pyarrow, never all at once:

1. **moments**: per-criterion mean and standard deviation (for the z-scores), tokens and
   documents per domain (and per value of ``domain_field``), corpus size (to check the budget).
   Reads scores, ``num_tokens`` and the domain columns; never the texts. With ``noise_key:
   id`` it also reads the ids, the only read of them before pass 3, and keeps their 64-bit
   hashes (those of the documents with tokens, in row order: 8 bytes per document, 80 MB at
   10^7) for pass 2.
2. **keys**: the key of every document; only rows whose key can still be inside the budget
   are kept (a running threshold, below), so memory grows with the *selection* (at most about
   twice its documents plus one batch, 24 bytes each: float64 key, int64 row, int64 tokens),
   not with the corpus, and no text is read. Keys stay float64: in float32 (24-bit mantissa)
   10^7 keys would collide often enough to decide inclusions by row order instead of by
   noise. Also the z-score histograms of the whole corpus. The id-keyed noise is drawn from
   pass 1's hashes (the ids are not read or hashed again); once every key is drawn, the hashes
   are sorted in place and checked for uniqueness, then freed: two documents with one id would
   get the same noise and be selected or dropped together. Checking after pass 2 rather than
   after pass 1 lets one array serve both (the check destroys the row order the noise needs)
   at the cost of holding it through pass 2; a repeated id is still refused before anything
   is written.
3. **write**: a row group without a selected row is skipped; a row group holding at least one
   is read whole, all columns (texts included), and its selected rows are written as
   ``<out>/<domain>/train.jsonl`` (the corpus layout
   :func:`acadlm_plugins.data.mixture.domain_mixture_dataset` reads) with ``selection.json``
   and ``selection.png`` (what was kept), into a scratch folder that replaces ``<out>`` when it
   is complete. A row group of 10^5 rows almost always holds a selected row even at a budget
   of a few percent, so in practice most texts are read once.

The noise of a document is a hash of ``(seed, document id)`` (or of its global row number with
``noise_key: row``), not a draw from a stateful generator, so the selection does not depend on
the batch size, on how the corpus is split into shards or (with ids) on the order of the
shards. The ids must therefore be unique (a repeated one is refused, naming both rows);
``noise_key: row`` needs no ids. Exactly equal keys are ordered by row number.

Each pass shows a tqdm progress bar over the corpus's rows (``ACADLM_NO_PROGRESS=1`` hides it).

Running threshold (one per domain with ``domain_field``): after each batch, if the candidates
hold at least the budget, taking them by key and summing their tokens gives the key ``t`` of the
document that fills the budget (found by a weighted quickselect, not a full sort). A later
document with a key below ``t`` would come after that one and is never selected, so it is
dropped on sight; candidates below ``t`` are dropped at the next compaction (when the candidate
count has doubled since the last one, so the compactions cost O(n) overall).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from acadlm_plugins.defaults.paths import STAGING_KINDS, remove_stale_staging, stale_staging
from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.qurating import CRITERIA
from acadlm_plugins.training.config_checks import check_output_dir, config_value

log = logging.getLogger(__name__)

SHARD_PATTERN = "scores-*.parquet"
ANNOTATION_SUMMARY = "annotation.json"  # written by the annotation when every shard is done
ANNOTATION_PLAN = "annotation_plan.json"  # written when it starts
SCORE_PREFIX = "score_"
TOKENS_COLUMN = "num_tokens"
DOMAIN_COLUMN = "domain"
ID_COLUMN = "id"
MISSING_DOMAIN = "unknown"
REPORT_NAME = "selection.json"
PLOT_NAME = "selection.png"
SPLIT_FILENAME = "train.jsonl"
NOISE_KEYS = ("id", "row")
# The folder name acadlm_plugins.data.mixture.LONG_DOCUMENTS_DIRNAME skips; repeated here so that
# selecting does not import torch (a test checks that the two agree).
LOADER_SKIPPED_FOLDER = "long"
HISTOGRAM_EDGES = np.linspace(-4.0, 4.0, 81)  # z-scores; values outside land in the end bins
_MIN_COMPACTION = 1 << 16


# --------------------------------------------------------------------------------------------
# Settings


@dataclass
class SelectionConfig:
    """Everything a selection run reads from its config (see configs/smollm2/qurating_select.yaml).

    Attributes:
        scores_dir: folder of the annotation shards ``scores-<rank>-<NNNNN>.parquet``.
        output_dir: where the selection is written (``<domain>/train.jsonl`` + report).
        criteria: ``{criterion: weight}``; the score is ``sum(weight * z[criterion])``. One
            criterion with weight 1 is the paper's ``exp(z / tau)``; weights scale the score,
            so ``{a: 1, b: 1}`` is as sharp as halving ``tau``. Negative weights select against
            a criterion.
        budget_tokens: tokens to select, as the annotation counted them (``num_tokens``, the
            rater's tokenizer); the last document may cross it (see :func:`select`).
        budget_fraction: instead of ``budget_tokens``, a share of the corpus's tokens in (0, 1].
        tau: temperature > 0; ``"inf"`` or ``None`` is a uniform sample.
        top_k: deterministic top-k by score (the ``tau -> 0`` limit); ``tau`` is then ignored.
        seed: seeds the Gumbel noise.
        noise_key: ``id`` (noise from the ``id`` column, which must be unique: the same
            document gets the same noise however the corpus is sharded) or ``row`` (from the
            global row number: the position in the shards sorted by name).
        uniform_output_dir: if set, also write the uniform (``tau = inf``) selection at the
            same budget and seed there, for the comparison run. Neither folder may lie inside
            the other.
        domain_field: a column of the shards (``a.b``: field ``b`` of a struct column ``a``)
            whose values are domains: each domain gets its share of the budget and is sampled
            on its own (QuRating's ``--domain_field``). ``None``: one selection over the whole
            corpus.
        domain_weights: ``{domain: weight}`` splitting the budget instead of the corpus's
            token shares (normalised to sum to 1; a domain not listed gets nothing). Needs
            ``domain_field``.
        batch_size: rows per pyarrow batch (memory/speed only; the result does not depend on it).

    The typed settings are checked when the config is built (:meth:`__post_init__`), so a typo
    such as ``seed=abc`` or ``top_k=maybe`` stops the run before any shard is read.
    """

    scores_dir: str
    output_dir: str
    criteria: dict[str, float]
    budget_tokens: int | None = None
    budget_fraction: float | None = None
    tau: float | str | None = 2.0
    top_k: bool = False
    seed: int = 0
    noise_key: str = "id"
    uniform_output_dir: str | None = None
    domain_field: str | None = None
    domain_weights: dict[str, float] | None = None
    batch_size: int = 1 << 16

    def __post_init__(self) -> None:
        """Convert the typed settings with :func:`config_value`: a :class:`ConfigError` naming
        the key for a value that is not of its type. (The budget's presence is checked by
        :func:`check_budget_settings`: other readers, such as the weighted dataset, build a
        config without one.)"""
        self.budget_tokens = config_value(self.budget_tokens, "budget_tokens", int, minimum=1,
                                          allow_none=True)
        self.budget_fraction = config_value(self.budget_fraction, "budget_fraction", float,
                                            above=0, allow_none=True)
        self.top_k = config_value(self.top_k, "top_k", bool)
        self.seed = config_value(self.seed, "seed", int)
        self.batch_size = config_value(self.batch_size, "batch_size", int, minimum=1)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SelectionConfig:
        """Build from a config mapping, refusing unknown keys with the closest known one."""
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean `{close[0]}`?" if close else f"known keys: {known}."
                raise ConfigError(str(key), "is not a key the selection reads.", hint)
        for key in ("scores_dir", "output_dir", "criteria"):
            if values.get(key) in (None, ""):
                raise ConfigError(key, "is required.",
                                  "see configs/smollm2/qurating_select.yaml for an example.")
        return cls(**dict(values))


@dataclass(frozen=True)
class Sampling:
    """How one selection turns scores into keys: the checked, resolved settings."""

    weights: dict[str, float]
    tau: float  # math.inf for uniform; unused for top_k
    top_k: bool
    seed: int
    noise_key: str

    @property
    def mode(self) -> str:
        if self.top_k:
            return "top_k"
        return "uniform" if math.isinf(self.tau) else "sample"

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "criteria": dict(self.weights),
                "tau": None if self.top_k else ("inf" if math.isinf(self.tau) else self.tau),
                "top_k": self.top_k, "seed": self.seed, "noise_key": self.noise_key}


def parse_tau(tau: float | str | None, top_k: bool) -> float:
    """``tau`` as a float (``inf`` for uniform), with a fix-naming error for ``tau <= 0``."""
    if top_k:
        return 0.0
    if tau is None or (isinstance(tau, str) and tau.strip().lower() in ("inf", "infinity")):
        return math.inf
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise ConfigError("tau", f"{tau!r} is not a number.",
                          "give a temperature > 0 (e.g. 2.0), `inf` for a uniform sample, or "
                          "set `top_k: true` for deterministic top-k.") from None
    if math.isnan(value) or value <= 0:
        raise ConfigError("tau", f"must be > 0, got {tau!r}.",
                          "tau -> 0 is deterministic top-k: say so with `top_k: true`; or use "
                          "a positive temperature (e.g. 2.0), or `inf` for a uniform sample.")
    return value


def check_sampling(config: SelectionConfig, available: Sequence[str]) -> Sampling:
    """Check criteria weights, tau, seed and noise key against the shards' score columns."""
    if not isinstance(config.criteria, Mapping) or not config.criteria:
        raise ConfigError("criteria", f"must be a non-empty mapping {{criterion: weight}}, got "
                          f"{config.criteria!r}.", "e.g. `criteria: {educational_value: 1.0}`.")
    known = list(dict.fromkeys([*CRITERIA, *available]))
    weights: dict[str, float] = {}
    for name, weight in config.criteria.items():
        name = str(name)
        if name not in available:
            if name in CRITERIA:
                continue  # a known criterion whose column is missing: ScoreShards names the file
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise ConfigError(f"criteria.{name}", f"unknown criterion {name!r}.",
                              f"{hint}criteria: {known} (the shards have score columns for "
                              f"{list(available)}).")
        try:
            weights[name] = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(f"criteria.{name}", f"weight {weight!r} is not a number.",
                              f"give criteria.{name} a number, e.g. 1.0.") from None
        if not math.isfinite(weights[name]):
            raise ConfigError(f"criteria.{name}", f"weight must be finite, got {weight!r}.")
    if weights and all(w == 0 for w in weights.values()):
        raise ConfigError("criteria", "all weights are 0.", "give one criterion a weight, e.g. 1.")
    if config.noise_key not in NOISE_KEYS:
        raise ConfigError("noise_key", f"unknown value {config.noise_key!r}.",
                          f"use one of {list(NOISE_KEYS)}.")
    if int(config.batch_size) < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {config.batch_size}.")
    tau = parse_tau(config.tau, bool(config.top_k))
    if config.top_k and config.tau not in (None, 0, 0.0):
        log.info("top_k: true selects the highest scores; tau=%s is ignored", config.tau)
    return Sampling(weights=weights, tau=tau, top_k=bool(config.top_k), seed=int(config.seed),
                    noise_key=config.noise_key)


def check_budget_settings(config: SelectionConfig) -> None:
    """Refuse both or neither of ``budget_tokens`` and ``budget_fraction``, a fraction
    outside (0, 1] and a token budget below 1: checks that need no corpus, made before any
    shard is read."""
    if (config.budget_tokens is None) == (config.budget_fraction is None):
        raise ConfigError("budget_tokens", "give exactly one of `budget_tokens` and "
                          "`budget_fraction`.", "e.g. `budget_tokens: 1000000` with "
                          "`budget_fraction: null`, or `budget_fraction: 0.5` with "
                          "`budget_tokens: null`.")
    if config.budget_fraction is not None and not 0 < config.budget_fraction <= 1:
        raise ConfigError("budget_fraction", f"must be in (0, 1], got {config.budget_fraction}.",
                          "it is the share of the corpus's tokens to select.")
    if config.budget_tokens is not None and config.budget_tokens < 1:
        raise ConfigError("budget_tokens", f"must be >= 1, got {config.budget_tokens}.")


def resolve_budget(config: SelectionConfig, corpus_tokens: int, corpus_documents: int,
                   num_shards: int) -> int:
    """The budget in tokens; an error naming the corpus size when it cannot be met."""
    check_budget_settings(config)
    if config.budget_fraction is not None:
        return max(1, math.ceil(config.budget_fraction * corpus_tokens))
    budget = int(config.budget_tokens)
    if budget > corpus_tokens:
        raise ConfigError(
            "budget_tokens",
            f"{budget:,} tokens is more than the corpus holds: {corpus_tokens:,} tokens in "
            f"{corpus_documents:,} documents ({num_shards} shards of {config.scores_dir}).",
            f"set `budget_tokens` to at most {corpus_tokens:,}, or use `budget_fraction` "
            "(a share of the corpus).")
    return budget


def check_domain_settings(config: SelectionConfig) -> None:
    """Refuse ``domain_weights`` without ``domain_field`` and a malformed ``domain_field``."""
    field_name = config.domain_field
    if field_name is not None and (not isinstance(field_name, str) or not field_name.strip(".")
                                   or "" in field_name.split(".")):
        raise ConfigError("domain_field", f"{field_name!r} is not a column name.",
                          "name the shards' domain column, e.g. `domain_field: domain` (or "
                          "`meta.domain` for a field of a struct column), or null.")
    if config.domain_weights is not None:
        if field_name is None:
            raise ConfigError("domain_weights", "is given but `domain_field` is not set, so "
                              "there are no domains to weight.",
                              "set `domain_field` (e.g. `domain`), or remove `domain_weights`.")
        if not isinstance(config.domain_weights, Mapping) or not config.domain_weights:
            raise ConfigError("domain_weights", f"must be a non-empty mapping {{domain: weight}}, "
                              f"got {config.domain_weights!r}.",
                              "e.g. `domain_weights: {web: 0.7, books: 0.3}`, or null for the "
                              "corpus's token shares.")


def domain_budgets(domain_tokens: Mapping[str, int], budget: int,
                   weights: Mapping[str, float] | None = None) -> dict[str, int]:
    """The token budget of every domain: ``budget`` split in proportion to the domains' tokens
    (QuRating's ``--domain_field``) or to ``weights``, in whole tokens adding up to ``budget``.

    Each domain first gets the floor of its exact share; the tokens left over go one each to
    the domains with the largest remainders (ties by name). With ``weights``, a listed domain
    the corpus does not have, a negative or non-finite weight, and a share larger than the
    domain's tokens are :class:`ConfigError`s; an unlisted domain gets 0.
    """
    domains = sorted(d for d, t in domain_tokens.items() if t > 0)
    if weights is None:
        raw = {d: float(domain_tokens[d]) for d in domains}
    else:
        unknown = sorted(str(d) for d in weights if str(d) not in domain_tokens)
        if unknown:
            close = difflib.get_close_matches(unknown[0], domains, n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise ConfigError(f"domain_weights.{unknown[0]}", f"the corpus has no domain "
                              f"{unknown[0]!r} in `domain_field`.",
                              f"{hint}its domains are {domains}.")
        raw = {}
        for name, weight in weights.items():
            try:
                value = float(weight)
            except (TypeError, ValueError):
                raise ConfigError(f"domain_weights.{name}", f"weight {weight!r} is not a "
                                  "number.") from None
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"domain_weights.{name}", f"weight must be finite and >= 0, "
                                  f"got {weight!r}.")
            raw[str(name)] = value
        left_out = [d for d in domains if d not in raw]
        if left_out:
            log.warning("domain_weights lists no weight for %s: nothing is selected from them",
                        left_out)
    total = sum(Fraction(w) for w in raw.values())
    if total <= 0:
        raise ConfigError("domain_weights", "all weights are 0.",
                          "give at least one domain a positive weight.")
    # Exact rational shares: the rounding below cannot be thrown off by float error.
    exact = {d: budget * Fraction(w) / total for d, w in raw.items()}
    for name, share in exact.items():
        if share > domain_tokens.get(name, 0):
            raise ConfigError(f"domain_weights.{name}", f"asks for {float(share):,.0f} tokens "
                              f"of domain {name!r}, which holds {domain_tokens.get(name, 0):,}.",
                              "lower its weight or the budget.")
    budgets = {d: math.floor(v) for d, v in exact.items()}
    spare = budget - sum(budgets.values())  # < the number of domains with a fractional share
    by_remainder = sorted((d for d in exact if exact[d] > budgets[d]),
                          key=lambda d: (-(exact[d] - budgets[d]), d))
    for name in by_remainder[:spare]:
        budgets[name] += 1
    return {d: budgets.get(d, 0) for d in sorted(set(domains) | set(budgets))}


# --------------------------------------------------------------------------------------------
# Shards


@dataclass(frozen=True)
class Shard:
    """One annotation shard: its path, where its rows start globally, its row groups."""

    path: Path
    first_row: int
    num_rows: int
    row_group_rows: tuple[int, ...]
    columns: frozenset[str]


class ScoreShards:
    """The annotation shards of one corpus, in file-name order, addressed by global row."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        shards: list[Shard] = []
        first = 0
        for raw in paths:
            path = Path(raw)
            try:
                meta = pq.ParquetFile(path).metadata
            except (OSError, pa.ArrowInvalid) as err:
                raise DataError(f"{path}: not a readable parquet file ({err}). Fix: re-run the "
                                "annotation for this shard, or remove it.") from None
            groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
            columns = frozenset(meta.schema.to_arrow_schema().names)
            shards.append(Shard(path, first, meta.num_rows, groups, columns))
            first += meta.num_rows
        if not shards:
            raise DataError("no score shards given. Fix: point `scores_dir` at the annotation "
                            f"output ({SHARD_PATTERN}).")
        self.shards = shards

    @classmethod
    def discover(cls, scores_dir: str | Path) -> ScoreShards:
        """The ``scores-*.parquet`` files of ``scores_dir``, sorted by name."""
        root = Path(scores_dir).expanduser()
        if not root.is_dir():
            raise ConfigError("scores_dir", f"{root} is not a directory.",
                              "point it at the annotation's output_dir (it holds "
                              f"{SHARD_PATTERN}).")
        paths = sorted(root.glob(SHARD_PATTERN))
        if not paths:
            raise ConfigError("scores_dir", f"{root} holds no {SHARD_PATTERN} files.",
                              "run the annotation first (tune run acadlm_plugins/"
                              "annotate_recipe), or point `scores_dir` at its output_dir.")
        _check_annotation_finished(root, len(paths))
        return cls(paths)

    @property
    def num_rows(self) -> int:
        return self.shards[-1].first_row + self.shards[-1].num_rows

    def score_criteria(self, *, in_every_shard: bool = True) -> list[str]:
        """Criteria with a ``score_<criterion>`` column in every shard (or in any shard)."""
        combine = set.intersection if in_every_shard else set.union
        found = combine(*(set(s.columns) for s in self.shards))
        return sorted(c[len(SCORE_PREFIX):] for c in found if c.startswith(SCORE_PREFIX))

    def has_column(self, column: str) -> bool:
        return all(column in s.columns for s in self.shards)

    def require_domain_field(self, domain_field: str) -> None:
        """Raise :class:`ConfigError` naming the first shard without ``domain_field``'s column
        (the part before the first dot)."""
        top = domain_field.split(".")[0]
        for shard in self.shards:
            if top not in shard.columns:
                raise ConfigError("domain_field", f"{shard.path} has no column {top!r} (its "
                                  f"columns: {sorted(shard.columns)}).",
                                  "name a column the annotation kept from the corpus, e.g. "
                                  "`domain`, or set `domain_field: null` for one selection over "
                                  "the whole corpus.")

    def require(self, criteria: Sequence[str], *, need_id: bool) -> None:
        """Raise :class:`DataError` naming the first shard without a needed column."""
        for shard in self.shards:
            for name in criteria:
                if SCORE_PREFIX + name not in shard.columns:
                    have = sorted(c for c in shard.columns if c.startswith(SCORE_PREFIX))
                    raise DataError(
                        f"{shard.path}: no column `{SCORE_PREFIX}{name}` for criterion {name!r} "
                        f"(config `criteria.{name}`); its score columns are {have}. Fix: "
                        f"annotate with a rater that has the criterion {name!r}, or remove "
                        f"`{name}` from `criteria`.")
            if TOKENS_COLUMN not in shard.columns:
                raise DataError(f"{shard.path}: no `{TOKENS_COLUMN}` column. Fix: these are not "
                                "annotation shards; re-run the annotation.")
            if need_id and ID_COLUMN not in shard.columns:
                raise DataError(f"{shard.path}: no `{ID_COLUMN}` column, which `noise_key: id` "
                                "hashes. Fix: set `noise_key: row` (noise from the row number).")

    def iter_batches(self, columns: Sequence[str], batch_size: int, *, desc: str | None = None,
                     read_dictionary: Sequence[str] = ()
                     ) -> Iterator[tuple[Shard, int, pa.RecordBatch]]:
        """``(shard, global index of the batch's first row, batch)`` over every shard; with
        ``desc``, a progress bar over the corpus's rows (see :func:`progress_bar`). The string
        columns named in ``read_dictionary`` come as dictionary arrays (pyarrow then need not
        build a string per row)."""
        bar = progress_bar(self.num_rows, desc) if desc is not None else None
        try:
            for shard in self.shards:
                start = shard.first_row
                reader = pq.ParquetFile(shard.path, read_dictionary=list(read_dictionary) or None)
                for batch in reader.iter_batches(batch_size=batch_size, columns=list(columns)):
                    yield shard, start, batch
                    start += batch.num_rows
                    if bar is not None:
                        bar.update(batch.num_rows)
        finally:
            if bar is not None:
                bar.close()


def progress_bar(total_rows: int, desc: str) -> tqdm:
    """A tqdm bar over ``total_rows`` documents, as the other long loops of the package show
    one; ``ACADLM_NO_PROGRESS=1`` (tests, batch jobs) hides it."""
    return tqdm(total=total_rows, desc=desc, unit="doc", unit_scale=True, dynamic_ncols=True,
                disable=os.environ.get("ACADLM_NO_PROGRESS") == "1")


def _check_annotation_finished(root: Path, found: int) -> None:
    """Compare the shards found with the annotation's own summary, when it wrote one.

    The annotation writes ``annotation.json`` (with ``shards_total``) only when every shard is
    done; while it runs, or after ``max_shards`` stopped it, only its plan file is there.
    Selecting then is allowed (a deliberate subset) but said loudly.
    """
    summary = root / ANNOTATION_SUMMARY
    if summary.is_file():
        try:
            total = json.loads(summary.read_text(encoding="utf-8")).get("shards_total")
        except (OSError, json.JSONDecodeError):
            total = None
        if isinstance(total, int) and total != found:
            raise DataError(f"{summary} says the annotation wrote {total} shards, but {root} "
                            f"holds {found} {SHARD_PATTERN} files. Fix: restore the missing "
                            "shards (re-running the same annotation rescores them), or remove "
                            "the stray ones.")
    elif (root / ANNOTATION_PLAN).is_file():
        log.warning("%s has no %s: the annotation has not finished; selecting from the %d "
                    "shards written so far", root, ANNOTATION_SUMMARY, found)


# --------------------------------------------------------------------------------------------
# Pass 1: moments and domains


@dataclass
class Moments:
    """Count, mean and sum of squared deviations, merged batch by batch (Chan et al.)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: np.ndarray) -> None:
        n = int(values.size)
        if n == 0:
            return
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0


@dataclass
class CorpusStats:
    """What pass 1 learns: corpus size, per-criterion moments, tokens and documents per domain."""

    documents: int = 0
    empty_documents: int = 0
    tokens: int = 0
    moments: dict[str, Moments] = field(default_factory=dict)
    domain_tokens: dict[str, int] = field(default_factory=dict)
    domain_documents: dict[str, int] = field(default_factory=dict)
    stratum_tokens: dict[str, int] = field(default_factory=dict)  # per value of domain_field
    stratum_documents: dict[str, int] = field(default_factory=dict)
    # The 64-bit id hashes of the documents with tokens, in row order (scan_corpus with
    # unique_ids): pass 2 draws the noise from them instead of hashing the ids again, then
    # checks and drops them (plan_selections). None: not collected, or already used.
    id_hashes: np.ndarray | None = field(default=None, repr=False, compare=False)

    def z(self, criterion: str, values: np.ndarray) -> np.ndarray:
        """z-scores of raw ``values`` of ``criterion`` (0 for a constant criterion)."""
        m = self.moments[criterion]
        std = m.std
        if std == 0:
            return np.zeros_like(values, dtype=np.float64)
        return (values - m.mean) / std


def _scores(batch: pa.RecordBatch, criterion: str) -> np.ndarray:
    column = batch.column(SCORE_PREFIX + criterion)
    return column.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _tokens(shard: Shard, batch: pa.RecordBatch) -> np.ndarray:
    column = batch.column(TOKENS_COLUMN)
    if column.null_count or not pa.types.is_integer(column.type):
        raise DataError(f"{shard.path}: `{TOKENS_COLUMN}` must be integers without nulls, got "
                        f"{column.type} with {column.null_count} nulls. Fix: re-run the "
                        "annotation for this shard.")
    return column.to_numpy().astype(np.int64, copy=False)


def domain_values(batch: pa.RecordBatch, domain_field: str) -> pa.Array:
    """The ``domain_field`` value of every row as strings (null: ``MISSING_DOMAIN``), reading
    struct fields for a dotted name."""
    top, *inner = domain_field.split(".")
    values = batch.column(top)
    for name in inner:
        if not pa.types.is_struct(values.type):
            raise ConfigError("domain_field", f"{domain_field!r}: the column {top!r} holds "
                              f"{values.type}, which has no field {name!r}.",
                              "name a plain column, or a field of a struct column.")
        try:
            values = pc.struct_field(values, name)
        except (KeyError, pa.ArrowInvalid):
            raise ConfigError("domain_field", f"{domain_field!r}: the struct has no field "
                              f"{name!r} (fields: {[f.name for f in values.type]}).",
                              "name one of its fields.") from None
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        values = values.cast(pa.string())
    return values.fill_null(MISSING_DOMAIN)


def _domains(batch: pa.RecordBatch) -> list[str]:
    if DOMAIN_COLUMN not in batch.schema.names:
        return [MISSING_DOMAIN] * batch.num_rows
    values = batch.column(DOMAIN_COLUMN).to_pylist()
    return [MISSING_DOMAIN if d is None else str(d) for d in values]


def scan_corpus(shards: ScoreShards, criteria: Sequence[str], weighted: Sequence[str], *,
                batch_size: int, domain_field: str | None = None,
                unique_ids: bool = False) -> CorpusStats:
    """Pass 1: moments of every criterion in ``criteria`` over non-empty documents, and domains.

    A non-finite score of a ``weighted`` criterion is an error (the key would be undefined);
    for a criterion only reported, non-finite values are left out of its statistics. With
    ``domain_field``, tokens and documents are also counted per value of that column (the
    strata the budget is split over). With ``unique_ids`` (the noise is keyed by id), a null
    id is an error (:class:`DataError`) naming its shard and row, and the hashes of the ids of
    the documents with tokens are kept, in row order, as ``stats.id_hashes``:
    :func:`plan_selections` draws the id-keyed noise from them (so the ids are read and hashed
    once) and then refuses two that are equal, naming the shards and rows (see
    :func:`require_unique_ids`). The check is not made here because it sorts the hashes, and
    a sorted copy would double their memory.
    """
    stats = CorpusStats(moments={c: Moments() for c in criteria})
    has_domain = shards.has_column(DOMAIN_COLUMN)
    columns = [TOKENS_COLUMN, *(SCORE_PREFIX + c for c in criteria)]
    # The domain column is counted in a read of its own (`_count_domains`), as a dictionary
    # array: its parquet dictionary, no string per row. It is read here, with the scores, when
    # `domain_field` names it, or when a shard stores it as a dictionary (pyarrow then ends a
    # batch at every row group, and the moments, merged batch by batch, would round otherwise).
    domains_here = has_domain and (
        (domain_field is not None and domain_field.split(".")[0] == DOMAIN_COLUMN)
        or any(pa.types.is_dictionary(pq.read_schema(s.path).field(DOMAIN_COLUMN).type)
               for s in shards.shards))
    if domains_here:
        columns.append(DOMAIN_COLUMN)
    if domain_field is not None and domain_field.split(".")[0] not in columns:
        columns.append(domain_field.split(".")[0])
    if unique_ids and ID_COLUMN not in columns:
        columns.append(ID_COLUMN)
    # One slot per row, filled in row order with the hashes of the documents with tokens:
    # 8 bytes per row, allocated once (pages past the last document with tokens are never
    # touched), read by pass 2 and then sorted in place (no second copy at 10^7 documents).
    id_hashes = np.empty(shards.num_rows if unique_ids else 0, dtype=np.uint64)
    hashed = 0
    for shard, start, batch in shards.iter_batches(columns, batch_size,
                                                   desc="selection 1/3: moments"):
        tokens = _tokens(shard, batch)
        if tokens.size and tokens.min() < 0:
            row = int(np.argmax(tokens < 0)) + start - shard.first_row
            raise DataError(f"{shard.path}: row {row} has num_tokens {tokens.min()} < 0. Fix: "
                            "re-run the annotation for this shard.")
        live = tokens > 0
        if unique_ids:
            batch_hashes = _id_hashes(shard, start, batch)[live]
            id_hashes[hashed:hashed + batch_hashes.size] = batch_hashes
            hashed += batch_hashes.size
        stats.documents += int(live.sum())
        stats.empty_documents += int((~live).sum())
        stats.tokens += int(tokens.sum())
        for name in criteria:
            values = _scores(batch, name)[live]
            finite = np.isfinite(values)
            if not finite.all():
                if name in weighted:
                    bad = int(np.flatnonzero(live)[np.argmin(finite)]) + start - shard.first_row
                    raise DataError(
                        f"{shard.path}: row {bad} has a non-finite `{SCORE_PREFIX}{name}` "
                        f"({values[~finite][0]}) for a document with tokens. Fix: re-run the "
                        f"annotation for this shard, or drop `{name}` from `criteria`.")
                values = values[finite]
            stats.moments[name].update(values)
        if domains_here or not has_domain:
            _add_domain_counts(stats.domain_tokens, stats.domain_documents, batch, tokens, live)
        if domain_field is not None:
            _add_counts(stats.stratum_tokens, stats.stratum_documents,
                        domain_values(batch, domain_field), tokens, live)
    if stats.documents == 0:
        raise DataError(f"the {len(shards.shards)} shards hold no document with num_tokens > 0. "
                        "Fix: check the annotation output.")
    if has_domain and not domains_here:
        _count_domains(shards, stats, batch_size)
    if unique_ids:
        stats.id_hashes = id_hashes[:hashed]
    for name, m in stats.moments.items():
        if name in weighted and m.std == 0:
            log.warning("criterion %s has the same score for every document: it adds nothing "
                        "to the selection", name)
    return stats


def _count_domains(shards: ScoreShards, stats: CorpusStats, batch_size: int) -> None:
    """Tokens and documents per value of the domain column, read as a dictionary array.

    For shards that store the column as strings (:func:`scan_corpus` reads it with the scores
    otherwise). The values are counted in the order they first occur, as ``dictionary_encode``
    of the decoded strings gives them, so ``stats.domain_tokens`` is the same dict, order
    included, as when the strings are read. The counts are sums of integers, so they do not
    depend on how the rows are batched.
    """
    for shard, _start, batch in shards.iter_batches([TOKENS_COLUMN, DOMAIN_COLUMN], batch_size,
                                                    read_dictionary=[DOMAIN_COLUMN]):
        tokens = _tokens(shard, batch)
        _add_domain_counts(stats.domain_tokens, stats.domain_documents, batch, tokens,
                           tokens > 0, first_appearance=True)


_NOISE_FIX = ("give every document a unique id (e.g. prefix it with its domain or file name) "
              "and annotate again, or set `noise_key: row` (noise from the row's position in "
              "the shards sorted by name, which needs no ids; the selection then changes when "
              "the corpus is re-sharded or reordered).")


def _id_hashes(shard: Shard, start: int, batch: pa.RecordBatch) -> np.ndarray:
    """The 64-bit hash of every row's id (what keys its noise); a null id names its row."""
    ids = batch.column(ID_COLUMN)
    if ids.null_count:
        row = int(np.argmax(ids.is_null().to_numpy(zero_copy_only=False))) + start
        raise DataError(f"{shard.path}: row {row - shard.first_row} has no `{ID_COLUMN}` "
                        "(null), and `noise_key: id` keys the Gumbel noise by the id. Fix: "
                        + _NOISE_FIX)
    return hash_strings(ids)


def require_unique_ids(shards: ScoreShards, hashes: np.ndarray, *, batch_size: int) -> None:
    """Raise :class:`DataError` when two of ``hashes`` (the id hashes of the documents with
    tokens, from pass 1) are equal, naming the id and both shards and rows.

    The Gumbel noise is a hash of ``(seed, id)``: two documents with the same id (e.g. every
    file numbering its rows from 0) would get the same noise, so in a uniform selection they
    are always selected or dropped together, and a tau selection is correlated the same way.
    ``hashes`` is sorted in place. The rows are looked up again only to name them.
    """
    if hashes.size < 2:
        return
    hashes.sort()
    repeated = hashes[1:][hashes[1:] == hashes[:-1]]
    if repeated.size == 0:
        return
    target = repeated[0]
    found: list[tuple[Shard, int, str]] = []
    for shard, start, batch in shards.iter_batches([ID_COLUMN, TOKENS_COLUMN], batch_size):
        match = (hash_strings(batch.column(ID_COLUMN)) == target) & (_tokens(shard, batch) > 0)
        for index in np.flatnonzero(match)[: 2 - len(found)]:
            found.append((shard, start - shard.first_row + int(index),
                          str(batch.column(ID_COLUMN)[int(index)].as_py())))
        if len(found) == 2:
            break
    (shard_a, row_a, id_a), (shard_b, row_b, id_b) = found
    others = int(np.unique(repeated).size) - 1
    more = f" ({others} more ids repeat as well)" if others else ""
    where = f"{shard_a.path} row {row_a} and {shard_b.path} row {row_b}"
    if id_a == id_b:
        problem = (f"the id {id_a!r} is used twice: {where}{more}. `noise_key: id` draws a "
                   "document's Gumbel noise from a hash of (seed, id), so the two would get the "
                   "same noise and be selected or dropped together.")
    else:
        problem = (f"the ids {id_a!r} ({shard_a.path} row {row_a}) and {id_b!r} "
                   f"({shard_b.path} row {row_b}) have the same 64-bit hash{more}, so "
                   "`noise_key: id` would give them the same Gumbel noise.")
    raise DataError(f"{problem} Fix: {_NOISE_FIX}")


def _add_domain_counts(tokens_by: dict[str, int], docs_by: dict[str, int],
                       batch: pa.RecordBatch, tokens: np.ndarray, live: np.ndarray, *,
                       first_appearance: bool = False) -> None:
    if DOMAIN_COLUMN not in batch.schema.names:
        tokens_by[MISSING_DOMAIN] = tokens_by.get(MISSING_DOMAIN, 0) + int(tokens.sum())
        docs_by[MISSING_DOMAIN] = docs_by.get(MISSING_DOMAIN, 0) + int(live.sum())
        return
    _add_counts(tokens_by, docs_by, batch.column(DOMAIN_COLUMN), tokens, live,
                first_appearance=first_appearance)


def _encode(column: pa.Array, *, first_appearance: bool = False
            ) -> tuple[list[str | None], np.ndarray]:
    """``(distinct values, int64 code of every row)``; a null is the value ``None``.

    A dictionary array keeps its dictionary's order, unless ``first_appearance``: then only the
    values that occur, in the order they first occur (nulls last), as ``dictionary_encode`` of
    the decoded strings gives them (a column read as a dictionary only to save decoding).
    """
    encoded = column if pa.types.is_dictionary(column.type) else column.dictionary_encode()
    names = encoded.dictionary.to_pylist()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    if first_appearance and pa.types.is_dictionary(column.type):
        used = pc.unique(encoded.indices).drop_null().to_numpy(zero_copy_only=False)
        recode = np.zeros(max(len(names), 1), dtype=np.int64)
        recode[used] = np.arange(used.size)
        names = [names[int(i)] for i in used]
        codes = recode[encoded.indices.fill_null(0).to_numpy()]  # nulls: replaced below
    if encoded.null_count:
        names.append(None)
        codes = np.where(encoded.is_null().to_numpy(zero_copy_only=False), len(names) - 1, codes)
    return names, codes.astype(np.int64)


def _add_counts(tokens_by: dict[str, int], docs_by: dict[str, int], column: pa.Array,
                tokens: np.ndarray, live: np.ndarray, *, first_appearance: bool = False) -> None:
    # a null domain counts as MISSING_DOMAIN
    names, codes = _encode(column, first_appearance=first_appearance)
    token_sums = np.bincount(codes, weights=tokens, minlength=len(names))
    doc_counts = np.bincount(codes, weights=live, minlength=len(names))
    for name, tok, docs in zip(names, token_sums, doc_counts):
        key = MISSING_DOMAIN if name is None else str(name)
        tokens_by[key] = tokens_by.get(key, 0) + int(np.rint(tok))
        docs_by[key] = docs_by.get(key, 0) + int(np.rint(docs))


# --------------------------------------------------------------------------------------------
# Pass 2: keys


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_HASH_BLOCK = 8  # string positions gathered per step of hash_strings
_NULL_ID = ("an `id` is null, so it cannot key the noise. Fix: give every row an id, or set "
            "`noise_key: row`.")


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _seed_state(seed: int) -> np.uint64:
    x = (int(seed) * _GOLDEN + 0x632BE59BD9B4E019) & _MASK64
    return _mix64(np.asarray([x], dtype=np.uint64))[0]


def hash_strings(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """FNV-1a 64-bit hash of every string (ids), vectorized: cost grows with the total bytes."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        values = values.cast(pa.string())
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets_type = np.int64 if pa.types.is_large_string(values.type) else np.int32
    buffers = values.buffers()
    offsets = np.frombuffer(buffers[1], dtype=offsets_type)[values.offset : values.offset + n + 1]
    lengths = np.diff(offsets).astype(np.int64)
    hashed = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    longest = int(lengths.max())
    if longest == 0:
        return hashed  # only empty strings (hash ^ length 0)
    data = np.frombuffer(buffers[2], dtype=np.uint8)
    starts = offsets[:-1].astype(np.int64)
    if longest == int(lengths.min()):  # ids of one length (common): no reordering
        order = None
        sorted_lengths, sorted_starts = lengths, starts
    else:  # longest first; a stable radix sort when the lengths fit 16 bits
        order = (np.argsort((longest - lengths).astype(np.uint16), kind="stable")
                 if longest < 1 << 16 else np.argsort(-lengths, kind="stable"))
        sorted_lengths = lengths[order]
        sorted_starts = starts[order]
    # active[j]: how many strings are longer than j (a prefix of the length-sorted order)
    active = np.searchsorted(-sorted_lengths, -np.arange(longest), side="left")
    for j0 in range(0, longest, _HASH_BLOCK):
        # Bytes j0..j0+_HASH_BLOCK-1 of the strings still active at j0, gathered at once;
        # positions past a string's end (clipped into range) are never used.
        j1 = min(j0 + _HASH_BLOCK, longest)
        count = int(active[j0])
        positions = np.arange(j0, j1)[:, None] + sorted_starts[None, :count]
        block = np.take(data, positions, mode="clip")
        for j in range(j0, j1):
            part = hashed[: int(active[j])]
            np.bitwise_xor(part, block[j - j0, : part.size], out=part)
            np.multiply(part, _FNV_PRIME, out=part)
    hashed ^= sorted_lengths.astype(np.uint64)
    if order is None:
        return hashed
    out = np.empty(n, dtype=np.uint64)
    out[order] = hashed
    return out


def gumbel_noise(seed: int, *, rows: np.ndarray | None = None,
                 ids: pa.Array | None = None, id_hashes: np.ndarray | None = None) -> np.ndarray:
    """Standard Gumbel noise as a pure function of ``(seed, id)`` or ``(seed, global row)``.

    ``id_hashes`` (the :func:`hash_strings` of the ids, e.g. kept from pass 1) gives the same
    noise as ``ids`` without hashing them again. Uniforms are the top 53 bits of a SplitMix64
    hash, shifted half a step into (0, 1), so the noise is finite; ``-log(-log(u))`` is Gumbel.
    """
    state = _seed_state(seed)
    if ids is not None:
        if ids.null_count:
            raise DataError(_NULL_ID)
        id_hashes = hash_strings(ids)
    if id_hashes is not None:
        x = _mix64(_mix64(id_hashes ^ state) + np.uint64(_GOLDEN))
    elif rows is not None:
        x = _mix64(rows.astype(np.uint64) * np.uint64(_GOLDEN) + state)
    else:
        raise TypeError("gumbel_noise needs rows, ids or id_hashes")
    uniform = ((x >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))
    return -np.log(-np.log(uniform))


def combined_score(stats: CorpusStats, batch: pa.RecordBatch,
                   weights: Mapping[str, float]) -> np.ndarray:
    """``sum(weight * z[criterion])`` for every row of ``batch``."""
    score = np.zeros(batch.num_rows, dtype=np.float64)
    for name, weight in weights.items():
        if weight:
            score += weight * stats.z(name, _scores(batch, name))
    return score


def selection_keys(sampling: Sampling, score: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
    """The Gumbel top-k keys: ``score / tau + noise``; the score (top-k) or the noise (uniform)."""
    if sampling.top_k:
        return score
    if math.isinf(sampling.tau):
        return noise
    return score / sampling.tau + noise


class _Candidates:
    """Rows that may still be inside the budget, with the running key threshold."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.threshold = -math.inf
        self.keys: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []
        self.tokens: list[np.ndarray] = []
        self.count = 0
        self.kept_after_compaction = 0
        self.peak = 0

    def add(self, keys: np.ndarray, rows: np.ndarray, tokens: np.ndarray) -> None:
        keep = keys >= self.threshold
        if not keep.any():
            return
        self.keys.append(keys[keep])
        self.rows.append(rows[keep])
        self.tokens.append(tokens[keep])
        self.count += int(keep.sum())
        self.peak = max(self.peak, self.count)
        if self.count > max(_MIN_COMPACTION, 2 * self.kept_after_compaction):
            self.compact()

    def compact(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keep only the rows up to the one that fills the budget, in the order key descending,
        then row ascending (all of them while they hold less than the budget); return them, in
        no particular order.

        The row that fills the budget is found by narrowing the candidates down around it
        (:func:`_filling_row`, linear time) instead of sorting them all: the same rows and
        threshold as sorting, for much less work (a few million candidates at 10^7 documents).
        """
        keys = np.concatenate(self.keys) if self.keys else np.zeros(0)
        rows = np.concatenate(self.rows) if self.rows else np.zeros(0, dtype=np.int64)
        tokens = np.concatenate(self.tokens) if self.tokens else np.zeros(0, dtype=np.int64)
        self.keys, self.rows, self.tokens = [], [], []  # free the pieces first
        if int(tokens.sum()) >= self.budget:
            key, row = _filling_row(keys, rows, tokens, self.budget)
            kept = (keys > key) | ((keys == key) & (rows <= row))
            keys, rows, tokens = keys[kept], rows[kept], tokens[kept]
            self.threshold = float(key)
        self.keys, self.rows, self.tokens = [keys], [rows], [tokens]
        self.count = self.kept_after_compaction = len(keys)
        return keys, rows, tokens


_EXACT_SORT = 1 << 13  # _filling_row sorts once this few candidates are left
_PIVOT_SAMPLE = 1 << 12  # candidates sampled to choose its two pivots
_PIVOT_SLACK = 0.03  # share of the sample on either side of the estimated position


def _filling_row(keys: np.ndarray, rows: np.ndarray, tokens: np.ndarray,
                 budget: int) -> tuple[float, int]:
    """``(key, row)`` of the candidate whose tokens fill ``budget`` when the candidates are
    taken by key descending, then row ascending (their ``tokens`` add up to at least
    ``budget``; every one is > 0).

    A weighted quickselect with two pivots: a strided sample of the remaining candidates
    brackets the filling row's key between ``lo`` and ``hi``; the candidates above ``hi``, in
    ``[lo, hi]`` and below ``lo`` are three consecutive runs of the order, and the tokens of
    the runs say which one holds the filling row. A few linear passes leave a few thousand
    candidates, which are sorted exactly (``lexsort`` by row, then key descending).
    """
    before = 0  # tokens of the candidates known to come before the remaining ones
    for _ in range(64):  # each round keeps a few % (bounded: a bad sample just sorts more)
        if keys.size <= _EXACT_SORT:
            break
        need = budget - before
        step = max(1, keys.size // _PIVOT_SAMPLE)
        sample_keys = keys[::step]
        by_key = np.argsort(sample_keys)[::-1]
        share = np.cumsum(tokens[::step][by_key]) / float(tokens.sum())  # of the sample, top down
        position = int(np.searchsorted(share, need / float(tokens.sum()) * share[-1]))
        slack = int(_PIVOT_SLACK * by_key.size) + 1
        hi = sample_keys[by_key[max(0, position - slack)]]
        lo = sample_keys[by_key[min(by_key.size - 1, position + slack)]]
        keep = keys > hi
        above = int(tokens[keep].sum())
        if above < need:
            keep = (keys >= lo) & ~keep
            inside = int(tokens[keep].sum())
            if above + inside >= need:
                before += above
            else:
                before += above + inside
                keep = keys < lo
        if keep.all():
            break  # no progress (e.g. all remaining keys equal): sort them
        keys, rows, tokens = keys[keep], rows[keep], tokens[keep]
    order = np.lexsort((rows, -keys))
    last = int(np.searchsorted(np.cumsum(tokens[order]) + before, budget, side="left"))
    return keys[order[last]], int(rows[order[last]])


class _DomainCandidates:
    """One :class:`_Candidates` pool per domain, each filling its own budget (a domain with a
    budget of 0 has no pool: its documents are never candidates)."""

    def __init__(self, budgets: Mapping[str, int]) -> None:
        self.budgets = dict(budgets)
        self.pools = {d: _Candidates(b) for d, b in budgets.items() if b > 0}

    def add(self, keys: np.ndarray, rows: np.ndarray, tokens: np.ndarray,
            domains: pa.Array) -> None:
        names, codes = _encode(domains)
        order = np.argsort(codes, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=len(names)))])
        for code, name in enumerate(names):
            pool = self.pools.get(MISSING_DOMAIN if name is None else str(name))
            if pool is not None and bounds[code + 1] > bounds[code]:
                take = order[bounds[code]:bounds[code + 1]]
                pool.add(keys[take], rows[take], tokens[take])

    @property
    def peak(self) -> int:
        """An upper bound of the candidates held at once (the pools' peaks added)."""
        return sum(pool.peak for pool in self.pools.values())


@dataclass
class SelectionPlan:
    """The outcome of pass 2 for one sampling: which global rows are selected.

    ``domains`` (with ``domain_field``) holds, per domain, its ``budget_tokens``, the selected
    ``tokens`` and ``documents``, and its ``threshold_key``.
    """

    sampling: Sampling
    budget_tokens: int
    rows: np.ndarray  # sorted global row numbers
    tokens: int
    threshold_key: float
    peak_candidates: int
    domain_field: str | None = None
    domains: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def documents(self) -> int:
        return int(self.rows.size)


def plan_selections(shards: ScoreShards, stats: CorpusStats, samplings: Sequence[Sampling],
                    budget: int, *, batch_size: int, histogram_criteria: Sequence[str] = (),
                    domain_field: str | None = None,
                    budgets_by_domain: Mapping[str, int] | None = None
                    ) -> tuple[list[SelectionPlan], dict[str, np.ndarray]]:
    """Pass 2: the selected rows of every sampling (one read), and z histograms of the corpus.

    With ``domain_field`` and ``budgets_by_domain`` (see :func:`domain_budgets`), every domain
    is filled to its own budget from its own documents; otherwise ``budget`` is filled from the
    whole corpus.

    Id-keyed noise comes from ``stats.id_hashes`` when pass 1 kept them (:func:`scan_corpus`
    with ``unique_ids``): the id column is then not read here. After the pass they are checked
    for uniqueness (:func:`require_unique_ids`, which sorts them in place) and dropped from
    ``stats``. Without them the ids are read and hashed here, once per batch whatever the
    number of seeds, and not checked.
    """
    if (domain_field is None) != (budgets_by_domain is None):
        raise ValueError("domain_field and budgets_by_domain go together")
    weighted = sorted({c for s in samplings for c, w in s.weights.items() if w})
    need_noise = [not s.top_k for s in samplings]
    use_ids = any(s.noise_key == "id" for s, n in zip(samplings, need_noise) if n)
    kept_hashes = stats.id_hashes
    hashed = 0  # documents with tokens whose kept hash pass 2 has used
    batch_hashes: np.ndarray | None = None  # a batch's id hashes, for every seed
    columns = [TOKENS_COLUMN, *(SCORE_PREFIX + c for c in sorted({*weighted,
                                                                  *histogram_criteria}))]
    if use_ids and kept_hashes is None:
        columns.append(ID_COLUMN)
    if domain_field is not None and domain_field.split(".")[0] not in columns:
        columns.append(domain_field.split(".")[0])
    candidates: list[_Candidates | _DomainCandidates] = [
        _Candidates(budget) if budgets_by_domain is None else _DomainCandidates(budgets_by_domain)
        for _ in samplings]
    histograms = {c: np.zeros(len(HISTOGRAM_EDGES) - 1, dtype=np.int64)
                  for c in histogram_criteria}
    for shard, start, batch in shards.iter_batches(columns, batch_size,
                                                   desc="selection 2/3: keys"):
        tokens = batch.column(TOKENS_COLUMN).to_numpy().astype(np.int64, copy=False)
        live = tokens > 0
        all_live = bool(live.all())
        rows = np.arange(start, start + batch.num_rows, dtype=np.int64)
        for name in histogram_criteria:
            histograms[name] += _z_histogram(stats.z(name, _scores(batch, name)[live]))
        noise_cache: dict[tuple[int, str], np.ndarray] = {}
        domains = (domain_values(batch, domain_field).filter(pa.array(live))
                   if domain_field is not None else None)
        batch_hashes = None
        if use_ids and kept_hashes is not None:
            live_count = int(live.sum())
            if hashed + live_count > kept_hashes.size:
                raise DataError(f"{shard.path}: the shards hold more documents with tokens "
                                f"than pass 1 counted ({kept_hashes.size:,}): they changed "
                                "during the selection. Fix: run it again on shards that are "
                                "not being written.")
            batch_hashes = kept_hashes[hashed:hashed + live_count]  # rows with tokens only
            hashed += live_count
        elif use_ids:
            ids = batch.column(ID_COLUMN)
            if ids.null_count:
                raise DataError(_NULL_ID)
            batch_hashes = hash_strings(ids)  # every row
        for sampling, pool in zip(samplings, candidates):
            noise = None
            if not sampling.top_k:
                cache_key = (sampling.seed, sampling.noise_key)
                if cache_key not in noise_cache and sampling.noise_key == "id":
                    assert batch_hashes is not None  # use_ids: set above for every batch
                    noise_cache[cache_key] = _batch_id_noise(
                        sampling.seed, batch_hashes, live, all_live,
                        from_live_rows=kept_hashes is not None)
                elif cache_key not in noise_cache:
                    noise_cache[cache_key] = gumbel_noise(sampling.seed, rows=rows)
                noise = noise_cache[cache_key]
            score = (combined_score(stats, batch, sampling.weights)
                     if sampling.mode != "uniform" else None)
            keys = selection_keys(sampling, score, noise)
            if all_live:  # no copies of the batch when no document is empty (the usual case)
                live_keys, live_rows, live_tokens = keys, rows, tokens
            else:
                live_keys, live_rows, live_tokens = keys[live], rows[live], tokens[live]
            if isinstance(pool, _DomainCandidates):
                pool.add(live_keys, live_rows, live_tokens, domains)
            else:
                pool.add(live_keys, live_rows, live_tokens)
    if kept_hashes is not None:
        # Every key is drawn: the row order is no longer needed, so the check may sort the
        # hashes in place. They are dropped from `stats` first: sorted, they no longer match
        # the rows, and a later pass 2 with these stats reads the ids instead.
        stats.id_hashes = None
        if use_ids and hashed != kept_hashes.size:
            raise DataError(f"the shards hold {hashed:,} documents with tokens, pass 1 counted "
                            f"{kept_hashes.size:,}: they changed during the selection. Fix: "
                            "run it again on shards that are not being written.")
        require_unique_ids(shards, kept_hashes, batch_size=batch_size)
        del kept_hashes, batch_hashes  # (the last batch's is a view) freed before the compactions
    plans = []
    for sampling, pool in zip(samplings, candidates):
        if isinstance(pool, _Candidates):
            keys, rows, tokens = pool.compact()
            plans.append(SelectionPlan(sampling=sampling, budget_tokens=budget,
                                       rows=np.sort(rows), tokens=int(tokens.sum()),
                                       threshold_key=float(keys.min()) if keys.size else math.nan,
                                       peak_candidates=pool.peak))
            continue
        per_domain: dict[str, dict[str, Any]] = {}
        chosen = []
        for name, domain_budget in sorted(pool.budgets.items()):
            domain_pool = pool.pools.get(name)
            keys, rows, tokens = (domain_pool.compact() if domain_pool is not None else
                                  (np.zeros(0), np.zeros(0, dtype=np.int64),
                                   np.zeros(0, dtype=np.int64)))
            chosen.append(rows)
            per_domain[name] = {"budget_tokens": int(domain_budget), "tokens": int(tokens.sum()),
                                "documents": int(rows.size),
                                "threshold_key": float(keys.min()) if keys.size else None}
        rows = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
        thresholds = [d["threshold_key"] for d in per_domain.values()
                      if d["threshold_key"] is not None]
        plans.append(SelectionPlan(
            sampling=sampling, budget_tokens=budget, rows=rows,
            tokens=sum(d["tokens"] for d in per_domain.values()),
            threshold_key=min(thresholds) if thresholds else math.nan,
            peak_candidates=pool.peak, domain_field=domain_field, domains=per_domain))
    return plans, histograms


def _batch_id_noise(seed: int, hashes: np.ndarray, live: np.ndarray, all_live: bool, *,
                    from_live_rows: bool) -> np.ndarray:
    """The id-keyed noise of every row of a batch, from its id hashes.

    ``hashes`` holds one hash per row, or (``from_live_rows``, pass 1's kept hashes) one per
    row with tokens only; then the rows without tokens get 0, which is never used: their keys
    are dropped with them. The noise of a row with tokens is the same either way.
    """
    noise = gumbel_noise(seed, id_hashes=hashes)
    if not from_live_rows or all_live:
        return noise
    full = np.zeros(live.size, dtype=np.float64)
    full[live] = noise
    return full


def _z_histogram(z: np.ndarray) -> np.ndarray:
    finite = z[np.isfinite(z)]
    clipped = np.clip(finite, HISTOGRAM_EDGES[0], HISTOGRAM_EDGES[-1])
    return np.histogram(clipped, bins=HISTOGRAM_EDGES)[0].astype(np.int64)


# --------------------------------------------------------------------------------------------
# Pass 3: write


def domain_folder(domain: str) -> str:
    """A folder name for ``domain``: itself when it is a plain name the loader will read.

    ``domain_mixture_dataset`` skips a folder named ``long`` (long-document evaluation data),
    and a name with path separators is not one folder, so such names get a safe spelling plus a
    short hash (recorded in ``selection.json``).
    """
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", domain) and domain != LOADER_SKIPPED_FOLDER:
        return domain
    import hashlib

    safe = re.sub(r"[^A-Za-z0-9._-]", "_", domain).strip("._") or "domain"
    return f"{safe}-{hashlib.sha1(domain.encode()).hexdigest()[:8]}"


class _SelectionWriter:
    """Writes one plan's rows into a scratch folder and gathers the after-selection stats.

    The scratch folder is ``.<name>.tmp-<pid>`` beside the output folder, and replacing a previous
    selection moves it to ``.<name>.old-<pid>`` for a moment: the names
    :func:`remove_stale_leftovers` finds when this process is killed.
    """

    def __init__(self, plan: SelectionPlan, output_dir: Path, criteria: Sequence[str]) -> None:
        self.plan = plan
        self.output_dir = output_dir
        self.scratch = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
        if self.scratch.exists():
            shutil.rmtree(self.scratch)
        self.scratch.mkdir(parents=True)
        self.handles: dict[str, Any] = {}
        self.encode = json.JSONEncoder(ensure_ascii=False, default=str).encode
        self.folders: dict[str, str] = {}
        self.domain_tokens: dict[str, int] = {}
        self.domain_documents: dict[str, int] = {}
        self.score_sums = {c: 0.0 for c in criteria}
        self.score_counts = {c: 0 for c in criteria}
        self.histograms = {c: np.zeros(len(HISTOGRAM_EDGES) - 1, dtype=np.int64)
                           for c in criteria}

    def write(self, batch: pa.RecordBatch, local: np.ndarray, stats: CorpusStats) -> None:
        picked = batch.take(pa.array(local))
        tokens = picked.column(TOKENS_COLUMN).to_numpy().astype(np.int64, copy=False)
        for name in self.score_sums:
            values = _scores(picked, name)
            values = values[np.isfinite(values)]
            self.score_sums[name] += float(values.sum())
            self.score_counts[name] += int(values.size)
            self.histograms[name] += _z_histogram(stats.z(name, values))
        for row, count, domain in zip(picked.to_pylist(), tokens, _domains(picked)):
            handle = self.handles.get(domain)
            if handle is None:
                folder = self.folders.setdefault(domain, domain_folder(domain))
                (self.scratch / folder).mkdir(exist_ok=True)
                # One handle per domain stays open across batches; close() closes them all.
                handle = open(self.scratch / folder / SPLIT_FILENAME, "w",  # noqa: SIM115
                              encoding="utf-8")
                self.handles[domain] = handle
            handle.write(self.encode(row) + "\n")
            self.domain_tokens[domain] = self.domain_tokens.get(domain, 0) + int(count)
            self.domain_documents[domain] = self.domain_documents.get(domain, 0) + 1

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()

    def abort(self) -> None:
        self.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def finish(self, report: dict[str, Any]) -> Path:
        """Write the report and plot into the scratch folder, then move it into place."""
        self.close()
        _atomic_text(self.scratch / REPORT_NAME, json.dumps(report, indent=2) + "\n")
        plot_selection(report, self.scratch / PLOT_NAME)
        final = self.output_dir
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(self.scratch, final)
            shutil.rmtree(old)
        else:
            os.replace(self.scratch, final)
        return final


def remove_stale_leftovers(output_dir: str | Path) -> list[Path]:
    """Clean up what killed selections left beside ``output_dir``; return what was removed.

    A selection writes ``.<name>.tmp-<pid>`` (a full copy of the selected texts), then moves a
    previous ``<name>`` to ``.<name>.old-<pid>`` and the scratch folder to ``<name>``. Folders of
    a process that is gone are removed (those of a live one, e.g. a concurrent run, are kept), as
    are ``.<name>.partial-<pid>`` scratch folders of earlier versions. A run killed between the
    two moves leaves no ``<name>``: its ``.old-<pid>`` is moved back first, so the previous
    selection stays readable until this run replaces it (or if this run fails too).
    """
    output_dir = Path(output_dir)
    if not output_dir.exists() and not output_dir.is_symlink():
        complete = [p for p in stale_staging(output_dir, ("old",)) if (p / REPORT_NAME).is_file()]
        if complete:
            previous = max(complete, key=lambda p: p.stat().st_mtime)
            os.replace(previous, output_dir)
            log.info("restored %s from %s, where a killed selection had moved it", output_dir,
                     previous.name)
    return remove_stale_staging(output_dir, (*STAGING_KINDS, "partial"))


def write_selections(shards: ScoreShards, stats: CorpusStats,
                     plans: Sequence[tuple[SelectionPlan, Path]], criteria: Sequence[str], *,
                     batch_size: int) -> list[_SelectionWriter]:
    """Pass 3: skip the row groups without a selected row, read the others whole (all
    columns) and write each plan's rows."""
    writers = [_SelectionWriter(plan, Path(out), criteria) for plan, out in plans]
    bar = progress_bar(shards.num_rows, "selection 3/3: write")
    try:
        for shard in shards.shards:
            reader = pq.ParquetFile(shard.path)
            group_start = shard.first_row
            for group, group_rows in enumerate(shard.row_group_rows):
                group_end = group_start + group_rows
                spans = [np.searchsorted(p.rows, [group_start, group_end]) for p, _ in plans]
                if all(lo == hi for lo, hi in spans):
                    group_start = group_end
                    bar.update(group_rows)
                    continue
                start = group_start
                for batch in reader.iter_batches(batch_size=batch_size, row_groups=[group]):
                    end = start + batch.num_rows
                    for writer in writers:
                        lo, hi = np.searchsorted(writer.plan.rows, [start, end])
                        if hi > lo:
                            writer.write(batch, writer.plan.rows[lo:hi] - start, stats)
                    start = end
                    bar.update(batch.num_rows)
                group_start = group_end
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    finally:
        bar.close()
    return writers


# --------------------------------------------------------------------------------------------
# Report


def _shares(counts: Mapping[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: (v / total if total else 0.0) for k, v in sorted(counts.items())}


def _entropy_bits(counts: Mapping[str, int]) -> float:
    p = np.asarray([v for v in counts.values() if v > 0], dtype=np.float64)
    if p.size == 0:
        return 0.0
    p = p / p.sum()
    return float(-(p * np.log2(p)).sum())


def build_report(config: SelectionConfig, shards: ScoreShards, stats: CorpusStats,
                 writer: _SelectionWriter, histograms_before: Mapping[str, np.ndarray],
                 elapsed: Mapping[str, float]) -> dict[str, Any]:
    """What was kept: settings, sizes, domain shares and diversity, score means and histograms."""
    plan = writer.plan
    domains_before = {d: t for d, t in stats.domain_tokens.items() if stats.domain_documents[d]}
    domains_after = dict(sorted(writer.domain_tokens.items()))
    entropy_before = _entropy_bits(domains_before)
    entropy_after = _entropy_bits(domains_after)
    max_entropy = math.log2(len(domains_before)) if len(domains_before) > 1 else 0.0
    mean_score = {}
    for name, moments in stats.moments.items():
        after = (writer.score_sums[name] / writer.score_counts[name]
                 if writer.score_counts[name] else None)
        mean_score[name] = {
            "before": moments.mean, "after": after, "std_before": moments.std,
            "mean_z_after": (None if after is None or moments.std == 0
                             else (after - moments.mean) / moments.std)}
    report = {
        "settings": {**plan.sampling.describe(), "scores_dir": str(config.scores_dir),
                     "shards": len(shards.shards), "budget_tokens": plan.budget_tokens,
                     "budget_fraction": config.budget_fraction,
                     "domain_field": plan.domain_field,
                     "domain_weights": (dict(config.domain_weights)
                                        if config.domain_weights is not None else None),
                     "batch_size": int(config.batch_size)},
        "corpus": {"documents": stats.documents, "empty_documents": stats.empty_documents,
                   "tokens": stats.tokens},
        "selected": {"documents": plan.documents, "tokens": plan.tokens,
                     "token_share": plan.tokens / stats.tokens,
                     "document_share": plan.documents / stats.documents,
                     "over_budget_tokens": plan.tokens - plan.budget_tokens,
                     "threshold_key": plan.threshold_key,
                     "peak_candidates": plan.peak_candidates},
        "normalisation": {n: {"mean": m.mean, "std": m.std, "documents": m.count}
                          for n, m in stats.moments.items()},
        "tokens_per_domain": {"before": dict(sorted(domains_before.items())),
                              "after": domains_after},
        "documents_per_domain": {"before": dict(sorted(stats.domain_documents.items())),
                                 "after": dict(sorted(writer.domain_documents.items()))},
        "token_share_per_domain": {"before": _shares(domains_before),
                                   "after": _shares(domains_after)},
        "diversity": {
            "domains_before": len(domains_before), "domains_after": len(domains_after),
            "unique_domain_share": len(domains_after) / max(1, len(domains_before)),
            "domain_entropy_bits": {"before": entropy_before, "after": entropy_after},
            "normalized_domain_entropy": {
                "before": entropy_before / max_entropy if max_entropy else 1.0,
                "after": entropy_after / max_entropy if max_entropy else 1.0}},
        "mean_score": mean_score,
        "z_histograms": {"edges": HISTOGRAM_EDGES.tolist(),
                         "before": {n: h.tolist() for n, h in histograms_before.items()},
                         "after": {n: h.tolist() for n, h in writer.histograms.items()}},
        "domain_folders": {d: writer.folders[d] for d in sorted(writer.folders)},
        "elapsed_s": {k: round(v, 3) for k, v in elapsed.items()},
    }
    if plan.domain_field is not None:
        corpus = stats.stratum_tokens
        total = sum(corpus.values())
        report["budget_per_domain"] = {
            "domain_field": plan.domain_field,
            "split_by": "domain_weights" if config.domain_weights is not None
            else "corpus token shares",
            "domains": {name: {"corpus_tokens": corpus.get(name, 0),
                               "corpus_token_share": corpus.get(name, 0) / total if total else 0.0,
                               **values} for name, values in plan.domains.items()}}
    return report


def plot_selection(report: Mapping[str, Any], path: str | Path) -> Path:
    """Score histograms before/after per criterion and the domain token shares, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = report["z_histograms"]
    criteria = list(hist["before"])
    panels = len(criteria) + 1
    cols = 2 if panels > 1 else 1
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.4 * rows), squeeze=False)
    edges = np.asarray(hist["edges"])
    width = np.diff(edges)
    for ax, name in zip(axes.flat, criteria):
        for label, color in (("before", "C0"), ("after", "C1")):
            counts = np.asarray(hist[label][name], dtype=np.float64)
            density = counts / (counts.sum() * width) if counts.sum() else counts
            ax.stairs(density, edges, color=color, label=f"{label} ({int(counts.sum()):,} docs)",
                      fill=label == "before", alpha=0.35 if label == "before" else 1.0)
        ax.set_title(f"{name} (weight {report['settings']['criteria'].get(name, 0):g})",
                     fontsize="medium")
        ax.set_xlabel("z-score")
        ax.legend(fontsize="x-small")
    ax = axes.flat[len(criteria)]
    shares = report["token_share_per_domain"]
    domains = list(shares["before"])
    x = np.arange(len(domains))
    ax.bar(x - 0.2, [shares["before"][d] for d in domains], 0.4, label="before")
    ax.bar(x + 0.2, [shares["after"].get(d, 0.0) for d in domains], 0.4, label="after")
    ax.set_xticks(x, domains, rotation=45, ha="right", fontsize="small")
    ax.set_ylabel("token share")
    ax.set_title(f"domains (unique-domain share {report['diversity']['unique_domain_share']:.2f})",
                 fontsize="medium")
    ax.legend(fontsize="x-small")
    for extra in list(axes.flat)[panels:]:
        extra.set_visible(False)
    settings = report["settings"]
    fig.suptitle(f"QuRating selection: {settings['mode']}, tau={settings['tau']}, "
                 f"{report['selected']['tokens']:,} of {report['corpus']['tokens']:,} tokens")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Entry point


def _check_output_dir(path: Path, field_name: str) -> None:
    """Refuse a folder that cannot be written (checked before the passes over the corpus, not
    after them) or that holds something other than a previous selection, which it would
    replace."""
    check_output_dir(path, field_name)
    if path.exists() and (not path.is_dir() or (
            any(path.iterdir()) and not (path / REPORT_NAME).is_file())):
        raise ConfigError(field_name, f"{path} exists and is not a selection folder (no "
                          f"{REPORT_NAME}); it would be replaced.",
                          "choose a new or empty folder.")


def _check_separate_outputs(selected: Path, uniform: Path) -> None:
    """Refuse ``uniform_output_dir`` equal to ``output_dir`` or either inside the other: each
    selection replaces its whole folder when it is written, which would delete (or move away)
    the other one."""
    selected, uniform = selected.resolve(), uniform.resolve()
    if uniform == selected:
        raise ConfigError("uniform_output_dir", "is the same folder as `output_dir`.",
                          "give the uniform baseline its own folder.")
    if uniform.is_relative_to(selected) or selected.is_relative_to(uniform):
        inner, outer = ((("uniform_output_dir", uniform), ("output_dir", selected))
                        if uniform.is_relative_to(selected)
                        else (("output_dir", selected), ("uniform_output_dir", uniform)))
        raise ConfigError("uniform_output_dir", f"`{inner[0]}` ({inner[1]}) is inside "
                          f"`{outer[0]}` ({outer[1]}); writing `{outer[0]}` replaces the whole "
                          f"folder and would lose the other selection.",
                          "give the two selections sibling folders, e.g. "
                          "`<run>/selected` and `<run>/uniform`.")


def select(config: SelectionConfig | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Run passes 1-3 and return the reports, ``{"selected": ..., "uniform": ...}``.

    The selection takes documents in decreasing key order until their tokens reach the budget,
    so it holds at least ``budget`` tokens and less than ``budget`` plus its last document.
    With ``domain_field`` the same holds for every domain and its share of the budget.
    Documents with ``num_tokens == 0`` are never selected.
    """
    if not isinstance(config, SelectionConfig):
        config = SelectionConfig.from_mapping(config)
    check_budget_settings(config)
    check_domain_settings(config)
    started = time.perf_counter()
    shards = ScoreShards.discover(config.scores_dir)
    if config.domain_field is not None:
        shards.require_domain_field(config.domain_field)
    available = shards.score_criteria()
    # A criterion some shard has is known; `require` then names the shard that lacks it.
    sampling = check_sampling(config, shards.score_criteria(in_every_shard=False))
    uses_noise = not sampling.top_k or bool(config.uniform_output_dir)
    need_id = sampling.noise_key == "id" and uses_noise
    shards.require([str(c) for c in config.criteria], need_id=need_id)
    outputs = {"selected": Path(config.output_dir).expanduser()}
    if config.uniform_output_dir:
        outputs["uniform"] = Path(config.uniform_output_dir).expanduser()
        _check_separate_outputs(outputs["selected"], outputs["uniform"])
    for name, path in outputs.items():
        _check_output_dir(path, "output_dir" if name == "selected" else "uniform_output_dir")
    for path in outputs.values():
        remove_stale_leftovers(path)
    # The outputs are published one after the other; a run killed in between leaves a new
    # `selected/` beside an old `uniform/`. Their reports carry this id, so a pair that differs
    # is from two runs (a rerun writes both again).
    run = {"id": f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}",
           "outputs": {name: str(path) for name, path in outputs.items()}}
    samplings = [sampling]
    if "uniform" in outputs:
        samplings.append(Sampling(weights={}, tau=math.inf, top_k=False, seed=sampling.seed,
                                  noise_key=sampling.noise_key))
    reported = sorted(set(available) | set(sampling.weights))
    batch_size = int(config.batch_size)

    stats = scan_corpus(shards, reported, list(sampling.weights), batch_size=batch_size,
                        domain_field=config.domain_field, unique_ids=need_id)
    budget = resolve_budget(config, stats.tokens, stats.documents, len(shards.shards))
    budgets_by_domain = None
    if config.domain_field is not None:
        budgets_by_domain = domain_budgets(stats.stratum_tokens, budget, config.domain_weights)
        log.info("budget per %s: %s", config.domain_field,
                 ", ".join(f"{d} {b:,}" for d, b in budgets_by_domain.items()))
    scanned = time.perf_counter()
    log.info("pass 1: %s documents, %s tokens in %d shards (%.1f s)", f"{stats.documents:,}",
             f"{stats.tokens:,}", len(shards.shards), scanned - started)
    plans, before = plan_selections(shards, stats, samplings, budget, batch_size=batch_size,
                                    histogram_criteria=reported,
                                    domain_field=config.domain_field,
                                    budgets_by_domain=budgets_by_domain)
    planned = time.perf_counter()
    log.info("pass 2: selected %s documents (%s tokens, budget %s) (%.1f s)",
             f"{plans[0].documents:,}", f"{plans[0].tokens:,}", f"{budget:,}", planned - scanned)
    writers = write_selections(shards, stats, list(zip(plans, outputs.values())), reported,
                               batch_size=batch_size)
    written = time.perf_counter()
    elapsed = {"moments": scanned - started, "keys": planned - scanned, "write": written - planned}
    reports = {}
    try:
        for name, writer in zip(outputs, writers):
            reports[name] = {"run": run,
                             **build_report(config, shards, stats, writer, before, elapsed)}
            writer.finish(reports[name])
            log.info("wrote %s (%s)", writer.output_dir, writer.plan.sampling.mode)
    except BaseException:
        for writer in writers:
            writer.abort()  # the scratch folders not yet moved into place
        raise
    return reports


__all__ = [
    "CorpusStats",
    "Moments",
    "Sampling",
    "ScoreShards",
    "SelectionConfig",
    "SelectionPlan",
    "check_budget_settings",
    "check_domain_settings",
    "check_sampling",
    "combined_score",
    "domain_budgets",
    "domain_folder",
    "domain_values",
    "gumbel_noise",
    "hash_strings",
    "parse_tau",
    "plan_selections",
    "plot_selection",
    "progress_bar",
    "remove_stale_leftovers",
    "require_unique_ids",
    "resolve_budget",
    "scan_corpus",
    "select",
    "selection_keys",
    "write_selections",
]
