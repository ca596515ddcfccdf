"""HELMET's long-document QA and summarization datasets (Yen et al. 2024, sections 2.6-2.7):
NarrativeQA, InfiniteBench En.QA, En.MC and En.Sum, and Multi-LexSum, from the local jsonl files
``acadlm-eval-data convert`` writes.

What each task takes from HELMET (princeton-nlp/HELMET ``data.py``, ``configs/longqa.yaml``,
``configs/summ.yaml``, ``scripts/collect_results.py``):

* **Prompts**: HELMET's instructions, its demonstration blocks (questions and answers, or
  summaries, of other documents with the documents left out, ``[story text]`` standing for them
  in InfiniteBench's), the document, then the question (with the options lettered A-D for
  En.MC) or the request to summarize; ``Answer:`` / ``Summary:`` is the answer prefix, written
  only without a chat template (:mod:`acadlm_plugins.evaluation.helmet_frame`). HELMET runs
  both categories with the chat template.
* **Truncation**: the document keeps its start and loses its end, as HELMET cuts it, followed
  by HELMET's marker `` ... [the rest of the text is omitted]``; it is cut just enough for the
  whole prompt (chat template included) and the tokens to generate to fit the length.
* **Generation**: 100 tokens for NarrativeQA, 10 for En.QA and En.MC, 1200 for En.Sum, 400 for
  Multi-LexSum; no stop at a line break.
* **Demonstrations**: 2 per prompt. InfiniteBench's come from the other rows of its file, as
  HELMET takes them; NarrativeQA's and Multi-LexSum's from their train split
  (``<dataset>_demo_path``) or, without it, from a held-out part of the file.
* **Metrics**: HELMET's (``utils.calculate_metrics``), each the better of the whole generation
  and of the answer line it reads: ROUGE-L F1 (En.QA's category score), exact match (En.MC, on
  the option letter), token F1, substring exact match, ROUGE-Lsum; the judge metrics of
  :mod:`acadlm_plugins.evaluation.judge_metrics` for NarrativeQA and the two summarization
  datasets when the metadata names a judge. The metric named by the length alone is the score
  HELMET's category uses: the judge's (NarrativeQA ``judge_score``, summaries ``judge_f1``)
  when a judge computed it, else the model-free stand-in (ROUGE-L F1, ROUGE-Lsum F1); every
  measure is also reported as ``<length>_<measure>``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from acadlm_plugins.evaluation.helmet import (
    LongDocument,
    fit_units,
    hold_out_demos,
    num_shots_setting,
    pick_demos,
    pick_long_document,
)
from acadlm_plugins.evaluation.helmet_frame import HelmetFrame, HelmetLayout, HelmetTask
from acadlm_plugins.evaluation.judge_metrics import (
    DOC_FIELD,
    KEYPOINTS_KEY,
    LONGQA,
    SUMM,
    judge_scores,
    judged_builder,
)
from acadlm_plugins.evaluation.lengths import LengthTokenizer, task_error
from acadlm_plugins.evaluation.local_data import (
    OPTION_LETTERS,
    data_path,
    file_stamp,
    load_choice,
    load_longqa,
    load_summ,
)
from acadlm_plugins.evaluation.prompting import FittedPrompt
from acadlm_plugins.evaluation.scoring import choice_exact_match, helmet_answer_scores
from acadlm_plugins.evaluation.task_base import build_length_dataset
from acadlm_plugins.evaluation.task_settings import declare_settings, path_check

#: What HELMET appends to a document it cuts (``truncate_llama2``'s ``postfix_text``).
TRUNCATION_MARK = " ... [the rest of the text is omitted]"
#: The judge metric that stands for a judged dataset in its category (HELMET's
#: ``gpt-4-score`` and ``gpt-4-f1``).
JUDGE_MAIN = {LONGQA: "judge_score", SUMM: "judge_f1"}


@dataclass(frozen=True)
class LongDocItem:
    """A row of a long-document dataset: the document, what is asked (empty for a summary),
    the options of a choice question, and the references (answers or summaries; for a choice
    question its letter, then the lettered option)."""

    id: str
    document: str
    question: str
    options: tuple[str, ...]
    references: tuple[str, ...]


@dataclass(frozen=True)
class LongDocDataset:
    """One of HELMET's long-document datasets: its user template in parts, its answer prefix
    and generation budget, where its demonstrations come from and how it is scored."""

    name: str  # also the metadata keys: <name>_path, <name>_demo_path
    task: str
    category: str  # "longqa" or "summ"
    kind: str  # "qa", "choice" or "summ"
    instruction: str
    demo_open: str
    demo_entry: str  # {question}, {options}, {answer}
    demo_close: str
    context_label: str
    closing: str  # after the document: {question}, {options}
    prefix: str  # HELMET's system template
    separator: str  # between the user template and the prefix in plain text
    parse_prefix: str  # the prefix HELMET's post-processing reads the answer line after
    generation: int
    demos_held_out: bool  # True: HELMET draws them from a train split; False: from this file
    main: str  # the model-free measure that stands for the dataset without a judge
    measures: tuple[str, ...]
    judge_kind: str | None = None

    @property
    def key(self) -> str:
        """The metadata key naming the converted file."""
        return f"{self.name}_path"

    @property
    def demo_key(self) -> str:
        """The metadata key naming a separate demonstration file (a train split)."""
        return f"{self.name}_demo_path"

    @property
    def keypoints_key(self) -> str:
        """The metadata key naming HELMET's key points for this dataset's judge (falls back on
        ``summ_keypoints_path``)."""
        return f"{self.name}_keypoints_path"

    @property
    def layout(self) -> HelmetLayout:
        """Category, answer prefix, separator and generation budget."""
        return HelmetLayout(self.category, self.prefix, self.separator, self.generation)

    def options_text(self, item: LongDocItem) -> str:
        """The lettered options of a choice question, one a line (``A. ...``)."""
        return "\n".join(f"{OPTION_LETTERS[i]}. {option}" for i, option in
                         enumerate(item.options))

    def user_head(self, item: LongDocItem) -> str:
        """The instruction, with the letters of this question's options for En.MC."""
        if self.kind != "choice":
            return self.instruction + "\n\n"
        return self.instruction.format(letters=_listed(OPTION_LETTERS[:len(item.options)])) \
            + "\n\n"

    def tail(self, item: LongDocItem) -> str:
        """What follows the document: the question (and options), or the request to
        summarize."""
        return self.closing.format(question=item.question, options=self.options_text(item))

    def demo_text(self, item: LongDocItem) -> str:
        """One demonstration: a question and its answer (a letter for En.MC), or a summary."""
        return self.demo_entry.format(question=item.question, options=self.options_text(item),
                                      answer=item.references[0].strip())

    def demo_block(self, demos: Sequence[LongDocItem]) -> str:
        """The demonstrations of a prompt ("" without any)."""
        if not demos:
            return ""
        return self.demo_open + "\n\n".join(self.demo_text(d) for d in demos) + self.demo_close

    def user(self, item: LongDocItem, demos: Sequence[LongDocItem], document: str) -> str:
        """HELMET's user template filled in."""
        return (self.user_head(item) + self.demo_block(demos) + self.context_label + document
                + self.tail(item))


