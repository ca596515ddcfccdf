"""QuRating stage 3: score every document of a local corpus with a trained rater.

**Scoring.** A document is tokenized with the rater's tokenizer and cut into chunks of
``chunk_tokens`` tokens (the last one shorter); each chunk is framed like a training excerpt
(``[BOS] + tokens``) and scored, and the document's score per criterion is the token-weighted
mean of its chunk scores, ``sum(n_i * s_i) / sum(n_i)``. A ``chunk_tokens`` other than the
rater's training ``max_tokens`` (recorded in its ``rater.json``) is logged as a warning: a
legitimate choice, but the rater then scores texts of another length than it was trained on. A
document without tokens (an empty text) gets ``num_tokens = 0`` and NaN scores. Chunks of all
documents of a shard are sorted by length and batched up to ``batch_tokens`` padded tokens per
forward pass; because texts are right-padded under causal attention, a chunk's score does not
depend on its batch (up to floating-point rounding), and batches depend only on the shard, so a
shard is scored the same way however the run was interrupted.

**Input.** Local jsonl/json, parquet or Arrow files (or a folder saved with ``save_to_disk``),
read through Hugging Face ``datasets`` (memory-mapped Arrow, so the corpus is never held in
memory). Every column is carried into the output. A row whose text is missing or null is an
error naming the file and row, found when the corpus is opened, before any scoring.

**Output.** ``<output_dir>/scores-<rank>-<NNNNN>.parquet`` (both numbers zero-padded to five
digits): the input rows with ``num_tokens`` and ``score_<criterion>`` columns appended. Rank
``r`` of ``W`` scores the contiguous rows ``[r*N//W, (r+1)*N//W)`` in shards of ``shard_size``
rows, numbered from 0 per rank, so the shards sorted by name list the corpus in its original
order. A shard is written to a temporary file and renamed into place, then its marker
``scores-<rank>-<NNNNN>._done`` is written the same way; a shard without marker is scored again
(replacing any file of the same name), one with a marker never is, so a killed run resumes
without losing or duplicating rows. ``annotation_plan.json`` records what the shards mean
(corpus files and row counts, rater, chunking, world size); a run whose plan differs refuses to
mix its shards with the old ones. ``annotation.json`` summarizes a finished run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from acadlm_plugins.data.documents import (
    iter_jsonl_lines,
    iter_jsonl_values,
    resolve_data_files,
)
from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.qurating.rater import (
    HEADS_FILENAME,
    INFO_FILENAME,
    LoadedRater,
    frame,
    pad_batch,
)
from acadlm_plugins.training.checkpointing import write_atomically

log = logging.getLogger(__name__)

DEFAULT_CHUNK_TOKENS = 512
DEFAULT_BATCH_TOKENS = 8192
DEFAULT_SHARD_SIZE = 1024
TOKENS_COLUMN = "num_tokens"
SCORE_PREFIX = "score_"
PLAN_FILENAME = "annotation_plan.json"
SUMMARY_FILENAME = "annotation.json"
DONE_SUFFIX = "._done"
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


def shard_name(rank: int, index: int) -> str:
    """File name of shard ``index`` of ``rank``: ``scores-<rank>-<index>.parquet``."""
    return f"scores-{rank:05d}-{index:05d}.parquet"


def done_marker(shard_path: Path) -> Path:
    """The marker that says ``shard_path`` is complete."""
    return shard_path.with_name(shard_path.name[:-len(".parquet")] + DONE_SUFFIX)


# ------------------------------------------------------------------------------------ corpus
@dataclass(frozen=True)
class CorpusFile:
    """One input file: its path, its rows, and the global number of its first row."""

    path: Path
    num_rows: int
    first_row: int


class Corpus:
    """The documents of local files, read through ``datasets``, addressed by global row."""

    def __init__(self, files: list[CorpusFile], dataset: Any, text_field: str) -> None:
        self.files = files
        self.dataset = dataset
        self.text_field = text_field

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    @property
    def column_names(self) -> list[str]:
        return list(self.dataset.column_names)

    def rows(self, start: int, end: int) -> pa.Table:
        """Rows ``[start, end)`` with every column, as an Arrow table."""
        return self.dataset.with_format("arrow")[start:end]

    def where(self, row: int) -> str:
        """``file:line`` (jsonl) or ``file, row n`` of a global row, for messages."""
        for file in self.files:
            if file.first_row <= row < file.first_row + file.num_rows:
                return _locate(file.path, row - file.first_row)
        return f"global row {row}"


def resolve_corpus_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files, globs and folders to a sorted-per-entry list of corpus files (jsonl/json/parquet/
    arrow) or ``save_to_disk`` folders."""
    return resolve_data_files(paths, field="data_files", suffixes=tuple(BUILDERS),
                              saved_datasets=True)


