"""RULER's two QA tasks (Hsieh et al. 2024, section 3, "Question answering"): ``acadlm_qa_1``
asks SQuAD questions and ``acadlm_qa_2`` HotpotQA ones, each over its gold paragraph(s) hidden
among distractor paragraphs, read from the files that ``acadlm-eval-data convert squad`` and
``acadlm-eval-data convert hotpotqa`` write (nothing is shipped or downloaded).

As RULER builds them (``scripts/data/synthetic/qa.py`` and ``constants.py``):

* a prompt's documents are the question's gold paragraph(s), then the question's own other
  paragraphs (SQuAD: the rest of its article; HotpotQA: the rest of its ``context``), a random
  subset of them when not all fit, then paragraphs of other questions drawn at random from the
  whole file, as many as the length holds; every paragraph is shown once, in a random order,
  as a ``Document i:`` block, a HotpotQA paragraph under its title line;
* the instruction comes before the documents and again after them, then the question; the
  answer prefix ``Answer:`` is lm-eval's ``gen_prefix``;
* 32 tokens are generated and scored by string-match-part: full credit when any reference
  answer occurs in the generation;
* the questions are the file's first ``num_samples``, in file order, the same at every length.

Where we differ: the instruction is in our words; a prompt fills at least 99% of its budget,
so its last distractor may be cut at a word (RULER stops at whole documents); the order is
drawn per prompt (RULER shuffles every prompt with one seed, which puts SQuAD's gold paragraph
at the same place in all prompts of a length); and a length the file's paragraphs cannot fill is
refused, naming the length and what the file holds (RULER repeats its whole document list).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.evaluation.lengths import LengthTokenizer, task_error
from acadlm_plugins.evaluation.local_data import (
    Passage,
    QARecord,
    file_stamp,
    load_qa,
)
from acadlm_plugins.evaluation.prompting import FittedPrompt
from acadlm_plugins.evaluation.ruler import (
    FILL_RATIO,
    BudgetSettings,
    PromptFrame,
    finish_row,
    fit_units,
    prompt_frame,
    ruler_dataset,
)
from acadlm_plugins.evaluation.task_base import DEFAULT_NUM_SAMPLES, int_setting
from acadlm_plugins.evaluation.task_settings import declare_retired, declare_settings, path_check

QA_INSTRUCTION = ("Answer the question using the documents provided. Give the answer alone, "
                  "with no other words.")
QA_HEAD = QA_INSTRUCTION + "\n\nThe documents provided are these.\n\n"
QA_TAIL = "\n\n" + QA_INSTRUCTION + "\n\nQuestion: {question}"
QA_ANSWER = "Answer:"
QA_DOCUMENT = "Document {number}:\n{text}"
QA_SEPARATOR = "\n\n"
#: Documents tokenized at a time while measuring how many tokens a file's paragraphs hold.
_MEASURE_BATCH = 256
#: Later candidates scanned, and longer ones tried, for a document to cut in place of the last.
_SWAP_SCAN, _SWAP_TRIES = 64, 3

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QASource:
    """One of RULER's QA datasets: its task, the metadata key naming its converted file, the
    ``acadlm-eval-data`` dataset that writes that file and the published file it converts."""

    task: str
    key: str
    dataset: str
    published: str
    titled: bool  # documents open with the paragraph's title line (RULER's HotpotQA)


SQUAD = QASource("acadlm_qa_1", "squad_path", "squad", "dev-v2.0.json", titled=False)
HOTPOTQA = QASource("acadlm_qa_2", "hotpotqa_path", "hotpotqa",
                    "hotpot_dev_distractor_v1.json", titled=True)
# Each task's converted file (qa_file); `qa_path`, the file of the former merged task, is read
# only to say so when a task's own key is missing.
declare_settings("RULER's QA tasks", {source.key: path_check(source.key)
                                      for source in (SQUAD, HOTPOTQA)})
declare_retired("qa_path", f"`{SQUAD.key}` / `{HOTPOTQA.key}` (RULER's two QA tasks each read "
                "their own file)")


@dataclass(frozen=True)
class QAPool:
    """A converted file as RULER reads it: the questions in file order, every distinct document
    (a paragraph as shown) once, and for each question the numbers of its gold documents and of
    its own other documents."""

    path: Path
    records: tuple[QARecord, ...]
    documents: tuple[str, ...]
    gold: tuple[tuple[int, ...], ...]
    own: tuple[tuple[int, ...], ...]


def document_text(passage: Passage, *, titled: bool) -> str:
    """A paragraph as its document shows it: RULER's HotpotQA documents open with the title
    line; its SQuAD ones are the paragraph alone."""
    return f"{passage.title}\n{passage.text}" if titled and passage.title else passage.text


def _convert_hint(source: QASource) -> str:
    return (f"Convert {source.published} with `acadlm-eval-data convert {source.dataset} "
            f"{source.published} -o {source.dataset}.jsonl` and pass the jsonl it writes as "
            f"--metadata '{{\"{source.key}\": \"{source.dataset}.jsonl\"}}' (convert the whole "
            "file: the distractors come from its other questions).")


def qa_file(source: QASource, metadata: Mapping[str, Any]) -> Path:
    """The converted file named by ``metadata[source.key]``; an error naming the key and the
    ``acadlm-eval-data convert`` command when it is unset or not a file."""
    value = metadata.get(source.key)
    if value in (None, ""):
        former = (" (`qa_path` named the file of the former merged task `acadlm_ruler_qa`; "
                  "RULER's two QA tasks each read their own file)"
                  if metadata.get("qa_path") else "")
        raise task_error(source.task, source.key, "no file given: RULER's "
                         f"{source.dataset} questions are read from a local file, never "
                         f"downloaded{former}.", _convert_hint(source))
    path = Path(str(value)).expanduser()
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        raise task_error(source.task, source.key, f"{path} {state}.", _convert_hint(source))
    return path


@lru_cache(maxsize=4)
def _pool(stamp: tuple[str, int, int], titled: bool, task: str, key: str) -> QAPool:
    path = Path(stamp[0])
    records = load_qa(path, task=task, key=key)
    numbers: dict[str, int] = {}

    def number(passage: Passage) -> int:
        return numbers.setdefault(document_text(passage, titled=titled), len(numbers))

    gold, own = [], []
    for record in records:
        golds = tuple(dict.fromkeys(number(passage) for passage in record.gold))
        others = dict.fromkeys(number(passage) for passage in record.distractors)
        gold.append(golds)
        own.append(tuple(n for n in others if n not in golds))
    return QAPool(path, records, tuple(numbers), tuple(gold), tuple(own))


def load_qa_pool(source: QASource, metadata: Mapping[str, Any]) -> QAPool:
    """The questions and documents of ``source``'s file (read once per file version)."""
    path = qa_file(source, metadata)
    return _pool(file_stamp(path), source.titled, source.task, source.key)


