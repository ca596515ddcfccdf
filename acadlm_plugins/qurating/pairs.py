"""Pairs of text excerpts for a judge LM to compare, sampled from a local corpus.

QuRating asks a judge about excerpts rather than whole documents: the judge reads both texts in
one prompt, and the two texts of a pair are cut to the same number of tokens (unless one is
shown whole, below) so that length is not what the judge rewards. The length varies from pair
to pair, as in QuRating's judging script (``prompting/score_pairwise.py``: ``--tokens_min 256
--tokens_max 512 --probability_tokens_max 0.5``, Llama-2 tokens): with probability
``p_max_tokens`` a pair gets ``max_tokens`` tokens, otherwise a length drawn uniformly from
``[min_excerpt_tokens, max_tokens]``. The defaults are QuRating's 512, 256 and 0.5
(:class:`ExcerptLengths`); a smaller ``max_tokens`` alone scales the range to
``[max_tokens // 2, max_tokens]``.

An excerpt follows QuRating's ``extract_excerpt``, in tokens of the *judge's* tokenizer: a
document of at most ``max_tokens`` tokens is shown whole, whatever length was drawn for the
pair (so its excerpt may be shorter or longer than its partner's); a longer document gets the
drawn number of tokens from a start drawn uniformly from ``[0, tokens - max_tokens]``, the
range of a ``max_tokens`` excerpt whatever the drawn length (:func:`excerpt_of`). The span is
cut on token boundaries but sliced from the original text, with surrounding whitespace
trimmed, so it is an exact substring of the document. (Earlier versions tested the whole
text and drew the start against the drawn length, cutting a 400-token document to a drawn 300
tokens where QuRating shows all 400, so they sampled other pairs from the same seed. A pair id
names the excerpts' spans, so resuming a judgments file of theirs is refused, as pairs not in
this run's sample, unless each of its pairs is one this rule also samples, excerpts and all.)

Sampling is seeded and sequential: pair ``k`` depends only on the seed and the corpus, so asking
for more pairs with the same seed extends the same list, and a resumed run samples the same
pairs again. A pair's id hashes the two document ids and the excerpts' character spans, so the
id names exactly what was judged and does not depend on the order pairs were drawn in.

Corpora are read from jsonl or parquet files, or from our corpus layout
``<root>/<domain>/<split>.jsonl`` (the embedded default is ``~/.cache/acadlm/corpus``). A row
is ``{"text": ..., "id": ..., "domain": ..., "source": ...}``; only the text is required. A
row without a text is an error naming ``file:line``, not a silent skip: a corpus that lost its
texts is a corpus to repair. Texts shorter than ``min_tokens`` (empty ones included) are skipped
and counted.

Alternatively, ready-made pairs are read from a jsonl file of rows with ``text_a`` and ``text_b``
(a judgments file of an earlier run qualifies), to judge the same pairs again with another judge
or other criteria.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from acadlm_plugins.data.documents import SUPPORTED_SUFFIXES, iter_jsonl_values, resolve_data_files
from acadlm_plugins.errors import DataError
from acadlm_plugins.evaluation.lm_adapter import AcadTokenizer
from acadlm_plugins.training.config_checks import config_value

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512
DEFAULT_P_MAX_TOKENS = 0.5
DEFAULT_MIN_TOKENS = 32
PAIRS_CONFIG_KEYS = frozenset({"data", "file", "split", "text_field", "num_pairs", "max_tokens",
                               "min_excerpt_tokens", "p_max_tokens", "min_tokens", "same_domain",
                               "seed", "tokenizer"})


@dataclass(frozen=True)
class Document:
    """One corpus document and where it was read from (``file:line``, for messages)."""

    doc_id: str
    text: str
    domain: str
    source: str
    where: str


@dataclass(frozen=True)
class Excerpt:
    """A span ``[start, end)`` (characters) of a document, and its text. ``doc_id`` is ``""``
    when unknown (a ready-made pair whose row names no ``doc_id_a``/``doc_id_b``)."""

    doc_id: str
    text: str
    domain: str
    source: str
    start: int
    end: int


@dataclass(frozen=True)
class Pair:
    """Two excerpts to compare, A and B, under a stable id."""

    pair_id: str
    a: Excerpt
    b: Excerpt

    def row_fields(self) -> dict[str, str | None]:
        """The pair's part of a judgments row (see :mod:`acadlm_plugins.qurating`); the
        document ids (null when unknown) let the rater count held-out pairs that share a
        document with a training pair."""
        return {"pair_id": self.pair_id, "text_a": self.a.text, "text_b": self.b.text,
                "source_a": self.a.source, "source_b": self.b.source,
                "domain_a": self.a.domain, "domain_b": self.b.domain,
                "doc_id_a": self.a.doc_id or None, "doc_id_b": self.b.doc_id or None}


def pair_id(a: Excerpt, b: Excerpt) -> str:
    """A 16-hex-digit id from the two document ids and the excerpts' character spans."""
    key = f"{a.doc_id}\x1f{a.start}:{a.end}\x1e{b.doc_id}\x1f{b.start}:{b.end}"
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------- reading a corpus