def open_corpus(paths: str | Path | Sequence[str | Path], *, text_field: str = "text",
                cache_dir: str | Path | None = None,
                max_documents_per_file: int | None = None) -> Corpus:
    """Open the corpus files through ``datasets`` and check every text up front.

    ``cache_dir`` is where ``datasets`` keeps its Arrow copy of jsonl/parquet files (default:
    its own cache). ``max_documents_per_file`` keeps the first rows of each file (for demos).
    Raises :class:`DataError` naming the file and row of the first missing/null text, a text
    column that is not text, or a file whose columns differ from the first file's.
    """
    import datasets
    from datasets.exceptions import DatasetGenerationError

    if os.environ.get("ACADLM_NO_PROGRESS") == "1":
        datasets.disable_progress_bars()
    parts, files, first = [], [], 0
    for path in resolve_corpus_files(paths):
        try:
            if path.is_dir():
                part = datasets.load_from_disk(str(path))
            else:
                part = datasets.load_dataset(
                    BUILDERS[path.suffix], data_files=str(path), split="train",
                    cache_dir=None if cache_dir is None else str(Path(cache_dir).expanduser()))
        except (DatasetGenerationError, pa.ArrowException, OSError, ValueError) as err:
            raise DataError(_first_bad_line(path) or (
                f"{path}: `datasets` cannot read it ({type(err).__name__}: "
                f"{_first_line(err)}). Fix: repair the file or remove it from "
                "`data_files`.")) from None
        if isinstance(part, datasets.DatasetDict):
            raise DataError(f"{path}: a saved DatasetDict with splits {list(part)}. Fix: point "
                            "`data_files` at one split's folder.")
        if path.suffix in (".jsonl", ".json") and path.is_file():
            _check_utf8(part, path)
        if max_documents_per_file is not None and len(part) > max_documents_per_file:
            part = part.select(range(max_documents_per_file))
        _check_texts(part, path, text_field)
        if parts and part.column_names != parts[0].column_names:
            raise DataError(f"{path}: columns {part.column_names} differ from those of "
                            f"{files[0].path} ({parts[0].column_names}). Fix: annotate files "
                            "with different columns in separate runs.")
        parts.append(part)
        files.append(CorpusFile(path, len(part), first))
        first += len(part)
    try:
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except ValueError as err:
        raise DataError(f"the corpus files cannot be read as one table ({_first_line(err)}). "
                        "Fix: give their columns the same types, or annotate them separately."
                        ) from None
    return Corpus(files, dataset, text_field)


def _check_utf8(part: Any, path: Path) -> None:
    """Stop on text that is not UTF-8 now, naming its file and line, rather than when a later
    read of it fails deep inside pyarrow: the JSON reader of ``datasets`` lets such bytes
    through into the Arrow table. The validation is one linear pass in C++ over the
    memory-mapped table; the file is scanned for the line only once it has failed."""
    try:
        part.with_format("arrow")[:].validate(full=True)
    except pa.ArrowInvalid as err:
        raise DataError(_first_bad_line(path) or (
            f"{path}: holds text that is not valid UTF-8 ({_first_line(err)}). Fix: re-encode "
            "it as UTF-8 or remove it from `data_files`.")) from None


