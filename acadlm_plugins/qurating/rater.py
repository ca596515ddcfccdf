"""QuRating stage 2: the rater, a decoder with one scalar quality head per criterion.

A rater reads a text and gives it one real-valued score per criterion. It is trained on the
judge's pairwise preferences with the Bradley-Terry model: the probability that text B is better
than text A is ``sigmoid(s_B - s_A)``, fitted to the judge's confidence ``p`` with binary
cross-entropy (:func:`bradley_terry_loss`). Only differences of scores are ever trained, so a
score is meaningful relative to other texts' scores, not on its own (the selection stage
z-normalises them).

**Model.** :class:`RaterModel` is a torchtune ``TransformerDecoder`` used without its output
projection: the final-norm hidden states are pooled into one vector per text and mapped by
``nn.Linear(dim, num_criteria, bias=False)`` to the scores. The bias is left out because it
cancels in ``s_B - s_A`` and so could never be trained. The head starts as QuRating's score
layer does (Hugging Face's ``_init_weights``): normal with mean 0 and the standard deviation
``initializer_range`` of the backbone's ``config.json`` (0.02 when the config has none, the
Llama value and the transformers default; :func:`head_init_std`). A zero head would give the
backbone no gradient on the first step (the gradient reaching the hidden states is the head
weight) and tiny ones for many steps after. The draw comes from a generator of its own, seeded
with the run's seed, so a run is reproducible, every rank draws the same head, and the global
RNG stream is untouched. The default pooling is ``last``, the hidden state of the last real
token: in a causal decoder that is the only position which has
attended to the whole text, and it is what sequence-classification heads on decoders (the
paper's rater among them) use. ``mean`` (the average over the text's positions) is available
as an alternative; it averages states that each saw only a prefix. Texts are right-padded, so
with causal attention a real token never sees padding and no attention mask is needed: a text
gets the same score alone or in any batch (up to floating-point rounding).

**Input.** A text becomes ``[BOS] + its tokens`` (without the tokenizer's post-processor),
truncated to ``max_tokens`` text tokens; the annotator frames each chunk of a document the same
way (:func:`frame`), so the rater sees at annotation time what it saw in training.

**Folder** (see :mod:`acadlm_plugins.qurating`)::

    <rater>/model/           the trained backbone as a Hugging Face model folder (+ tokenizer)
    <rater>/rater_heads.pt   {"weight": criteria x dim tensor, "criteria": [...]}
    <rater>/rater.json       criteria, pooling, max_tokens, head shape, training summary

**Judgments.** :class:`PairwiseJudgments` keeps the pairs whose judgment is confident enough
(``|p - 0.5| >= margin``) for at least one criterion, with a per-criterion mask, since a pair
can be clear on one criterion and a coin flip on another. A criterion the judge could not answer
for a pair (``null`` or absent in its row) is masked the same way, so the pair still trains the
criteria it has. A pair is held out for evaluation when
a hash of its ``pair_id`` falls below ``validation_fraction``: the split does not depend on the
file's order, and a pair stays on its side when more judgments are added. The split is over
pairs, not documents: a held-out pair may hold an excerpt of a document that a training pair
also shows, so held-out accuracy measures pairs the rater was not trained on, not unseen
documents, and is optimistic when they share documents. ``counts`` says how many held-out pairs
do (``heldout_pairs_sharing_a_training_document``, from the rows' ``doc_id_a``/``doc_id_b``;
null when no held-out row carries them, as in files written before they were). With
``validation_split="documents"`` the same pairs are held out, and every training pair that
shows a document a held-out pair shows is left out of training
(``train_pairs_left_out_for_heldout_documents``), so held-out accuracy is over unseen documents,
as QuRating measures its rater; every pair must then name both its documents.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchtune import training
from torchtune.modules import TransformerDecoder

from acadlm_plugins._compat import (
    complete_checkpointer_config,
    hf_checkpoint_files,
    save_hf_model_dir,
)
from acadlm_plugins.data.documents import iter_jsonl_lines, json_error_text
from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.evaluation.lm_adapter import AcadTokenizer, final_hidden_states
from acadlm_plugins.models.families import HFModelSpec, hf_model_spec, unreadable_weights_refused
from acadlm_plugins.qurating import CRITERIA
from acadlm_plugins.training.checkpointing import files_fingerprint

log = logging.getLogger(__name__)

POOLINGS = ("last", "mean")
# How pairs are held out: by pair id only (``pairs``), or by pair id with the training pairs
# that show a held-out document left out of training (``documents``). The first is the default.
VALIDATION_SPLITS = ("pairs", "documents")
BACKBONE_DIRNAME = "model"
HEADS_FILENAME = "rater_heads.pt"
INFO_FILENAME = "rater.json"
FORMAT_VERSION = 1
DEFAULT_MARGIN = 0.25
# The head's init std when the backbone's config.json has no `initializer_range`: the value of
# the Llama configs QuRating trains and the transformers default.
DEFAULT_HEAD_INIT_STD = 0.02
# The files RaterTokenizer (through AcadTokenizer) reads from a model folder: the vocabulary and
# merges, and the files its BOS/EOS/pad ids come from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


# ------------------------------------------------------------------------------------ model
class RaterModel(nn.Module):
    """A torchtune decoder backbone plus ``nn.Linear(dim, num_criteria)`` on pooled hidden
    states; ``forward(tokens, lengths)`` gives ``batch x num_criteria`` float32 scores.

    The head weights are drawn from ``normal(0, init_std)`` with ``generator`` (a CPU
    generator; None: one seeded with 0, so building a model never advances the global RNG),
    as :func:`init_head_weight` does; a loaded or resumed rater overwrites them."""

    def __init__(self, backbone: TransformerDecoder, criteria: Sequence[str],
                 pooling: str = "last", *, init_std: float = DEFAULT_HEAD_INIT_STD,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_pooling(pooling)
        if not criteria:
            raise ConfigError("criteria", "is empty.", "give the rater at least one criterion.")
        self.backbone = backbone
        self.criteria = tuple(criteria)
        self.pooling = pooling
        dim = backbone.tok_embeddings.embedding_dim
        weight = backbone.tok_embeddings.weight
        # skip_init: no default (kaiming) init, which would draw from the global RNG.
        self.heads = nn.utils.skip_init(nn.Linear, dim, len(self.criteria), bias=False,
                                        device=weight.device, dtype=weight.dtype)
        init_head_weight(self.heads.weight, init_std,
                         generator if generator is not None else torch.Generator().manual_seed(0))

    @property
    def dim(self) -> int:
        """Width of the pooled hidden state."""
        return self.heads.in_features

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores of right-padded ``tokens`` (``batch x length``) whose real lengths (BOS
        included) are ``lengths``."""
        hidden = final_hidden_states(self.backbone, tokens)
        return self.heads(pool(hidden, lengths, self.pooling)).float()