def _listed(letters: str) -> str:
    """Letters as a sentence lists them: "A or B", "A, B, C, or D" (HELMET's wording for 4)."""
    if len(letters) <= 2:
        return " or ".join(letters)
    return ", ".join(letters[:-1]) + f", or {letters[-1]}"


QA_MEASURES = ("rougeL_f1", "f1", "exact_match", "substring_exact_match")
SUMM_MEASURES = ("rougeLsum_f1", "rougeL_f1")
INFBENCH_DEMOS = ("For example:\n\n", "\n\nNow, read the following story:\n\n")

NARRATIVEQA = LongDocDataset(
    name="narrativeqa", task="acadlm_narrativeqa", category="longqa", kind="qa",
    instruction=("You are given a story, which can be either a novel or a movie script, and a "
                 "question. Answer the question as concisely as you can, using a single phrase "
                 "if possible."),
    demo_open="For example:\n\n", demo_entry="Question: {question}\nAnswer: {answer}",
    demo_close="\n\nNow, use the following story to answer the question:\n\n",
    context_label="", closing="\n\nQuestion: {question}", prefix="Answer:", separator="\n",
    parse_prefix="Answer:", generation=100, demos_held_out=True, main="rougeL_f1",
    measures=QA_MEASURES, judge_kind=LONGQA)
INFBENCH_QA = LongDocDataset(
    name="infbench_qa", task="acadlm_infbench_qa", category="longqa", kind="qa",
    instruction=("You are given a story and a question. Answer the question as concisely as you "
                 "can, using a single phrase if possible."),
    demo_open=INFBENCH_DEMOS[0], demo_entry="[story text]\nQuestion: {question}\nAnswer: {answer}",
    demo_close=INFBENCH_DEMOS[1], context_label="", closing="\n\nQuestion: {question}",
    prefix="Answer:", separator="\n\n", parse_prefix="Answer:", generation=10,
    demos_held_out=False, main="rougeL_f1", measures=QA_MEASURES)