def _first_bad_line(path: Path) -> str | None:
    """What is wrong with the first bad line of a jsonl (or json) file, as ``file:line: ...``
    with the fix: bytes that are not UTF-8, or (jsonl) a line that is not a JSON object. None
    when no line is bad, or for other formats. Called once ``datasets`` has refused a file or
    read bytes that are not UTF-8 from it, to name the line; the file is streamed line by line
    and the scan stops at the first bad line. A ``.json`` file may be one JSON document over
    many lines, so only its bytes are checked there."""
    if not path.is_file():
        return None
    try:
        if path.suffix == ".jsonl":
            for line_no, value in iter_jsonl_values(path):
                if not isinstance(value, dict):
                    return (f"{path}:{line_no}: expected a JSON object, got "
                            f"{type(value).__name__}. Fix: repair or delete that line.")
        elif path.suffix == ".json":
            for _ in iter_jsonl_lines(path):
                pass
    except DataError as err:
        return str(err)
    return None


def _check_texts(part: Any, path: Path, text_field: str) -> None:
    if text_field not in part.column_names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {part.column_names}). "
                        "Fix: set `text_field` to the column that holds the text.")
    column = part.with_format("arrow")[:][text_field] if len(part) else None
    if column is None:
        return
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            or pa.types.is_null(column.type)):
        raise DataError(f"{path}: column {text_field!r} holds {column.type}, not text. Fix: set "
                        "`text_field` to the column that holds the text.")
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{_locate(path, row)}: the row has no text ({text_field!r} is missing "
                        "or null). Fix: repair or delete that row; an empty string is accepted "
                        "and scored as a document without tokens.")


