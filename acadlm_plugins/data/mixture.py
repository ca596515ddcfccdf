"""Mix several domain corpora by weight, packed, with the domain of every sample.

Two ways to draw from a mixture:

* :class:`DomainMixtureDataset` is a map-style torchtune dataset with *fixed* weights: index i
  is assigned a domain up front (seeded), so stock torchtune recipes, with their own shuffling
  samplers, see the requested proportions. Use it by ``_component_`` path::

      dataset:
        _component_: acadlm_plugins.data.mixture.domain_mixture_dataset
        data_dir: ${oc.env:ACADLM_HOME}/corpus    # stock recipes don't know ${acadlm_home:}
        weights: {code: 0.4, books: 0.2, scripture: 0.2, docs: 0.2}
        max_seq_len: 2048
        packed: True

* :class:`DomainBatchSampler` draws every batch from the *current* weights, which dynamic batch
  loading changes during training; its state (RNG, per-domain cursors, weights, global batch) is
  checkpointed so a resumed run draws exactly the batches the uninterrupted run would have drawn
  (a resume with another global batch is refused).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from acadlm_plugins.data.documents import resolve_data_files
from acadlm_plugins.data.packing import (
    CROSS_ENTROPY_IGNORE_INDEX,
    PackedSequences,
    PackingMode,
    PositionMode,
    check_max_seq_len,
    collate_packs,
    pack_documents,
)
from acadlm_plugins.data.tokenization import load_or_tokenize
from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.training.config_checks import config_value

log = logging.getLogger(__name__)

LONG_DOCUMENTS_DIRNAME = "long"
# How errors name the dataset block when the caller does not say which one it is: the same
# builder serves `dataset` and `validation_dataset`, and torchtune does not tell it which.
DEFAULT_CONFIG_KEY = "dataset (or validation_dataset)"
PACKING_MODES = ("split", "whole")
POSITION_MODES = ("reset", "continuous")


class PackedDomainCorpus:
    """The packs of every domain of one split, addressed by (domain index, pack index)."""

    def __init__(self, domains: Mapping[str, PackedSequences], *,
                 positions: PositionMode = "reset") -> None:
        self.domain_names: list[str] = list(domains)
        self._packs = [domains[name] for name in self.domain_names]
        self._digests: list[str] | None = None
        self.positions = positions

    @property
    def num_packs(self) -> list[int]:
        return [len(p) for p in self._packs]

    @property
    def max_seq_len(self) -> int:
        return self._packs[0].max_seq_len

    def content_digests(self) -> list[str] | None:
        """A sha256 of every domain's packs, in domain order: what a resumed run checks its
        data against (the same files give the same digests wherever they were moved). Packs in
        memory hash their tokens; packs streamed from disk (the long-context corpora) give
        their own ``content_digest()``, which rests on their token store's content key (the
        files' names and bytes and the tokenizer) and the length filter and packing, so the
        tokens are not read again. None when some domain's packs have neither."""
        if self._digests is None:
            digests = [_pack_digest(packs) for packs in self._packs]
            if any(digest is None for digest in digests):
                return None
            self._digests = digests
        return self._digests

    def packs(self, domain: str) -> PackedSequences:
        return self._packs[self.domain_names.index(domain)]

    def get(self, domain_index: int, pack_index: int) -> dict[str, Any]:
        sample = self._packs[domain_index].sample(pack_index, positions=self.positions)
        sample["domain"] = domain_index
        return sample


def _pack_digest(packs: Any) -> str | None:
    """:meth:`PackedDomainCorpus.content_digests` for one domain."""
    own = getattr(packs, "content_digest", None)
    if own is not None:
        return own()
    if hasattr(packs, "tokens"):
        return hashlib.sha256(np.ascontiguousarray(packs.tokens).data).hexdigest()
    return None


