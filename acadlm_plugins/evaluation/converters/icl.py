"""Labelled texts for many-shot in-context learning (``acadlm_icl``): TREC coarse and fine,
BANKING77, CLINC150 and NLU, as HELMET uses them (Yen et al. 2024, section 2.5).

Each writes the ICL schema of ``docs/evaluation_data.md``: ``text``, ``label`` and ``split``.
HELMET draws demonstrations from the train split and asks about the test split; so do we when the
source has both: give the train file and ``--test`` the test file (rows of the first become
``"demo"``, of the second ``"test"``). CLINC150's JSON holds its splits itself (HELMET asks about
``val``, as the Hugging Face ``plus`` configuration's validation split, and ignores ``test``). NLU
is published as one file: without ``--test`` its rows carry no split, and the task asks about any
row and shows the others (HELMET asks a seeded 10% and shows the rest: split the file and give
that 10% as ``--test`` for its arrangement). Labels keep their names (the task maps them to numbers, as
HELMET does); files exported from Hugging Face carry class numbers, which work the same.

Published forms read: TREC's ``train_5500.label`` / ``TREC_10.label`` (``COARSE:fine question``
per line; TREC's train file has one byte that is not UTF-8, so give it ``--encoding latin-1``),
BANKING77's ``train.csv`` / ``test.csv`` (``text,category``), CLINC150's ``data_oos_plus.json``
(``{"train": [[text, intent], ...], "val": ..., "oos_train": ...}``), NLU's
``NLU-Data-Home-Domain-Annotated-All.csv`` (``;``-separated; the text is ``answer_annotation``
with its ``[slot : words]`` marks reduced to the words, the label ``<scenario>_<intent>``), and
for all five the rows of the Hugging Face copies as JSON Lines.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from acadlm_plugins.evaluation.converters.base import (
    DatasetSpec,
    Fields,
    Run,
    SourceError,
    Where,
)
from acadlm_plugins.evaluation.converters.reading import (
    csv_records,
    decoded_lines,
    holds_json_lines,
    json_document,
    json_items,
)

Labelled = tuple[str, str]  # (text, label)
Reader = Callable[[Path, Run], Iterator[Labelled]]
TREC_LABEL = re.compile(r"([A-Z]+):(\S+)")
SLOT_MARK = re.compile(r"\[\s*[^\[\]:]+?\s*:+\s*([^\[\]]*?)\s*\]")


def _flat(text: str) -> str:
    return " ".join(text.split())


def _json_rows(path: Path, run: Run, label_names: tuple[str, ...]) -> Iterator[Labelled]:
    """(text, label) of Hugging Face rows: ``text`` and the first label field present."""
    def parse(row: Fields, run: Run) -> Labelled:
        name = next((n for n in label_names if row.has(n)), label_names[0])
        return _flat(row.text("text")), row.ident(name) or str(row.require(name))

    for where, value in json_items(path, run):
        record = run.convert_row(parse, value, where)
        if record is not None:
            yield record


def _is_json(path: Path) -> bool:
    return path.suffix.lower() in (".json", ".jsonl")


def _trec_reader(fine: bool) -> Reader:
    def read(path: Path, run: Run) -> Iterator[Labelled]:
        if _is_json(path):
            names = ("fine_label", "label-fine") if fine else ("coarse_label", "label-coarse")
            yield from _json_rows(path, run, names)
            return
        for number, text in decoded_lines(path, run):
            if not text.strip():
                continue
            run.read += 1
            where = Where(path, line=number)
            label, _, question = text.strip().partition(" ")
            match = TREC_LABEL.fullmatch(label)
            if match is None or not question.strip():
                run.reject(SourceError(where, f"does not read `COARSE:fine question` (got "
                                       f"{text.strip()[:50]!r}).", run.fix(where)))
                continue
            yield _flat(question), label if fine else match.group(1)
    return read


def _banking_reader(path: Path, run: Run) -> Iterator[Labelled]:
    if _is_json(path):
        yield from _json_rows(path, run, ("label", "category"))
        return
    for where, record in csv_records(path, run, columns=("text", "category")):
        if record["text"].strip() and record["category"].strip():
            yield _flat(record["text"]), record["category"].strip()
        else:
            run.reject(SourceError(where, "has an empty `text` or `category`.", run.fix(where)))


def _nlu_reader(path: Path, run: Run) -> Iterator[Labelled]:
    if _is_json(path):
        yield from _json_rows(path, run, ("label", "intent"))
        return
    columns = ("scenario", "intent", "answer_annotation")
    for where, record in csv_records(path, run, columns=columns, delimiter=";",
                                     skip_initial_space=True):
        annotated = record["answer_annotation"].strip()
        if annotated in ("", "null"):
            run.skip("no utterance (answer_annotation is null; the Hugging Face copy drops it)")
        elif not record["scenario"].strip() or not record["intent"].strip():
            run.reject(SourceError(where, "has an empty `scenario` or `intent`.",
                                   run.fix(where)))
        else:
            label = f"{record['scenario'].strip()}_{record['intent'].strip()}"
            yield _flat(SLOT_MARK.sub(r"\1", annotated)), label


def _clinc_pairs(path: Path, run: Run, document: dict[str, Any],
                 split: str) -> Iterator[tuple[Where, Any]]:
    for part in (split, f"oos_{split}"):
        pairs = document.get(part)
        if not isinstance(pairs, list):
            raise SourceError(Where(path, item=part), "is missing or not a list of [text, "
                              "intent] pairs.", "Give CLINC150's data_oos_plus.json (or "
                              "data_full.json) as published.")
        for number, pair in enumerate(pairs):
            run.read += 1
            yield Where(path, item=f"{part}[{number}]"), pair


def _clinc_splits(path: Path, run: Run,
                  document: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(text, intent, split) of CLINC150's own JSON: train (and oos_train) rows as
    demonstrations, val (and oos_val) rows as the questions, as HELMET splits it."""
    for split, role in (("train", "demo"), ("val", "test")):
        for where, pair in _clinc_pairs(path, run, document, split):
            if isinstance(pair, list) and len(pair) == 2 and all(
                    isinstance(x, str) and x.strip() for x in pair):
                yield _flat(pair[0]), pair[1].strip(), role
            else:
                run.reject(SourceError(where, f"must be a [text, intent] pair of strings, got "
                                       f"{str(pair)[:60]}.", run.fix(where)))
    run.skip("CLINC150 test split (HELMET asks about val)",
             sum(len(document.get(part) or []) for part in ("test", "oos_test")))