def candidate_documents(pool: QAPool, index: int, rng: random.Random) -> list[int]:
    """The documents a prompt about question ``index`` takes, in the order it takes them:
    RULER's scheme, gold first, then the question's own other documents in a random order,
    then every other document of the file in a random order. A prompt holds a prefix of
    this list (the gold ones always)."""
    gold, own = pool.gold[index], pool.own[index]
    mine = set(gold) | set(own)
    others = [n for n in rng.sample(range(len(pool.documents)), len(pool.documents))
              if n not in mine]
    return [*gold, *rng.sample(own, len(own)), *others]


def render_documents(texts: Sequence[str], places: Sequence[float]) -> str:
    """``Document i:`` blocks of ``texts``, ordered by their ``places`` (random keys drawn once
    per candidate, so a document keeps its place relative to the others whatever is added)."""
    ordered = [text for _, text in sorted(zip(places, texts), key=lambda pair: pair[0])]
    return QA_SEPARATOR.join(QA_DOCUMENT.format(number=number, text=text)
                             for number, text in enumerate(ordered, start=1))


def _exhausted(source: QASource, pool: QAPool, length: int, frame: PromptFrame,
               tokens: int) -> ConfigError:
    room = length - frame.budget
    return task_error(source.task, "max_seq_lengths", f"{length}: all {len(pool.documents)} "
                      f"distinct paragraphs of {pool.path} (`{source.key}`) hold {tokens} tokens "
                      f"as a prompt (template and question included), short of the "
                      f"{FILL_RATIO:.0%} of {frame.budget} that this length needs; prompts are "
                      "never made shorter than their length.",
                      f"Evaluate at lengths up to {tokens + room}, or convert a larger file "
                      f"(all of {source.published}, without --sample or --max-passages).")


