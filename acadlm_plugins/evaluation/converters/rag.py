"""Question answering over passages: HELMET's KILT files (NQ, TriviaQA, HotpotQA, PopQA) for
``acadlm_rag``, and SQuAD 2.0 / HotpotQA's own JSON for RULER's QA (``acadlm_qa_1``, ``acadlm_qa_2``).

All write the QA schema of ``docs/evaluation_data.md``: ``id``, ``question``, ``answers``,
``gold`` passages and ``distractors`` (the question's own hard negatives).

* KILT, as HELMET's RAG uses it (Yen et al. 2024, section 2.3): HELMET's
  ``data/kilt/*-multikilt_1000_k*_dep*.jsonl`` rows carry the question, its ``answers``, the gold
  ``positive_ctxs`` and ``ctxs``, retrieved passages that do not contain the answer with the gold
  one inserted at a depth. Each question is repeated once per depth; ``acadlm_rag`` places the
  gold passage itself, so one row per question is written: its gold passages are the ones
  HELMET inserted (the ``positive_ctxs`` found in ``ctxs``, or entries with ``has_answer``), its
  distractors the other retrieved passages in retrieval order. DPR's ``*-multikilt.json`` lists
  (all ``positive_ctxs`` gold, ``hard_negative_ctxs`` as distractors) are read too. PopQA keeps, as HELMET's ``kilt_popqa_3`` does, the long
  tail: ``s_pop`` below 10^3.
* SQuAD 2.0 (RULER's qa_1, Hsieh et al. 2024): every answerable question; its paragraph is the
  gold passage and the article's other paragraphs the distractors (RULER's "more context").
* HotpotQA (RULER's qa_2): the paragraphs named by ``supporting_facts`` are gold, the other
  paragraphs of its ``context`` the distractors; a paragraph's text is its sentences joined.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from acadlm_plugins.evaluation.converters.base import DatasetSpec, Fields, Run, Where
from acadlm_plugins.evaluation.converters.reading import json_document, json_items
from acadlm_plugins.evaluation.converters.writing import limited

KILT_SHAPE = ('an object like {"question": "...", "answers": ["..."], "positive_ctxs": '
              '[{"title": "...", "text": "..."}], "ctxs": [{"title": "...", "text": "..."}]}')
REPEATED = "repeated question (HELMET repeats each one per gold depth; acadlm_rag sets the depth)"


def _kilt_record(row: Fields, run: Run) -> dict[str, Any] | None:
    question = row.text("question")
    key = row.ident("id") or question
    if run.already_written(key):
        run.skip(REPEATED)
        return None
    answers = row.texts("answers")
    threshold = run.options.popularity_below
    if threshold is not None and threshold != math.inf and \
            row.number("s_pop") >= _power_of_ten(threshold):
        run.skip(f"popular entity (s_pop >= 10^{threshold:g}; HELMET keeps the long tail)")
        return None
    positives = [p for _, p in _listed(row, "positive_ctxs")]
    answering = {p["text"] for p in positives}
    retrieved = _listed(row, "ctxs")
    # HELMET inserts the gold passage(s) into ctxs; those copies are the gold ones it shows.
    gold = _unique_passages([p for entry, p in retrieved
                             if p["text"] in answering or _has_answer(entry)]) or positives
    if not gold:
        raise row.fail("positive_ctxs", "is missing and no `ctxs` entry has \"has_answer\": "
                       "true, so the gold passage is unknown.")
    answering |= {p["text"] for p in gold}
    pool = retrieved if row.has("ctxs") else _listed(row, "hard_negative_ctxs")
    distractors = _unique_passages([p for entry, p in pool
                                    if p["text"] not in answering and not _has_answer(entry)])
    run.remember(key)
    return {"id": row.ident("id") or f"{run.spec.name}:{row.where.number}", "question": question,
            "answers": answers, "gold": _unique_passages(gold),
            "distractors": limited(distractors, run.options.max_passages)}


def _power_of_ten(exponent: float) -> float:
    """10^exponent as a float; inf where that is beyond a float (``10 ** 400.0`` raises)."""
    try:
        return 10.0 ** exponent
    except OverflowError:
        return math.inf


def _listed(row: Fields, name: str) -> list[tuple[Any, dict[str, str]]]:
    """(raw entry, passage) of each entry of the list field ``name``; [] when it is absent."""
    if not row.has(name):
        return []
    return [(entry, row.passage(f"{name}[{i}]", entry))
            for i, entry in enumerate(row.items(name, allow_empty=True))]


def _has_answer(entry: Any) -> bool:
    return isinstance(entry, dict) and entry.get("has_answer") is True


def _unique_passages(passages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The passages without repeats of a text, in their first order."""
    kept: dict[str, dict[str, str]] = {}
    for passage in passages:
        kept.setdefault(passage["text"], passage)
    return list(kept.values())