def _locate(path: Path, row: int) -> str:
    """``file:line`` for jsonl (blank lines skipped, as ``datasets`` skips them), else
    ``file, row n`` (1-based)."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as handle:
            seen = -1
            for line_no, line in enumerate(handle, start=1):
                if line.strip():
                    seen += 1
                    if seen == row:
                        return f"{path}:{line_no}"
    return f"{path}, row {row + 1}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or repr(err)
    return text.splitlines()[0][:300]


# ----------------------------------------------------------------------------------- scoring
class DocumentScorer:
    """Token-weighted chunk scoring of documents with a loaded rater (see module docstring)."""

    def __init__(self, rater: LoadedRater, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 device: str | torch.device = "cpu") -> None:
        if chunk_tokens < 1:
            raise ConfigError("chunk_tokens", f"{chunk_tokens} is not a positive number.",
                              f"use e.g. {DEFAULT_CHUNK_TOKENS}.")
        limit = rater.model.backbone.max_seq_len
        if chunk_tokens + 1 > limit:
            raise ConfigError("chunk_tokens", f"{chunk_tokens} tokens plus a BOS exceed the "
                              f"rater's maximum sequence length {limit}.",
                              f"use at most {limit - 1}.")
        if batch_tokens < chunk_tokens + 1:
            raise ConfigError("batch_tokens", f"{batch_tokens} cannot hold one chunk of "
                              f"{chunk_tokens} tokens plus a BOS.",
                              f"use at least {chunk_tokens + 1}.")
        trained = rater.info.max_tokens
        if chunk_tokens != trained:
            log.warning("chunk_tokens is %d but the rater was trained on texts cut at "
                        "max_tokens %d (%s): it scores chunks of another length than it was "
                        "trained on. Set chunk_tokens: %d to match, or keep %d if %s chunks "
                        "are meant.", chunk_tokens, trained, rater.folder / INFO_FILENAME,
                        trained, chunk_tokens,
                        "longer" if chunk_tokens > trained else "shorter")
        self.rater = rater
        self.criteria = list(rater.info.criteria)
        self.chunk_tokens = int(chunk_tokens)
        self.batch_tokens = int(batch_tokens)
        self.device = torch.device(device)
        self.forward_positions = 0  # padded positions fed to the model so far (for reports)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens)."""
        return self.rater.tokenizer.encode(texts)

    def chunks(self, documents: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
        """``(document, start, end)`` token spans of every chunk, in document order."""
        spans = []
        for doc, ids in enumerate(documents):
            for start in range(0, len(ids), self.chunk_tokens):
                spans.append((doc, start, min(start + self.chunk_tokens, len(ids))))
        return spans

    @torch.inference_mode()
    def score_chunks(self, documents: Sequence[Sequence[int]],
                     spans: Sequence[tuple[int, int, int]],
                     on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """``chunks x criteria`` float32 scores of the spans, batched longest first."""
        scores = np.zeros((len(spans), len(self.criteria)), dtype=np.float32)
        order = sorted(range(len(spans)), key=lambda i: (spans[i][1] - spans[i][2], i))
        bos, pad = self.rater.tokenizer.bos_id, self.rater.tokenizer.pad_id
        position = 0
        while position < len(order):
            longest = spans[order[position]][2] - spans[order[position]][1] + 1
            group = order[position:position + max(1, self.batch_tokens // longest)]
            position += len(group)
            sequences = [frame(documents[d][s:e], bos) for d, s, e in (spans[i] for i in group)]
            tokens, lengths = pad_batch(sequences, pad)
            self.forward_positions += tokens.numel()
            batch_scores = self.rater.model(tokens.to(self.device), lengths.to(self.device))
            scores[group] = batch_scores.float().cpu().numpy()
            if on_batch is not None:
                on_batch(int(lengths.sum()) - len(group))
        return scores

    def score_documents(self, documents: Sequence[Sequence[int]],
                        on_batch: Callable[[int], None] | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
        """``(num_tokens, scores)`` of tokenized documents: int64 token counts and
        ``documents x criteria`` float32 token-weighted mean chunk scores (NaN for a document
        without tokens)."""
        spans = self.chunks(documents)
        chunk_scores = self.score_chunks(documents, spans, on_batch)
        num_tokens = np.array([len(ids) for ids in documents], dtype=np.int64)
        sums = np.zeros((len(documents), len(self.criteria)), dtype=np.float64)
        if spans:
            owner = np.array([d for d, _, _ in spans], dtype=np.int64)
            weight = np.array([e - s for _, s, e in spans], dtype=np.float64)
            np.add.at(sums, owner, chunk_scores.astype(np.float64) * weight[:, None])
        with np.errstate(invalid="ignore", divide="ignore"):
            means = sums / num_tokens[:, None]
        return num_tokens, means.astype(np.float32)

    def score_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`score_documents` of raw texts."""
        return self.score_documents(self.tokenize(texts))


# ------------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` of ``rank``: global rows ``[start, end)``."""

    rank: int
    index: int
    start: int
    end: int

    @property
    def name(self) -> str:
        return shard_name(self.rank, self.index)


def plan_shards(num_rows: int, world_size: int, shard_size: int) -> list[list[ShardSpec]]:
    """Each rank's shards: rank ``r`` takes rows ``[r*N//W, (r+1)*N//W)`` in order, cut into
    ``shard_size``-row shards."""
    if shard_size < 1:
        raise ConfigError("shard_size", f"{shard_size} is not a positive number.",
                          f"use e.g. {DEFAULT_SHARD_SIZE}.")
    plan = []
    for rank in range(world_size):
        lo, hi = rank * num_rows // world_size, (rank + 1) * num_rows // world_size
        plan.append([ShardSpec(rank, i, start, min(start + shard_size, hi))
                     for i, start in enumerate(range(lo, hi, shard_size))])
    return plan


def plan_record(corpus: Corpus, rater_dir: Path, *, chunk_tokens: int, shard_size: int,
                world_size: int, max_documents_per_file: int | None) -> dict[str, Any]:
    """What the shard files mean; a resumed run must have the same record."""
    return {
        "files": [{"path": str(f.path.resolve()), "rows": f.num_rows,
                   "content": corpus_file_digest(f.path)} for f in corpus.files],
        "num_rows": corpus.num_rows, "text_field": corpus.text_field,
        "max_documents_per_file": max_documents_per_file,
        "rater": {"dir": str(rater_dir.resolve()), "fingerprint": rater_fingerprint(rater_dir)},
        "chunk_tokens": chunk_tokens, "shard_size": shard_size, "world_size": world_size,
    }


#: Files up to this size are hashed whole; larger ones by their size, their first and last
#: MiB and 64 evenly spaced 64 KiB blocks (annotation corpora can be hundreds of GB).
WHOLE_FILE_HASH_BYTES = 256 << 20


def corpus_file_digest(path: Path) -> str:
    """A digest of a corpus file's content: a file edited in place with the same row count is
    a different corpus, whose shards (holding the old texts) must not be reused."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as handle:
        if size <= WHOLE_FILE_HASH_BYTES:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        else:
            offsets = [0, size - (1 << 20)] + [size * i // 64 for i in range(1, 64)]
            for offset in offsets:
                handle.seek(offset)
                digest.update(handle.read(1 << 20 if offset in (0, size - (1 << 20))
                                          else 64 << 10))
    return digest.hexdigest()[:16]


def rater_fingerprint(rater_dir: Path) -> str:
    """A hash of the rater's heads and ``rater.json``: changes whenever the rater is
    re-trained (the heads are trained together with the backbone)."""
    digest = hashlib.sha256()
    for name in (INFO_FILENAME, HEADS_FILENAME):
        digest.update((Path(rater_dir) / name).read_bytes())
    return digest.hexdigest()[:16]


def check_or_write_plan(output_dir: Path, record: dict[str, Any], *, write: bool) -> None:
    """Compare ``record`` with the plan already in ``output_dir`` (if any) and refuse a
    mismatch; with ``write``, store the record when there is none."""
    path = output_dir / PLAN_FILENAME
    if path.is_file():
        before = _plan_identity(json.loads(path.read_text()))
        now = _plan_identity(record)
        if any("content" not in f for f in before.get("files", [])):
            now = _without_content(now)  # an older plan: compared as it was then
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if changed:
            raise ConfigError(
                "output_dir", f"{output_dir} holds shards of a different annotation ("
                f"{', '.join(changed)} changed: was {[before.get(k) for k in changed]}, is "
                f"{[now.get(k) for k in changed]}), which the new shards must not mix with.",
                "resume with the same corpus, rater, chunk_tokens, shard_size and number of "
                "processes, or choose a new `output_dir`.")
    elif write:
        _write_atomically(path, (json.dumps(record, indent=2) + "\n").encode())


def _plan_identity(record: dict[str, Any]) -> dict[str, Any]:
    """The parts of a plan that give the shards their meaning: the rater counts by its
    fingerprint, not by where it lies, so a rater folder copied or moved with its run resumes."""
    identity = dict(record)
    if isinstance(identity.get("rater"), dict):
        identity["rater"] = {k: v for k, v in identity["rater"].items() if k != "dir"}
    return identity


def _without_content(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with no file content digests: how a plan written before they were recorded
    compares."""
    files = [{k: v for k, v in f.items() if k != "content"} for f in record.get("files", [])]
    return {**record, "files": files}


def is_done(output_dir: Path, shard: ShardSpec) -> bool:
    """Whether the shard was completed by an earlier run."""
    return done_marker(output_dir / shard.name).is_file()


def write_shard(output_dir: Path, shard: ShardSpec, rows: pa.Table, num_tokens: np.ndarray,
                scores: np.ndarray, criteria: Sequence[str]) -> Path:
    """The shard's parquet file (input columns + ``num_tokens`` + ``score_<c>``), then its
    done marker, each written to a temporary file and renamed into place."""
    names = [TOKENS_COLUMN, *(SCORE_PREFIX + c for c in criteria)]
    clash = [n for n in names if n in rows.column_names]
    if clash:
        log.warning("%s: the input already has columns %s; they are replaced by the new scores",
                    shard.name, clash)
        rows = rows.drop_columns(clash)
    table = rows.append_column(TOKENS_COLUMN, pa.array(num_tokens, type=pa.int64()))
    for c, criterion in enumerate(criteria):
        table = table.append_column(SCORE_PREFIX + criterion,
                                    pa.array(scores[:, c], type=pa.float32()))
    path = output_dir / shard.name
    write_atomically(path, lambda handle: pq.write_table(table, handle),
                     prefix=f".{shard.name}.")
    marker = {"rows": table.num_rows, "first_row": shard.start, "tokens": int(num_tokens.sum()),
              "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    _write_atomically(done_marker(path), (json.dumps(marker) + "\n").encode())
    return path


def _write_atomically(path: Path, data: bytes) -> None:
    write_atomically(path, lambda handle: handle.write(data), prefix=f".{path.name}.")


def remove_stale_temporaries(output_dir: Path, rank: int) -> None:
    """Delete the temporary files a killed run of ``rank`` left behind."""
    for tmp in output_dir.glob(f".scores-{rank:05d}-*.tmp"):
        tmp.unlink(missing_ok=True)


@dataclass
class RankResult:
    """What one rank did in this run."""

    shards_total: int
    shards_done_before: int
    shards_scored: int
    documents: int
    tokens: int
    seconds: float

    @property
    def complete(self) -> bool:
        return self.shards_done_before + self.shards_scored == self.shards_total


def annotate_rank(corpus: Corpus, scorer: DocumentScorer, output_dir: str | Path,
                  shards: Sequence[ShardSpec], *, max_shards: int | None = None,
                  progress: bool = True,
                  on_shard: Callable[[dict[str, float], int], None] | None = None
                  ) -> RankResult:
    """Score this rank's ``shards`` that have no done marker yet, in order.

    ``max_shards`` stops after that many newly scored shards (a time-boxed job; the next run
    continues). Shows a progress bar with documents and tokens per second when ``progress``.
    ``on_shard(metrics, shards_done)``, when given, is called after every written shard with
    this run's throughput so far (``tokens_per_second``, ``documents_per_second``) and this
    rank's finished shards (earlier runs' included): the annotate recipe logs it to its metric
    logger.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    todo = [s for s in shards if not is_done(output_dir, s)]
    if max_shards is not None:
        todo_now = todo[:max_shards]
    else:
        todo_now = todo
    started = time.perf_counter()
    bar = tqdm(total=sum(s.end - s.start for s in todo_now), unit="doc", desc="annotating",
               disable=not progress or os.environ.get("ACADLM_NO_PROGRESS") == "1",
               dynamic_ncols=True)
    tokens = documents = 0

    def on_batch(batch_tokens: int) -> None:
        nonlocal tokens
        tokens += batch_tokens
        bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f}")

    for scored, shard in enumerate(todo_now, start=1):
        rows = corpus.rows(shard.start, shard.end)
        texts = rows.column(corpus.text_field).to_pylist()
        num_tokens, scores = scorer.score_documents(scorer.tokenize(texts), on_batch)
        write_shard(output_dir, shard, rows, num_tokens, scores, scorer.criteria)
        documents += len(texts)
        bar.update(len(texts))
        if on_shard is not None:
            seconds = max(time.perf_counter() - started, 1e-9)
            on_shard({"tokens_per_second": tokens / seconds,
                      "documents_per_second": documents / seconds},
                     len(shards) - len(todo) + scored)
    bar.close()
    return RankResult(shards_total=len(shards), shards_done_before=len(shards) - len(todo),
                      shards_scored=len(todo_now), documents=documents, tokens=tokens,
                      seconds=time.perf_counter() - started)


def score_statistics(output_dir: str | Path, criteria: Sequence[str]) -> dict[str, Any]:
    """Documents, tokens and per-criterion mean/std/min/max over every finished shard
    (documents with tokens only); reads only the score columns."""
    paths = sorted(Path(output_dir).glob("scores-*.parquet"))
    paths = [p for p in paths if done_marker(p).is_file()]
    columns = [TOKENS_COLUMN, *(SCORE_PREFIX + c for c in criteria)]
    tables = [pq.read_table(p, columns=columns) for p in paths]
    if not tables:
        return {"shards": 0, "documents": 0, "tokens": 0, "empty_documents": 0, "scores": {}}
    table = pa.concat_tables(tables)
    tokens = table.column(TOKENS_COLUMN).to_numpy()
    live = tokens > 0
    stats: dict[str, Any] = {}
    for criterion in criteria:
        values = table.column(SCORE_PREFIX + criterion).to_numpy()[live]
        stats[criterion] = ({"mean": float(values.mean()), "std": float(values.std()),
                             "min": float(values.min()), "max": float(values.max())}
                            if values.size else {})
    return {"shards": len(paths), "documents": int(table.num_rows), "tokens": int(tokens.sum()),
            "empty_documents": int((~live).sum()), "scores": stats}