def init_head_weight(weight: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Fill ``weight`` in place with ``normal(0, std)`` draws of the CPU ``generator``, made in
    float32 on the CPU and then copied, so the same seed gives the same head (up to the
    weight's dtype) on any device. A meta tensor (a model built for its shapes only) is left
    as it is: it has no values to fill."""
    if not std > 0:
        raise ValueError(f"the head init std must be positive, not {std!r}")
    if weight.is_meta:
        return
    draw = torch.empty(tuple(weight.shape), dtype=torch.float32, device="cpu")
    draw.normal_(0.0, std, generator=generator)
    with torch.no_grad():
        weight.copy_(draw)


def head_init_std(model_dir: str | Path, *, key: str = "backbone_dir") -> float:
    """The std the rater head is initialized with: ``initializer_range`` of the backbone's
    ``config.json``, as Hugging Face initializes QuRating's score layer, or
    :data:`DEFAULT_HEAD_INIT_STD` when the config does not set it. A value that is not a
    positive number is refused naming ``key``."""
    value = backbone_spec(model_dir, key=key).config.get("initializer_range")
    if value is None:
        return DEFAULT_HEAD_INIT_STD
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ConfigError(key, f"{Path(model_dir).expanduser() / 'config.json'} has "
                          f"initializer_range {value!r}; the rater head is initialized with "
                          "that standard deviation.", "give a positive number (Llama: 0.02) "
                          "or remove the field (then 0.02 is used).")
    return float(value)


def check_pooling(pooling: str) -> None:
    """Refuse an unknown pooling name with the config key and the choices."""
    if pooling not in POOLINGS:
        raise ConfigError("pooling", f"unknown pooling {pooling!r}.", f"use one of {POOLINGS}.")


def check_validation_split(validation_split: str) -> None:
    """Refuse an unknown ``validation_split`` with the config key and the choices."""
    if validation_split not in VALIDATION_SPLITS:
        raise ConfigError("validation_split", f"unknown value {validation_split!r}.",
                          f"use one of {list(VALIDATION_SPLITS)}: `pairs` holds out pairs by "
                          "pair_id hash, `documents` also keeps their documents out of "
                          "training.")


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per sequence of ``hidden`` (``batch x length x dim``): the state at position
    ``lengths - 1`` (``last``) or the mean over the first ``lengths`` positions (``mean``)."""
    lengths = lengths.to(hidden.device)
    if pooling == "last":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, lengths - 1]
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    keep = (positions[None, :] < lengths[:, None]).to(hidden.dtype)
    return (hidden * keep[..., None]).sum(dim=1) / lengths[:, None].to(hidden.dtype)


# ------------------------------------------------------------------------------------- loss
def bradley_terry_loss(s_a: torch.Tensor, s_b: torch.Tensor, p_b: torch.Tensor,
                       mask: torch.Tensor | None = None, *,
                       reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy between ``sigmoid(s_b - s_a)`` and the judge's ``p_b``.

    All arguments are ``pairs x criteria`` (or any equal shape); ``p_b`` is the probability that
    B is better. ``mask`` selects the entries that count (a pair may pass the confidence margin
    for some criteria only). ``reduction``: ``mean`` over counted entries (0 when none),
    ``sum``, or ``none`` (masked entries are 0). The gradient with respect to ``s_b`` is
    ``sigmoid(s_b - s_a) - p_b``: negative, so the preferred text's score rises, whenever the
    model believes in B less than the judge does.
    """
    losses = F.binary_cross_entropy_with_logits((s_b - s_a).float(), p_b.float(),
                                                reduction="none")
    if mask is not None:
        losses = losses * mask.to(losses.dtype)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}; use mean, sum or none")
    count = losses.numel() if mask is None else int(mask.sum())
    return losses.sum() / max(count, 1)


def pairwise_correct(s_a: torch.Tensor, s_b: torch.Tensor, p_b: torch.Tensor) -> torch.Tensor:
    """1 where the rater orders a pair as the judge does, 0 where not, 0.5 for a tied score."""
    agree = torch.sign(s_b - s_a) * torch.sign(p_b - 0.5)
    return (agree + 1) / 2


# ------------------------------------------------------------------------------- tokenizer
class RaterTokenizer:
    """The backbone folder's ``tokenizer.json`` (read by the lm-eval adapter's
    :class:`AcadTokenizer`), encoding plain text without special tokens; :func:`frame` adds the
    BOS. Training and annotation both tokenize through this class. A ``truncation`` or
    ``padding`` the file enables is switched off when it is loaded
    (:func:`acadlm_plugins.models.tokenizer.load_hf_base_tokenizer`): texts are encoded whole,
    so annotation scores every chunk and counts every token of a document."""

    def __init__(self, folder: str | Path, *, key: str = "backbone_dir") -> None:
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise ConfigError(key, f"no tokenizer.json in {folder}.",
                              "point it at a complete Hugging Face model folder (the rater "
                              "tokenizes with the backbone's own tokenizer).")
        self._tokenizer = AcadTokenizer(folder)
        self.bos_id = self._tokenizer.bos_id
        self.pad_id = self._tokenizer.pad_id
        self.vocab_size = self._tokenizer.vocab_size

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of every text, without BOS/EOS (batched in the Rust tokenizer)."""
        encodings = self._tokenizer.rust.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]