def build_packed_corpus(tokenizer, domain_files: Mapping[str, Sequence[Path]], *,
                        max_seq_len: int, packing: PackingMode = "split",
                        positions: PositionMode = "reset", text_field: str = "text",
                        cache_dir: str | Path | None = None,
                        split: str | None = None) -> PackedDomainCorpus:
    """Tokenize (cached) and pack each domain's files; log the token accounting per domain.

    ``split`` (when the files are one split of a corpus) goes into the log line,
    ``[code/validation] packed ...``, so a run's train and validation lines differ."""
    packed: dict[str, PackedSequences] = {}
    for name, files in domain_files.items():
        docs = load_or_tokenize(files, tokenizer, text_field=text_field, cache_dir=cache_dir,
                                desc=f"tokenizing {name}")
        if docs.num_documents == 0:
            raise DataError(f"domain {name!r} has no documents in {[str(f) for f in files]}. "
                            "Fix: give it data, or remove it from `weights`/`domains`.")
        packed[name] = pack_documents(docs, max_seq_len, _pad_id(tokenizer), mode=packing)
        log.info(packed[name].stats.describe(f"{name}/{split}" if split else name))
    return PackedDomainCorpus(packed, positions=positions)


def discover_domain_files(data_dir: str | Path, split: str, *,
                          field: str = "data_dir") -> dict[str, list[Path]]:
    """Domains of a corpus directory laid out as ``<data_dir>/<domain>/<split>.jsonl``
    (or ``.parquet``); ``field`` is the config key of ``data_dir``, for errors."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"`{field}`: {root} is not a directory. Fix: run `acadlm-defaults build` "
                        f"for the default corpus, or point `{field}` at "
                        "<dir>/<domain>/<split>.jsonl.")
    found: dict[str, list[Path]] = {}
    for sub in _domain_folders(root):
        candidates = (sub / f"{split}.jsonl", sub / f"{split}.parquet")
        for path in candidates:
            if path.exists() and not path.is_file():
                raise DataError(f"`{field}`: {path} is not a file (a folder?), so domain "
                                f"{sub.name!r} would be left out of split {split!r}. Fix: put "
                                f"the {split} documents in that file.")
        files = [f for f in candidates if f.is_file()]
        if files:
            found[sub.name] = files
    if not found:
        raise DataError(f"`{field}`: no <domain>/{split}.jsonl or <domain>/{split}.parquet "
                        f"files under {root}. Fix: check `{field}` and `split`.")
    return found


def _domain_folders(root: Path) -> list[Path]:
    """The subfolders of a corpus directory that may be domains (not ``long/``), sorted."""
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != LONG_DOCUMENTS_DIRNAME)


def check_weighted_folders(weights: Mapping[str, Any], data_dir: str | Path, split: str,
                           found: Sequence[str], *, field: str) -> None:
    """Refuse weights for a folder of ``data_dir`` that :func:`discover_domain_files` skipped
    because it has no ``<split>`` file (e.g. only ``validation.jsonl``), with that reason:
    otherwise the user reads "unknown domains" about a folder they can see."""
    root = Path(data_dir).expanduser()
    skipped = {p.name: p for p in _domain_folders(root) if p.name not in found}
    named = [name for name in weights if name in skipped]
    if named:
        folders = ", ".join(str(skipped[name]) for name in named)
        raise DataError(f"`{field}` names {named}, but {folders} has no {split}.jsonl or "
                        f"{split}.parquet file (split={split!r}), so it is not a domain of this "
                        f"split. Fix: add the file, or leave {named} out of `{field}`.")


def normalize_weights(weights: Mapping[str, float], domain_names: Sequence[str], *,
                      field: str = "weights") -> np.ndarray:
    """Weights in ``domain_names`` order, checked and normalized to sum to one.

    A weight that is not a number is a :class:`ConfigError` naming its key
    (``<field>.<domain>``)."""
    if not isinstance(weights, Mapping):
        raise ConfigError(field, f"is {weights!r}, not a mapping of domain to weight.",
                          f"write `{field}: {{domain: weight, ...}}`.")
    unknown = sorted(set(weights) - set(domain_names))
    if unknown:
        raise ConfigError(field, f"unknown domains {unknown}.",
                          f"use only the corpus's domains: {list(domain_names)}.")
    values = np.asarray([float(config_value(weights[name], f"{field}.{name}", float))
                         if name in weights else 0.0 for name in domain_names])
    if np.any(~np.isfinite(values)) or np.any(values < 0):
        raise ConfigError(field, f"weights must be finite and >= 0, got {dict(weights)}.")
    if values.sum() <= 0:
        raise ConfigError(field, f"weights must sum to a positive number, got {dict(weights)}.",
                          "give at least one domain a positive weight.")
    return values / values.sum()


class DomainMixtureDataset(Dataset):
    """A map-style dataset over a packed multi-domain corpus.

    An integer index draws from the fixed-weight schedule (for stock recipes); a
    ``(domain_index, pack_index)`` tuple addresses a pack directly (for
    :class:`DomainBatchSampler`). Every sample is a torchtune packed sample plus ``domain``.
    """

    packed = True  # tells stock recipes to use padded_collate_packed

    def __init__(self, corpus: PackedDomainCorpus, weights: np.ndarray, *,
                 num_samples: int | None = None, seed: int = 0) -> None:
        self.corpus = corpus
        self.weights = np.asarray(weights, dtype=np.float64)
        self.seed = seed
        self.num_samples = int(num_samples or sum(corpus.num_packs))
        self._schedule: np.ndarray | None = None

    @property
    def domain_names(self) -> list[str]:
        return self.corpus.domain_names

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, tuple):
            return self.corpus.get(*key)
        return self.corpus.get(*self.pack_address(key))

    def pack_address(self, index: int) -> tuple[int, int]:
        """The ``(domain_index, pack_index)`` that integer ``index`` reads in the fixed-weight
        schedule."""
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        if self._schedule is None:
            self._schedule = self._build_schedule()
        domain, pack = self._schedule[index]
        return int(domain), int(pack)

    def _build_schedule(self) -> np.ndarray:
        """Every domain gets exactly its share of the indices (:func:`exact_domain_counts`),
        in a seeded random order: with the natural proportions and the default length, one
        pass over the dataset visits every pack once (independent draws per index would leave
        some packs out of an epoch and repeat others)."""
        rng = np.random.default_rng(self.seed)
        counts = exact_domain_counts(self.weights, self.num_samples)
        domains = rng.permutation(np.repeat(np.arange(len(self.weights)), counts))
        schedule = np.zeros((self.num_samples, 2), dtype=np.int64)
        schedule[:, 0] = domains
        for d, count in enumerate(self.corpus.num_packs):
            where = np.flatnonzero(domains == d)
            schedule[where, 1] = _epoch_permutations(count, len(where), self.seed, d)
        return schedule


def exact_domain_counts(weights: np.ndarray, total: int) -> np.ndarray:
    """How many of ``total`` samples each domain gets: ``total * weight`` rounded so that the
    counts sum to ``total`` (largest remainders round up; ties go to the earlier domain)."""
    wanted = np.asarray(weights, dtype=np.float64) * total
    counts = np.floor(wanted + 1e-9).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        order = np.argsort(-(wanted - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def _epoch_permutations(count: int, needed: int, seed: int, domain: int) -> np.ndarray:
    """``needed`` pack indices: a fresh seeded permutation of ``range(count)`` per pass."""
    out = []
    epoch = 0
    while sum(len(x) for x in out) < needed:
        out.append(_permutation(count, seed, domain, epoch))
        epoch += 1
    return np.concatenate(out)[:needed] if out else np.zeros(0, dtype=np.int64)


def _permutation(count: int, seed: int, domain: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, domain, epoch]).permutation(count)


def domain_mixture_dataset(tokenizer, *, data_dir: str | None = None,
                           domains: Mapping[str, Any] | None = None,
                           weights: Mapping[str, float] | None = None, split: str = "train",
                           max_seq_len: int = 2048, packing: PackingMode = "split",
                           positions: PositionMode = "reset", num_samples: int | None = None,
                           seed: int = 0, text_field: str = "text",
                           cache_dir: str | None = None, packed: bool = True,
                           config_key: str | None = None) -> DomainMixtureDataset:
    """Build a weighted, packed multi-domain dataset from local files.

    Args:
        tokenizer: a torchtune tokenizer with ``encode`` and ``pad_id``.
        data_dir: a corpus laid out as ``<data_dir>/<domain>/<split>.jsonl`` (the default
            corpus built by ``acadlm-defaults build`` is).
        domains: instead of ``data_dir``, ``{name: files}`` or ``{name: {data_files, weight}}``;
            either every entry has a ``weight`` or none has (mixing them is refused: the
            unweighted entries would silently get weight 0).
        weights: ``{domain: weight}``; domains not named get weight 0; normalized. Defaults to
            the ``domains:`` weights, else each domain's share of packs (its natural
            proportion).
        split: which split file to read under ``data_dir`` (``train``/``validation``).
        max_seq_len: pack length in tokens.
        packing: ``split`` (cut documents at pack boundaries, no padding but the last pack) or
            ``whole`` (never cut a document that fits; pad instead).
        positions: ``reset`` positions at each document, or ``continuous`` over the pack.
        num_samples: length of the dataset; default the total number of packs.
        seed: seeds the domain schedule and the per-domain pack order.
        text_field: the text column of the data files.
        cache_dir: where tokenized arrays are cached; ``None`` disables the cache.
        packed: must be True; accepted because stock recipes read it to choose the collate.
        config_key: the config key of this block (``dataset``, ``validation_dataset``), used to
            name keys in errors; a recipe passes it when it builds the block. Default: errors
            say ``dataset (or validation_dataset).<key>``.
    """
    key = config_key or DEFAULT_CONFIG_KEY
    if not packed:
        raise ConfigError(f"{key}.packed", "domain mixtures are always packed.",
                          "set `packed: True` (stock recipes then use padded_collate_packed).")
    # Checked before anything is read or tokenized, which can take minutes.
    max_seq_len = check_max_seq_len(max_seq_len, field=f"{key}.max_seq_len")
    _check_choice(packing, PACKING_MODES, f"{key}.packing")
    _check_choice(positions, POSITION_MODES, f"{key}.positions")
    domain_files, domain_weights = _domain_sources(data_dir, domains, split, key)
    if weights is None:
        check_all_or_none_weighted(list(domain_files), domain_weights, field=f"{key}.domains")
    else:
        if not isinstance(weights, Mapping):
            raise ConfigError(f"{key}.weights", f"is {weights!r}, not a mapping of domain to "
                              "weight.", "write `weights: {domain: weight, ...}`.")
        if data_dir is not None:
            check_weighted_folders(weights, data_dir, split, list(domain_files),
                                   field=f"{key}.weights")
        domain_weights = dict(weights)
    # The key the user wrote the weights under: `weights:`, or each entry's `weight` in `domains:`.
    weights_field = f"{key}.weights" if weights is not None else f"{key}.domains"
    if domain_weights:
        checked = normalize_weights(domain_weights, list(domain_files), field=weights_field)
        # A domain with weight 0 is left out entirely: it is never tokenized or sampled.
        domain_files = {n: f for n, f, w in zip(domain_files, domain_files.values(), checked)
                        if w > 0}
    corpus = build_packed_corpus(tokenizer, domain_files, max_seq_len=max_seq_len,
                                 packing=packing, positions=positions, text_field=text_field,
                                 cache_dir=cache_dir,
                                 split=split if data_dir is not None else None)
    if domain_weights:
        normalized = normalize_weights({n: domain_weights[n] for n in corpus.domain_names},
                                       corpus.domain_names, field=weights_field)
    else:
        counts = np.asarray(corpus.num_packs, dtype=np.float64)
        normalized = counts / counts.sum()
    return DomainMixtureDataset(corpus, normalized, num_samples=num_samples, seed=seed)


def _check_choice(value: object, choices: Sequence[str], field: str) -> None:
    """Raise :class:`ConfigError` naming ``field`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(field, f"unknown mode {value!r}.",
                          f"use one of {', '.join(repr(c) for c in choices)}.")


def _domain_sources(data_dir: str | Path | None, domains: Mapping[str, Any] | None, split: str,
                    key: str) -> tuple[dict[str, list[Path]], dict[str, float]]:
    """The files of every domain and the ``weight``s given inside ``domains:`` (empty for
    ``data_dir``); ``key`` names the dataset block in errors."""
    if (data_dir is None) == (domains is None):
        raise ConfigError(key, "give exactly one of `data_dir` and `domains`.",
                          "e.g. `data_dir: ${acadlm_home:}/corpus`.")
    if data_dir is not None:
        return discover_domain_files(data_dir, split, field=f"{key}.data_dir"), {}
    if not isinstance(domains, Mapping):
        raise ConfigError(f"{key}.domains", f"is {domains!r}, not a mapping of domain name to "
                          "files.", "write `domains: {name: files, ...}`.")
    files: dict[str, list[Path]] = {}
    weights: dict[str, float] = {}
    for name, spec in domains.items():
        if isinstance(spec, Mapping):
            if "data_files" not in spec:
                raise ConfigError(f"{key}.domains.{name}", "has no `data_files`.")
            files[name] = resolve_data_files(spec["data_files"],
                                             field=f"{key}.domains.{name}.data_files")
            if "weight" in spec:
                weights[name] = float(config_value(spec["weight"],
                                                   f"{key}.domains.{name}.weight", float))
        else:
            files[name] = resolve_data_files(spec, field=f"{key}.domains.{name}")
    return files, weights


def check_all_or_none_weighted(names: Sequence[str], weights: Mapping[str, float], *,
                               field: str) -> None:
    """Refuse ``domains:`` entries of which some have a ``weight`` and some do not, when those
    weights are the mixture's (no top-level ``weights:``).

    An entry without one would otherwise get weight 0 and be left out without a word (a
    likely slip, not a choice: weight 0 is written ``weight: 0``)."""
    unweighted = [name for name in names if name not in weights]
    if weights and unweighted:
        raise ConfigError(field, f"entries {sorted(weights)} have a `weight` but {unweighted} "
                          "do not; an entry without one would get weight 0 and be left out.",
                          f"give every entry a weight (e.g. `{unweighted[0]}: {{data_files: "
                          "..., weight: 0.5}`), or give none to mix the domains in their "
                          "natural proportions (each domain's share of packs).")


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_id", None)
    if pad is None:
        raise ConfigError("tokenizer", f"{type(tokenizer).__name__} has no `pad_id`.",
                          "use a ModelTokenizer such as acadlm_plugins.models.tokenizer."
                          "smollm2_tokenizer.")
    return int(pad)


class DomainBatchSampler:
    """Draws batches of ``(domain_index, pack_index)`` keys from the current domain weights.

    Each draw takes the whole global batch (``batch_size * world_size`` samples) with one RNG
    shared by all ranks, and each rank keeps its own slice: ranks agree on the data without
    communicating. Within a domain packs are visited in a seeded random order, reshuffled
    every pass. ``set_weights`` takes effect from the next batch.

    The stream of keys depends on the samples per draw (``batch_size * world_size``: two ranks
    with ``batch_size`` B draw what one process with 2B draws) and on the draws per optimizer
    step (``gradient_accumulation_steps``, which places the weight updates), so both are saved
    and a resume that changes either is refused: it would silently train on another global
    batch than the checkpoint's run.
    """

    def __init__(self, domain_names: Sequence[str], num_packs: Sequence[int],
                 weights: np.ndarray, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, gradient_accumulation_steps: int = 1) -> None:
        if batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {batch_size}.")
        self.domain_names = list(domain_names)
        self.num_packs = list(num_packs)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        self._generator = torch.Generator().manual_seed(seed)
        self._cursor = [0] * len(self.domain_names)
        self._epoch = [0] * len(self.domain_names)
        self._orders = [_permutation(n, seed, d, 0) for d, n in enumerate(self.num_packs)]
        self.batches_drawn = 0
        self.samples_per_domain = [0] * len(self.domain_names)
        #: per-domain digests of the packed tokens (:meth:`PackedDomainCorpus.content_digests`)
        self.content: list[str] | None = None

    @classmethod
    def for_dataset(cls, dataset: DomainMixtureDataset, batch_size: int, **kwargs) -> DomainBatchSampler:
        sampler = cls(dataset.domain_names, dataset.corpus.num_packs, dataset.weights,
                      batch_size, **kwargs)
        digests = getattr(dataset.corpus, "content_digests", None)
        sampler.content = digests() if digests is not None else None
        return sampler

    def set_weights(self, weights: Sequence[float] | np.ndarray | torch.Tensor) -> None:
        weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        if weights.shape != self.weights.shape or not torch.isfinite(weights).all() \
                or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"invalid domain weights {weights.tolist()}")
        self.weights = weights / weights.sum()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> list[tuple[int, int]]:
        """The keys of this rank's share of the next global batch."""
        total = self.batch_size * self.world_size
        domains = torch.multinomial(self.weights, total, replacement=True,
                                    generator=self._generator).tolist()
        keys = [(d, self._next_pack(d)) for d in domains]
        for d in domains:
            self.samples_per_domain[d] += 1
        self.batches_drawn += 1
        start = self.rank * self.batch_size
        return keys[start : start + self.batch_size]

    def _next_pack(self, domain: int) -> int:
        if self._cursor[domain] >= self.num_packs[domain]:
            self._epoch[domain] += 1
            self._cursor[domain] = 0
            self._orders[domain] = _permutation(self.num_packs[domain], self.seed, domain,
                                                self._epoch[domain])
        pack = int(self._orders[domain][self._cursor[domain]])
        self._cursor[domain] += 1
        return pack

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state(), "cursor": list(self._cursor),
                "epoch": list(self._epoch), "weights": self.weights.clone(),
                "batches_drawn": self.batches_drawn, "domain_names": list(self.domain_names),
                "num_packs": list(self.num_packs),
                "samples_per_domain": list(self.samples_per_domain), "content": self.content,
                "global_batch": self._global_batch()}

    def _global_batch(self) -> dict[str, int]:
        """What defines the stream this sampler draws, beyond the data and the seed."""
        return {"batch_size": self.batch_size, "world_size": self.world_size,
                "gradient_accumulation_steps": self.gradient_accumulation_steps}

    def _check_global_batch(self, saved: Mapping[str, int] | None) -> None:
        """Refuse a resume that would draw another global batch than the checkpoint's run."""
        if saved is None:  # checkpoints written before the global batch was recorded
            if self.rank == 0:
                log.warning("the checkpoint does not record its global batch (batch_size x "
                            "data-parallel processes x gradient_accumulation_steps; it was "
                            "written by a version that did not record it), so this resume "
                            "cannot check that it matches this run's (%d x %d x %d). If the "
                            "checkpoint's run used another, stop and resume with its "
                            "batch_size, process count and gradient_accumulation_steps, or start "
                            "a new output_dir.", self.batch_size, self.world_size,
                            self.gradient_accumulation_steps)
            return
        old_b, old_w = int(saved["batch_size"]), int(saved["world_size"])
        old_a = int(saved.get("gradient_accumulation_steps", 1))
        old_draw, new_draw = old_b * old_w, self.batch_size * self.world_size
        new_a = self.gradient_accumulation_steps
        if old_draw == new_draw and old_a == new_a:
            return
        if old_draw % self.world_size == 0:
            same = (f"batch_size {old_draw // self.world_size} on this run's {self.world_size} "
                    f"data-parallel process(es)")
        else:
            same = (f"a process count that divides {old_draw}, with batch_size x processes "
                    f"= {old_draw}")
        was = (f"batch_size {old_b} x {old_w} data-parallel process(es) x "
               f"gradient_accumulation_steps {old_a}")
        now = (f"batch_size {self.batch_size} x {self.world_size} x "
               f"gradient_accumulation_steps {new_a}")
        if old_draw * old_a != new_draw * new_a:
            problem = (f"the checkpoint being resumed was trained on a global batch of "
                       f"{old_draw * old_a} samples per step ({was}); this run's is "
                       f"{new_draw * new_a} ({now}), so it would go on with other batches than "
                       "the run it continues.")
        else:
            problem = (f"the checkpoint being resumed drew its {old_draw * old_a} samples per "
                       f"step as {was}; this run would draw them as {now}, and the sampler "
                       "draws each micro-batch's samples at once, so it would go on with other "
                       "batches than the run it continues.")
        raise ConfigError(
            "batch_size" if old_draw != new_draw else "gradient_accumulation_steps",
            problem + " (The processes are `tune run --nproc_per_node`, divided by the "
            "sequence-parallel degree where one is set.)",
            f"resume with {same} and gradient_accumulation_steps {old_a}, so that batch_size "
            f"x data-parallel processes stays {old_draw}"
            + (" (batch_size goes the other way from the processes: half the processes, twice "
               "the batch_size)"
               if self.world_size != old_w else "")
            + "; or start a new output_dir.")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["domain_names"]) != self.domain_names or \
                list(state["num_packs"]) != self.num_packs:
            raise DataError(
                "cannot resume: the checkpoint's data has domains "
                f"{list(state['domain_names'])} with {list(state['num_packs'])} packs, this run "
                f"has {self.domain_names} with {self.num_packs}. Fix: resume with the same "
                "dataset config (files, weights' domains, max_seq_len), or start a new output_dir.")
        saved = state.get("content")  # None in checkpoints written before it was recorded
        if saved is not None and self.content is not None and list(saved) != self.content:
            changed = [name for name, old, new in zip(self.domain_names, saved, self.content,
                                                      strict=True) if old != new]
            raise DataError(
                f"cannot resume: the text of domains {changed} changed since the checkpoint was "
                "written (same files and pack counts, other tokens), so the run would go on "
                "training on other data under the old run's name. Fix: restore the data the run "
                "started with, or start a new output_dir.")
        self._check_global_batch(state.get("global_batch"))
        self._generator.set_state(state["generator"])
        self._cursor = list(state["cursor"])
        self._epoch = list(state["epoch"])
        self._orders = [_permutation(n, self.seed, d, e)
                        for d, (n, e) in enumerate(zip(self.num_packs, self._epoch))]
        self.weights = state["weights"].clone().to(torch.float64)
        self.batches_drawn = int(state["batches_drawn"])
        self.samples_per_domain = list(state["samples_per_domain"])


def collate_domain_packs(batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Collate packed samples as torchtune's ``padded_collate_packed`` does (``tokens``,
    ``labels``, ``input_pos``, the document ``mask``), keeping ``domain`` and the segment
    lengths (``seq_lens``, zero-padded to ``[b, most segments]``, for attention that masks
    documents by itself). The mask is built without torchtune's dense S x S step where it uses
    FlexAttention (:mod:`~acadlm_plugins.data.document_masks`)."""
    missing = [i for i, sample in enumerate(batch) if "domain" not in sample]
    if missing:
        raise ValueError(f"samples {missing} carry no `domain`; collate_packs batches those")
    return collate_packs(batch, block_mask=True)


__all__ = ["CROSS_ENTROPY_IGNORE_INDEX", "DomainBatchSampler", "DomainMixtureDataset",
           "PackedDomainCorpus", "build_packed_corpus", "collate_domain_packs",
           "discover_domain_files", "domain_mixture_dataset", "exact_domain_counts",
           "normalize_weights"]