INFBENCH_CHOICE = LongDocDataset(
    name="infbench_choice", task="acadlm_infbench_choice", category="longqa", kind="choice",
    instruction=("You are given a story and a question with multiple choices. Choose the best "
                 "answer from the options provided. Only one of the following options is "
                 "correct, output the answer using one single letter ({letters}). Don't say "
                 "anything else."),
    demo_open=INFBENCH_DEMOS[0],
    demo_entry="[story text]\nQuestion: {question}\nOptions:\n{options}\nAnswer: {answer}",
    demo_close=INFBENCH_DEMOS[1], context_label="",
    closing="\n\nQuestion: {question}\nOptions:\n{options}", prefix="Answer:", separator="\n\n",
    parse_prefix="Answer:", generation=10, demos_held_out=False, main="exact_match",
    measures=("exact_match",))
INFBENCH_SUM = LongDocDataset(
    name="infbench_sum", task="acadlm_infbench_sum", category="summ", kind="summ",
    instruction=("You are given a book and you are tasked to summarize it. Write a summary of "
                 "about 1000 to 1200 words. Only write about the plot and characters of the "
                 "story. Do not discuss the themes or background of the book. Do not provide any "
                 "analysis or commentary."),
    demo_open=INFBENCH_DEMOS[0], demo_entry="[story text]\nSummary: {answer}",
    demo_close=INFBENCH_DEMOS[1], context_label="", closing="\n\nNow summarize the book.",
    prefix="Summary:", separator="\n\n", parse_prefix="Answer:", generation=1200,
    demos_held_out=False, main="rougeLsum_f1", measures=SUMM_MEASURES, judge_kind=SUMM)
MULTI_LEXSUM = LongDocDataset(
    name="multi_lexsum", task="acadlm_multi_lexsum", category="summ", kind="summ",
    instruction=("You are given the legal documents in a civil rights lawsuit, and you are "
                 "tasked to summarize the case. Write a concise summary of one paragraph (200 to "
                 "250 words). The summary should contain a short description of the background, "
                 "the parties involved, and the outcomes of the case."),
    demo_open="Example summaries:\n\n", demo_entry="Summary: {answer}",
    demo_close="\n\nNow, write a summary of the following legal documents.\n",
    context_label="Legal documents:\n", closing="\n\nNow please summarize the case.",
    prefix="Summary:", separator="\n\n", parse_prefix="Summary:", generation=400,
    demos_held_out=True, main="rougeLsum_f1", measures=SUMM_MEASURES, judge_kind=SUMM)
LONGDOC_DATASETS = {dataset.name: dataset for dataset in
                    (NARRATIVEQA, INFBENCH_QA, INFBENCH_CHOICE, INFBENCH_SUM, MULTI_LEXSUM)}
# Each dataset's file and demonstration file (longdoc_dataset, demo_pool) and, where its judge
# scores key points (summarization), its key-point file.
declare_settings("HELMET's long-document datasets", {
    key: path_check(key) for dataset in LONGDOC_DATASETS.values()
    for key in (dataset.key, dataset.demo_key,
                *((dataset.keypoints_key,) if dataset.judge_kind == SUMM else ()))})


# ------------------------------------------------------------------------------- loading


def load_items(dataset: LongDocDataset, path: Path, *, task: str,
               key: str) -> tuple[LongDocItem, ...]:
    """The rows of a converted file in the schema of the dataset's kind (long-document QA,
    choice, summarization; ``docs/evaluation_data.md``)."""
    if dataset.kind == "choice":
        return tuple(LongDocItem(r.id, r.document, r.question, r.options,
                                 (r.letter, f"{r.letter}. {r.options[r.answer]}"))
                     for r in load_choice(path, task=task, key=key))
    if dataset.kind == "qa":
        return tuple(LongDocItem(r.id, r.document, r.question, (), r.answers)
                     for r in load_longqa(path, task=task, key=key))
    return tuple(LongDocItem(r.id, r.document, "", (), r.summaries)
                 for r in load_summ(path, task=task, key=key))


