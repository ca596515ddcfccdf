"""ALCE's ASQA and QAMPARI (Gao et al. 2023), for HELMET's ``cite`` category
(``acadlm_cite_asqa`` / ``acadlm_cite_qampari``).

These tasks read ALCE's own item format, so the conversion keeps it: each item is checked, cut
down to the fields the tasks use (the question, its answers, the long answer of a demonstration,
the retrieved ``docs`` with title and text, in retrieval order) and written one per line.
HELMET's cite config reads ``data/alce/*_eval_gtr_top2000.json`` (ALCE's items with 2,000
retrieved documents per question, gigabytes in all; ALCE's own ``*_gtr_top100.json`` have the
same format); ``--max-passages N`` keeps the first N of each question (HELMET shows up to 700 at
128K tokens). The demonstrations are HELMET's ``prompts/asqa_revised.json`` and
``qampari_revised.json``, used as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from acadlm_plugins.evaluation.converters.base import DatasetSpec, Fields, Run
from acadlm_plugins.evaluation.converters.reading import json_items
from acadlm_plugins.evaluation.converters.writing import limited


def _docs(row: Fields, run: Run) -> list[dict[str, str]]:
    docs = [row.passage(f"docs[{i}]", value) for i, value in enumerate(row.items("docs"))]
    return limited(docs, run.options.max_passages)


def _answer_groups(row: Fields, name: str, values: list[Any]) -> list[list[str]]:
    """Lists of acceptable strings (a single string counts as a list of one)."""
    groups = []
    for i, value in enumerate(values):
        group = [value] if isinstance(value, str) else value
        if not isinstance(group, list) or not group or not all(
                isinstance(alias, str) and alias.strip() for alias in group):
            raise row.fail(f"{name}[{i}]", "must be a non-empty list of non-empty strings.")
        groups.append(list(dict.fromkeys(alias.strip() for alias in group)))
    return groups


def _asqa(row: Fields, run: Run) -> dict[str, Any]:
    pairs = []
    for i, value in enumerate(row.items("qa_pairs")):
        pair = row.sub(f"qa_pairs[{i}]", value)
        pairs.append({"question": pair.optional_text("question"),
                      "short_answers": pair.texts("short_answers")})
    item: dict[str, Any] = {"sample_id": row.ident("sample_id") or row.where.number,
                            "question": row.text("question"), "qa_pairs": pairs}
    answer = row.optional_text("answer")
    if not answer and isinstance(row.get("annotations"), list) and row.get("annotations"):
        first = row.sub("annotations[0]", row.get("annotations")[0])
        answer = first.optional_text("long_answer")
    if answer:
        item["answer"] = answer
    item["docs"] = _docs(row, run)
    return item


def _qampari(row: Fields, run: Run) -> dict[str, Any]:
    answers = _answer_groups(row, "answers", row.items("answers"))
    return {"id": row.ident("id") or row.where.number, "question": row.text("question"),
            "answers": answers, "docs": _docs(row, run)}


def _converter(build: Callable[[Fields, Run], dict[str, Any]]) -> Callable[
        [Run], Iterator[dict[str, Any]]]:
    def convert(run: Run) -> Iterator[dict[str, Any]]:
        for where, value in json_items(run.source, run, key="data"):
            item = run.convert_row(build, value, where)
            if item is not None:
                yield item
    return convert


SPECS = (
    DatasetSpec(
        name="alce_asqa", title="ALCE ASQA (generation with citations)",
        source="HELMET's data/alce/asqa_eval_gtr_top2000.json",
        shape=('an object like {"sample_id": "...", "question": "...", "qa_pairs": '
               '[{"short_answers": ["..."]}], "answer": "...", "docs": [{"title": "...", '
               '"text": "..."}]}'),
        schema="alce", metadata_key="asqa_path", task="acadlm_cite_asqa",
        convert=_converter(_asqa), options=("max_passages",),
        note="demonstrations: HELMET's prompts/asqa_revised.json as asqa_demo_path (no "
             "conversion)"),
    DatasetSpec(
        name="alce_qampari", title="ALCE QAMPARI (generation with citations)",
        source="HELMET's data/alce/qampari_eval_gtr_top2000.json",
        shape=('an object like {"id": "...", "question": "...", "answers": [["...", "alias"]], '
               '"docs": [{"title": "...", "text": "..."}]}'),
        schema="alce", metadata_key="qampari_path", task="acadlm_cite_qampari",
        convert=_converter(_qampari), options=("max_passages",),
        note="demonstrations: HELMET's prompts/qampari_revised.json as qampari_demo_path"),
)