def convert_kilt(run: Run) -> Iterator[dict[str, Any]]:
    """Rows of HELMET's (or DPR's) KILT file as QA rows, one per question."""
    for where, value in json_items(run.source, run, key="data"):
        record = run.convert_row(_kilt_record, value, where)
        if record is not None:
            yield record


SQUAD_SHAPE = ('an object like {"question": "...", "id": "...", "answers": [{"text": "...", '
               '"answer_start": 0}], "is_impossible": false} under data[].paragraphs[].qas[]')


def _squad_paragraphs(article: Fields) -> list[tuple[Fields, str]]:
    paragraphs = []
    for i, value in enumerate(article.items("paragraphs")):
        paragraph = article.sub(f"paragraphs[{i}]", value)
        paragraphs.append((paragraph, " ".join(paragraph.text("context").split())))
    return paragraphs


def _squad_question(run: Run, value: Any, where: Where, title: str, context: str,
                    others: list[str]) -> dict[str, Any] | None:
    qa = run.fields(value, where)
    if qa.get("is_impossible") is True:
        run.skip("unanswerable (SQuAD 2.0 is_impossible; RULER leaves these out)")
        return None
    answers = [qa.sub(f"answers[{i}]", a).text("text") for i, a in enumerate(qa.items("answers"))]
    passage = {"title": title, "text": context} if title else {"text": context}
    distractors = [{"title": title, "text": other} if title else {"text": other}
                   for other in others]
    return {"id": qa.ident("id") or qa.where.number, "question": qa.text("question"),
            "answers": list(dict.fromkeys(answers)), "gold": [passage],
            "distractors": limited(distractors, run.options.max_passages)}


def convert_squad(run: Run) -> Iterator[dict[str, Any]]:
    """Every answerable question of SQuAD's JSON (``data[].paragraphs[].qas[]``)."""
    document = json_document(run.source, run)
    root = run.fields(document, Where(run.source, item="the top level"))
    for a, value in enumerate(root.items("data")):
        where = Where(run.source, item=f"data[{a}]")
        article = run.attempt(run.fields, value, where)
        paragraphs = run.attempt(_squad_paragraphs, article) if article else None
        if article is None or paragraphs is None:
            continue
        title = article.optional_text("title").replace("_", " ")
        contexts = list(dict.fromkeys(context for _, context in paragraphs))
        for p, (paragraph, context) in enumerate(paragraphs):
            others = [other for other in contexts if other != context]
            qas = run.attempt(paragraph.items, "qas", allow_empty=True) or []
            for q, qa_value in enumerate(qas):
                run.read += 1
                spot = Where(run.source, item=f"data[{a}].paragraphs[{p}].qas[{q}]")
                record = run.attempt(_squad_question, run, qa_value, spot, title, context,
                                     others)
                if record is not None:
                    yield record


HOTPOT_SHAPE = ('an object like {"_id": "...", "question": "...", "answer": "...", '
                '"supporting_facts": [["Title", 0]], "context": [["Title", ["Sentence one.", '
                '" Sentence two."]]]}')


def _hotpot_context(row: Fields) -> list[tuple[str, str]]:
    """(title, text) of each paragraph: HotpotQA's ``[[title, [sentences]], ...]`` or the
    Hugging Face copy's ``{"title": [...], "sentences": [[...], ...]}``."""
    value = row.require("context")
    if isinstance(value, dict):
        titles, sentences = value.get("title"), value.get("sentences")
        if not isinstance(titles, list) or not isinstance(sentences, list) or \
                len(titles) != len(sentences):
            raise row.fail("context", "must hold lists `title` and `sentences` of one length.")
        pairs = list(zip(titles, sentences))
    elif isinstance(value, list):
        pairs = value
    else:
        raise row.fail("context", "must be a list of [title, [sentences]] pairs.")
    paragraphs = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], list) and all(isinstance(s, str) for s in pair[1])):
            raise row.fail(f"context[{i}]", f"must be a [title, [sentences]] pair, got "
                           f"{str(pair)[:60]}.")
        text = " ".join("".join(pair[1]).split())
        if text:
            paragraphs.append((pair[0].strip(), text))
    if not paragraphs:
        raise row.fail("context", "has no paragraph with text.")
    return paragraphs