def frame(ids: Sequence[int], bos_id: int, max_tokens: int | None = None) -> list[int]:
    """``[BOS] + ids``, keeping at most ``max_tokens`` text tokens: what the rater reads."""
    kept = list(ids) if max_tokens is None else list(ids[:max_tokens])
    return [bos_id, *kept]


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """Right-padded ``batch x longest`` int64 tokens and the int64 lengths."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    tokens = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return tokens, lengths


# ------------------------------------------------------------------------------- judgments
@dataclass(frozen=True)
class JudgedPair:
    """One judgments row: the two texts and ``p(B better)`` per criterion (NaN: not judged),
    and the ids of the documents the texts were cut from (None when the row does not say)."""

    pair_id: str
    text_a: str
    text_b: str
    p_b: tuple[float, ...]
    where: str
    doc_id_a: str | None = None
    doc_id_b: str | None = None


def read_judgments(paths: str | Path | Sequence[str | Path], *,
                   criteria: Sequence[str] | None = None) -> tuple[list[str], list[JudgedPair]]:
    """Criteria and pairs of judgments jsonl files (schema in :mod:`acadlm_plugins.qurating`).

    ``criteria`` picks and orders the criteria; by default every criterion found in the files
    (the four built-in ones first, in their usual order, then others alphabetically). A pair
    not judged on a criterion gets NaN there. A repeated ``pair_id`` keeps its first row.
    Malformed rows raise :class:`DataError` naming ``file:line``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    rows: list[tuple[str, str, str, dict[str, float], tuple[str | None, str | None], str]] = []
    seen: set[str] = set()
    repeated = 0
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            inside = path / "judgments.jsonl"
            raise ConfigError("judgments", f"{path} is a directory; a JSONL file is expected.",
                              f"point it at {inside}." if inside.is_file() else
                              "point it at the judgments.jsonl file the judging stage wrote.")
        if not path.is_file():
            raise ConfigError("judgments", f"{path} does not exist.",
                              "point it at the judgments.jsonl the judging stage wrote.")
        # Streamed line by line; a byte that is not UTF-8 is a DataError naming file:line.
        for line_no, line in iter_jsonl_lines(path):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            row = _judgment_row(line, where)
            if row[0] in seen:
                repeated += 1
                continue
            seen.add(row[0])
            rows.append((*row, where))
    if repeated:
        log.warning("%d judgment rows repeat an earlier pair_id; the first row of each is used",
                    repeated)
    if not rows:
        raise DataError(f"no judgments in {', '.join(str(p) for p in paths)}. Fix: run the "
                        "judging stage first, or point `judgments` at its output.")
    found = {name for _, _, _, judged, _, _ in rows for name in judged}
    if criteria is None:
        criteria = [c for c in CRITERIA if c in found] + sorted(found - set(CRITERIA))
    else:
        criteria = list(criteria)
        missing = [c for c in criteria if c not in found]
        if missing:
            raise ConfigError("criteria", f"{missing} appear in no judgment row (the rows "
                              f"judge {sorted(found)}).", "pick criteria the judge was asked "
                              "about, or leave `criteria` unset to use all of them.")
    pairs = [JudgedPair(pair_id, a, b, tuple(judged.get(c, math.nan) for c in criteria), where,
                        *doc_ids)
             for pair_id, a, b, judged, doc_ids, where in rows]
    return criteria, pairs


