"""Passage re-ranking from MS MARCO, for ``acadlm_rerank`` (the re-ranking schema of
``docs/evaluation_data.md``: ``id``, ``query``, ``passages`` with graded ``relevance``).

Two published forms are read:

* HELMET's ``data/msmarco/test_reranking_data_k*_dep3.jsonl`` (Yen et al. 2024): one query per
  row with ``qid``, ``query`` and ``ctxs``, each passage with its ``id``, ``text`` and TREC
  ``label`` (0-3). A query repeated in the file is written once.
* The TREC Deep Learning track's files (Craswell et al. 2020), from which HELMET's come: the run
  ``msmarco-passagetest2019-top1000.tsv`` (``qid``, ``pid``, query, passage; tab-separated) with
  ``--qrels 2019qrels-pass.txt`` (``qid 0 pid grade``). Only judged candidates are kept, in
  the run's order; queries without any judged candidate are left out.

Our task puts every passage of a query into the prompt whole, so ``--max-passages N`` keeps the
first N of each query (HELMET's files for short lengths hold fewer passages per query, too).
A query none of whose kept passages is relevant cannot be scored and is left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from acadlm_plugins.evaluation.converters.base import (
    SKIP_HINT,
    DatasetSpec,
    Fields,
    Run,
    SourceError,
    Where,
)
from acadlm_plugins.evaluation.converters.reading import decoded_lines, json_items
from acadlm_plugins.evaluation.converters.writing import limited

HELMET_SHAPE = ('an object like {"qid": "...", "query": "...", "ctxs": [{"id": "...", "text": '
                '"...", "label": 3}]}')
NOTHING_RELEVANT = "query with no passage of relevance > 0 (nothing to rank)"


def _grade(entry: Fields, name: str) -> float:
    grade = entry.number(name)
    if grade < 0:
        raise entry.fail(name, f"must be a relevance grade >= 0, got {grade:g}.")
    return grade


def _helmet_query(row: Fields, run: Run) -> dict[str, Any] | None:
    query = row.text("query")
    key = row.ident("qid") or query
    if run.already_written(key):
        run.skip("repeated query")
        return None
    passages = []
    for i, value in enumerate(row.items("ctxs")):
        entry = row.sub(f"ctxs[{i}]", value)
        passages.append({**row.passage(f"ctxs[{i}]", value), "relevance": _grade(entry, "label")})
    passages = limited(passages, run.options.max_passages)
    if not any(p["relevance"] > 0 for p in passages):
        run.skip(NOTHING_RELEVANT)
        return None
    run.remember(key)
    return {"id": row.ident("qid") or row.where.number, "query": query, "passages": passages}


def _read_qrels(path: Path, run: Run) -> dict[str, dict[str, float]]:
    """qid -> {pid: grade} of a TREC qrels file (``qid iteration pid grade`` per line)."""
    grades: dict[str, dict[str, float]] = {}
    fix = (f"each line of {path.name} must be `qid 0 pid grade` (TREC qrels, e.g. "
           f"2019qrels-pass.txt); correct or remove it, {SKIP_HINT}.")
    for number, text in decoded_lines(path, run, rows=False):
        fields = text.split()
        if not fields:
            continue
        where = Where(path, line=number)
        try:
            if len(fields) != 4:
                raise SourceError(where, f"has {len(fields)} columns, not 4.", fix)
            try:
                grade = float(fields[3])
            except ValueError:
                raise SourceError(where, f"column 4 (the grade) is {fields[3]!r}, not a "
                                  "number.", fix) from None
            grades.setdefault(fields[0], {})[fields[2]] = grade
        except SourceError as error:
            run.reject(error)
    return grades


def _trec_run(run: Run, qrels: Path) -> Iterator[dict[str, Any]]:
    """Queries of a TREC run file (``qid<TAB>pid<TAB>query<TAB>passage``) with their judged
    candidates, in the order they first appear."""
    grades = _read_qrels(qrels, run)
    queries: dict[str, dict[str, Any]] = {}
    for number, text in decoded_lines(run.source, run):
        if not text.strip():
            continue
        run.read += 1
        where = Where(run.source, line=number)
        columns = text.rstrip("\r\n").split("\t")
        if len(columns) != 4 or not all(column.strip() for column in columns):
            run.reject(SourceError(where, f"has {len(columns)} tab-separated columns (or an "
                                   "empty one).", f"line {number} must be qid<TAB>pid<TAB>"
                                   f"query<TAB>passage, as in TREC DL's top1000 run files; "
                                   f"correct or remove it, {SKIP_HINT}."))
            continue
        qid, pid, query, passage = (column.strip() for column in columns)
        judged = grades.get(qid)
        if judged is None:
            run.skip("candidate of a query without judgments in --qrels")
        elif pid not in judged:
            run.skip("candidate passage without a judgment")
        else:
            entry = queries.setdefault(qid, {"id": qid, "query": query, "passages": []})
            entry["passages"].append({"text": " ".join(passage.split()),
                                      "relevance": judged[pid]})
    for entry in queries.values():
        entry["passages"] = limited(entry["passages"], run.options.max_passages)
        if any(p["relevance"] > 0 for p in entry["passages"]):
            yield entry
        else:
            run.skip(NOTHING_RELEVANT)


def convert_msmarco(run: Run) -> Iterator[dict[str, Any]]:
    """MS MARCO queries with graded passages, from HELMET's jsonl or a TREC run + qrels."""
    if run.source.suffix.lower() == ".tsv":
        if run.options.qrels is None:
            raise SourceError(Where(run.source), "is a TREC run file, whose grades are in a "
                              "separate qrels file.", "Pass --qrels 2019qrels-pass.txt (or the "
                              "qrels that go with this run).")
        yield from _trec_run(run, run.options.qrels)
        return
    if run.options.qrels is not None:
        raise SourceError(Where(run.source), "carries its grades (`label`), so --qrels is not "
                          "used.", "Drop --qrels, or give the TREC run file (.tsv) it grades.")
    for where, value in json_items(run.source, run):
        record = run.convert_row(_helmet_query, value, where)
        if record is not None:
            yield record


SPECS = (
    DatasetSpec(
        name="msmarco", title="MS MARCO passage re-ranking (TREC DL 2019, as HELMET uses it)",
        source=("HELMET's data/msmarco/test_reranking_data_k*_dep3.jsonl, or TREC DL's "
                "msmarco-passagetest2019-top1000.tsv with --qrels 2019qrels-pass.txt"),
        shape=HELMET_SHAPE, schema="rerank", metadata_key="rerank_path",
        task="acadlm_rerank", convert=convert_msmarco, options=("qrels", "max_passages"),
        note="every passage goes into the prompt whole: use the k50 file or --max-passages"),
)