def _required_file(dataset: LongDocDataset, metadata: Mapping[str, Any], *, task: str) -> Path:
    path = data_path(metadata, dataset.key, None, task=task)
    if path is None:
        raise task_error(task, dataset.key, f"no file given; this task asks HELMET's "
                         f"{dataset.name} questions, which are not shipped and never "
                         "downloaded.", f"Download the dataset elsewhere, convert it with "
                         f"`acadlm-eval-data convert {dataset.name} <file>` and pass "
                         f"--metadata '{{\"{dataset.key}\": \"<converted file>\"}}' "
                         "(docs/evaluation_data.md).")
    return path


def demo_pool(dataset: LongDocDataset, metadata: Mapping[str, Any], items: Sequence[LongDocItem],
              *, task: str) -> tuple[list[LongDocItem], list[LongDocItem]]:
    """(rows to ask about, demonstration pool): with ``<name>_demo_path`` every row and that
    file; else InfiniteBench's other rows (HELMET draws its demonstrations from the same file),
    or a held-out part of the rows for the datasets HELMET takes them from a train split."""
    shots = num_shots_setting(metadata, task=task)
    demo_path = data_path(metadata, dataset.demo_key, None, task=task) if shots else None
    if demo_path is not None:
        return list(items), list(load_items(dataset, demo_path, task=task,
                                            key=dataset.demo_key))
    if not dataset.demos_held_out:
        return list(items), list(items)
    asked, held = hold_out_demos(task, metadata, len(items), shots, key=dataset.key)
    return [items[i] for i in asked], [items[i] for i in held]


def long_documents(items: Sequence[LongDocItem]) -> tuple[LongDocument, ...]:
    """The documents of ``items``, in order, one object per distinct text (several questions
    share a story) keyed by its digest, so that its token count is measured once."""
    made: dict[str, LongDocument] = {}
    for item in items:
        if item.document not in made:
            digest = hashlib.sha256(item.document.encode("utf-8")).hexdigest()
            made[item.document] = LongDocument(digest, item.document)
    return tuple(made[item.document] for item in items)


# ------------------------------------------------------------------------------ building


@lru_cache(maxsize=32)
def _overhead_bound(dataset: LongDocDataset, frame: HelmetFrame, tokenizer: LengthTokenizer,
                    items: tuple[LongDocItem, ...], demos: tuple[LongDocItem, ...],
                    shots: int) -> int:
    """Tokens a prompt takes around its document at most: the longest question and the
    ``shots`` longest demonstrations, laid out (what to leave free when choosing a document
    long enough to fill the rest)."""
    longest = max(items, key=lambda item: len(dataset.tail(item)))
    widest = sorted(demos, key=lambda d: len(dataset.demo_text(d)), reverse=True)[:shots]
    return tokenizer.count(frame.render(dataset.user(longest, widest, TRUNCATION_MARK)))


def fit_long_document(dataset: LongDocDataset, frame: HelmetFrame, item: LongDocItem,
                      demos: Sequence[LongDocItem], document: LongDocument,
                      tokenizer: LengthTokenizer, *, task: str) -> tuple[FittedPrompt, bool]:
    """The prompt of ``item`` with as much of the start of its document as fits the frame's
    budget (the rest cut and marked, as HELMET truncates), and whether the document was cut.
    A document that fits whole is shown whole, the prompt then shorter than the budget."""
    pieces = document.pieces

    def render(units: int) -> str:
        body = "".join(pieces[:units]).strip()
        return frame.render(dataset.user(item, demos, body + (
            TRUNCATION_MARK if units < len(pieces) else "")))

    whole = render(len(pieces))
    count = tokenizer.count(whole)
    if count <= frame.budget:
        return FittedPrompt(whole, count, len(pieces)), False
    fitted = fit_units(render, tokenizer, frame.budget, max_units=min(len(pieces),
                                                                      frame.budget + 1),
                       task=task, key=dataset.key)
    return fitted, True