def judgments_fingerprint(criteria: Sequence[str], pairs: Sequence[JudgedPair]
                          ) -> dict[str, Any]:
    """What a rater run trains on, as ``{"pairs": count, "sha256": hex}``: a hash of the
    criteria and of every pair as :func:`read_judgments` read it (id, both texts, p per
    criterion), in file order, since the order numbers the pairs a checkpoint's data position
    points at. The same file under another path spelling has the same fingerprint; a file with
    pairs added, removed, reordered or relabelled has another."""
    digest = hashlib.sha256(json.dumps(list(criteria)).encode("utf-8"))
    for pair in pairs:
        probs = [None if math.isnan(p) else p for p in pair.p_b]
        digest.update(b"\n" + json.dumps([pair.pair_id, pair.text_a, pair.text_b, probs],
                                          ensure_ascii=False).encode("utf-8"))
    return {"pairs": len(pairs), "sha256": digest.hexdigest()}


def _judgment_row(line: str, where: str) -> tuple[str, str, str, dict[str, float],
                                                  tuple[str | None, str | None]]:
    try:
        row = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: {json_error_text(err)}. Fix: "
                        "repair or delete that line.") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    for key in ("pair_id", "text_a", "text_b", "judgments"):
        if key not in row:
            raise DataError(f"{where}: the row has no {key!r} field (keys: {sorted(row)}). "
                            "Fix: judgments rows need pair_id, text_a, text_b and judgments.")
    for key in ("text_a", "text_b"):
        if not isinstance(row[key], str):
            raise DataError(f"{where}: {key!r} is {type(row[key]).__name__}, not a string.")
    judged = row["judgments"]
    if not isinstance(judged, dict):
        raise DataError(f"{where}: 'judgments' must map criterion -> p(B better), got "
                        f"{type(judged).__name__}.")
    probs: dict[str, float] = {}
    for name, value in judged.items():
        if value is None:
            continue  # not judged on this criterion
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0.0 <= float(value) <= 1.0):
            raise DataError(f"{where}: judgment {name!r} = {value!r} is not a probability in "
                            "[0, 1].")
        probs[str(name)] = float(value)
    doc_ids = tuple(str(row[key]) if row.get(key) not in (None, "") else None
                    for key in ("doc_id_a", "doc_id_b"))
    return str(row["pair_id"]), row["text_a"], row["text_b"], probs, (doc_ids[0], doc_ids[1])


