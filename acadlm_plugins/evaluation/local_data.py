"""Read and check the local jsonl files that the QA, RAG, re-ranking, ICL, long-document QA and
summarization tasks are built from.

A user points a task at their own file through a metadata key (``rag_path``, ``rerank_path``,
``icl_path``, ``longqa_path``, ``summ_path``, and the ``<dataset>_path`` of HELMET's
long-document datasets); when the key is unset the task uses its shipped example (under
``acadlm_plugins/evaluation/data/``) or data derived from the embedded corpus, or, for a task
that needs a real dataset, stops and says how to convert one. Every row is checked when the file is read, so a bad row fails before any
prompt is built, with an error that names the task, the metadata key, ``file:line``, the row
field at fault and how to fix it. The schemas are documented in ``docs/evaluation_data.md``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from acadlm_plugins.data.documents import json_error_text
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.evaluation.lengths import task_error

DATA_DIR = Path(__file__).parent / "data"
#: The shipped example used by both ``acadlm_ruler_qa`` and ``acadlm_rag``.
DEFAULT_QA_FILE = DATA_DIR / "qa_passages.jsonl"
#: The shipped example of ``acadlm_rerank``.
DEFAULT_RERANK_FILE = DATA_DIR / "rerank_passages.jsonl"
SCHEMA_DOC = "docs/evaluation_data.md"

Record = TypeVar("Record")


@dataclass(frozen=True)
class Passage:
    """A passage a question may be answered from (or a distractor)."""

    text: str
    title: str = ""


@dataclass(frozen=True)
class QARecord:
    """A question with its answers, the passage(s) that answer it and optional hard negatives."""

    id: str
    question: str
    answers: tuple[str, ...]
    gold: tuple[Passage, ...]
    distractors: tuple[Passage, ...]


@dataclass(frozen=True)
class RankedPassage:
    """A candidate passage of a re-ranking query with its graded relevance (0 = not relevant)."""

    text: str
    title: str
    relevance: float


@dataclass(frozen=True)
class RerankRecord:
    """A query and its judged candidate passages."""

    id: str
    query: str
    passages: tuple[RankedPassage, ...]


@dataclass(frozen=True)
class LabelledText:
    """One labelled example for in-context learning; ``split`` is "demo", "test" or None."""

    text: str
    label: str
    split: str | None = None


@dataclass(frozen=True)
class DocumentQA:
    """A question about a long document."""

    id: str
    document: str
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class DocumentChoice:
    """A multiple-choice question about a long document (InfiniteBench En.MC): its options in
    order and the index of the correct one."""

    id: str
    document: str
    question: str
    options: tuple[str, ...]
    answer: int

    @property
    def letter(self) -> str:
        """The correct option's letter (A for the first)."""
        return OPTION_LETTERS[self.answer]


#: Letters of the options of a multiple-choice question, in order.
OPTION_LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class DocumentSummary:
    """A long document and its reference summaries."""

    id: str
    document: str
    summaries: tuple[str, ...]


