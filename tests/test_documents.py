"""Reading document files (errors that name the file, line and fix) and the permissions of
the token caches written from them."""

from __future__ import annotations

import json
import os
import stat

import pytest
from tiny_setup import ByteTokenizer

from acadlm_plugins.data.documents import read_texts, resolve_data_files
from acadlm_plugins.data.mixture import domain_mixture_dataset
from acadlm_plugins.data.streaming import write_token_store
from acadlm_plugins.errors import DataError


def test_a_corrupt_parquet_file_is_a_data_error_naming_it(tmp_path):
    """It used to surface as pyarrow.lib.ArrowInvalid from inside the tokenizer loop."""
    bad = tmp_path / "train.parquet"
    bad.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match=r"train\.parquet: not a readable parquet file.*Fix:"):
        domain_mixture_dataset(ByteTokenizer(), domains={"x": str(bad)}, max_seq_len=32)


def test_an_unterminated_string_is_reported_as_such(tmp_path):
    """The line ending used to be parsed too: 'Invalid control character at at column 17'."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "broken\n')
    with pytest.raises(DataError) as err:
        read_texts([bad])
    message = str(err.value)
    assert "bad.jsonl:2: not valid JSON (Unterminated string starting at column 10)" in message
    assert "at at" not in message and "control character" not in message


def test_json_files_are_read_as_json_lines_and_errors_say_so(tmp_path):
    lines = tmp_path / "docs.json"
    lines.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert read_texts([lines]) == ["one", "two"]
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps([{"text": "one"}], indent=2))
    with pytest.raises(DataError, match=r"pretty\.json:1: .*read as JSON Lines"):
        read_texts([pretty])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"\.json \(read as JSON Lines\)"):
        resolve_data_files(str(tmp_path / "empty"), field="dataset.domains.x")
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(DataError, match=r"is not a \.jsonl, \.json \(read as JSON Lines\) or "
                                        r"\.parquet file"):
        resolve_data_files(str(other), field="dataset.domains.x")


def test_empty_and_whitespace_only_texts_are_dropped(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a", "", " \n\t ", "b"]))
    assert read_texts([docs]) == ["a", "b"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_a_token_store_gets_the_umask_mode(tmp_path, umask):
    """mkdtemp makes 0700 folders: a store in a shared cache_dir was closed to the others."""
    previous = os.umask(umask)
    try:
        store = write_token_store([[1, 2, 3], [4]], tmp_path / "cache" / "k.tokens")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(store.stat().st_mode) == 0o777 & ~umask
    for name in ("tokens.bin", "offsets.npy"):
        assert stat.S_IMODE((store / name).stat().st_mode) == 0o666 & ~umask


def test_sft_and_judgment_files_report_an_unterminated_string_in_one_sentence(tmp_path):
    """The SFT reader and the rater's judgments reader word JSON errors as the corpus reader
    does: the line ending is not part of the error and "at" is not doubled."""
    from acadlm_plugins.data.sft import check_ultrachat_file
    from acadlm_plugins.qurating.rater import _judgment_row

    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"messages": "unterminated\n')
    with pytest.raises(DataError) as err:
        check_ultrachat_file(sft)
    assert "Unterminated string starting at column 14" in str(err.value)
    assert "at at" not in str(err.value)
    with pytest.raises(DataError) as err:
        _judgment_row('{"pair_id": "unterminated\n', "judgments.jsonl:1")
    assert "judgments.jsonl:1: not valid JSON (Unterminated string starting at column 13)" in (
        str(err.value))


def test_the_token_cache_key_changes_with_the_tokenizer_definition(tmp_path):
    """A normalizer added to tokenizer.json leaves the probe's ids as they were but changes
    other texts' ids: the cache key must change with it, or stale tokens would be served."""
    from tiny_setup import write_tiny_tokenizer

    from acadlm_plugins.data.tokenization import tokenizer_fingerprint
    from acadlm_plugins.models import smollm2_tokenizer

    folder = write_tiny_tokenizer(tmp_path / "tok")
    before = smollm2_tokenizer(str(folder))
    definition = json.loads((folder / "tokenizer.json").read_text())
    definition["normalizer"] = {"type": "NFKC"}
    (folder / "tokenizer.json").write_text(json.dumps(definition))
    after = smollm2_tokenizer(str(folder))
    text = "\ufb01le \u00bd \u2460"  # ligature fi, one half, circled 1: NFKC rewrites them
    assert before.encode(text) != after.encode(text)
    assert tokenizer_fingerprint(before) != tokenizer_fingerprint(after)
    assert tokenizer_fingerprint(after) == tokenizer_fingerprint(smollm2_tokenizer(str(folder)))