def corpus_files(data: str | Path | Sequence[str | Path], *, split: str = "train",
                 field: str = "pairs.data") -> list[tuple[Path, str | None, Path]]:
    """``(file, domain from the layout or None, root for relative names)`` for every file.

    A single folder holding ``<domain>/<split>.jsonl`` (or ``.parquet``) sub-folders is read
    as our corpus layout; anything else goes through
    :func:`acadlm_plugins.data.documents.resolve_data_files` (files, folders, globs).
    """
    if isinstance(data, (str, Path)):
        root = Path(data).expanduser()
        if root.is_dir():
            layout = sorted(file for suffix in SUPPORTED_SUFFIXES
                            for file in root.glob(f"*/{split}{suffix}"))
            if layout:
                return [(file, file.parent.name, root) for file in layout]
    files = resolve_data_files(data, field=field)
    return [(file, None, file.parent) for file in files]


def read_documents(data: str | Path | Sequence[str | Path], *, split: str = "train",
                   text_field: str = "text", field: str = "pairs.data") -> list[Document]:
    """Every document of the corpus, in file order, with ids checked to be unique.

    A document's id is its ``id`` field, else ``<file>:<line>``; its domain the ``domain``
    field, else the layout's folder name, else the file's stem; its source the ``source``
    field, else the file. Raises :class:`DataError` naming ``file:line`` for a line that is not
    a JSON object, a row without a text (missing, null or not a string) and a repeated id.
    """
    documents: list[Document] = []
    first_seen: dict[str, str] = {}
    for file, layout_domain, root in corpus_files(data, split=split, field=field):
        name = _relative_name(file, root, layout_domain)
        for line_no, row in _iter_rows(file):
            where = f"{file}:{line_no}"
            text = _row_text(row, where, text_field)
            raw_id = row.get("id")
            doc_id = str(raw_id) if raw_id not in (None, "") else f"{name}:{line_no}"
            if doc_id in first_seen:
                raise DataError(f"{where}: the document id {doc_id!r} was already used at "
                                f"{first_seen[doc_id]}. Pair ids are built from document ids, "
                                "so they must be unique. Fix: give unique `id`s, or drop the "
                                "`id` field (then file:line is the id).")
            first_seen[doc_id] = where
            domain = row.get("domain") or layout_domain or file.stem
            source = row.get("source") or name
            documents.append(Document(doc_id=doc_id, text=text, domain=str(domain),
                                      source=str(source), where=where))
    if not documents:
        raise DataError(f"`{field}`: no documents in {data!r}. Fix: point it at jsonl/parquet "
                        "files with a `text` field, or build the default corpus with "
                        "`acadlm-defaults build`.")
    return documents


def _relative_name(file: Path, root: Path, layout_domain: str | None) -> str:
    if layout_domain is not None:
        return f"{layout_domain}/{file.name}"
    try:
        return str(file.relative_to(root))
    except ValueError:
        return str(file)


