"""Long documents from NarrativeQA, InfiniteBench and Multi-LexSum as HELMET uses them (Yen et
al. 2024, sections 2.6-2.7), for the tasks of its long-document QA and summarization categories
(``acadlm_narrativeqa``, ``acadlm_infbench_qa``, ``acadlm_infbench_choice``,
``acadlm_infbench_sum``, ``acadlm_multi_lexsum``; each reads ``<dataset>_path``).

Long-document QA rows are ``id``, ``document``, ``question``, ``answers``; choice rows add
``options`` and name the correct one in ``answer``; summarization rows are ``id``, ``document``,
``summary`` (``docs/evaluation_data.md``). The QA and summarization files also serve the
stand-ins ``acadlm_longqa`` / ``acadlm_summ`` (``longqa_path`` / ``summ_path``). Our tasks fit
each document to the length themselves, so documents are written whole.

* NarrativeQA (Kočiský et al. 2018): rows of the Hugging Face copy HELMET loads (``document``
  with its ``id`` and full ``text``, ``question.text``, ``answers[].text``); give the test split.
  A document is repeated for each of its questions, so ``--sample 100`` (HELMET asks 100) keeps
  the file small.
* InfiniteBench (Zhang et al. 2024): ``longbook_qa_eng.jsonl``, ``longbook_choice_eng.jsonl`` and
  ``longbook_sum_eng.jsonl`` (``id``, ``context``, ``input``, ``answer``, ``options``). A choice
  question keeps its options in order and its answer (the correct option's text); the task
  letters the options A-D and scores the letter as HELMET does.
* Multi-LexSum (Shen et al. 2022): rows of the Hugging Face copy (``sources``, ``summary/short``);
  the sources are joined by blank lines and the short summary is the reference, as in HELMET
  (HELMET tests on the validation split). Cases without a short summary are left out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from acadlm_plugins.evaluation.converters.base import DatasetSpec, Fields, Run
from acadlm_plugins.evaluation.converters.reading import json_items

Build = Callable[[Fields, Run], "dict[str, Any] | None"]


def _each_row(run: Run, build: Build) -> Iterator[dict[str, Any]]:
    for where, value in json_items(run.source, run):
        record = run.convert_row(build, value, where)
        if record is not None:
            yield record


def _text_of(row: Fields, name: str) -> str:
    """A field that is a string, or an object holding it under ``text`` (NarrativeQA's)."""
    value = row.require(name)
    return row.sub(name, value).text("text") if isinstance(value, dict) else row.text(name)


def _narrativeqa_builder() -> Build:
    asked: Counter[str] = Counter()

    def build(row: Fields, run: Run) -> dict[str, Any]:
        document = row.sub("document", row.require("document"))
        doc_id = document.ident("id") or row.where.number
        answers = [_answer(row, i, value) for i, value in enumerate(row.items("answers"))]
        record = {"id": f"{doc_id}:{asked[doc_id]}", "document": document.text("text"),
                  "question": " ".join(_text_of(row, "question").split()),
                  "answers": list(dict.fromkeys(answers))}
        asked[doc_id] += 1
        return record
    return build


def _answer(row: Fields, index: int, value: Any) -> str:
    if isinstance(value, dict):
        return row.sub(f"answers[{index}]", value).text("text")
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise row.fail(f"answers[{index}]", "must be an object with a `text` string.")


def convert_narrativeqa(run: Run) -> Iterator[dict[str, Any]]:
    """NarrativeQA questions with their whole story or script."""
    return _each_row(run, _narrativeqa_builder())


def _infbench_qa(row: Fields, run: Run) -> dict[str, Any]:
    return {"id": row.ident("id") or row.where.number, "document": row.text("context"),
            "question": row.text("input"), "answers": row.texts("answer")}


LETTERS = "ABCDEFGHIJ"


def _infbench_choice(row: Fields, run: Run) -> dict[str, Any]:
    options = row.texts("options")
    if not 2 <= len(options) <= len(LETTERS) or len(set(options)) != len(options):
        raise row.fail("options", f"must hold 2 to {len(LETTERS)} distinct options, got "
                       f"{len(options)}.")
    answer = row.texts("answer")[0]
    if answer not in options:
        raise row.fail("answer", f"{answer[:40]!r} is not one of the `options`.")
    return {"id": row.ident("id") or row.where.number, "document": row.text("context"),
            "question": row.text("input"), "options": list(options), "answer": answer}


def _infbench_sum(row: Fields, run: Run) -> dict[str, Any]:
    return {"id": row.ident("id") or row.where.number, "document": row.text("context"),
            "summary": row.texts("answer")}


def _multi_lexsum(row: Fields, run: Run) -> dict[str, Any] | None:
    sources = row.texts("sources")
    if not row.has("summary/short"):
        run.skip("case without a short summary (HELMET leaves these out)")
        return None
    return {"id": row.ident("id") or row.where.number, "document": "\n\n".join(sources),
            "summary": row.text("summary/short")}


def _spec(name: str, title: str, source: str, shape: str, build: Build, schema: str,
          note: str = "") -> DatasetSpec:
    return DatasetSpec(name=name, title=title, source=source, shape=shape, schema=schema,
                       metadata_key=f"{name}_path", task=f"acadlm_{name}",
                       convert=lambda run: _each_row(run, build), note=note)


INFBENCH_SHAPE = ('an object like {"id": 0, "context": "...", "input": "...", "answer": ["..."], '
                  '"options": []}')
SPECS = (
    DatasetSpec(
        name="narrativeqa", title="NarrativeQA (long-document QA)",
        source="the test split of the Hugging Face copy (narrativeqa) as JSON Lines",
        shape=('an object like {"document": {"id": "...", "text": "..."}, "question": {"text": '
               '"..."}, "answers": [{"text": "..."}]}'),
        schema="longqa", metadata_key="narrativeqa_path", task="acadlm_narrativeqa",
        convert=convert_narrativeqa, note="a story per question: add --sample 100 as HELMET"),
    _spec("infbench_qa", "InfiniteBench En.QA (novel QA)", "InfiniteBench's longbook_qa_eng.jsonl",
          INFBENCH_SHAPE, _infbench_qa, "longqa"),
    _spec("infbench_choice", "InfiniteBench En.MC (novel multiple choice)",
          "InfiniteBench's longbook_choice_eng.jsonl", INFBENCH_SHAPE, _infbench_choice,
          "choice", note="options kept apart; the task scores the letter as HELMET"),
    _spec("infbench_sum", "InfiniteBench En.Sum (novel summarization)",
          "InfiniteBench's longbook_sum_eng.jsonl", INFBENCH_SHAPE, _infbench_sum, "summ"),
    _spec("multi_lexsum", "Multi-LexSum (legal multi-document summarization)",
          "the validation split of the Hugging Face copy (allenai/multi_lexsum) as JSON Lines",
          ('an object like {"id": "...", "sources": ["..."], "summary/short": "..."}'),
          _multi_lexsum, "summ"),
)
