"""The default corpus: deterministic split, text helpers, manifest checks and a real build."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from acadlm_plugins.defaults import manifest as manifest_lib
from acadlm_plugins.defaults.corpus import (
    DOMAINS,
    SDISTS,
    Document,
    build_corpus,
    is_validation_id,
    normalize_text,
    split_documents,
    split_passages,
)
from acadlm_plugins.defaults.paths import default_corpus_dir, sources_dir
from acadlm_plugins.errors import DataError

FIELDS = {"text", "domain", "source", "id"}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _docs(count: int, domain: str = "toy") -> list[Document]:
    return [Document(f"{domain}/{i}", domain, "synthetic", f"text {i}\n") for i in range(count)]


def test_split_is_deterministic_and_uses_the_hash_rule():
    docs = _docs(2000)
    train, validation = split_documents(docs)
    assert split_documents(list(reversed(docs)))[1] == list(reversed(validation))
    assert {d.id for d in validation} == {d.id for d in docs if is_validation_id(d.id)}
    assert 50 < len(validation) < 150  # about 5 %
    assert len(train) + len(validation) == len(docs)
    assert not {d.id for d in train} & {d.id for d in validation}


def test_split_keeps_at_least_two_validation_documents():
    docs = _docs(10)
    assert sum(is_validation_id(d.id) for d in docs) < 2  # the rule alone would give too few
    train, validation = split_documents(docs)
    assert len(validation) == 2 and len(train) == 8
    assert split_documents(docs) == (train, validation)


def test_split_refuses_to_empty_train():
    with pytest.raises(DataError, match="only 2 documents"):
        split_documents(_docs(2))


def test_normalize_text_strips_gutenberg_boilerplate_and_crlf():
    raw = (
        "\ufeffThe Project Gutenberg EBook of X\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\n"
        "Produced by Someone\r\n\r\nChapter 1\r\n\r\nIt was a dark night.\r\n\r\n"
        "End of the Project Gutenberg EBook of X\r\nlicense text\r\n"
    )
    assert normalize_text(raw) == "Chapter 1\n\nIt was a dark night.\n"
    assert normalize_text(" \n\n") == ""
    # Botchan's file has no blank lines: only the credits line may go, not the text after it.
    unspaced = "*** START OF THE PROJECT GUTENBERG EBOOK Y ***\nProduced by Z\nTITLE\nText.\n"
    assert normalize_text(unspaced) == "TITLE\nText.\n"


def test_split_passages_starts_a_passage_at_each_act():
    text = "ACT I.\n\n" + "\n\n".join(["line " * 20] * 10) + "\n\nACT II.\n\nshort\n"
    passages = split_passages(text, target_chars=300)
    assert passages[0].startswith("ACT I.")
    assert passages[-1].startswith("ACT II.")
    assert all(len(p) < 700 for p in passages)
    assert "".join(p.replace("\n", "") for p in passages) == text.replace("\n", "")


def test_manifest_detects_a_modified_file(tmp_path):
    data = tmp_path / "corpus" / "toy" / "train.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text('{"text": "a"}\n')
    record = {"recipe_version": 1, "files": [manifest_lib.file_record(tmp_path, data, [])]}
    manifest_lib.record_component(tmp_path, "corpus", record)
    assert manifest_lib.component_problems(tmp_path, "corpus", 1) == []
    assert manifest_lib.component_problems(tmp_path, "corpus", 2)  # stale recipe
    data.write_text('{"text": "b"}\n')  # same size, other content
    assert manifest_lib.component_problems(tmp_path, "corpus") == [
        "corpus/toy/train.jsonl: sha256 differs from the manifest"
    ]
    data.unlink()
    assert manifest_lib.verify_manifest(tmp_path) == [
        "corpus/toy/train.jsonl: missing",
        "model: not built",
    ]


@pytest.mark.integration
def test_build_corpus_into_a_fresh_home(tmp_path, monkeypatch):
    from acadlm_plugins.defaults.paths import acadlm_home

    real_sources = sources_dir(acadlm_home())
    missing = [s.filename for s in SDISTS if not (real_sources / s.filename).is_file()]
    assert not missing, (
        f"{real_sources} lacks {missing}; run `acadlm-defaults build` first "
        "(this test reuses its downloaded sdists to stay offline)."
    )
    home = tmp_path / "home"
    sources_dir(home).mkdir(parents=True)
    for sdist in SDISTS:
        shutil.copy(real_sources / sdist.filename, sources_dir(home) / sdist.filename)
    monkeypatch.setenv("ACADLM_HOME", str(home))

    corpus = build_corpus(home)
    assert corpus == default_corpus_dir(home)
    for domain in DOMAINS:
        for split in ("train", "validation"):
            records = _read_jsonl(corpus / domain / f"{split}.jsonl")
            assert len(records) >= 2, (domain, split)
            assert all(set(r) == FIELDS and r["domain"] == domain and r["text"] for r in records)
    for name in ("code_packages", "books"):
        records = _read_jsonl(corpus / "long" / f"{name}.jsonl")
        assert records and all(set(r) == FIELDS and r["text"].strip() for r in records)
    first_package = _read_jsonl(corpus / "long" / "code_packages.jsonl")[0]
    assert first_package["text"].startswith("# file: Lib/")

    assert manifest_lib.component_problems(home, "corpus") == []
    built_at = manifest_lib.load_manifest(home)["components"]["corpus"]["built_at"]
    started = time.perf_counter()
    build_corpus(home)  # idempotent: nothing to do
    assert time.perf_counter() - started < 5
    assert manifest_lib.load_manifest(home)["components"]["corpus"]["built_at"] == built_at

    docs_train = corpus / "docs" / "train.jsonl"
    with open(docs_train, "a") as handle:
        handle.write("\n")
    size = docs_train.stat().st_size
    expected = f"corpus/docs/train.jsonl: size {size} != {size - 1}"
    assert manifest_lib.component_problems(home, "corpus") == [expected]


def test_an_unreadable_manifest_is_empty_for_a_build_and_an_error_for_verify(tmp_path, caplog):
    """json.loads of a corrupt manifest.json crashed both `build` and `verify`."""
    path = manifest_lib.manifest_path(tmp_path)
    for text in ("{truncated", "[]", '{"components": []}', "\udcff"):
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        with caplog.at_level("WARNING"):
            assert manifest_lib.load_manifest(tmp_path) == {"format": 1, "components": {}}
        assert f"{path}: unreadable manifest" in caplog.text
        assert manifest_lib.component_problems(tmp_path, "corpus", 1) == ["corpus: not built"]
        for read in (lambda: manifest_lib.load_manifest(tmp_path, strict=True),
                     lambda: manifest_lib.verify_manifest(tmp_path)):
            with pytest.raises(DataError, match=r"unreadable manifest .*Delete it and run "
                               r"`acadlm-defaults build`"):
                read()
    manifest_lib.record_component(tmp_path, "corpus", {"recipe_version": 1, "files": []})
    assert manifest_lib.verify_manifest(tmp_path) == ["model: not built"]  # written over it


def test_build_corpus_removes_what_killed_builds_left(tmp_path, monkeypatch):
    import os
    import subprocess

    from acadlm_plugins.defaults.corpus import RECIPE_VERSION

    monkeypatch.setenv("ACADLM_HOME", str(tmp_path))
    corpus = default_corpus_dir(tmp_path)
    data = corpus / "code" / "train.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text('{"text": "a"}\n')
    manifest_lib.record_component(tmp_path, "corpus", {
        "recipe_version": RECIPE_VERSION, "files": [manifest_lib.file_record(tmp_path, data, [])]})
    child = subprocess.Popen(["true"])
    child.wait()
    stale = [tmp_path / f".corpus.{kind}-{child.pid}" for kind in ("tmp", "old")]
    live = [tmp_path / f".corpus.tmp-{os.getppid()}", tmp_path / f".corpus.tmp-{os.getpid()}"]
    others = [tmp_path / ".corpus.tmp-x", tmp_path / ".corpusX.tmp-1"]
    for folder in (*stale, *live, *others):
        folder.mkdir()
    assert build_corpus(tmp_path) == corpus  # up to date: only the leftovers go
    assert not any(folder.exists() for folder in stale)
    assert all(folder.is_dir() for folder in (*live, *others, corpus))
    assert data.is_file()