class RowChecker:
    """Reads typed fields from one jsonl row and raises errors that say where and what."""

    def __init__(self, row: Mapping[str, Any], *, path: Path, line: int, task: str, key: str,
                 example: str) -> None:
        self.row = row
        self.path = path
        self.line = line
        self.task = task
        self.key = key
        self.example = example

    def fail(self, name: str, problem: str) -> ConfigError:
        """An error naming the task, the metadata key, ``file:line`` and the row field."""
        return task_error(self.task, self.key, f"{self.path}:{self.line}: field `{name}` {problem}",
                          f"Each line must be a JSON object like {self.example} "
                          f"(schema in {SCHEMA_DOC}); fix or remove line {self.line}.")

    def text(self, name: str, *, required: bool = True, default: str = "") -> str:
        """A non-empty string field (or ``default`` when optional and absent)."""
        value = self.row.get(name)
        if value is None and not required:
            return default
        if value is None:
            raise self.fail(name, "is missing.")
        if not isinstance(value, str) or not value.strip():
            raise self.fail(name, f"must be a non-empty string, got {_show(value)}.")
        return value.strip()

    def label(self, name: str) -> str:
        """A class label: a non-empty string or an integer (kept as its text)."""
        value = self.row.get(name)
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
            raise self.fail(name, "must be a non-empty string or an integer, got "
                            f"{_show(value)}." if name in self.row else "is missing.")
        return str(value).strip()

    def texts(self, name: str) -> tuple[str, ...]:
        """A non-empty list of non-empty strings (a single string is accepted as a list of one)."""
        value = self.row.get(name)
        if value is None:
            raise self.fail(name, "is missing.")
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(
                isinstance(item, str) and item.strip() for item in items):
            raise self.fail(name, f"must be a non-empty list of non-empty strings, got "
                            f"{_show(value)}.")
        return tuple(item.strip() for item in items)

    def passages(self, name: str, *, required: bool) -> tuple[Passage, ...]:
        """A list of passages, each a string or an object with `text` (and optional `title`)."""
        value = self.row.get(name)
        if value is None and not required:
            return ()
        if value is None:
            raise self.fail(name, "is missing.")
        items = [value] if isinstance(value, (str, dict)) else value
        if not isinstance(items, list) or (required and not items):
            raise self.fail(name, f"must be a non-empty list of passages, got {_show(value)}.")
        return tuple(self._passage(item, f"{name}[{i}]") for i, item in enumerate(items))

    def _passage(self, item: Any, where: str) -> Passage:
        if isinstance(item, str) and item.strip():
            return Passage(" ".join(item.split()))
        if isinstance(item, dict):
            text, title = item.get("text"), item.get("title", "")
            if not isinstance(text, str) or not text.strip():
                raise self.fail(f"{where}.text", f"must be a non-empty string, got {_show(text)}.")
            if not isinstance(title, str):
                raise self.fail(f"{where}.title", f"must be a string, got {_show(title)}.")
            return Passage(" ".join(text.split()), " ".join(title.split()))
        raise self.fail(where, f"must be a string or an object with `text`, got {_show(item)}.")

    def ranked_passages(self, name: str) -> tuple[RankedPassage, ...]:
        """Candidate passages with a numeric `relevance` >= 0, at least one of them > 0."""
        value = self.row.get(name)
        if not isinstance(value, list) or not value:
            raise self.fail(name, "must be a non-empty list of objects with `text` and "
                            f"`relevance`, got {_show(value)}." if name in self.row
                            else "is missing.")
        ranked = []
        for i, item in enumerate(value):
            passage = self._passage(item, f"{name}[{i}]")
            grade = item.get("relevance") if isinstance(item, dict) else None
            if isinstance(grade, bool) or not isinstance(grade, (int, float)) or grade < 0:
                raise self.fail(f"{name}[{i}].relevance", "must be a number >= 0 (a graded "
                                f"judgment such as 0-3), got {_show(grade)}.")
            ranked.append(RankedPassage(passage.text, passage.title, float(grade)))
        if not any(p.relevance > 0 for p in ranked):
            raise self.fail(name, "has no passage with relevance > 0, so no ranking can be "
                            "scored.")
        return tuple(ranked)


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if value is not None else "null"
    return text if len(text) <= 60 else text[:57] + "..."


def data_path(metadata: Mapping[str, Any], key: str, default: Path | None, *,
              task: str) -> Path | None:
    """The file named by ``metadata[key]`` (which must exist), else ``default`` (may be None,
    meaning: derive the data from the embedded corpus)."""
    value = metadata.get(key)
    if value in (None, ""):
        return default
    if not isinstance(value, (str, Path)):
        raise task_error(task, key, f"{value!r} is not a file path.",
                         f"Give the path of a local jsonl file (schema in {SCHEMA_DOC}).")
    path = Path(value).expanduser()
    if not path.is_file():
        raise task_error(task, key, f"{path} does not exist" + (" (it is a folder)."
                         if path.is_dir() else "."),
                         f"Point `{key}` in --metadata at an existing local jsonl file (schema "
                         f"in {SCHEMA_DOC}), or leave it unset to use the default data.")
    return path


