"""Read a domain's documents from local jsonl or parquet files, with errors that name the line.

A ``.json`` file is read as JSON Lines too (one JSON object per line), not as one JSON document.

A corrupt corpus is a common and expensive surprise half-way through a run, so documents are
read up front and every problem is reported with the file, the line and the fix.
"""

from __future__ import annotations

import codecs
import glob
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from acadlm_plugins.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")
SUPPORTED_KINDS = ".jsonl, .json (read as JSON Lines) or .parquet"
# Half of a UTF-16 pair on its own: JSON lets "\ud800" through, but it is not a character and
# no tokenizer can encode it (it fails later with an error that names no file).
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def resolve_data_files(paths: str | Path | Sequence[str | Path], *, field: str,
                       suffixes: Sequence[str] = SUPPORTED_SUFFIXES,
                       saved_datasets: bool = False) -> list[Path]:
    """Expand files, directories (their files with one of ``suffixes``) and globs to files.

    ``field`` is the config key the paths came from, used in error messages; a value that is
    neither a path nor a list of paths (null, a number, a mapping) is a :class:`ConfigError`
    naming it. With ``saved_datasets``, a folder that ``datasets``' ``save_to_disk`` wrote (it
    holds ``state.json``) is one entry of the result, not searched for files (annotation reads
    corpora through ``datasets``; training reads files itself).
    """
    kinds = (SUPPORTED_KINDS if tuple(suffixes) == SUPPORTED_SUFFIXES
             else "/".join(s.lstrip(".") for s in suffixes))
    if isinstance(paths, (str, Path)):
        paths = [paths]
    fix = f"set `{field}` to a {kinds} file, a folder of them, a glob, or a list of these."
    if not isinstance(paths, Sequence):
        raise ConfigError(field, f"is {paths!r}, not a path or a list of paths.", fix)
    for raw in paths:
        if not isinstance(raw, (str, Path)):
            raise ConfigError(field, f"holds {raw!r}, which is not a path.", fix)
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if any(ch in str(raw) for ch in "*?["):
            matched = sorted(Path(m) for m in glob.glob(str(path)))
            if not matched:
                raise DataError(f"`{field}`: the pattern {raw!r} matches no file. "
                                "Fix: check the path, or build the default corpus with "
                                "`acadlm-defaults build`.")
            files.extend(matched)
        elif saved_datasets and path.is_dir() and (path / "state.json").is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in suffixes)
            if not found:
                raise DataError(f"`{field}`: the directory {path} holds no {kinds} file.")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"`{field}`: data file {path} does not exist. Fix: give a local "
                            f"{kinds} path, or run `acadlm-defaults build` for the default "
                            "corpus.")
    for file in files:
        if file.suffix not in suffixes and not (saved_datasets and file.is_dir()):
            raise DataError(f"`{field}`: {file} is not a {kinds} file.")
    return files


def iter_texts(files: Sequence[Path], *, text_field: str = "text") -> Iterator[str]:
    """Yield the text of every document in ``files``, in order.

    Raises :class:`DataError` naming the file and line for a line that is not a JSON object,
    a row without ``text_field``, a text that is not a string (null included) or one holding
    a lone UTF-16 surrogate (``"\\ud800"``, which JSON accepts but no tokenizer can encode),
    and naming the file for a parquet file that cannot be read. Empty and whitespace-only
    texts are skipped: they carry nothing to learn from; how many is logged once per file.
    """
    for file in files:
        reader = _iter_parquet_texts if file.suffix == ".parquet" else _iter_jsonl_texts
        skipped = 0
        for text in reader(file, text_field):
            if text.strip():
                yield text
            else:
                skipped += 1
        if skipped:
            log.info("%s: skipped %d empty or whitespace-only text%s", file, skipped,
                     "" if skipped == 1 else "s")


def read_texts(files: Sequence[Path], *, text_field: str = "text") -> list[str]:
    """All document texts of ``files`` that are not empty or whitespace only (see
    :func:`iter_texts`)."""
    return list(iter_texts(files, text_field=text_field))


