"""Readers of the published file formats, each yielding rows with the place they came from.

Text is decoded line by line, so a byte that is not valid in the file's encoding is reported at
its line (and, with ``--skip-invalid``, only that line is lost). JSON Lines files are streamed; a
JSON document is loaded once. Which of the two a ``.json`` file holds is sniffed: Hugging Face's
``Dataset.to_json`` writes JSON Lines under that suffix.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from acadlm_plugins.data.documents import json_error_text
from acadlm_plugins.evaluation.converters.base import SKIP_HINT, Run, SourceError, Where

#: Files at least this large show a progress bar (on a terminal).
PROGRESS_BYTES = 64 * 2**20


def _encoding_fix(run: Run) -> str:
    return (f"Re-save the file as {run.options.encoding}, or name its real encoding with "
            f"--encoding (e.g. --encoding latin-1), {SKIP_HINT}.")


def _bad_bytes(run: Run, where: Where, raw: bytes, error: UnicodeDecodeError) -> SourceError:
    column = len(raw[:error.start].decode(run.options.encoding, errors="replace")) + 1
    return SourceError(where, f"is not {run.options.encoding} text (byte 0x{raw[error.start]:02x} "
                       f"at column {column}).", _encoding_fix(run))


def decoded_lines(path: Path, run: Run, *, rows: bool = True) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of ``path``; a line that does not decode is rejected
    through ``run`` (raised, or skipped with ``--skip-invalid``) and, when the lines are the
    source's ``rows``, counted as read."""
    size = path.stat().st_size
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"reading {path.name}", leave=False,
               disable=None) if size >= PROGRESS_BYTES else None
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if bar is not None:
                    bar.update(len(raw))
                try:
                    text = raw.decode(run.options.encoding)
                except UnicodeDecodeError as error:
                    if rows:
                        run.read += 1
                    run.reject(_bad_bytes(run, Where(path, line=number), raw, error))
                    continue
                yield number, text.removeprefix("\ufeff") if number == 1 else text
    finally:
        if bar is not None:
            bar.close()


def jsonl_values(path: Path, run: Run) -> Iterator[tuple[Where, Any]]:
    """(where, value) for every non-blank line of a JSON Lines file; counts each as read."""
    for number, text in decoded_lines(path, run):
        if not text.strip():
            continue
        run.read += 1
        where = Where(path, line=number)
        try:
            yield where, json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as error:
            run.reject(SourceError(where, f"is {json_error_text(error)}.", run.fix(where)))


def json_document(path: Path, run: Run) -> Any:
    """The one JSON document of ``path``, loaded once; undecodable bytes or broken JSON stop the
    conversion with the line and column."""
    raw = path.read_bytes()
    try:
        text = raw.decode(run.options.encoding).removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        start = raw.rfind(b"\n", 0, error.start) + 1
        line_end = raw.find(b"\n", error.start)
        line = raw[start: line_end if line_end >= 0 else len(raw)]
        where = Where(path, line=raw.count(b"\n", 0, error.start) + 1)
        shifted = UnicodeDecodeError(error.encoding, line, error.start - start,
                                     error.end - start, error.reason)
        raise _bad_bytes(run, where, line, shifted) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise SourceError(Where(path, line=error.lineno), f"is not valid JSON ({error.msg} at "
                          f"column {error.colno}).", f"Give {run.spec.source} as published (one "
                          "JSON document); this one is cut short or is another file.") from None


def holds_json_lines(path: Path) -> bool:
    """Whether ``path`` holds JSON Lines: its name ends in ``.jsonl``, or its first non-blank
    line is a whole JSON value and another non-blank line follows."""
    if path.suffix.lower() == ".jsonl":
        return True
    with path.open("rb") as handle:
        lines = (line for line in handle if line.strip())
        first = next(lines, None)
        if first is None or next(lines, None) is None:
            return False
    try:
        json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return True


def json_items(path: Path, run: Run, *, key: str | None = None) -> Iterator[tuple[Where, Any]]:
    """(where, item) of a file that is either JSON Lines or one JSON list (optionally held
    under ``key`` of an object, as ``{"data": [...]}``); counts each item as read."""
    if holds_json_lines(path):
        yield from jsonl_values(path, run)
        return
    loaded = json_document(path, run)
    items = loaded.get(key) if key and isinstance(loaded, dict) else loaded
    if isinstance(loaded, dict) and not isinstance(items, list):
        items = [loaded]  # a JSON Lines file of a single row
    if not isinstance(items, list):
        raise SourceError(Where(path), f"holds a JSON {type(loaded).__name__}, not a list of "
                          "rows.", f"Give {run.spec.source} as published.")
    for number, item in enumerate(items, start=1):
        run.read += 1
        yield Where(path, item=f"item {number}"), item


class _LineFeed:
    """Decoded lines for :mod:`csv`, remembering the number of the last line handed out."""

    def __init__(self, lines: Iterator[tuple[int, str]]) -> None:
        self.lines, self.last = lines, 0

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        self.last, text = next(self.lines)
        return text


def csv_records(path: Path, run: Run, *, columns: Sequence[str], delimiter: str = ",",
                skip_initial_space: bool = False) -> Iterator[tuple[Where, dict[str, str]]]:
    """(where, record) of a CSV file with a header row that names at least ``columns``; each
    record maps the header's names to its fields. Counts each record as read."""
    feed = _LineFeed(decoded_lines(path, run))
    reader = csv.reader(feed, delimiter=delimiter, skipinitialspace=skip_initial_space)
    header: list[str] | None = None
    while True:
        start = feed.last + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            run.read += 1
            where = Where(path, line=start)
            run.reject(SourceError(where, f"is not valid CSV ({error}).", run.fix(where)))
            continue
        if not any(field.strip() for field in fields):
            continue
        where = Where(path, line=start)
        if header is None:
            header = [name.strip() for name in fields]
            missing = [name for name in columns if name not in header]
            if missing:
                raise SourceError(where, f"the header {fields} lacks the column(s) "
                                  f"{', '.join(missing)}.", f"Give {run.spec.source} as "
                                  f"published, whose first line names {', '.join(columns)}.")
            continue
        run.read += 1
        if len(fields) != len(header):
            run.reject(SourceError(where, f"has {len(fields)} fields where the header has "
                                   f"{len(header)} ({delimiter!r}-separated).", run.fix(where)))
            continue
        yield where, dict(zip(header, fields))