def build_longdoc_sample(dataset: LongDocDataset, items: Sequence[LongDocItem],
                         documents: Sequence[LongDocument], pool: Sequence[LongDocItem],
                         source: str, metadata: Mapping[str, Any], task: str,
                         rng: random.Random, length: int, index: int,
                         tokenizer: LengthTokenizer) -> dict[str, Any]:
    """Sample ``index`` at ``length``: a row whose document can fill what the prompt leaves,
    its ``num_shots`` demonstrations (never about the same document), the document cut to fit."""
    frame = dataset.layout.frame(metadata, length, tokenizer, task=task)
    shots = num_shots_setting(metadata, task=task)
    needed = frame.budget - _overhead_bound(dataset, frame, tokenizer, tuple(items), tuple(pool),
                                            shots)
    chosen = pick_long_document(documents, source, needed, metadata, task, dataset.key, length,
                                index, tokenizer)
    item = items[chosen]
    demos = pick_demos(pool, shots, metadata, task=task, item=item.id, key=dataset.key,
                       allowed=lambda demo: demo.document != item.document
                       and demo.id != item.id)
    fitted, cut = fit_long_document(dataset, frame, item, demos, documents[chosen], tokenizer,
                                    task=task)
    row = frame.row(fitted, outputs=list(item.references), document_id=item.id,
                    helmet_dataset=dataset.name, truncated=cut,
                    demo_ids=json.dumps([demo.id for demo in demos]))
    if dataset.kind != "summ":
        row["question"] = item.question
    if dataset.kind == "choice":
        row["answer_option"] = item.options[OPTION_LETTERS.index(item.references[0])]
    return row


def longdoc_dataset(dataset: LongDocDataset, metadata: Mapping[str, Any],
                    task: str | None = None) -> dict[str, Any]:
    """The dataset of ``dataset.task`` (or ``task``), from the converted file its
    ``<name>_path`` names; a missing key stops the task and says how to make the file."""
    task = task or dataset.task
    path = _required_file(dataset, metadata, task=task)
    items = load_items(dataset, path, task=task, key=dataset.key)
    asked, pool = demo_pool(dataset, metadata, items, task=task)
    builder = partial(build_longdoc_sample, dataset, asked, long_documents(asked), pool,
                      f"{dataset.name}:{file_stamp(path)}", metadata, task)
    if dataset.judge_kind is not None:
        keypoints = metadata.get(dataset.keypoints_key) or metadata.get(KEYPOINTS_KEY)
        builder = judged_builder(task, dataset.judge_kind,
                                 {**metadata, KEYPOINTS_KEY: keypoints}, builder)
    return build_length_dataset(task, metadata, builder)


# ------------------------------------------------------------------------------- scoring


def longdoc_scores(dataset: LongDocDataset, doc: Mapping[str, Any],
                   continuation: str) -> dict[str, float]:
    """The model-free measures of a generation. Without a chat template the answer prefix is
    put back in front of it, as HELMET prepends its system template before parsing."""
    prediction = str(doc.get("gen_prefix") or "") + continuation
    if dataset.kind == "choice":
        return {"exact_match": choice_exact_match(prediction, doc["outputs"][0],
                                                  doc["answer_option"])}
    scores = helmet_answer_scores(prediction, doc["outputs"], prefix=dataset.parse_prefix)
    return {name: scores[name] for name in dataset.measures}


def process_results_longdoc(doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    """A sample's scores, named by its length: the category score under the length alone (the
    judge's when the document carries a judge, which leaves it out when the judge could not
    score it; else the model-free stand-in), and every measure as ``<length>_<measure>``."""
    dataset = LONGDOC_DATASETS[doc["helmet_dataset"]]
    length = str(doc["max_length"])
    scores = longdoc_scores(dataset, doc, results[0])
    judged = judge_scores(doc, results[0]) if dataset.judge_kind else {}
    named = {f"{length}_{name}": value for name, value in {**scores, **judged}.items()}
    if dataset.judge_kind is not None and doc.get(DOC_FIELD):
        main = judged.get(JUDGE_MAIN[dataset.judge_kind])
    else:
        main = scores[dataset.main]
    return named if main is None else {length: main, **named}


# --------------------------------------------------------------------------- lm-eval tasks


class NarrativeQATask(HelmetTask):
    """``acadlm_narrativeqa``."""

    category, measures, judge_kind = "longqa", NARRATIVEQA.measures, LONGQA


class InfBenchQATask(HelmetTask):
    """``acadlm_infbench_qa``."""

    category, measures = "longqa", INFBENCH_QA.measures


class InfBenchChoiceTask(HelmetTask):
    """``acadlm_infbench_choice``."""

    category, measures = "longqa", INFBENCH_CHOICE.measures


class InfBenchSumTask(HelmetTask):
    """``acadlm_infbench_sum``."""

    category, measures, judge_kind = "summ", INFBENCH_SUM.measures, SUMM


class MultiLexSumTask(HelmetTask):
    """``acadlm_multi_lexsum``."""

    category, measures, judge_kind = "summ", MULTI_LEXSUM.measures, SUMM