def is_held_out(pair_id: str, validation_fraction: float) -> bool:
    """Whether a pair belongs to the held-out split: a hash of its id, uniform in [0, 1),
    below ``validation_fraction``."""
    digest = hashlib.sha256(pair_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction


def document_overlap(pairs: Sequence[JudgedPair], heldout: Sequence[bool]) -> dict[str, Any]:
    """How far the held-out pairs are from unseen documents: ``heldout_pairs_sharing_a_
    training_document``, the held-out pairs with a text cut from a document that a training
    pair also shows (None when no held-out pair names its documents), and
    ``pairs_without_document_ids``, the pairs whose row names neither document (rows written
    before ``doc_id_a``/``doc_id_b`` were); when some do, the count covers the others only."""
    training = {doc for pair, held in zip(pairs, heldout, strict=True) if not held
                for doc in (pair.doc_id_a, pair.doc_id_b) if doc is not None}
    sharing, known = 0, 0
    for pair, held in zip(pairs, heldout, strict=True):
        docs = [doc for doc in (pair.doc_id_a, pair.doc_id_b) if doc is not None]
        if held and docs:
            known += 1
            sharing += any(doc in training for doc in docs)
    return {"heldout_pairs_sharing_a_training_document": (
                sharing if known or not any(heldout) else None),
            "pairs_without_document_ids": sum(p.doc_id_a is None and p.doc_id_b is None
                                              for p in pairs)}


def check_document_ids(pairs: Sequence[JudgedPair]) -> None:
    """Refuse a split by documents when a pair does not name both its documents: a side
    without ``doc_id_a``/``doc_id_b`` could be a held-out document trained on (or a training
    document held out) and nothing could tell, so the split could not keep its promise."""
    unnamed = [pair for pair in pairs if pair.doc_id_a is None or pair.doc_id_b is None]
    if unnamed:
        raise DataError(
            f"`validation_split` is 'documents', but {len(unnamed)} of the {len(pairs)} "
            f"confident pairs do not name both their documents (first: {unnamed[0].where}, "
            f"pair {unnamed[0].pair_id!r}), so whether a held-out document is trained on "
            "cannot be checked. Fix: set `validation_split: pairs`, or re-judge with a judge "
            "that records `doc_id_a` and `doc_id_b` (sampled pairs; a pairs file whose rows "
            "give both).")


def training_pairs_on_heldout_documents(pairs: Sequence[JudgedPair], heldout: Sequence[bool]
                                        ) -> list[bool]:
    """For each pair, whether it is a training pair that shows a document a held-out pair
    shows (by ``doc_id_a``/``doc_id_b``): the pairs a split by documents leaves out of
    training, so that no held-out document is trained on."""
    held_docs = {doc for pair, held in zip(pairs, heldout, strict=True) if held
                 for doc in (pair.doc_id_a, pair.doc_id_b) if doc is not None}
    return [not held and any(doc in held_docs for doc in (pair.doc_id_a, pair.doc_id_b)
                             if doc is not None)
            for pair, held in zip(pairs, heldout, strict=True)]


@dataclass
class PairwiseJudgments:
    """Tokenized confident pairs, split into training and held-out pairs.

    ``targets`` and ``mask`` are ``pairs x criteria``: the judge's p(B better), and whether
    ``|p - 0.5| >= margin`` for that criterion. Pairs confident on no criterion are dropped.
    """

    criteria: list[str]
    pair_ids: list[str]
    tokens_a: list[list[int]]
    tokens_b: list[list[int]]
    targets: torch.Tensor
    mask: torch.Tensor
    train_indices: list[int]
    heldout_indices: list[int]
    pad_id: int
    counts: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, criteria: Sequence[str], pairs: Sequence[JudgedPair],
              tokenizer: RaterTokenizer, *, margin: float = DEFAULT_MARGIN,
              validation_fraction: float = 0.1, max_tokens: int = 512,
              validation_split: str = "pairs") -> PairwiseJudgments:
        """Filter by margin, split by pair-id hash, and tokenize (``[BOS] + text``, truncated
        to ``max_tokens`` text tokens). With ``validation_split="documents"`` the training
        pairs that show a held-out pair's document are in neither split (and counted)."""
        check_validation_split(validation_split)
        if not 0.0 <= margin < 0.5:
            raise ConfigError("margin", f"{margin} is outside [0, 0.5).",
                              "QuRating trains on pairs with |p - 0.5| >= 0.25 (the default).")
        if not 0.0 <= validation_fraction < 1.0:
            raise ConfigError("validation_fraction", f"{validation_fraction} is outside [0, 1).",
                              "hold out a small share of pairs, e.g. 0.1.")
        probs = torch.tensor([p.p_b for p in pairs], dtype=torch.float32).reshape(
            len(pairs), len(criteria))
        judged = ~torch.isnan(probs)
        # A small tolerance so that p = 0.75 passes margin 0.25 despite float rounding.
        confident = judged & ((probs - 0.5).abs() >= margin - 1e-9)
        keep = confident.any(dim=1)
        kept = [p for p, k in zip(pairs, keep.tolist()) if k]
        if not kept:
            raise DataError(f"none of the {len(pairs)} judged pairs has |p - 0.5| >= {margin} "
                            "on any criterion. Fix: lower `margin`, or check the judge (its "
                            "answers may all be near 0.5).")
        texts = [p.text_a for p in kept] + [p.text_b for p in kept]
        ids = tokenizer.encode(texts)
        framed = [frame(t, tokenizer.bos_id, max_tokens) for t in ids]
        truncated = sum(len(t) > max_tokens for t in ids)
        heldout = [is_held_out(p.pair_id, validation_fraction) for p in kept]
        left_out = [False] * len(kept)
        if validation_split == "documents":
            check_document_ids(kept)
            left_out = training_pairs_on_heldout_documents(kept, heldout)
        used = [not out for out in left_out]
        train = [not held and use for held, use in zip(heldout, used)]
        mask = confident[keep]
        held = torch.tensor(heldout, dtype=torch.bool)
        counts: dict[str, Any] = {
            "pairs_read": len(pairs), "pairs_kept": len(kept),
            "train_pairs": train.count(True), "heldout_pairs": heldout.count(True),
            **document_overlap([p for p, use in zip(kept, used) if use],
                               [h for h, use in zip(heldout, used) if use]),
            "validation_split": validation_split,
            "train_pairs_left_out_for_heldout_documents": left_out.count(True),
            "truncated_texts": truncated,
            "per_criterion": {name: {"judged": int(judged[:, c].sum()),
                                     "confident": int(confident[:, c].sum()),
                                     "heldout": int(mask[held, c].sum())}
                              for c, name in enumerate(criteria)},
        }
        return cls(criteria=list(criteria), pair_ids=[p.pair_id for p in kept],
                   tokens_a=framed[:len(kept)], tokens_b=framed[len(kept):],
                   targets=torch.nan_to_num(probs[keep], nan=0.5), mask=mask,
                   train_indices=[i for i, t in enumerate(train) if t],
                   heldout_indices=[i for i, h in enumerate(heldout) if h],
                   pad_id=tokenizer.pad_id, counts=counts)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A batch of pairs: ``tokens``/``lengths`` hold the A texts then the B texts (one
        forward pass scores both), ``targets`` and ``mask`` are ``pairs x criteria``."""
        sequences = [self.tokens_a[i] for i in indices] + [self.tokens_b[i] for i in indices]
        tokens, lengths = pad_batch(sequences, self.pad_id)
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return {"tokens": tokens, "lengths": lengths, "targets": self.targets[index],
                "mask": self.mask[index]}


def split_scores(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s_a, s_b)`` of the scores of a :meth:`PairwiseJudgments.collate` batch."""
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