def _iter_rows(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of a jsonl file (blank lines skipped) or a parquet file (rows
    numbered from 1)."""
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        for row_no, row in enumerate(pq.read_table(file).to_pylist(), start=1):
            yield row_no, row
        return
    for line_no, row in iter_jsonl_values(file):
        if not isinstance(row, dict):
            raise DataError(f"{file}:{line_no}: expected a JSON object, got "
                            f"{type(row).__name__}. Fix: one object per line.")
        yield line_no, row


def _row_text(row: dict[str, Any], where: str, text_field: str) -> str:
    if text_field not in row:
        raise DataError(f"{where}: the row has no {text_field!r} field (keys: {sorted(row)}). "
                        "Fix: add the text, delete the row, or set `pairs.text_field` to the "
                        "column that holds the text.")
    text = row[text_field]
    if text is None:
        raise DataError(f"{where}: the row's {text_field!r} is null; a document without a text "
                        "cannot be judged. Fix: add the text or delete the row.")
    if not isinstance(text, str):
        raise DataError(f"{where}: the row's {text_field!r} is a {type(text).__name__}, not a "
                        "string. Fix: store the text as a string.")
    return text


# ---------------------------------------------------------------------- sampling


class _Spans:
    """Token character spans of documents, computed once per document on first use."""

    def __init__(self, tokenizer: AcadTokenizer, documents: Sequence[Document]) -> None:
        self.tokenizer = tokenizer
        self.documents = documents
        self.cache: dict[int, list[tuple[int, int]]] = {}

    def __call__(self, index: int) -> list[tuple[int, int]]:
        if index not in self.cache:
            encoding = self.tokenizer.rust.encode(self.documents[index].text,
                                                  add_special_tokens=False)
            self.cache[index] = list(encoding.offsets)
        return self.cache[index]


@dataclass(frozen=True)
class ExcerptLengths:
    """How many tokens the two excerpts of a pair get (both the same; a document of at most
    ``max_tokens`` tokens is shown whole instead, see :func:`excerpt_of`).

    ``max_tokens`` with probability ``p_max_tokens``, otherwise a length drawn uniformly from
    ``[min_tokens, max_tokens]`` (both ends included): QuRating's rule, so about half of the
    pairs have the longest length and the rest spread over the range. The defaults, 512 / 256 /
    0.5, are the values of QuRating's judging command; ``min_tokens`` defaults to half of
    ``max_tokens``.
    ``min_tokens == max_tokens`` (or ``p_max_tokens = 1``) gives one fixed length.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    min_tokens: int | None = None
    p_max_tokens: float = DEFAULT_P_MAX_TOKENS

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise DataError(f"`pairs.max_tokens` must be at least 1, not {self.max_tokens}.")
        if self.min_tokens is None:
            object.__setattr__(self, "min_tokens", max(1, self.max_tokens // 2))
        if not 1 <= self.shortest <= self.max_tokens:
            raise DataError(f"`pairs.min_excerpt_tokens` ({self.min_tokens}) must be between 1 "
                            f"and `pairs.max_tokens` ({self.max_tokens}).")
        if not 0.0 <= self.p_max_tokens <= 1.0:
            raise DataError(f"`pairs.p_max_tokens` ({self.p_max_tokens}) is a probability; give "
                            "a value in [0, 1] (QuRating: 0.5).")

    @property
    def shortest(self) -> int:
        """The shortest length a pair can get."""
        return int(self.min_tokens if self.min_tokens is not None else self.max_tokens // 2)

    def draw(self, rng: random.Random) -> int:
        """One pair's excerpt length."""
        if rng.random() < self.p_max_tokens:
            return self.max_tokens
        return rng.randint(self.shortest, self.max_tokens)

    def describe(self) -> str:
        """The rule in words, for logs."""
        if self.shortest == self.max_tokens:
            return f"{self.max_tokens} tokens"
        return (f"{self.max_tokens} tokens with p={self.p_max_tokens:g}, else uniform in "
                f"[{self.shortest}, {self.max_tokens}]")


def excerpt_of(document: Document, spans: Sequence[tuple[int, int]], *, max_tokens: int,
               num_tokens: int, rng: random.Random) -> Excerpt:
    """The excerpt of ``document`` (token character ``spans``) shown to the judge, by
    QuRating's rule (``extract_excerpt`` in ``prompting/score_pairwise.py``).

    A document of at most ``max_tokens`` tokens (the rule's longest excerpt) is shown whole,
    whatever ``num_tokens`` (the length drawn for the pair) is, and ``rng`` is not used.
    Otherwise the first token is drawn uniformly from ``[0, len(spans) - max_tokens]`` and
    ``num_tokens`` tokens are taken from there; the range is that of a ``max_tokens`` excerpt
    for every drawn length, as in QuRating. Surrounding whitespace is trimmed from the span.
    """
    if not 1 <= num_tokens <= max_tokens:
        raise ValueError(f"num_tokens ({num_tokens}) must be in [1, max_tokens={max_tokens}]")
    if len(spans) <= max_tokens:
        start, end = 0, len(document.text)
    else:
        first = rng.randrange(len(spans) - max_tokens + 1)
        start, end = spans[first][0], spans[first + num_tokens - 1][1]
    piece = document.text[start:end]
    start += len(piece) - len(piece.lstrip())
    end -= len(piece) - len(piece.rstrip())
    return Excerpt(doc_id=document.doc_id, text=document.text[start:end], domain=document.domain,
                   source=document.source, start=start, end=end)


def sample_pairs(documents: Sequence[Document], tokenizer: AcadTokenizer, *, num_pairs: int,
                 max_tokens: int = DEFAULT_MAX_TOKENS, min_excerpt_tokens: int | None = None,
                 p_max_tokens: float = DEFAULT_P_MAX_TOKENS,
                 min_tokens: int = DEFAULT_MIN_TOKENS, seed: int = 0,
                 same_domain: bool = False) -> list[Pair]:
    """``num_pairs`` distinct pairs of excerpts of two different documents.

    Documents are drawn uniformly (``same_domain``: B from A's domain), documents with fewer
    than ``min_tokens`` tokens are passed over (``min_tokens > max_tokens`` makes every excerpt
    of a pair exactly as long as drawn), and a pair already drawn (in either order) is drawn
    again. Each pair's length comes from :class:`ExcerptLengths` (``max_tokens``,
    ``min_excerpt_tokens``, ``p_max_tokens``) and both its excerpts are cut to it, except that
    a document of at most ``max_tokens`` tokens is shown whole (:func:`excerpt_of`). Only the
    documents drawn are tokenized, so a large corpus costs little. Raises :class:`DataError`
    when the corpus cannot give that many pairs.
    """
    if num_pairs < 1:
        raise DataError(f"`pairs.num_pairs` must be at least 1, not {num_pairs}.")
    lengths = ExcerptLengths(max_tokens=max_tokens, min_tokens=min_excerpt_tokens,
                             p_max_tokens=p_max_tokens)
    if min_tokens < 1:
        raise DataError(f"`pairs.min_tokens` ({min_tokens}) must be at least 1 (documents "
                        "shorter than it are passed over).")
    rng = random.Random(seed)
    spans = _Spans(tokenizer, documents)
    by_domain: dict[str, list[int]] = {}
    for index, document in enumerate(documents):
        by_domain.setdefault(document.domain, []).append(index)
    too_short: set[int] = set()
    seen: set[tuple[str, str]] = set()
    pairs: list[Pair] = []
    attempts, limit = 0, 50 * num_pairs + 1000
    while len(pairs) < num_pairs:
        attempts += 1
        if attempts > limit:
            usable = len(documents) - len(too_short)
            raise DataError(
                f"`pairs`: only {len(pairs)} distinct pairs could be drawn of the {num_pairs} "
                f"asked for ({len(documents)} documents, {len(too_short)} of them seen to be "
                f"shorter than min_tokens={min_tokens}; at most {usable} usable). Fix: lower "
                "`pairs.num_pairs` or `pairs.min_tokens`, or give a larger corpus"
                + (" (or set `pairs.same_domain: false`)." if same_domain else "."))
        first = rng.randrange(len(documents))
        pool = by_domain[documents[first].domain] if same_domain else None
        second = rng.choice(pool) if pool is not None else rng.randrange(len(documents))
        if first == second or first in too_short or second in too_short:
            continue
        if len(spans(first)) < min_tokens:
            too_short.add(first)
            continue
        if len(spans(second)) < min_tokens:
            too_short.add(second)
            continue
        length = lengths.draw(rng)
        a = excerpt_of(documents[first], spans(first), max_tokens=lengths.max_tokens,
                       num_tokens=length, rng=rng)
        b = excerpt_of(documents[second], spans(second), max_tokens=lengths.max_tokens,
                       num_tokens=length, rng=rng)
        key_a, key_b = f"{a.doc_id}@{a.start}:{a.end}", f"{b.doc_id}@{b.start}:{b.end}"
        key = (min(key_a, key_b), max(key_a, key_b))
        if key in seen:
            continue
        seen.add(key)
        pairs.append(Pair(pair_id=pair_id(a, b), a=a, b=b))
    if too_short:
        log.info("Passed over %d documents shorter than %d tokens.", len(too_short), min_tokens)
    domains = Counter(f"{pair.a.domain}/{pair.b.domain}" for pair in pairs)
    log.info("Sampled %d pairs, excerpts of %s (domains A/B: %s).", len(pairs),
             lengths.describe(), dict(domains.most_common(8)))
    return pairs


def sampling_settings(pairs_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The typed sampling settings of a ``pairs`` block, as :func:`sample_pairs` keywords,
    each read with :func:`config_value`: ``num_pairs=ten`` or ``same_domain=maybe`` is a
    :class:`ConfigError` naming ``pairs.<key>``, raised before any model or corpus is loaded
    (the judge recipe calls this in its config check)."""
    def read(key: str, default: Any, kind: type, **limits: Any) -> Any:
        return config_value(pairs_cfg.get(key, default), f"pairs.{key}", kind, **limits)

    return {"num_pairs": read("num_pairs", 64, int, minimum=1),
            "max_tokens": read("max_tokens", DEFAULT_MAX_TOKENS, int, minimum=1),
            "min_excerpt_tokens": read("min_excerpt_tokens", None, int, minimum=1,
                                       allow_none=True),
            "p_max_tokens": read("p_max_tokens", DEFAULT_P_MAX_TOKENS, float, minimum=0.0),
            "min_tokens": read("min_tokens", DEFAULT_MIN_TOKENS, int, minimum=1),
            "seed": read("seed", 0, int),
            "same_domain": read("same_domain", False, bool)}


def pairs_from_config(pairs_cfg: Mapping[str, Any], tokenizer: AcadTokenizer) -> list[Pair]:
    """The pairs a judge config's ``pairs`` block asks for (keys: :data:`PAIRS_CONFIG_KEYS`):
    read from ``file``, or sampled from the corpus at ``data``."""
    if pairs_cfg.get("file") is not None:
        return read_pairs_file(str(pairs_cfg["file"]))
    settings = sampling_settings(pairs_cfg)
    data = pairs_cfg["data"]
    data = str(data) if isinstance(data, (str, Path)) else [str(item) for item in data]
    documents = read_documents(data, split=str(pairs_cfg.get("split", "train")),
                               text_field=str(pairs_cfg.get("text_field", "text")))
    return sample_pairs(documents, tokenizer, **settings)


# ---------------------------------------------------------------------- ready-made pairs


def read_pairs_file(path: str | Path, *, field: str = "pairs.file") -> list[Pair]:
    """Pairs from a jsonl file of rows with ``text_a`` and ``text_b`` (optional: ``pair_id``,
    ``source_a/b``, ``domain_a/b``, ``doc_id_a/b``); a row lacking a text is an error naming
    ``file:line``. A side without ``doc_id_<side>`` has no known document (``doc_id`` ``""``):
    made-up ids would hide that two rows excerpt the same document."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"`{field}`: the pairs file {file} does not exist. Fix: give a jsonl "
                        "file of {\"text_a\": ..., \"text_b\": ...} rows.")
    pairs: list[Pair] = []
    first_seen: dict[str, int] = {}
    for line_no, row in _iter_rows(file):
        where = f"{file}:{line_no}"
        sides = []
        for side in ("a", "b"):
            text = row.get(f"text_{side}")
            if not isinstance(text, str) or not text.strip():
                problem = ("is missing" if f"text_{side}" not in row else
                           "is empty" if isinstance(text, str) else
                           f"is {type(text).__name__}, not a string")
                raise DataError(f"{where}: the pair references no text {side.upper()}: "
                                f"`text_{side}` {problem}. Fix: give both texts, or delete "
                                "the row.")
            given_id = row.get(f"doc_id_{side}")
            doc_id = str(given_id) if given_id not in (None, "") else ""
            sides.append(Excerpt(doc_id=doc_id, text=text, domain=str(row.get(f"domain_{side}")
                                                                      or ""),
                                 source=str(row.get(f"source_{side}") or file.name),
                                 start=0, end=len(text)))
        a, b = sides
        given = row.get("pair_id")
        pid = str(given) if given not in (None, "") else hashlib.sha1(
            f"{a.text}\x1e{b.text}".encode()).hexdigest()[:16]
        if pid in first_seen:
            raise DataError(f"{where}: pair_id {pid!r} repeats line {first_seen[pid]}. Fix: "
                            "remove the duplicate row.")
        first_seen[pid] = line_no
        pairs.append(Pair(pair_id=pid, a=a, b=b))
    if not pairs:
        raise DataError(f"`{field}`: {file} holds no pairs.")
    return pairs