def iter_json_objects(path: Path, *, task: str, key: str,
                      example: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a jsonl file; a line that is not a
    JSON object, or holds bytes that are not UTF-8, is an error naming the task, the metadata
    ``key`` and ``file:line``. The file is streamed line by line, never read whole."""
    # Bytes that are not UTF-8 come through as lone surrogates (U+DC80-U+DCFF), which UTF-8
    # text never decodes to, so the line they are on can be named rather than a
    # UnicodeDecodeError raised from the middle of a buffered block with no line at all.
    with path.open(encoding="utf-8", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, start=1):
            _check_utf8_line(path, number, line, task=task, key=key)
            if not line.strip():
                continue
            try:
                # The line ending is left out: kept, an unterminated string runs into it and
                # the error blames an "invalid control character" instead.
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise task_error(task, key, f"{path}:{number} is {json_error_text(err)}.",
                                 f"Each line must be one JSON object like {example}; fix or "
                                 f"remove line {number}.") from None
            if not isinstance(row, dict):
                raise task_error(task, key, f"{path}:{number} is a JSON {type(row).__name__}, "
                                 "not an object.", f"Each line must be one JSON object like "
                                 f"{example}.")
            yield number, row


#: A byte that is not UTF-8, as ``errors="surrogateescape"`` decodes it.
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def _check_utf8_line(path: Path, number: int, line: str, *, task: str, key: str) -> None:
    """An error naming ``file:line`` and the column when ``line`` (decoded with
    ``errors="surrogateescape"``) holds a byte that is not UTF-8."""
    bad = _NOT_UTF8.search(line)
    if bad:
        byte = ord(bad.group()) - 0xDC00
        raise task_error(task, key, f"{path}:{number}: byte {byte:#04x} at column "
                         f"{bad.start() + 1} is not UTF-8.", "Re-encode the file as "
                         "UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or fix or remove "
                         f"line {number}.")


def check_utf8_file(path: Path, *, task: str, key: str) -> None:
    """Stream ``path`` and stop at its first byte that is not UTF-8 with the error
    :func:`iter_json_objects` gives, for readers of whole JSON documents (which learn of such
    a byte only from a decoding error without a line)."""
    with path.open(encoding="utf-8", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, start=1):
            _check_utf8_line(path, number, line, task=task, key=key)


def text_field(row: Mapping[str, Any], path: Path, number: int, *, task: str, key: str) -> str:
    """The ``text`` string of a row, or an error naming ``file:line``."""
    if not isinstance(row.get("text"), str):
        raise task_error(task, key, f"{path}:{number}: field `text` is missing or not a string.",
                         "Each line must be an object with a `text` string.")
    return row["text"]


def read_jsonl(path: Path, *, task: str, key: str, example: str,
               parse: Callable[[RowChecker], Record]) -> list[Record]:
    """Parse every non-blank line of ``path`` with ``parse``; errors carry ``file:line``."""
    records: list[Record] = []
    for number, row in iter_json_objects(path, task=task, key=key, example=example):
        checker = RowChecker(row, path=path, line=number, task=task, key=key, example=example)
        records.append(parse(checker))
    if not records:
        raise task_error(task, key, f"{path} has no rows.", f"Add rows like {example}.")
    return records


def file_stamp(path: Path) -> tuple[str, int, int]:
    """What identifies a file's current content for caching: resolved path, mtime and size."""
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


QA_EXAMPLE = ('{"id": "q1", "question": "...", "answers": ["..."], "gold": [{"title": "...", '
              '"text": "..."}], "distractors": [{"title": "...", "text": "..."}]}')
RERANK_EXAMPLE = ('{"id": "r1", "query": "...", "passages": [{"title": "...", "text": "...", '
                  '"relevance": 3}, {"text": "...", "relevance": 0}]}')
ICL_EXAMPLE = '{"text": "...", "label": "...", "split": "demo"}'
LONGQA_EXAMPLE = '{"id": "d1", "document": "...", "question": "...", "answers": ["..."]}'
SUMM_EXAMPLE = '{"id": "d1", "document": "...", "summary": "..."}'
CHOICE_EXAMPLE = ('{"id": "d1", "document": "...", "question": "...", "options": ["...", "...", '
                  '"...", "..."], "answer": "<the correct option, or its letter>"}')


def _parse_qa(row: RowChecker) -> QARecord:
    return QARecord(id=row.text("id", required=False, default=f"line{row.line}"),
                    question=row.text("question"), answers=row.texts("answers"),
                    gold=row.passages("gold", required=True),
                    distractors=row.passages("distractors", required=False))


def _parse_rerank(row: RowChecker) -> RerankRecord:
    return RerankRecord(id=row.text("id", required=False, default=f"line{row.line}"),
                        query=row.text("query"), passages=row.ranked_passages("passages"))


def _parse_icl(row: RowChecker) -> LabelledText:
    split = row.row.get("split")
    if split is not None and split not in ("demo", "train", "test"):
        raise row.fail("split", f"must be \"demo\" (or \"train\") or \"test\", got {_show(split)}.")
    return LabelledText(" ".join(row.text("text").split()), row.label("label"),
                        "demo" if split == "train" else split)


def _parse_longqa(row: RowChecker) -> DocumentQA:
    return DocumentQA(id=row.text("id", required=False, default=f"line{row.line}"),
                      document=row.text("document"), question=row.text("question"),
                      answers=row.texts("answers"))


def _parse_choice(row: RowChecker) -> DocumentChoice:
    options = row.texts("options")
    if not 2 <= len(options) <= len(OPTION_LETTERS) or len(set(options)) != len(options):
        raise row.fail("options", f"must hold 2 to {len(OPTION_LETTERS)} distinct options, got "
                       f"{len(options)} ({len(set(options))} distinct).")
    answer = row.text("answer")
    letters = OPTION_LETTERS[:len(options)]
    if answer in options:
        index = options.index(answer)
    elif len(answer) == 1 and answer.upper() in letters:
        index = letters.index(answer.upper())
    else:
        raise row.fail("answer", f"{_show(answer)} is neither one of the `options` nor one of "
                       f"the letters {', '.join(letters)}.")
    return DocumentChoice(id=row.text("id", required=False, default=f"line{row.line}"),
                          document=row.text("document"), question=row.text("question"),
                          options=options, answer=index)


def _parse_summ(row: RowChecker) -> DocumentSummary:
    return DocumentSummary(id=row.text("id", required=False, default=f"line{row.line}"),
                           document=row.text("document"), summaries=row.texts("summary"))


@lru_cache(maxsize=16)
def _cached(kind: str, stamp: tuple[str, int, int], task: str, key: str) -> tuple[Any, ...]:
    parse, example = _PARSERS[kind]
    return tuple(read_jsonl(Path(stamp[0]), task=task, key=key, example=example, parse=parse))


_PARSERS: dict[str, tuple[Callable[[RowChecker], Any], str]] = {
    "qa": (_parse_qa, QA_EXAMPLE),
    "rerank": (_parse_rerank, RERANK_EXAMPLE),
    "icl": (_parse_icl, ICL_EXAMPLE),
    "longqa": (_parse_longqa, LONGQA_EXAMPLE),
    "summ": (_parse_summ, SUMM_EXAMPLE),
    "choice": (_parse_choice, CHOICE_EXAMPLE),
}


def load_qa(path: Path, *, task: str, key: str) -> tuple[QARecord, ...]:
    """Questions with gold passages and distractors (``qa_path``/``rag_path``)."""
    return _cached("qa", file_stamp(path), task, key)


def load_rerank(path: Path, *, task: str, key: str) -> tuple[RerankRecord, ...]:
    """Queries with graded candidate passages (``rerank_path``)."""
    return _cached("rerank", file_stamp(path), task, key)


def load_icl(path: Path, *, task: str, key: str) -> tuple[LabelledText, ...]:
    """Labelled texts; at least two labels, and test rows if any row names a split."""
    rows = _cached("icl", file_stamp(path), task, key)
    labels = {row.label for row in rows}
    if len(labels) < 2:
        raise task_error(task, key, f"{path} has {len(labels)} distinct label(s) in field "
                         "`label`; classification needs at least 2.", "Add rows of other labels.")
    if any(row.split for row in rows) and not any(row.split == "test" for row in rows):
        raise task_error(task, key, f"{path} names splits in field `split` but has no "
                         "\"test\" row to ask about.", "Mark the rows to classify with "
                         "\"split\": \"test\", or drop `split` to hold rows out at random.")
    return rows


def load_longqa(path: Path, *, task: str, key: str) -> tuple[DocumentQA, ...]:
    """Questions over long documents (``longqa_path``, ``narrativeqa_path``,
    ``infbench_qa_path``)."""
    return _cached("longqa", file_stamp(path), task, key)


def load_summ(path: Path, *, task: str, key: str) -> tuple[DocumentSummary, ...]:
    """Long documents with reference summaries (``summ_path``, ``infbench_sum_path``,
    ``multi_lexsum_path``)."""
    return _cached("summ", file_stamp(path), task, key)


def load_choice(path: Path, *, task: str, key: str) -> tuple[DocumentChoice, ...]:
    """Multiple-choice questions over long documents (``infbench_choice_path``)."""
    return _cached("choice", file_stamp(path), task, key)
