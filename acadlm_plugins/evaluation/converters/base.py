"""What every converter shares: where a source row sits, the error that names it, the options of
one conversion, and typed reads of a row's fields.

A conversion never lets a raw ``KeyError``, ``JSONDecodeError`` or ``UnicodeDecodeError`` out: a
row that cannot be used becomes a :class:`SourceError` that names the file and line (or the item
of a JSON file), the field at fault and the fix. :class:`Run` decides what happens to it: raised
(the default) or, with ``--skip-invalid``, counted and reported at the end.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from acadlm_plugins.errors import DataError

T = TypeVar("T")
SKIP_HINT = "or pass --skip-invalid to skip such rows"
#: The skip reason of bad rows passed over with ``--skip-invalid``.
INVALID = "invalid (see the messages above)"
#: How many of their messages a run keeps for the report.
KEPT_PROBLEMS = 100


@dataclass(frozen=True)
class Where:
    """The place of one row: a line of a text file, or an item (a JSON path) of a JSON file."""

    path: Path
    line: int | None = None
    item: str | None = None

    @property
    def unit(self) -> str:
        """How a fix refers to the row: "line 12", "item 3", "data[0].paragraphs[2].qas[1]"."""
        if self.line is not None:
            return f"line {self.line}"
        return self.item or "the file"

    @property
    def number(self) -> str:
        """A short, stable tag of the row for ids made up when the source has none."""
        return str(self.line) if self.line is not None else (self.item or "0").replace(" ", "")

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}"
        return f"{self.path} at {self.item}" if self.item else str(self.path)


class SourceError(DataError):
    """A row (or the whole file) of a downloaded dataset cannot be converted; the message says
    where, what is wrong and how to fix it."""

    def __init__(self, where: Where, problem: str, fix: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem} Fix: {fix}")


@dataclass(frozen=True)
class Options:
    """Settings of one conversion. The first four apply to some datasets only (see ``list``)."""

    test: Path | None = None  # ICL: the file of the test split (its rows are asked about)
    qrels: Path | None = None  # MS MARCO run file (.tsv): the TREC qrels with the grades
    max_passages: int | None = None  # keep at most this many passages / documents per row
    popularity_below: float | None = None  # PopQA: keep rows with s_pop < 10 ** this
    encoding: str = "utf-8"
    skip_invalid: bool = False
    sample: int | None = None  # keep a seeded random sample of this many rows (source order)
    seed: int = 0


#: Options a dataset must declare to be given them (the others are generic).
SPECIFIC_OPTIONS = {"test": "--test", "qrels": "--qrels", "max_passages": "--max-passages",
                    "popularity_below": "--popularity-below"}


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset the converter knows: what file to give, what it writes and who reads it."""

    name: str
    title: str
    source: str  # the file(s) to give, as their publisher names them
    shape: str  # one source row, for fixes: "an object like {...}"
    schema: str  # the schema written (docs/evaluation_data.md)
    metadata_key: str  # the --metadata key that names the written file
    task: str  # the lm-eval task that reads it
    convert: Callable[[Run], Iterator[dict[str, Any]]]
    options: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass
class Run:
    """The state of one conversion: the source, its options, and the counts for the report."""

    spec: DatasetSpec
    source: Path
    options: Options
    read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)

    def fix(self, where: Where) -> str:
        """The fix of a bad row: what the row must look like and what to do with it."""
        return (f"{where.unit} must be {self.spec.shape}, as in {self.spec.source}; correct or "
                f"remove it, {SKIP_HINT}.")

    def reject(self, error: SourceError) -> None:
        """Raise ``error``, or with ``--skip-invalid`` count it and keep it for the report."""
        if not self.options.skip_invalid:
            raise error
        self.skipped[INVALID] += 1
        if len(self.problems) < KEPT_PROBLEMS:
            self.problems.append(str(error))

    def attempt(self, build: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``build(*args, **kwargs)``, or None when it raised a :class:`SourceError` that
        :meth:`reject` let pass."""
        try:
            return build(*args, **kwargs)
        except SourceError as error:
            self.reject(error)
            return None

    def convert_row(self, build: Callable[[Fields, Run], T], value: Any, where: Where) -> T | None:
        """``build(fields of the row, self)``, or None for a bad row that :meth:`reject` let
        pass (a row that is not even a JSON object included)."""
        return self.attempt(lambda: build(self.fields(value, where), self))

    def skip(self, reason: str, count: int = 1) -> None:
        """Count rows left out on purpose (not errors), by reason."""
        if count:
            self.skipped[reason] += count

    def already_written(self, key: str) -> bool:
        """Whether a row with ``key`` (a question or query id) was written before."""
        return key in self._seen

    def remember(self, key: str) -> None:
        """Note that the row with ``key`` is written, so that its repeats are skipped."""
        self._seen.add(key)

    def fields(self, value: Any, where: Where) -> Fields:
        """Typed access to one source row, with errors that point at it."""
        return Fields(value, where, self.fix(where))


def show(value: Any) -> str:
    """A short rendering of a bad value for an error message."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """Typed reads of one JSON object; every failure names the row and the field's full path."""

    def __init__(self, value: Any, where: Where, fix: str, prefix: str = "") -> None:
        self.where, self.fix, self.prefix = where, fix, prefix
        if not isinstance(value, Mapping):
            name = prefix.rstrip(".") or "the row"
            raise SourceError(where, f"{name} is a JSON {_kind(value)}, not an object.", fix)
        self.row: Mapping[str, Any] = value

    def fail(self, name: str, problem: str) -> SourceError:
        """An error about field ``name`` of this row."""
        return SourceError(self.where, f"field `{self.prefix}{name}` {problem}", self.fix)

    def has(self, name: str) -> bool:
        """Whether the field is present and not null."""
        return self.row.get(name) is not None

    def get(self, name: str) -> Any:
        """The raw value (None when absent)."""
        return self.row.get(name)

    def require(self, name: str) -> Any:
        """The raw value, which must be present and not null."""
        if self.row.get(name) is None:
            raise self.fail(name, "is missing.")
        return self.row[name]

    def text(self, name: str) -> str:
        """A non-empty string, stripped."""
        value = self.require(name)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(name, f"must be a non-empty string, got {show(value)}.")
        return value.strip()

    def optional_text(self, name: str) -> str:
        """A string (whitespace squeezed), "" when absent or null."""
        value = self.row.get(name)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, got {show(value)}.")
        return " ".join(value.split())

    def ident(self, name: str) -> str | None:
        """An id: a string or an integer, as text; None when absent."""
        value = self.row.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
            raise self.fail(name, f"must be a string or an integer id, got {show(value)}.")
        return str(value).strip()

    def texts(self, name: str) -> list[str]:
        """A non-empty list of non-empty strings (one string counts as a list of one)."""
        value = self.require(name)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(
                isinstance(item, str) and item.strip() for item in items):
            raise self.fail(name, f"must be a non-empty list of non-empty strings, got "
                            f"{show(value)}.")
        return _unique(item.strip() for item in items)

    def number(self, name: str) -> float:
        """A number (an integer or a decimal; numeric strings are accepted)."""
        value = self.require(name)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise self.fail(name, f"must be a number, got {show(value)}.")

    def items(self, name: str, *, allow_empty: bool = False) -> list[Any]:
        """A list (non-empty unless ``allow_empty``)."""
        value = self.require(name)
        if not isinstance(value, list) or (not value and not allow_empty):
            wanted = "a list" if allow_empty else "a non-empty list"
            raise self.fail(name, f"must be {wanted}, got {show(value)}.")
        return value

    def sub(self, name: str, value: Any) -> Fields:
        """Fields of a nested object, reported as ``<prefix><name>.<field>``."""
        return Fields(value, self.where, self.fix, f"{self.prefix}{name}.")

    def passage(self, name: str, value: Any) -> dict[str, str]:
        """A passage object with a non-empty ``text`` and an optional ``title``, as our schemas
        write it (whitespace squeezed, title omitted when empty)."""
        entry = self.sub(name, value)
        text = " ".join(entry.text("text").split())
        title = entry.optional_text("title")
        return {"title": title, "text": text} if title else {"text": text}


def _kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _unique(items: Iterator[str] | Any) -> list[str]:
    """Items in their first order, without repeats."""
    return list(dict.fromkeys(items))
