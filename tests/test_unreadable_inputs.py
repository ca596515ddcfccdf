"""A corrupt line in a user's jsonl file (a byte that is not UTF-8, a truncated last line) is a
clear error naming the file, the line and the fix, never a Python traceback: the evaluation
tasks' local data (``rag_path``, ``haystack_path``, ...), the rater's ``judgments`` and the
annotator's ``data_files``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.evaluation.haystack import prose_words
from acadlm_plugins.evaluation.local_data import DEFAULT_QA_FILE, load_qa
from acadlm_plugins.qurating.annotation import open_corpus
from acadlm_plugins.qurating.rater import read_judgments


def _qa_lines() -> list[bytes]:
    return DEFAULT_QA_FILE.read_bytes().splitlines()[:2]


# ------------------------------------------------------------------ evaluation local data
def test_a_qa_file_with_a_byte_that_is_not_utf8_names_the_file_and_line(tmp_path: Path) -> None:
    first, second = _qa_lines()
    # A long first line (past any read buffer) and non-ASCII text before the bad byte: the
    # line is still the right one and the column counts characters.
    first = first.replace(b'"question": "', b'"question": "' + "é".encode() * 20_000, 1)
    bad = second.replace(b'"question": "', '"question": "日本'.encode() + b"\xff", 1)
    column = bad.decode("utf-8", errors="replace").index("\ufffd") + 1
    path = tmp_path / "rag.jsonl"
    path.write_bytes(first + b"\n" + bad + b"\n")
    with pytest.raises(ConfigError, match=rf"`acadlm_rag: rag_path`: {re.escape(str(path))}:2: "
                                          rf"byte 0xff at column {column} is not UTF-8\. Fix: "
                                          r"Re-encode the file as UTF-8.*remove line 2\."):
        load_qa(path, task="acadlm_rag", key="rag_path")


@pytest.mark.parametrize("ending", ["\n", ""])
def test_a_truncated_last_qa_line_says_so_without_at_at(tmp_path: Path, ending: str) -> None:
    first, second = _qa_lines()
    cut = second.decode()[:40]
    path = tmp_path / "rag.jsonl"
    path.write_text(first.decode() + "\n" + cut + ending, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_qa(path, task="acadlm_ruler_qa", key="qa_path")
    message = str(caught.value)
    assert f"{path}:2 is not valid JSON (Unterminated string starting at column " in message
    assert "at at" not in message


def test_a_jsonl_haystack_with_a_byte_that_is_not_utf8_names_the_file_and_line(
        tmp_path: Path) -> None:
    path = tmp_path / "hay.jsonl"
    path.write_bytes(b'{"text": "a few words"}\n\n{"text": "bad \xff byte"}\n')
    with pytest.raises(ConfigError, match=rf"`acadlm_niah_single_2: haystack_path`: "
                                          rf"{re.escape(str(path))}:3: byte 0xff at column 15 "
                                          r"is not UTF-8"):
        prose_words(str(path), task="acadlm_niah_single_2", min_words=1)


# ------------------------------------------------------------------ rater judgments
def _judgment(pair_id: str) -> bytes:
    return json.dumps({"pair_id": pair_id, "text_a": "x", "text_b": "y",
                       "judgments": {"educational_value": 0.9}}).encode()


def test_judgments_with_a_byte_that_is_not_utf8_name_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "judgments.jsonl"
    path.write_bytes(_judgment("a") + b"\n" + _judgment("b").replace(b'"x"', b'"x\xff"') + b"\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: byte 0xff at column \d+ is "
                                        r"not UTF-8\. Fix: re-encode"):
        read_judgments(path)


def test_judgments_pointing_at_a_directory_say_a_jsonl_file_is_expected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config `judgments`: .* is a directory; a JSONL file "
                                          r"is expected\. Fix: point it at the judgments\.jsonl"):
        read_judgments(tmp_path)
    inside = tmp_path / "judgments.jsonl"
    inside.write_bytes(_judgment("a") + b"\n")
    with pytest.raises(ConfigError, match=rf"is a directory.*point it at "
                                          rf"{re.escape(str(inside))}\."):
        read_judgments(tmp_path)


# ------------------------------------------------------------------ annotation data_files
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_corpus_file_with_a_byte_that_is_not_utf8_names_the_file_and_line(
        tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"docs{suffix}"
    path.write_bytes(b'{"text": "a"}\n{"text": "b\xff"}\n{"text": "c"}\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: byte 0xff at column 12 is "
                                        r"not UTF-8\. Fix: re-encode"):
        open_corpus(path, cache_dir=tmp_path / "cache")


def test_a_truncated_last_corpus_line_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "a"}\n\n{"text": "b"}\n{"text": "c')
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:4: not valid JSON \("
                                        r"Unterminated string starting at column 10\)\. Fix: "):
        open_corpus(path, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("layout", ["json_list", "one_object_per_line", "json_list_over_lines"])
def test_an_alce_file_with_a_byte_that_is_not_utf8_names_the_file_and_line(tmp_path: Path,
                                                                            layout: str) -> None:
    """It was a UnicodeDecodeError traceback from reading the whole file."""
    from acadlm_plugins.evaluation.helmet import ASQA, load_alce

    path = tmp_path / "asqa.json"
    if layout == "json_list":
        path.write_bytes(b'[{"question": "\xff"}]')
    else:
        path.write_bytes(b'{"question": "\xff"}\n{"question": "q", "docs": []}\n')
    line = 1
    if layout == "json_list_over_lines":  # was blamed on line 1 as JSON that is not an object
        path.write_bytes(b'[\n {"question": "q"},\n {"question": "bad \xff"}\n]\n')
        line = 3
    with pytest.raises(ConfigError, match=rf"`acadlm_cite_asqa: asqa_path`: "
                                          rf"{re.escape(str(path))}:{line}: byte 0xff at column "
                                          rf"\d+ is not UTF-8"):
        load_alce(path, ASQA, task="acadlm_cite_asqa", key="asqa_path")