def _icl_rows(reader: Reader, run: Run) -> Iterator[dict[str, Any]]:
    """ICL rows of the source (and of ``--test``), with their splits."""
    main_split = "demo" if run.options.test else None
    for text, label in reader(run.source, run):
        yield _row(text, label, main_split)
    if run.options.test:
        for text, label in reader(run.options.test, run):
            yield _row(text, label, "test")


def _row(text: str, label: str, split: str | None) -> dict[str, Any]:
    return {"text": text, "label": label, **({"split": split} if split else {})}


def _converter(reader: Reader) -> Callable[[Run], Iterator[dict[str, Any]]]:
    def convert(run: Run) -> Iterator[dict[str, Any]]:
        return _icl_rows(reader, run)
    return convert


def convert_clinc(run: Run) -> Iterator[dict[str, Any]]:
    """CLINC150 from its own JSON (splits inside) or from Hugging Face rows (with --test)."""
    if holds_json_lines(run.source):
        yield from _icl_rows(lambda path, r: _json_rows(path, r, ("intent", "label")), run)
        return
    document = json_document(run.source, run)
    if not isinstance(document, dict) or "train" not in document:
        yield from _icl_rows(lambda path, r: _json_rows(path, r, ("intent", "label")), run)
        return
    if run.options.test:
        raise SourceError(Where(run.source), "holds its own splits (train, val, test), so "
                          "--test is not used.", "Drop --test.")
    for text, label, split in _clinc_splits(run.source, run, document):
        yield _row(text, label, split)


def _spec(name: str, title: str, source: str, shape: str,
          convert: Callable[[Run], Iterator[dict[str, Any]]], note: str = "") -> DatasetSpec:
    return DatasetSpec(name=name, title=title, source=source, shape=shape, schema="icl",
                       metadata_key="icl_path", task="acadlm_icl", convert=convert,
                       options=("test",), note=note)


TREC_SOURCE = "TREC's train_5500.label with --test TREC_10.label"
TREC_SHAPE = 'a line `COARSE:fine question`, e.g. `DESC:manner How did serfdom develop ?`'
SPECS = (
    _spec("trec_coarse", "TREC question classification, 6 coarse classes", TREC_SOURCE,
          TREC_SHAPE, _converter(_trec_reader(fine=False)),
          note="train_5500.label has one non-UTF-8 byte: add --encoding latin-1"),
    _spec("trec_fine", "TREC question classification, 50 fine classes", TREC_SOURCE,
          TREC_SHAPE, _converter(_trec_reader(fine=True)),
          note="labels are COARSE:fine; train_5500.label needs --encoding latin-1"),
    _spec("banking77", "BANKING77 intents", "BANKING77's train.csv with --test test.csv",
          'a CSV record `text,category` (header first)', _converter(_banking_reader)),
    _spec("clinc150", "CLINC150 intents with out-of-scope (the plus version)",
          "CLINC150's data_oos_plus.json", 'a [text, intent] pair of strings', convert_clinc),
    _spec("nlu", "NLU Evaluation Data intents (68 classes)",
          "NLU-Data-Home-Domain-Annotated-All.csv",
          'a `;`-separated CSV record with scenario, intent and answer_annotation',
          _converter(_nlu_reader), note="one file: rows get no split unless --test is given"),
)