# -------------------------------------------------------------------------- save and load
@dataclass(frozen=True)
class RaterInfo:
    """What ``rater.json`` records about a rater."""

    criteria: tuple[str, ...]
    pooling: str
    max_tokens: int
    dim: int
    training: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "criteria": list(self.criteria),
                "pooling": self.pooling, "max_tokens": self.max_tokens,
                "input": "[BOS] + text tokens (no other special tokens)",
                "backbone": BACKBONE_DIRNAME, "heads": {"file": HEADS_FILENAME,
                                                        "shape": [len(self.criteria), self.dim],
                                                        "bias": False},
                "training": self.training}


def hf_checkpointer(model_dir: str | Path, output_dir: str | Path) -> training.FullModelHFCheckpointer:
    """torchtune's HF checkpointer over ``model_dir`` with the ``model_type`` of its family
    (the weight conversion: Qwen2's q/k are not permuted and carry biases), with the weights
    read once so that it knows their file layout (it writes our backbone folders in that
    layout)."""
    model_dir = Path(model_dir)
    spec = backbone_spec(model_dir)
    checkpointer = training.FullModelHFCheckpointer(
        checkpoint_dir=str(model_dir), checkpoint_files=hf_checkpoint_files(model_dir),
        model_type=spec.checkpointer_model_type, output_dir=str(output_dir))
    # config.json keys left to transformers' defaults (Llama 1: no num_key_value_heads)
    complete_checkpointer_config(checkpointer, spec.checkpointer_defaults())
    with unreadable_weights_refused(model_dir, key="backbone_dir"):
        checkpointer.load_checkpoint()
    return checkpointer