def iter_jsonl_lines(file: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, text)`` for each line of a UTF-8 file; bytes that are not UTF-8
    raise :class:`DataError` naming the file, the line and the byte, rather than a bare
    ``UnicodeDecodeError`` with neither. A UTF-8 byte order mark opening the file (as some
    Windows editors write) is dropped, not taken for the start of the first line's JSON; the
    columns of line 1 are then counted after it."""
    with open(file, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{file}:{line_no}: byte {raw[err.start]:#04x} at column {err.start + 1} is "
                    "not UTF-8. Fix: re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t "
                    "utf-8`), or repair or delete that line.") from None


def iter_jsonl_values(file: Path) -> Iterator[tuple[int, object]]:
    """Yield ``(line number, parsed value)`` for each non-blank line of a jsonl file; a line
    that is not JSON (or not UTF-8) raises :class:`DataError` naming the file and line.

    The line ending is stripped before parsing: kept, it is what an unterminated string runs
    into, and the error would blame an "invalid control character" instead."""
    for line_no, line in iter_jsonl_lines(file):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            raise DataError(f"{file}:{line_no}: {json_error_text(err)}. Fix: repair or delete "
                            f"that line.{_json_lines_hint(file)}") from None


def json_error_text(err: json.JSONDecodeError) -> str:
    """``not valid JSON (<what> at column <n>)`` for ``err``: several of json's messages end in
    "at" already ("Unterminated string starting at"), which must not read "at at"."""
    what = err.msg.removesuffix(" at")
    return f"not valid JSON ({what} at column {err.colno})"


def _json_lines_hint(file: Path) -> str:
    """For a ``.json`` file, the reminder that it is read as JSON Lines (a pretty-printed JSON
    document fails on its first line otherwise, with no word on why)."""
    if file.suffix != ".json":
        return ""
    return (" (.json files are read as JSON Lines: one JSON object per line; convert a JSON "
            "array with e.g. `jq -c '.[]' in.json > out.jsonl`.)")


def _iter_jsonl_texts(file: Path, text_field: str) -> Iterator[str]:
    for line_no, row in iter_jsonl_values(file):
        yield _text_of(row, file, line_no, text_field)


def _iter_parquet_texts(file: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{file}: not a readable parquet file ({err}). Fix: re-write or "
                        "re-download it, or remove it from the dataset's files.") from None
    if text_field not in table.column_names:
        raise DataError(f"{file}: no column {text_field!r} (columns: {table.column_names}). "
                        "Fix: set `text_field` in the dataset config to the text column.")
    for row_no, text in enumerate(table.column(text_field).to_pylist(), start=1):
        yield _text_of({text_field: text}, file, row_no, text_field)


def _text_of(row: object, file: Path, line_no: int, text_field: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{file}:{line_no}: expected a JSON object with a {text_field!r} field, "
                        f"got {type(row).__name__}. Fix: write each line as "
                        f'{{"{text_field}": "..."}}, or delete it.')
    if text_field not in row:
        raise DataError(f"{file}:{line_no}: the row has no {text_field!r} field (keys: "
                        f"{sorted(row)}). Fix: set `text_field` in the dataset config.")
    text = row[text_field]
    unit = "row" if file.suffix == ".parquet" else "line"
    if text is None:
        raise DataError(f"{file}:{line_no}: the row's {text_field!r} is null, not a string. "
                        f"Fix: give the {unit} its text, or delete it.")
    if not isinstance(text, str):
        raise DataError(f"{file}:{line_no}: field {text_field!r} is {type(text).__name__}, "
                        f"not a string. Fix: quote the {unit}'s text as a JSON string, or "
                        "delete it.")
    if not text.isascii():  # an ASCII str (a flag, no scan) holds no surrogate
        lone = _LONE_SURROGATE.search(text)
        if lone is not None:
            raise DataError(
                f"{file}:{line_no}: field {text_field!r} holds a lone UTF-16 surrogate "
                f"(\\u{ord(lone.group()):04x} at character {lone.start() + 1} of the text): half "
                "of an escaped pair, which is not a character and cannot be encoded as UTF-8 "
                "(the writer split an emoji or cut the text inside a pair). Fix: repair or "
                f"delete that {unit}.")
    return text