class _Capacity:
    """Whether a file's documents hold more than a number of tokens, measured once per number
    (the first documents tokenized in batches until the sum passes it)."""

    def __init__(self, pool: QAPool, tokenizer: LengthTokenizer) -> None:
        self.pool, self.tokenizer = pool, tokenizer
        self.known: dict[int, bool] = {}

    def exceeds(self, tokens: int) -> bool:
        """Whether the documents, as ``Document i:`` blocks, count more than ``tokens``."""
        if tokens not in self.known:
            total, documents = 0, self.pool.documents
            for start in range(0, len(documents), _MEASURE_BATCH):
                blocks = [QA_DOCUMENT.format(number=start + i + 1, text=text) + QA_SEPARATOR
                          for i, text in enumerate(documents[start:start + _MEASURE_BATCH])]
                encoded = self.tokenizer.tokenizer.encode_batch(blocks, add_special_tokens=False)
                total += sum(len(item.ids) for item in encoded)
                if total > tokens:
                    break
            self.known[tokens] = total > tokens
        return self.known[tokens]


@dataclass(frozen=True)
class _Layout:
    """The documents of one prompt: positions in the candidate list shown whole, and the
    position and text of the one shown cut (if any)."""

    whole: tuple[int, ...]
    cut: tuple[int, str] | None = None

    def positions(self) -> list[int]:
        return [*self.whole, *([self.cut[0]] if self.cut else [])]


def _cut_fill(coarse: FittedPrompt, render: Callable[[_Layout], str], units: int,
              tokenizer: LengthTokenizer, target: int, *, candidates: Sequence[int],
              documents: Sequence[str], num_gold: int, own_end: int, task: str
              ) -> tuple[FittedPrompt, _Layout]:
    """``coarse`` (gold and ``units`` whole distractors) filled to 99% of ``target`` with a
    document cut at a word: the next candidate; or, when even its ``Document i:`` line and first
    word overflow, a later and longer candidate of the same kind (own paragraph or another
    question's; ``own_end`` is where the own ones end) in place of the last whole distractor,
    so that RULER's order holds. Below 1K tokens neither may close the gap."""
    layout = _Layout(tuple(range(num_gold + units)))
    if coarse.num_tokens >= FILL_RATIO * target or num_gold + units >= len(candidates):
        return coarse, layout
    gap = target - coarse.num_tokens
    last = num_gold + units - 1
    tries = [(layout.whole, num_gold + units)]
    if last >= num_gold:
        floor = tokenizer.count(documents[candidates[last]]) + gap // 2
        later = range(num_gold + units, min(len(candidates), num_gold + units + _SWAP_SCAN))
        same_kind = [position for position in later
                     if (position < own_end) == (last < own_end)]
        tries += [(layout.whole[:-1], position) for position in same_kind
                  if tokenizer.count(documents[candidates[position]]) > floor][:_SWAP_TRIES]
    best, best_layout = coarse, layout
    for whole, position in tries:
        words = documents[candidates[position]].split(" ")

        def cut_render(kept: int, whole: tuple[int, ...] = whole, position: int = position,
                       words: list[str] = words) -> str:
            return render(_Layout(whole, (position, " ".join(words[:kept])) if kept else None))

        full = tokenizer.count(cut_render(len(words)))
        if full <= target:  # a later document short enough to show whole
            fitted = FittedPrompt(cut_render(len(words)), full, len(words))
        else:
            fitted = fit_units(cut_render, tokenizer, target, max_units=len(words), task=task)
        if fitted.num_tokens > best.num_tokens:
            kept = fitted.num_words
            best = fitted
            best_layout = (_Layout((*whole, position)) if kept == len(words) else
                           _Layout(whole, (position, " ".join(words[:kept])) if kept else None))
        if best.num_tokens >= FILL_RATIO * target:
            break
    return best, best_layout