def save_rater(folder: str | Path, state: Mapping[str, torch.Tensor], *,
               criteria: Sequence[str], pooling: str, max_tokens: int, source_dir: str | Path,
               training_info: Mapping[str, Any] | None = None,
               checkpointer: training.FullModelHFCheckpointer | None = None) -> Path:
    """Write a rater folder at ``folder`` atomically (replacing one that is there).

    ``state`` is a full :class:`RaterModel` state dict (``backbone.*`` and ``heads.weight``).
    ``source_dir`` is the HF folder the backbone was loaded from: its config and tokenizer files
    are copied and its weight layout reused; ``checkpointer`` (from :func:`hf_checkpointer`)
    saves reading it again.
    """
    folder = Path(folder)
    backbone = {k[len("backbone."):]: v.detach().cpu() for k, v in state.items()
                if k.startswith("backbone.")}
    heads = state["heads.weight"].detach().cpu().float().clone()
    if heads.shape[0] != len(criteria):
        raise ValueError(f"{heads.shape[0]} heads for {len(criteria)} criteria")
    partial = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="acadlm_rater_") as scratch:
        writer = checkpointer or hf_checkpointer(source_dir, scratch)
        save_hf_model_dir(writer, backbone, partial / BACKBONE_DIRNAME)
    torch.save({"weight": heads, "criteria": list(criteria)}, partial / HEADS_FILENAME)
    info = RaterInfo(tuple(criteria), pooling, int(max_tokens), int(heads.shape[1]),
                     dict(training_info or {}))
    (partial / INFO_FILENAME).write_text(json.dumps(info.to_json(), indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)
    return folder


def read_rater_info(folder: str | Path) -> RaterInfo:
    """``rater.json`` of a rater folder, checked; errors say what is missing."""
    folder = Path(folder).expanduser()
    info_file = folder / INFO_FILENAME
    if not info_file.is_file():
        raise ConfigError("rater_dir", f"{folder} is not a rater folder (no {INFO_FILENAME}).",
                          "point it at the `rater` folder the rater recipe exported "
                          "(<output_dir>/rater).")
    data = json.loads(info_file.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ConfigError("rater_dir", f"{info_file} has format_version "
                          f"{data.get('format_version')!r}; this version reads {FORMAT_VERSION}.",
                          "re-export the rater with this version of acadlm-plugins.")
    return RaterInfo(tuple(data["criteria"]), data["pooling"], int(data["max_tokens"]),
                     int(data["heads"]["shape"][1]), data.get("training", {}))


@dataclass
class LoadedRater:
    """A rater ready to score: model (eval mode, no grad), tokenizer, and its ``rater.json``."""

    model: RaterModel
    tokenizer: RaterTokenizer
    info: RaterInfo
    folder: Path


def load_rater(folder: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, max_seq_len: int | None = None) -> LoadedRater:
    """Load a rater folder written by :func:`save_rater` (the annotator's entry point).

    ``max_seq_len`` bounds the backbone's RoPE table (default: the model's own maximum).
    """
    folder = Path(folder).expanduser()
    info = read_rater_info(folder)
    device = torch.device(device)
    backbone = load_backbone(folder / BACKBONE_DIRNAME, device=device, dtype=dtype,
                             max_seq_len=max_seq_len, key="rater_dir")
    model = RaterModel(backbone, info.criteria, info.pooling)
    heads = torch.load(folder / HEADS_FILENAME, map_location="cpu", weights_only=True)
    if tuple(heads["criteria"]) != info.criteria or tuple(heads["weight"].shape) != (
            len(info.criteria), model.dim):
        raise ConfigError("rater_dir", f"{folder / HEADS_FILENAME} does not fit "
                          f"{INFO_FILENAME} (criteria {heads['criteria']}, shape "
                          f"{tuple(heads['weight'].shape)}; backbone width {model.dim}).",
                          "re-export the rater; its files come from different runs.")
    with torch.no_grad():
        model.heads.weight.copy_(heads["weight"].to(model.heads.weight.dtype))
    model.eval().requires_grad_(False)
    return LoadedRater(model, RaterTokenizer(folder / BACKBONE_DIRNAME, key="rater_dir"), info,
                       folder)


def load_backbone(model_dir: str | Path, *, device: torch.device, dtype: torch.dtype,
                  max_seq_len: int | None = None, key: str = "backbone_dir"
                  ) -> TransformerDecoder:
    """The torchtune decoder of an HF model folder of any supported family, built and loaded
    through the family layer (``HFModelSpec.load``: the family's modules, RoPE and
    checkpointer ``model_type``), with errors that name the config key ``key``; returned in
    eval mode without gradients."""
    model_dir = check_backbone_dir(model_dir, key=key)
    try:
        model = backbone_spec(model_dir, key=key).load(max_seq_len=max_seq_len, device=device,
                                                       dtype=dtype)
    except ConfigError as error:
        if error.key == key:
            raise
        raise ConfigError(key, f"{model_dir}: {error}") from error
    return model.requires_grad_(False)


def backbone_spec(model_dir: str | Path, *, key: str = "backbone_dir") -> HFModelSpec:
    """The family layer's reading of a backbone folder's config.json; an unsupported family
    (or config field) is refused naming ``key`` and, inside the message, the field."""
    try:
        return hf_model_spec(model_dir)
    except ConfigError as error:
        raise ConfigError(key, f"{Path(model_dir).expanduser()} cannot be a rater backbone: "
                          f"{error}") from error


def backbone_fingerprint(model_dir: str | Path) -> dict[str, Any]:
    """What a rater trains from in the backbone folder ``model_dir``, by content: ``weights``,
    the fingerprint of its HF weight files (:func:`hf_checkpoint_files`) that the other
    recipes record of their starting weights
    (:func:`~acadlm_plugins.training.checkpointing.files_fingerprint`), and
    ``tokenizer``, the same fingerprint of its :data:`TOKENIZER_FILES` (an absent file is
    recorded as absent). A rater checkpoint records both; a resumed run compares them."""
    model_dir = Path(model_dir).expanduser()
    return {"weights": files_fingerprint(model_dir, hf_checkpoint_files(model_dir)),
            "tokenizer": files_fingerprint(model_dir, TOKENIZER_FILES)}


def check_backbone_dir(model_dir: str | Path, *, key: str = "backbone_dir") -> Path:
    """Refuse a folder that is not a local HF model folder of a supported family with
    weights, naming ``key``."""
    model_dir = Path(model_dir).expanduser()
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(key, f"{model_dir} is not a Hugging Face model folder (no "
                          "config.json).", "point it at a local model folder, e.g. "
                          "${acadlm_home:}/models/SmolLM2-135M-Instruct.")
    backbone_spec(model_dir, key=key)
    if not hf_checkpoint_files(model_dir):
        raise ConfigError(key, f"no Hugging Face weights in {model_dir} (model*.safetensors, "
                          "pytorch_model*.bin, or the files of their index).",
                          "point it at a complete model folder.")
    return model_dir