def _hotpot_support(row: Fields) -> set[str]:
    value = row.require("supporting_facts")
    if isinstance(value, dict) and isinstance(value.get("title"), list):
        return {str(title).strip() for title in value["title"]}
    if isinstance(value, list) and all(isinstance(f, list) and f for f in value):
        return {str(fact[0]).strip() for fact in value}
    raise row.fail("supporting_facts", "must be a list of [title, sentence index] pairs.")


def _hotpot_record(row: Fields, run: Run) -> dict[str, Any]:
    if not row.has("answer"):
        raise row.fail("answer", "is missing (HotpotQA's test files have no answers: convert "
                       "hotpot_dev_distractor_v1.json or a train file).")
    paragraphs, support = _hotpot_context(row), _hotpot_support(row)
    gold = [{"title": t, "text": x} for t, x in paragraphs if t in support]
    if not gold:
        raise row.fail("supporting_facts", "names no paragraph of `context`.")
    others = [{"title": t, "text": x} for t, x in paragraphs if t not in support]
    return {"id": row.ident("_id") or row.ident("id") or row.where.number,
            "question": row.text("question"), "answers": [row.text("answer")], "gold": gold,
            "distractors": limited(others, run.options.max_passages)}


def convert_hotpotqa(run: Run) -> Iterator[dict[str, Any]]:
    """Every question of HotpotQA's JSON list (or the Hugging Face copy's JSON Lines)."""
    for where, value in json_items(run.source, run):
        record = run.convert_row(_hotpot_record, value, where)
        if record is not None:
            yield record


def _kilt(name: str, title: str, files: str, **extra: Any) -> DatasetSpec:
    return DatasetSpec(
        name=name, title=f"{title} (KILT, as HELMET's RAG uses it)",
        source=f"HELMET's data/kilt/{files}", shape=KILT_SHAPE, schema="qa",
        metadata_key="rag_path", task="acadlm_rag", convert=convert_kilt,
        options=("max_passages", *extra.pop("options", ())), **extra)


SPECS = (
    _kilt("kilt_nq", "Natural Questions", "nq-dev-multikilt_1000_k*_dep6.jsonl",
          note="convert nq-train-multikilt_1000_k3_dep6.jsonl too and give it as rag_demo_path"),
    _kilt("kilt_triviaqa", "TriviaQA", "triviaqa-dev-multikilt_1000_k*_dep6.jsonl",
          note="demonstrations: triviaqa-train-multikilt_1000_k3_dep6.jsonl as rag_demo_path"),
    _kilt("kilt_hotpotqa", "HotpotQA", "hotpotqa-dev-multikilt_1000_k*_dep3.jsonl",
          note="demonstrations: hotpotqa-train-multikilt_1000_k3_dep3.jsonl as rag_demo_path"),
    _kilt("kilt_popqa", "PopQA", "popqa_test_1000_k*_dep6.jsonl",
          options=("popularity_below",), defaults={"popularity_below": 3.0},
          note="keeps s_pop < 10^3 like HELMET's kilt_popqa_3 (--popularity-below inf keeps all)"),
    DatasetSpec(
        name="squad", title="SQuAD 2.0 (RULER qa_1)", source="SQuAD's dev-v2.0.json",
        shape=SQUAD_SHAPE, schema="qa", metadata_key="squad_path", task="acadlm_qa_1",
        convert=convert_squad, options=("max_passages",),
        note="unanswerable questions are left out, as RULER does"),
    DatasetSpec(
        name="hotpotqa", title="HotpotQA (RULER qa_2)", source="hotpot_dev_distractor_v1.json",
        shape=HOTPOT_SHAPE, schema="qa", metadata_key="hotpotqa_path", task="acadlm_qa_2",
        convert=convert_hotpotqa, options=("max_passages",)),
)