def build_qa_sample(source: QASource, pool: QAPool, settings: BudgetSettings,
                    rng: random.Random, length: int, index: int, tokenizer: LengthTokenizer,
                    *, capacity: _Capacity | None = None) -> dict[str, Any]:
    """Question ``index`` of the file with as many documents as a ``length``-token prompt holds
    (:func:`candidate_documents`), one of them cut at a word when whole documents miss the
    budget by more than 1% (:func:`_cut_fill`); refused when the whole file cannot fill it."""
    frame = prompt_frame(settings, length, tokenizer, task=source.task)
    record = pool.records[index]
    candidates = candidate_documents(pool, index, rng)
    places = [rng.random() for _ in candidates]
    num_gold = len(pool.gold[index])
    tail = QA_TAIL.format(question=record.question)

    def render(layout: _Layout) -> str:
        texts = [pool.documents[candidates[p]] for p in layout.whole]
        keys = [places[p] for p in layout.whole]
        if layout.cut:
            texts.append(layout.cut[1])
            keys.append(places[layout.cut[0]])
        return frame.lay_out(QA_HEAD + render_documents(texts, keys) + tail, QA_ANSWER)

    def first(units: int) -> str:
        return render(_Layout(tuple(range(num_gold + units))))

    frame.check_room(tokenizer.count(first(0)), task=source.task)
    max_units = len(candidates) - num_gold
    capacity = capacity or _Capacity(pool, tokenizer)
    coarse: FittedPrompt | None = None
    if not capacity.exceeds(2 * frame.budget):
        # The whole file is at most twice the budget: measuring all of it is cheap and exact.
        whole = tokenizer.count(first(max_units))
        if whole <= frame.budget:
            if whole < FILL_RATIO * frame.budget:
                raise _exhausted(source, pool, length, frame, whole)
            coarse = FittedPrompt(first(max_units), whole, max_units)
    if coarse is None:
        coarse = fit_units(first, tokenizer, frame.budget, max_units=max_units,
                           task=source.task)
    own_end = num_gold + len(pool.own[index])
    fitted, layout = _cut_fill(coarse, render, coarse.num_words, tokenizer, frame.budget,
                               candidates=candidates, documents=pool.documents,
                               num_gold=num_gold, own_end=own_end, task=source.task)
    if length >= 1024 and fitted.num_tokens < FILL_RATIO * frame.budget:  # the 1K+ contract
        log.warning("%s @ %d: question %d fills %d of %d tokens (no document cut closes the "
                    "gap)", source.task, length, index, fitted.num_tokens, frame.budget)
    shown = layout.positions()
    order = sorted(range(len(shown)), key=lambda i: places[shown[i]])
    kinds = ["gold" if shown[i] < num_gold else "own" if shown[i] < own_end else "other"
             for i in order]
    cut_number = order.index(len(shown) - 1) + 1 if layout.cut else 0
    return finish_row(frame, settings, fitted, QA_ANSWER, outputs=list(record.answers),
                      question=record.question, record_id=record.id, document_kinds=kinds,
                      cut_document=cut_number)


def qa_dataset(source: QASource, **metadata: Any) -> dict[str, Any]:
    """The dataset of ``source``'s task: the first ``num_samples`` questions of its file at every
    length of ``max_seq_lengths``, sized with the RULER length budget (32 tokens to generate)."""
    pool = load_qa_pool(source, metadata)
    num_samples = int_setting(metadata, "num_samples", DEFAULT_NUM_SAMPLES, task=source.task)
    if num_samples > len(pool.records):
        raise task_error(source.task, "num_samples", f"{num_samples} questions asked for, but "
                         f"{pool.path} (`{source.key}`) holds {len(pool.records)}.",
                         f"Use num_samples <= {len(pool.records)}, or convert more of "
                         f"{source.published}.")
    capacities: dict[str, _Capacity] = {}

    def build(settings: BudgetSettings, rng: random.Random, length: int, index: int,
              tokenizer: LengthTokenizer) -> dict[str, Any]:
        capacity = capacities.setdefault(tokenizer.source, _Capacity(pool, tokenizer))
        return build_qa_sample(source, pool, settings, rng, length, index, tokenizer,
                               capacity=capacity)

    return ruler_dataset(source.task, "qa", metadata, build)


squad_dataset = partial(qa_dataset, SQUAD)
hotpotqa_dataset = partial(qa_dataset, HOTPOTQA)