def test_a_lone_surrogate_is_a_data_error_naming_the_line_at_read_time(tmp_path):
    """JSON accepts "\\ud800" on its own; it used to pass the reader and fail inside the
    tokenizer with a TypeError/UnicodeEncodeError that named no file. An escaped pair (an emoji
    as json.dumps writes it) is a real character and stays."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "smile \U0001f600"}) + "\n"
                    + '{"text": "bad \\ud800 surrogate"}\n')
    assert '\\ud83d\\ude00' in docs.read_text()
    with pytest.raises(DataError) as err:
        read_texts([docs])
    message = str(err.value)
    assert f"{docs}:2: field 'text' holds a lone UTF-16 surrogate (\\ud800 at character 5" in (
        message)
    assert "Fix: repair or delete that line." in message
    docs.write_text(json.dumps({"text": "smile \U0001f600"}) + "\n")
    assert read_texts([docs]) == ["smile \U0001f600"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_utf8_byte_order_mark_opening_the_file_is_accepted(tmp_path, suffix):
    """It was refused at line 1 ("Unexpected UTF-8 BOM"), and the advice to delete that line
    cost a document."""
    docs = tmp_path / f"docs{suffix}"
    docs.write_bytes(b'\xef\xbb\xbf{"text": "aa"}\n{"text": "bbb"}\n')
    assert read_texts([docs]) == ["aa", "bbb"]
    docs.write_bytes(b'\xef\xbb\xbf{"text": "caf\xe9"}\n')  # columns count after the mark
    with pytest.raises(DataError, match=r"docs\.jsonl?:1: byte 0xe9 at column 14 is not UTF-8"):
        read_texts([docs])
    docs.write_bytes(b'{"text": "aa"}\n\xef\xbb\xbf{"text": "bbb"}\n')  # only at the start
    with pytest.raises(DataError, match=r":2: not valid JSON \(Unexpected UTF-8 BOM"):
        read_texts([docs])


@pytest.mark.parametrize(("line", "words"), [
    ('{"text": 5}', "field 'text' is int, not a string. Fix: quote the line's text"),
    ('["a", "b"]', "expected a JSON object with a 'text' field, got list. Fix: write each line"),
])
def test_a_row_of_the_wrong_shape_names_file_line_and_fix(tmp_path, line, words):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "a"}) + "\n" + line + "\n")
    with pytest.raises(DataError) as err:
        read_texts([docs])
    assert f"{docs}:2: " in str(err.value) and words in str(err.value)


def test_a_null_text_is_an_error_and_skipped_texts_are_counted_per_file(tmp_path, caplog):
    """A null text was dropped without a word, though the docstring says a text that is not a
    string raises (as the QuRating readers do); empty and whitespace-only texts are still
    skipped, but each file logs how many."""
    import logging

    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": None}) + "\n")
    with pytest.raises(DataError, match=rf"{docs}:2: the row's 'text' is null, not a string\. "
                                        r"Fix: give the line its text, or delete it\."):
        read_texts([docs])
    table = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["fine", None]}), table)
    with pytest.raises(DataError, match=rf"{table}:2: the row's 'text' is null.*the row its"):
        read_texts([table])
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a", "", " \n\t ", "b"]))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "c"}) + "\n" + json.dumps({"text": ""}) + "\n")
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps({"text": "d"}) + "\n")
    with caplog.at_level(logging.INFO, logger="acadlm_plugins.data.documents"):
        assert read_texts([docs, other, clean]) == ["a", "b", "c", "d"]
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == [f"{docs}: skipped 2 empty or whitespace-only texts",
                       f"{other}: skipped 1 empty or whitespace-only text"]
