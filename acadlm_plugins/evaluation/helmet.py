"""HELMET-style long-context tasks (Yen et al. 2024), rebuilt offline in our own words.

Seven categories, each sized to a target length with the evaluated model's tokenizer and scored
without a model or a judge (long-document QA and summarization add HELMET's judge metrics when
the metadata names a judge):

* ``acadlm_json_kv`` (synthetic recall): a JSON object of random UUID keys and values; the value
  of one key, placed at a controlled depth, is asked for.
* ``acadlm_helmet_niah_multikey_2`` / ``_3`` / ``_multivalue`` (synthetic recall): RULER's MK2,
  MK3 and MV as HELMET's recall category runs them (plain text, its generation lengths), drawn
  as :mod:`acadlm_plugins.evaluation.ruler` draws its own.
* ``acadlm_rag`` (retrieval-augmented generation): a question with k passages, its gold passage
  at a controlled depth among its hard negatives (in retrieval order) and other passages;
  substring exact match.
* ``acadlm_rerank`` (passage re-ranking): a query and as many passages as HELMET's MS MARCO
  files hold at the length, each with an id; the answer is the ids ranked by relevance; NDCG@10
  against graded judgments (trec_eval's linear gain).
* ``acadlm_cite_asqa`` / ``acadlm_cite_qampari`` (generation with citations, ALCE): a question
  with as many retrieved passages as fit; ALCE's STR-EM, answer-list precision/recall, and
  citation recall/precision when an NLI model is given (``nli_model_path``).
* ``acadlm_icl`` (many-shot in-context learning): labels mapped to numbers, as many labelled
  demonstrations as fit, then one text to label; accuracy.
* ``acadlm_longqa`` (long-document QA stand-in): which character speaks a quoted line of a
  Shakespeare play (or the user's documents and questions); substring exact match and, with a
  ``judge`` in the metadata, HELMET's judge score (:mod:`acadlm_plugins.evaluation.judge_metrics`).
  HELMET's own datasets are in :mod:`acadlm_plugins.evaluation.helmet_longdoc`.
* ``acadlm_summ`` (summarization stand-in): a Python standard-library module with its docstring
  removed, summarized as the docstring's first paragraph (or the user's documents); ROUGE-L
  and, with a ``judge``, HELMET's key-point F1 x fluency.

Every task but ICL opens, as HELMET's do, with ``num_shots`` (default 2) demonstrations in
HELMET's layout, drawn per question with a seeded stream from data never asked about: a
held-out part of the same file (or a separate demonstration file), other pairs of the same
JSON object, or other documents' questions and summaries (without their documents).

Prompts are laid out and sized as HELMET's (:mod:`acadlm_plugins.evaluation.helmet_frame`):
the answer prefix is lm-eval's ``gen_prefix`` without a chat template and absent with one, the
chat template applies only to the categories HELMET runs with it, and the prompt (template
included) plus the tokens to generate fit the length.

QA, RAG and re-ranking read a local jsonl (a shipped example by default, see
:mod:`acadlm_plugins.evaluation.local_data`); ALCE's files must be given (they are not shipped);
ICL, long-document QA and summarization default to data derived from the embedded corpus.
Fillers (distractor pairs, passages, demonstrations, document words) are fitted by binary
search so that a prompt is never longer than its budget and, from 1K tokens on, within 1% of
it: whole items are used while they fit and the last one is cut to the room left (never a gold
passage, the queried pair or a relevant passage). Re-ranking is the exception: HELMET fixes its
number of passages per length, so its prompts are cut only when they overflow.
"""

from __future__ import annotations

import ast
import bisect
import inspect
import io
import json
import logging
import math
import random
import re
import string
import tokenize
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from itertools import islice, pairwise
from pathlib import Path
from typing import Any, Protocol, TypeVar

from acadlm_plugins.evaluation.haystack import prose_words
from acadlm_plugins.evaluation.helmet_frame import HelmetFrame, HelmetLayout, HelmetTask
from acadlm_plugins.evaluation.judge_metrics import (
    DOC_FIELD,
    LONGQA,
    SUMM,
    judge_scores,
    judged_builder,
)
from acadlm_plugins.evaluation.lengths import LengthTokenizer, task_error
from acadlm_plugins.evaluation.local_data import (
    DEFAULT_QA_FILE,
    DEFAULT_RERANK_FILE,
    DocumentQA,
    DocumentSummary,
    LabelledText,
    Passage,
    QARecord,
    RankedPassage,
    RerankRecord,
    check_utf8_file,
    data_path,
    file_stamp,
    iter_json_objects,
    load_icl,
    load_longqa,
    load_qa,
    load_rerank,
    load_summ,
    text_field,
)
from acadlm_plugins.evaluation.prompting import FittedPrompt, random_uuid
from acadlm_plugins.evaluation.ruler import NIAH_VARIANTS, draw_needle_prompt, fit_words
from acadlm_plugins.evaluation.scoring import (
    Entails,
    answer_line,
    asqa_string_em,
    citation_scores,
    clean_prediction,
    exact_match,
    ndcg_at_k,
    qampari_scores,
    rouge_l,
    substring_exact_match,
)
from acadlm_plugins.evaluation.task_base import (
    DEFAULT_NUM_SAMPLES,
    DEFAULT_SEED,
    build_length_dataset,
    depth_setting_value,
    int_setting,
    per_length,
)
from acadlm_plugins.evaluation.task_settings import declare_settings, path_check, text_check

T = TypeVar("T")
Record = TypeVar("Record")
log = logging.getLogger(__name__)

#: Draw fillers until their separately counted tokens reach this multiple of the target, so the
#: binary search always has more than enough to choose from.
POOL_MARGIN = 1.2
#: Words with their leading whitespace; long runs without a space (tables, encoded data in code)
#: are cut every 6 characters so that no piece costs more than a few tokens.
_PIECE_RE = re.compile(r"\s*\S{1,6}")


# ----------------------------------------------------------------------------- shared helpers


def fit_units(render: Callable[[int], str], tokenizer: LengthTokenizer, target: int, *,
              max_units: int, task: str, key: str) -> FittedPrompt:
    """The longest ``render(n)`` (n = 0..max_units filler units) of at most ``target`` tokens.

    Same contract as :func:`acadlm_plugins.evaluation.prompting.fit_prompt`, found with fewer
    tokenizations: the token count grows almost linearly with n, so each probe is placed by
    interpolating between the largest n known to fit and the smallest known not to (regula
    falsi, with the Illinois correction against a stuck end and plain halving once the bracket
    is small). A 128K-token prompt takes about 8 tokenizations instead of 18. ``key`` is the
    metadata field to blame when the filler runs out before the target.
    """
    low, low_count = 0, tokenizer.count(render(0))
    if low_count > target:
        raise task_error(task, "max_seq_lengths", f"{target} tokens cannot hold even the task's "
                         f"template, question and demonstrations ({low_count} tokens).",
                         "Use a longer length, or fewer demonstrations (`num_shots`, 0 for "
                         "none).")
    high, high_count = max_units, tokenizer.count(render(max_units))
    if high_count <= target:
        if high_count < 0.99 * target:
            raise task_error(task, key, f"the filler ran out at {high_count} of {target} "
                             "tokens.", f"Give more data through `{key}`, or evaluate at "
                             "shorter lengths.")
        return FittedPrompt(render(max_units), high_count, max_units)
    low_weight = high_weight = 1.0
    last_side = 0
    while high - low > 1:
        if high - low <= 8:
            probe = (low + high) // 2
        else:
            below = (target - low_count) * low_weight
            above = (high_count - target) * high_weight
            probe = low + round((high - low) * below / max(below + above, 1e-9))
            probe = min(max(probe, low + 1), high - 1)
        count = tokenizer.count(render(probe))
        if count <= target:
            low, low_count = probe, count
            high_weight = high_weight / 2 if last_side == -1 else 1.0
            low_weight, last_side = 1.0, -1
        else:
            high, high_count = probe, count
            low_weight = low_weight / 2 if last_side == 1 else 1.0
            high_weight, last_side = 1.0, 1
    return FittedPrompt(render(low), low_count, low)


def take_counts(sizes: Sequence[int], budget: int) -> list[int]:
    """How many pieces of each item a budget of ``budget`` pieces covers: whole items in order
    while they fit, then the part of the next one that does (the list stops there)."""
    counts: list[int] = []
    for size in sizes:
        if budget <= 0:
            break
        taken = min(size, budget)
        counts.append(taken)
        budget -= taken
    return counts


#: A filler item used in a prompt: (index into the pool, pieces of it taken).
Taken = list[tuple[int, int]]

_WORD = re.compile(r"\S+")


def leading_words(text: str, count: int) -> str:
    """``text`` through its ``count``-th word, its white space as written: the whole text,
    verbatim, when ``count`` covers every word. A passage, query or demonstration is shown as
    HELMET shows it (its data's text as is); only the one cut to fit the length ends early."""
    end = 0
    for number, word in enumerate(_WORD.finditer(text), start=1):
        if number > count:
            return text[:end]
        end = word.end()
    return text


def fit_items(render: Callable[[Taken], str], sizes: Sequence[int], tokenizer: LengthTokenizer,
              target: int, *, task: str, key: str, keep: int = 0) -> tuple[FittedPrompt, Taken]:
    """Fit a prompt made of filler items of ``sizes`` pieces each (words, characters).

    ``render`` gets the items used, in fill order, each with the number of its pieces taken:
    whole items while they fit, then part of the next. Every item carries some fixed text (a
    header, a label), so when the next item cannot even start, the prompt may fall short by that
    much; then the last whole item is swapped for an unused one that is longer (and will be cut)
    or shorter by enough to let the next item start, and the fit is redone; the best of at most
    four fits is kept. The first ``keep`` items are never swapped out (a question's own
    retrieved passages, which must come first and whole while they fit).
    """
    order = list(range(len(sizes)))

    def take(units: int) -> Taken:
        return list(zip(order, take_counts([sizes[i] for i in order], units)))

    best: tuple[FittedPrompt, Taken] | None = None
    for _ in range(4):
        fitted = fit_units(lambda units: render(take(units)), tokenizer, target,
                           max_units=sum(sizes), task=task, key=key)
        taken = take(fitted.num_words)
        if best is None or fitted.num_tokens > best[0].num_tokens:
            best = (fitted, taken)
        if fitted.num_tokens >= 0.99 * target or not taken or taken[-1][1] < sizes[taken[-1][0]]:
            break
        last, count = len(taken) - 1, taken[-1][1]
        if last < keep:
            break
        unused = range(len(taken), len(order))
        longer = [p for p in unused if sizes[order[p]] > count]
        shorter = [p for p in unused if sizes[order[p]] + 8 <= count]
        if longer:
            swap = max(longer, key=lambda p: sizes[order[p]])
        elif shorter:
            swap = max(shorter, key=lambda p: sizes[order[p]])
        else:
            break
        order[last], order[swap] = order[swap], order[last]
    assert best is not None
    return best


def draw_pool(candidates: Iterable[T], cost: Callable[[T], int], target: int, *, task: str,
              key: str, what: str, more: str = "") -> list[T]:
    """Candidates, in order, until their token costs add up to ``POOL_MARGIN`` x ``target``;
    ``more`` names where else data can come from, for the error when they do not."""
    pool: list[T] = []
    total = 0
    for candidate in candidates:
        pool.append(candidate)
        total += cost(candidate)
        if total >= POOL_MARGIN * target:
            return pool
    raise task_error(task, key, f"only {total} tokens of {what} are available, too few for a "
                     f"{target}-token prompt.", f"Give more data through `{key}`{more}, or "
                     "evaluate at shorter lengths.")


def depth_setting(metadata: Mapping[str, Any], index: int, rng: random.Random, *, task: str,
                  spread: bool) -> float:
    """Where the evidence goes (0 = start of the context, 1 = end): ``depth`` from the metadata
    if set; else evenly spread over the samples (``spread``) or drawn at random."""
    depth = depth_setting_value(metadata, task=task)
    if depth is not None:
        return depth
    if not spread:
        return rng.random()
    num_samples = int_setting(metadata, "num_samples", DEFAULT_NUM_SAMPLES, task=task)
    return index / (num_samples - 1) if num_samples > 1 else 0.5


def sample_order(task: str, metadata: Mapping[str, Any], size: int) -> list[int]:
    """A permutation of ``range(size)`` seeded by the task and the seed, the same at every
    length: sample i of each length uses item ``order[i % size]``, so that every length asks
    the same questions (as HELMET runs one shuffled subset, ``shuffle(seed).select(n)``, at
    every length) and items repeat only after all have been used. What differs by length (the
    distractors, the filler) comes from the length's own stream."""
    seed = int_setting(metadata, "seed", DEFAULT_SEED, task=task, minimum=0)
    return _order(task, seed, size)


@lru_cache(maxsize=64)
def _order(task: str, seed: int, size: int) -> list[int]:
    order = list(range(size))
    random.Random(f"{task}:{seed}:order").shuffle(order)
    return order


def pieces_of(text: str) -> list[str]:
    """``text`` cut into pieces of a word or less that keep their leading whitespace: joining a
    prefix of them gives a prefix of the text with its layout (code indentation, verse lines)
    intact."""
    return _PIECE_RE.findall(text)


def _shuffled(items: Sequence[T], rng: random.Random) -> list[T]:
    copy = list(items)
    rng.shuffle(copy)
    return copy


# ---------------------------------------------------------------------------- demonstrations

#: HELMET prompts recall (JSON KV), RAG, re-ranking, citation, long-document QA and summarization
#: with 2 demonstrations (``shots: 2`` in its configs); ICL is made of demonstrations already.
DEFAULT_NUM_SHOTS = 2
#: The largest share of a data file held out as the demonstration pool: a quarter of its rows,
#: at most this many (and at least the number of shots).
DEMO_POOL_SIZE = 8


def num_shots_setting(metadata: Mapping[str, Any], *, task: str) -> int:
    """``num_shots`` of the metadata: demonstrations per prompt (default 2, as HELMET; 0 for
    none)."""
    return int_setting(metadata, "num_shots", DEFAULT_NUM_SHOTS, task=task, minimum=0)


# Every HELMET task but ICL (which fills its prompts with demonstrations instead): checked for
# ICL too, since the metadata is the whole run's.
declare_settings("HELMET's tasks", {"num_shots": num_shots_setting})


def hold_out_demos(task: str, metadata: Mapping[str, Any], size: int, shots: int, *,
                   key: str) -> tuple[list[int], list[int]]:
    """Split the ``size`` rows of a data file into (rows to ask about, demonstration rows).

    HELMET draws its demonstrations from a separate file (a train split); from a single file we
    hold out a seeded part of it instead, the same at every length, so that a row shown as a
    demonstration is never a question. With no shots nothing is held out.
    """
    if shots == 0:
        return list(range(size)), []
    held = max(shots, min(DEMO_POOL_SIZE, size // 4))
    if size - held < 1:
        raise task_error(task, key, f"its {size} row(s) cannot give {shots} demonstration(s) "
                         "and a question to ask.", "Add rows, give a separate demonstration "
                         "file, or set `num_shots` to 0.")
    seed = int_setting(metadata, "seed", DEFAULT_SEED, task=task, minimum=0)
    order = list(range(size))
    random.Random(f"{task}:{seed}:demos").shuffle(order)
    return sorted(order[held:]), sorted(order[:held])


def pick_demos(pool: Sequence[T], shots: int, metadata: Mapping[str, Any], *, task: str,
               item: str, key: str, allowed: Callable[[T], bool] = lambda _: True) -> list[T]:
    """``shots`` demonstrations for the test item named ``item``, drawn from the ``allowed``
    members of ``pool`` by a stream seeded with the task, the seed and the item: a question
    gets the same demonstrations at every length (HELMET seeds its draw with a hash of the
    question for the same reason)."""
    if shots == 0:
        return []
    candidates = [member for member in pool if allowed(member)]
    if len(candidates) < shots:
        raise task_error(task, key, f"only {len(candidates)} row(s) can serve as "
                         f"demonstrations for {item!r}, fewer than `num_shots` = {shots}.",
                         "Give more rows or set `num_shots` lower.")
    seed = int_setting(metadata, "seed", DEFAULT_SEED, task=task, minimum=0)
    return random.Random(f"{task}:{seed}:demos:{item}").sample(candidates, shots)


# ------------------------------------------------------------------- extra distractor passages


def _chunk_passages(text: str, title: str, *, low: int = 40, high: int = 120) -> list[Passage]:
    """Paragraphs of ``text`` merged or cut into passages of ``low``-``high`` words."""
    passages: list[Passage] = []
    words: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        words.extend(paragraph.split())
        while len(words) >= high:
            passages.append(Passage(" ".join(words[:high // 2 + low]), title))
            words = words[high // 2 + low:]
        if len(words) >= low:
            passages.append(Passage(" ".join(words), title))
            words = []
    return passages


@lru_cache(maxsize=4)
def _passages_from_source(source: str, task: str) -> tuple[Passage, ...]:
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) \
        if path.is_dir() else [path]
    passages: list[Passage] = []
    for file in files:
        if file.suffix == ".txt":
            passages.extend(_chunk_passages(file.read_text(encoding="utf-8", errors="replace"),
                                            file.stem.replace("_", " ")))
            continue
        rows = iter_json_objects(file, task=task, key="distractor_path",
                                 example='{"title": "...", "text": "..."}')
        for number, row in rows:
            text = text_field(row, file, number, task=task, key="distractor_path")
            title = row.get("title") if isinstance(row.get("title"), str) else \
                text.strip().split("\n", 1)[0][:80]
            passages.extend(_chunk_passages(text, title))
    return tuple(passages)


EXTRA_HINT = " or a larger text through `distractor_path`"
declare_settings("acadlm_rag, acadlm_rerank, the cite tasks",
                 {"distractor_path": path_check("distractor_path")})


def extra_passage_blocks(metadata: Mapping[str, Any], *,
                         task: str) -> Iterator[tuple[str, tuple[Passage, ...]]]:
    """Further distractor passages for when a data file's own run out, as (origin, passages)
    blocks: the local text named by ``distractor_path``, else the embedded corpus (the Python
    documentation first, then the books). A block is read only when a prompt needs it."""
    value = metadata.get("distractor_path")
    if value:
        path = Path(str(value)).expanduser()
        if not path.exists():
            raise task_error(task, "distractor_path", f"{path} does not exist.",
                             "Give a local .txt/.jsonl file or folder, or leave it unset to "
                             "use the embedded corpus.")
        yield "distractor_path", _passages_from_source(str(path.resolve()), task)
        return
    from acadlm_plugins.defaults.paths import require_default_corpus

    corpus = require_default_corpus()
    for domain in ("docs", "books"):
        for name in ("train.jsonl", "validation.jsonl"):
            file = corpus / domain / name
            if file.is_file():
                yield f"corpus_{domain}", _passages_from_source(str(file), task)


def _extra_stream(metadata: Mapping[str, Any], rng: random.Random, *,
                  task: str) -> Iterator[tuple[str, Passage]]:
    """The passages of :func:`extra_passage_blocks`, each block in a seeded random order."""
    for origin, block in extra_passage_blocks(metadata, task=task):
        for passage in _shuffled(block, rng):
            yield origin, passage


# --------------------------------------------------------------------------- JSON key-value

#: As HELMET's (lost in the middle's) layout: the object first, the instruction only after it.
JSON_KV_TAIL = ("\n\nReply with the value that the JSON object above stores under the key below, "
                "and nothing else.\n\n{demos}Key: \"{key}\"")
#: Synthetic recall: no chat template in HELMET's recall.yaml, its 100 tokens to generate.
JSON_KV_LAYOUT = HelmetLayout("recall", "Value:", "\n", 100)
#: One demonstration: a lookup answered, in the layout of the question (HELMET's "Key: ...
#: Corresponding value: ..." pairs before the question).
JSON_KV_DEMO = "Key: \"{key}\"\nValue: {value}\n\n"


def build_json_kv_sample(metadata: Mapping[str, Any], task: str, rng: random.Random,
                         length: int, index: int, tokenizer: LengthTokenizer) -> dict[str, Any]:
    """A JSON object of UUID pairs filling ``length`` tokens; the queried pair sits at the
    sample's depth. The last distractor pair may be shortened to fit exactly.

    With ``num_shots`` > 0, as many further pairs of the object, at random places and never the
    queried one, are looked up before the question as demonstrations.
    """
    frame = JSON_KV_LAYOUT.frame(metadata, length, tokenizer, task=task)
    depth = depth_setting(metadata, index, rng, task=task, spread=True)
    shots = num_shots_setting(metadata, task=task)
    key, value = random_uuid(rng), random_uuid(rng)
    pair_tokens = tokenizer.count(f'  "{key}": "{value}",\n')
    wanted = math.ceil(POOL_MARGIN * length / max(pair_tokens, 1)) + 2
    used = {key}
    distractors: list[tuple[str, str]] = []
    while len(distractors) < wanted + shots:
        other = random_uuid(rng)
        if other not in used:
            used.add(other)
            distractors.append((other, random_uuid(rng)))
    demos, distractors = distractors[:shots], distractors[shots:]
    demo_depths = [rng.random() for _ in demos]
    demo_text = "".join(JSON_KV_DEMO.format(key=k, value=v) for k, v in demos)
    sizes = [len(k) + len(v) for k, v in distractors]

    def arrange(taken: Taken) -> list[tuple[str, str]]:
        # A pair cut short keeps a prefix of its key (value empty), or its key and a prefix of
        # its value: still valid JSON, and never the queried pair or a demonstration.
        pairs = [(distractors[i][0][:n], "") if n <= len(distractors[i][0]) else
                 (distractors[i][0], distractors[i][1][: n - len(distractors[i][0])])
                 for i, n in taken]
        for pair, at in zip(demos, demo_depths):
            pairs.insert(round(at * len(pairs)), pair)
        pairs.insert(round(depth * len(pairs)), (key, value))
        return pairs

    def render(taken: Taken) -> str:
        body = ",\n".join(f'  "{k}": "{v}"' for k, v in arrange(taken))
        return frame.render("{\n" + body + "\n}"
                            + JSON_KV_TAIL.format(key=key, demos=demo_text))

    fitted, taken = fit_items(render, sizes, tokenizer, frame.budget, task=task,
                              key="max_seq_lengths")
    pairs = arrange(taken)
    return frame.row(fitted, outputs=[value], depth=depth, num_pairs=len(pairs),
                     key_position=pairs.index((key, value)),
                     demo_ids=json.dumps([k for k, _ in demos]))


# ------------------------------------------------- recall: RULER's needles as HELMET runs them


@dataclass(frozen=True)
class HelmetNeedleTask:
    """One of RULER's needle tasks that HELMET's recall category runs (configs/recall.yaml):
    the RULER variant whose prompt it draws and HELMET's ``generation_max_length`` for it."""

    variant: str  # the name of RULER's task of ours (a key of ruler.NIAH_VARIANTS)
    generation: int


#: HELMET's recall category averages JSON KV and RULER's MK2, MK3 and MV, all run as its
#: recall.yaml says: plain text even for an instruction-tuned model (``use_chat_template:
#: false``), the answer prefix on a line of its own, 50 / 100 / 50 tokens to generate, no stop
#: string (``stop_new_line: false``), no demonstrations (HELMET gives RULER's data none). Its
#: RULER files are RULER's own tasks (same haystacks, keys, values and number of needles), so
#: ours draw their prompts as our RULER tasks do; only the layout and the generation differ,
#: which is why RULER's own tasks (chat template per run, 128 tokens) cannot stand for them.
HELMET_NEEDLE_TASKS: dict[str, HelmetNeedleTask] = {
    "acadlm_helmet_niah_multikey_2": HelmetNeedleTask("acadlm_niah_multikey_2", 50),
    "acadlm_helmet_niah_multikey_3": HelmetNeedleTask("acadlm_niah_multikey_3", 100),
    "acadlm_helmet_niah_multivalue": HelmetNeedleTask("acadlm_niah_multivalue", 50),
}


def build_helmet_needle_sample(needle: HelmetNeedleTask, metadata: Mapping[str, Any], task: str,
                               rng: random.Random, length: int, index: int,
                               tokenizer: LengthTokenizer) -> dict[str, Any]:
    """RULER's needle prompt of ``needle.variant`` in HELMET's recall layout: the user text,
    then (in plain text) the answer prefix on a line of its own; prompt and HELMET's tokens to
    generate fit ``length``."""
    layout = HelmetLayout("recall", "", "\n", needle.generation)
    frame = layout.frame(metadata, length, tokenizer, task=task)
    spec = NIAH_VARIANTS[needle.variant]
    drawn = draw_needle_prompt(spec, task, metadata, rng, index, frame.budget, tokenizer)
    frame = replace(frame, prefix=drawn.prefix)  # the prefix names the queried key

    def render(words: Sequence[str]) -> str:
        return frame.render(drawn.text(words))

    frame.frame.check_room(tokenizer.count(render([])), task=task)
    fitted = fit_words(render, drawn.filler, tokenizer, frame.budget, task=task)
    return frame.row(fitted, outputs=list(drawn.answers), depths=list(drawn.depths),
                     needles=drawn.needles, haystack=spec.haystack)


def helmet_needle_dataset(task: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset of ``task``, one of :data:`HELMET_NEEDLE_TASKS`."""
    needle = HELMET_NEEDLE_TASKS[task]
    if NIAH_VARIANTS[needle.variant].haystack != "prose" and metadata.get("haystack_path"):
        prose_words(metadata["haystack_path"], task=task, min_words=1)  # report a wrong path
    return build_length_dataset(task, metadata,
                                partial(build_helmet_needle_sample, needle, metadata, task))


# ------------------------------------------------------------------- passages: QA, RAG, rerank


@dataclass(frozen=True)
class PassageStyle:
    """How a passage-QA task lays out its prompt and where its gold passages go."""

    head: str
    tail: str
    document: str  # format of one passage with a title: {title}, {text}
    untitled: str  # format of one passage without a title: {text}
    spread_depth: bool  # True: depths spread over samples (HELMET RAG); False: random (RULER QA)
    hard_negatives: bool  # use the question's own distractors first (RAG) or not (RULER QA)
    key: str  # the metadata key naming the data file
    layout: HelmetLayout  # category, answer prefix, tokens to generate
    #: Metadata key of a separate demonstration file; "" means no demonstrations.
    demo_key: str = ""


RAG_STYLE = PassageStyle(
    head=("Answer the question using the documents below. Give only a short answer, a few "
          "words taken from the documents, with no explanation.\n\n"),
    tail="\n\nQuestion: {question}",
    # HELMET's passage template (data.py, load_qa): no number; no title clause without a title,
    # as its MS MARCO template does for passages that have none.
    document="Document (Title: {title}): {text}", untitled="Document: {text}",
    spread_depth=True, hard_negatives=True, key="rag_path",
    # rag.yaml: no chat template, 20 tokens to generate.
    layout=HelmetLayout("rag", "Answer:", "\n", 20), demo_key="rag_demo_path")
declare_settings("acadlm_rag", {key: path_check(key) for key in (RAG_STYLE.key,
                                                                  RAG_STYLE.demo_key)})
#: One demonstration (HELMET's layout): its passages, its question, its first answer.
QA_DEMO = "{documents}\n\nQuestion: {question}\nAnswer: {answer}\n\n"


def titled_passage(titled: str, untitled: str, title: str, **fields: object) -> str:
    """One passage in HELMET's way: ``titled`` (with ``{title}``) when it has a title,
    ``untitled`` (no title clause) when it has none; ``fields`` fill the rest of either."""
    if title:
        return titled.format(title=title, **fields)
    return untitled.format(**fields)


def _format_passage(style: PassageStyle, passage: Passage) -> str:
    return titled_passage(style.document, style.untitled, passage.title, text=passage.text)


def _passage_tokens(tokenizer: LengthTokenizer, passage: Passage) -> int:
    return tokenizer.count(passage.title + " " + passage.text) + 8


def _distractor_stream(records: Sequence[QARecord], record: QARecord, style: PassageStyle,
                       metadata: Mapping[str, Any], rng: random.Random, *,
                       task: str) -> Iterator[tuple[str, Passage]]:
    """Distractors for ``record``: its own hard negatives (RAG) in the file's order, which is
    retrieval order in HELMET's files (its prompts show the top-retrieved passages, in that
    order), then the other questions' passages and extra passages in a random order; never a
    copy of one of its gold passages."""
    gold_texts = {p.text for p in record.gold}
    if style.hard_negatives:
        yield from (("hard_negative", p) for p in record.distractors)
    others = [p for r in records if r is not record for p in (*r.gold, *r.distractors)]
    for passage in _shuffled(others, rng):
        if passage.text not in gold_texts:
            yield "other_question", passage
    for origin, passage in _extra_stream(metadata, rng, task=task):
        if passage.text not in gold_texts:
            yield origin, passage


def qa_demo_text(style: PassageStyle, demos: Sequence[QARecord]) -> str:
    """Demonstrations of a passage-QA prompt: each with its first two hard negatives in the
    file's order and its gold passage(s) inserted among them at a place fixed by the row's id
    (HELMET's demonstrations carry 3 retrieved passages, the gold one at a depth), then its
    question and first answer."""
    blocks = []
    for demo in demos:
        negatives = list(demo.distractors[:2])
        at = random.Random(demo.id).randint(0, len(negatives))
        passages = [*negatives[:at], *demo.gold, *negatives[at:]]
        documents = "\n\n".join(_format_passage(style, p) for p in passages)
        blocks.append(QA_DEMO.format(documents=documents, question=demo.question,
                                     answer=demo.answers[0]))
    return "".join(blocks)


def build_passage_qa_sample(records: Sequence[QARecord], style: PassageStyle,
                            metadata: Mapping[str, Any], task: str, rng: random.Random,
                            length: int, index: int, tokenizer: LengthTokenizer, *,
                            demo_pool: Sequence[QARecord] = (),
                            every_record: Sequence[QARecord] = ()) -> dict[str, Any]:
    """A question of ``records`` with its gold passage(s) inserted at the sample's depth among
    distractors (:func:`_distractor_stream`: its hard negatives first, in the file's order, as
    HELMET shows its top-retrieved passages; then passages of ``every_record``, default
    ``records``) filling ``length`` tokens; the last distractor may be cut short to fit. When
    the style has demonstrations, ``num_shots`` rows of ``demo_pool`` (never one asking the same
    question) come between the instruction and the passages."""
    record = records[sample_order(task, metadata, len(records))[index % len(records)]]
    frame = style.layout.frame(metadata, length, tokenizer, task=task)
    depth = depth_setting(metadata, index, rng, task=task, spread=style.spread_depth)
    shots = num_shots_setting(metadata, task=task) if style.demo_key else 0
    demos = pick_demos(demo_pool, shots, metadata, task=task, item=record.id, key=style.key,
                       allowed=lambda demo: demo.question != record.question)
    stream = _distractor_stream(every_record or records, record, style, metadata, rng,
                                task=task)
    pool = draw_pool(stream, lambda item: _passage_tokens(tokenizer, item[1]), length,
                     task=task, key=style.key, what="distractor passages", more=EXTRA_HINT)
    sizes = [len(item[1].text.split()) for item in pool]  # words each passage can show
    # The question's own hard negatives lead the pool, in retrieval order: fit_items may swap the
    # last whole distractor for a later one, never one of these.
    hard_negatives = sum(1 for origin, _ in pool if origin == "hard_negative")
    head = style.head + qa_demo_text(style, demos)
    tail = style.tail.format(question=record.question)

    def arrange(taken: Taken) -> tuple[list[Passage], int]:
        passages = [Passage(leading_words(pool[i][1].text, n), pool[i][1].title)
                    for i, n in taken]
        position = round(depth * len(passages))
        return passages[:position] + list(record.gold) + passages[position:], position

    def render(taken: Taken) -> str:
        passages, _ = arrange(taken)
        body = "\n\n".join(_format_passage(style, p) for p in passages)
        return frame.render(head + body + tail)

    fitted, taken = fit_items(render, sizes, tokenizer, frame.budget,
                              task=task, key=style.key, keep=hard_negatives)
    passages, position = arrange(taken)
    origins = Counter(pool[i][0] for i, _ in taken)
    return frame.row(fitted, outputs=list(record.answers), question_id=record.id,
                     question=record.question, depth=depth, gold_position=position,
                     num_passages=len(passages), gold_texts=[p.text for p in record.gold],
                     distractor_origins=json.dumps(dict(sorted(origins.items()))),
                     demo_ids=json.dumps([demo.id for demo in demos]))


def split_for_demos(task: str, metadata: Mapping[str, Any], records: Sequence[Record], *,
                    key: str, demo_key: str, load: Callable[[Path], Sequence[Record]],
                    shots: int) -> tuple[list[Record], list[Record]]:
    """(rows to ask about, demonstration pool): every row and the file named by ``demo_key``
    when it is set (HELMET's separate demonstration file), else a held-out part of the rows."""
    demo_path = data_path(metadata, demo_key, None, task=task) if shots else None
    if demo_path is not None:
        return list(records), list(load(demo_path))
    asked, held = hold_out_demos(task, metadata, len(records), shots, key=key)
    return [records[i] for i in asked], [records[i] for i in held]


def passage_qa_dataset(task: str, style: PassageStyle, metadata: Mapping[str, Any],
                       default: Path = DEFAULT_QA_FILE) -> dict[str, Any]:
    """The dataset of a passage-QA task, from ``metadata[style.key]`` or the shipped example;
    demonstrations from ``metadata[style.demo_key]`` or a held-out part of the same rows."""
    path = data_path(metadata, style.key, None, task=task) or default
    records = load_qa(path, task=task, key=style.key)
    shots = num_shots_setting(metadata, task=task) if style.demo_key else 0
    asked, pool = split_for_demos(
        task, metadata, records, key=style.key, demo_key=style.demo_key, shots=shots,
        load=lambda demo_path: load_qa(demo_path, task=task, key=style.demo_key))
    return build_length_dataset(task, metadata, partial(
        build_passage_qa_sample, asked, style, metadata, task, demo_pool=pool,
        every_record=records))


RERANK_INSTRUCTION = ("Below is a list of documents, each marked with an ID, and then a query. "
                      "Rank the documents from the most to the least relevant to the query. Reply "
                      "with the IDs only, most relevant first, in the form: Ranking: ID > ID > "
                      "ID\n\n")
#: The query comes once, after the passages, as in HELMET's template (``{demos}{context}\n\n
#: Query: {question}``).
RERANK_TAIL = "\n\nQuery: {query}"
RERANK_DOCUMENT = "[ID: {pid}] Document (Title: {title}): {text}"
#: A passage without a title (MS MARCO's): HELMET's template then has no title clause.
RERANK_UNTITLED = "[ID: {pid}] Document: {text}"
#: One demonstration (HELMET's layout): its passages, its query, all its ids ranked.
RERANK_DEMO = "{documents}\n\nQuery: {query}\nRanking: {ranking}\n\n"
#: rerank.yaml: no chat template, 200 tokens to generate, the answer after "Ranking:".
RERANK_LAYOUT = HelmetLayout("rerank", "Ranking:", "\n", 200)
#: Passages per prompt in HELMET's MS MARCO files at each length (``scripts/generate_configs.py``
#: reads ``test_reranking_data_k{k}_dep3.jsonl``, k = 14 at 4K ... 1000 at 128K).
HELMET_RERANK_PASSAGES = {4096: 14, 8192: 50, 16384: 130, 32768: 285, 65536: 600, 131072: 1000}
#: Passages of each demonstration (HELMET's demonstration file holds 10 per query).
RERANK_DEMO_PASSAGES = 10


def rerank_entry(pid: str, title: str, text: str) -> str:
    """One passage of a re-ranking prompt, with its title clause only when it has a title."""
    return titled_passage(RERANK_DOCUMENT, RERANK_UNTITLED, title, pid=pid, text=text)


def rerank_passage_count(length: int) -> int:
    """How many passages a re-ranking prompt of ``length`` tokens holds: HELMET's count at its
    lengths, linear in between, and in proportion to the length below 4K (at least 2) and above
    128K. HELMET fixes the number of passages, not the number of tokens: a prompt of short
    passages stays below its length, one of long passages is cut at its end."""
    table = sorted(HELMET_RERANK_PASSAGES.items())
    (first, first_count), (last, last_count) = table[0], table[-1]
    if length <= first:
        return max(2, round(first_count * length / first))
    if length >= last:
        return round(last_count * length / last)
    for (low, low_count), (high, high_count) in pairwise(table):
        if low <= length <= high:
            return round(low_count + (high_count - low_count) * (length - low) / (high - low))
    raise AssertionError("unreachable: the table covers every length in between")


def rerank_demo_text(demos: Sequence[RerankRecord], rng: random.Random, taken: set[str]) -> str:
    """Demonstrations of a re-ranking prompt: the first ``RERANK_DEMO_PASSAGES`` passages of each
    demo query (HELMET's demonstrations have 10) in a random order under fresh ids (none of
    ``taken``, which grows), its query, and the ranking of all of them by grade (HELMET's
    demonstration answer ranks every passage shown)."""
    blocks = []
    for demo in demos:
        shown = []
        for passage in _shuffled(demo.passages[:RERANK_DEMO_PASSAGES], rng):
            pid = str(rng.randrange(10000, 100000))
            while pid in taken:
                pid = str(rng.randrange(10000, 100000))
            taken.add(pid)
            shown.append((pid, passage))
        ranking = [pid for pid, _ in sorted(shown, key=lambda item: -item[1].relevance)]
        documents = "\n\n".join(rerank_entry(pid, p.title, p.text) for pid, p in shown)
        blocks.append(RERANK_DEMO.format(documents=documents, query=demo.query,
                                         ranking=" > ".join(ranking)))
    return "".join(blocks)


def rerank_candidates(record: RerankRecord, count: int) -> list[RankedPassage]:
    """The query's own passages a prompt of ``count`` passages shows: the first ``count`` in the
    file's order (retrieval order in HELMET's and TREC's files); when none of them is relevant,
    the query's most relevant passage takes the last place, so that the ranking can be scored."""
    own = list(record.passages[:count])
    if not any(p.relevance > 0 for p in own):
        own[-1] = max(record.passages, key=lambda p: p.relevance)
    return own


def build_rerank_sample(records: Sequence[RerankRecord], metadata: Mapping[str, Any], task: str,
                        rng: random.Random, length: int, index: int,
                        tokenizer: LengthTokenizer, *, demo_pool: Sequence[RerankRecord] = (),
                        every_record: Sequence[RerankRecord] = ()) -> dict[str, Any]:
    """A query of ``records`` with :func:`rerank_passage_count` passages, as HELMET's files
    give each length: its own passages (:func:`rerank_candidates`), then unjudged filler
    passages (relevance 0; other queries' passages of ``every_record``, default ``records``,
    then extra ones) if it has fewer, all in a random order, each under a random 5-digit id;
    ``num_shots`` demonstration queries of ``demo_pool`` come between the instruction and the
    passages, and the query follows the passages (once, as in HELMET's template). When the
    passages overflow the length, the last ones are cut, as HELMET truncates
    the context at its end; the ranking is still scored against all their grades."""
    record = records[sample_order(task, metadata, len(records))[index % len(records)]]
    frame = RERANK_LAYOUT.frame(metadata, length, tokenizer, task=task)
    count = rerank_passage_count(length)
    demos = pick_demos(demo_pool, num_shots_setting(metadata, task=task), metadata, task=task,
                       item=record.id, key="rerank_path",
                       allowed=lambda demo: demo.query != record.query)
    own = rerank_candidates(record, count)
    judged_texts = {p.text for p in record.passages}
    others = [Passage(p.text, p.title) for r in every_record or records if r is not record
              for p in r.passages]
    fillers = [p for p in _shuffled(others, rng) if p.text not in judged_texts]
    if len(own) + len(fillers) < count:
        extras = (p for _, p in _extra_stream(metadata, rng, task=task)
                  if p.text not in judged_texts)
        fillers += list(islice(extras, count - len(own) - len(fillers)))
    fillers = fillers[:count - len(own)]
    if len(own) + len(fillers) < count:
        raise task_error(task, "rerank_path", f"only {len(own) + len(fillers)} passages are "
                         f"available for {count}-passage prompts at {length} tokens.",
                         f"Give more queries through `rerank_path`{EXTRA_HINT}, or evaluate "
                         "at shorter lengths.")
    ids = [str(i) for i in rng.sample(range(10000, 100000), count)]
    shown = sorted([(rng.random(), ids[i], Passage(p.text, p.title), p.relevance)
                    for i, p in enumerate(own)]
                   + [(rng.random(), ids[len(own) + i], p, 0.0) for i, p in enumerate(fillers)])
    sizes = [len(entry[2].text.split()) for entry in shown]  # words each passage can show
    head = RERANK_INSTRUCTION + rerank_demo_text(demos, rng, set(ids))
    tail = RERANK_TAIL.format(query=record.query)

    def render(units: int) -> str:
        cut = take_counts(sizes, units)
        body = "\n\n".join(rerank_entry(shown[i][1], shown[i][2].title,
                                         leading_words(shown[i][2].text, n))
                            for i, n in enumerate(cut))
        return frame.render(head + body + tail)

    total = sum(sizes)
    whole = render(total)
    fitted = FittedPrompt(whole, tokenizer.count(whole), total)
    if fitted.num_tokens > frame.budget:
        fitted = fit_units(render, tokenizer, frame.budget, max_units=total, task=task,
                           key="rerank_path")
    relevant = sorted(((grade, pid) for _, pid, _, grade in shown if grade > 0), reverse=True)
    return frame.row(fitted, outputs=[pid for _, pid in relevant],
                     oracle_answer=" > ".join(pid for _, pid in relevant), query_id=record.id,
                     relevant_ids=[pid for _, pid in relevant],
                     relevant_grades=[grade for grade, _ in relevant],
                     passage_ids=[entry[1] for entry in shown], num_passages=count,
                     num_shown=len(take_counts(sizes, fitted.num_words)),
                     demo_ids=json.dumps([demo.id for demo in demos]))


def parse_ranking(prediction: str) -> list[str]:
    """The ranking written in ``prediction``, read as HELMET's ``parse_rankings`` reads it:
    brackets, colons and "id" dropped, then the longest chain of ids joined by ">" (the first of
    equal length), each id at its first place. Ids that are no passage of the prompt (a
    demonstration's, say) stay in the ranking and count as unjudged, as in HELMET's NDCG."""
    text = re.sub(r"[\[\]:]", "", clean_prediction(prediction)).lower().replace("id", "")
    longest = max((match.group(0) for match in re.finditer(r"(\d+)(?:\s*>\s*(\d+))*", text)),
                  key=len, default="")
    return list(dict.fromkeys(part.strip() for part in longest.split(">") if part.strip()))


declare_settings("acadlm_rerank", {key: path_check(key) for key in (
    "rerank_path", "rerank_demo_path")})


def rerank_dataset(task: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset of ``acadlm_rerank``, from ``rerank_path`` or the shipped example;
    demonstrations from ``rerank_demo_path`` or a held-out part of the same queries."""
    path = data_path(metadata, "rerank_path", None, task=task) or DEFAULT_RERANK_FILE
    records = load_rerank(path, task=task, key="rerank_path")
    asked, pool = split_for_demos(
        task, metadata, records, key="rerank_path", demo_key="rerank_demo_path",
        shots=num_shots_setting(metadata, task=task),
        load=lambda demo_path: load_rerank(demo_path, task=task, key="rerank_demo_path"))
    return build_length_dataset(task, metadata, partial(build_rerank_sample, asked, metadata,
                                                        task, demo_pool=pool,
                                                        every_record=records))


# ------------------------------------------------------------------ in-context learning (ICL)

ICL_HEAD = ("Each text below is followed by its label, a number standing for a category. Work "
            "out which number goes with which kind of text, then label the last text. Reply "
            "with \"label: <number>\" and nothing else.\n\n")
ICL_DEMO = "{text}\nlabel: {label}"
ICL_TAIL = "\n\n{text}"
#: icl.yaml: no chat template, 20 tokens to generate, the label after "label:".
ICL_LAYOUT = HelmetLayout("icl", "label:", "\n", 20)
CORPUS_DOMAINS = ("books", "code", "docs", "scripture")
_SNIPPET_WORDS = (12, 40)


class LabelSource(Protocol):
    """Where ICL texts come from: queries to label and, per label, demonstrations."""

    labels: tuple[str, ...]

    @property
    def num_queries(self) -> int:
        """How many distinct queries :meth:`query` gives before repeating."""
        ...

    @property
    def query_labels(self) -> tuple[str, ...]:
        """The label of each query, by number, known before the query is drawn."""
        ...

    def query(self, rng: random.Random, order_index: int) -> LabelledText:
        """Query number ``order_index`` (0 <= order_index < num_queries); a random source
        draws it from ``rng``, a stream of the sample's own, the same at every length."""
        ...

    def demos(self, label: str, query: LabelledText, rng: random.Random) -> Iterator[str]:
        """Demonstration texts of ``label`` in a random order, never the query's own text."""
        ...


class FileLabels:
    """Labelled rows of a local jsonl: ``split`` "test" rows are asked about and "demo" rows
    shown; without splits any row may be asked about and all the others are shown."""

    def __init__(self, rows: Sequence[LabelledText]) -> None:
        has_splits = any(row.split for row in rows)
        self.tests = [row for row in rows if row.split == "test"] if has_splits else list(rows)
        shown = [row for row in rows if row.split != "test"] if has_splits else list(rows)
        self.labels = tuple(sorted({row.label for row in rows}))
        self.query_labels = tuple(row.label for row in self.tests)
        self.by_label = {label: [row.text for row in shown if row.label == label]
                         for label in self.labels}

    @property
    def num_queries(self) -> int:
        return len(self.tests)

    def query(self, rng: random.Random, order_index: int) -> LabelledText:
        return self.tests[order_index]

    def demos(self, label: str, query: LabelledText, rng: random.Random) -> Iterator[str]:
        return (text for text in _shuffled(self.by_label[label], rng) if text != query.text)


@lru_cache(maxsize=8)
def _domain_texts(corpus: str, domain: str, split: str) -> tuple[str, ...]:
    """The documents of one domain and split of the corpus that are long enough for a snippet."""
    texts = []
    with (Path(corpus) / domain / f"{split}.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            text = json.loads(line)["text"]
            if len(text) >= 40 * _SNIPPET_WORDS[1]:
                texts.append(text)
    return tuple(texts)


class CorpusLabels:
    """Snippets of the embedded corpus labelled by domain (books, code, docs, scripture):
    demonstrations from the train split, queries from the validation split."""

    labels = CORPUS_DOMAINS

    def __init__(self) -> None:
        from acadlm_plugins.defaults.paths import require_default_corpus

        self.corpus = str(require_default_corpus())

    @property
    def num_queries(self) -> int:
        # Queries are random snippets; 4 rounds of the labels keep the samples balanced.
        return 4 * len(self.labels)

    def _snippet(self, rng: random.Random, domain: str, split: str) -> str:
        """A run of 12-40 whole words from a random place of a random document, flattened to
        one line (the first, possibly cut, word is dropped)."""
        text = rng.choice(_domain_texts(self.corpus, domain, split))
        size = rng.randint(*_SNIPPET_WORDS)
        start = rng.randrange(len(text) - 20 * size)
        words = text[start:start + 20 * size].split()[1:]
        while len(words) < size and start > 0:  # sparse text (e.g. code tables): look back
            start = max(start - 20 * size, 0)
            words = text[start:start + 40 * size].split()[1:]
        return " ".join(words[:size])

    @property
    def query_labels(self) -> tuple[str, ...]:
        return tuple(self.labels[i % len(self.labels)] for i in range(self.num_queries))

    def query(self, rng: random.Random, order_index: int) -> LabelledText:
        domain = self.labels[order_index % len(self.labels)]
        return LabelledText(self._snippet(rng, domain, "validation"), domain, "test")

    def demos(self, label: str, query: LabelledText, rng: random.Random) -> Iterator[str]:
        seen = {query.text}
        for _ in range(100_000):
            text = self._snippet(rng, label, "train")
            if text not in seen:
                seen.add(text)
                yield text


def _balanced(source: LabelSource, query: LabelledText,
              rng: random.Random) -> Iterator[tuple[str, str]]:
    """Demonstrations in rounds of one per label (labels in a new random order each round), as
    HELMET balances its many-shot prompts; a label that runs out is skipped."""
    streams = {label: source.demos(label, query, rng) for label in source.labels}
    while streams:
        for label in _shuffled(sorted(streams), rng):
            text = next(streams[label], None)
            if text is None:
                del streams[label]
            else:
                yield text, label


def label_balanced_order(order: Sequence[int], label_of: Callable[[int], str]) -> list[int]:
    """``order`` rearranged in rounds that take, of each label still left, its next item in
    ``order``; within a round the items keep their places in ``order``. The first n items of the
    result have labels as balanced as the items allow, as HELMET's ``balance_labels`` draws its
    test queries when it evaluates fewer than the test split holds."""
    queues: dict[str, list[int]] = {}
    for item in order:
        queues.setdefault(label_of(item), []).append(item)
    place = {item: i for i, item in enumerate(order)}
    arranged: list[int] = []
    for round_number in range(max((len(q) for q in queues.values()), default=0)):
        arranged += sorted((q[round_number] for q in queues.values() if round_number < len(q)),
                           key=place.__getitem__)
    return arranged


def icl_query_order(source: LabelSource, task: str,
                    metadata: Mapping[str, Any]) -> tuple[int, ...]:
    """The queries in the seeded order of :func:`sample_order` (the same at every length),
    balanced by label (:func:`label_balanced_order`)."""
    seed = int_setting(metadata, "seed", DEFAULT_SEED, task=task, minimum=0)
    return _icl_query_order(task, seed, source.query_labels)


@lru_cache(maxsize=64)
def _icl_query_order(task: str, seed: int, labels: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(label_balanced_order(_order(task, seed, len(labels)), labels.__getitem__))


def build_icl_sample(source: LabelSource, metadata: Mapping[str, Any], task: str, key: str,
                     rng: random.Random, length: int, index: int,
                     tokenizer: LengthTokenizer) -> dict[str, Any]:
    """As many labelled demonstrations as fit ``length`` tokens, labels replaced by numbers in a
    per-sample random mapping, then the query; the last demonstration may be cut short. The
    queries come in rounds of one per label (:func:`icl_query_order`), so that the first
    ``num_samples`` are balanced by label, as HELMET balances its test queries; sample i asks
    the same query at every length (a corpus snippet is drawn from a stream of the sample's
    own, not the length's), and only the demonstrations and the label numbers differ."""
    frame = ICL_LAYOUT.frame(metadata, length, tokenizer, task=task)
    order = icl_query_order(source, task, metadata)
    seed = int_setting(metadata, "seed", DEFAULT_SEED, task=task, minimum=0)
    query = source.query(random.Random(f"{task}:{seed}:query:{index}"),
                         order[index % len(order)])
    numbers = list(range(len(source.labels)))
    rng.shuffle(numbers)
    mapping = {label: str(number) for label, number in zip(source.labels, numbers)}
    pool = draw_pool(_balanced(source, query, rng), lambda demo: tokenizer.count(demo[0]) + 5,
                     length, task=task, key=key, what="demonstrations")
    sizes = [len(text.split()) for text, _ in pool]  # words each demonstration can show
    tail = ICL_TAIL.format(text=query.text)

    def render(taken: Taken) -> str:
        demos = [ICL_DEMO.format(text=leading_words(pool[i][0], n), label=mapping[pool[i][1]])
                 for i, n in taken]
        return frame.render(ICL_HEAD + "\n\n".join(demos) + tail)

    fitted, taken = fit_items(render, sizes, tokenizer, frame.budget,
                              task=task, key=key)
    shown = Counter(pool[i][1] for i, _ in taken)
    return frame.row(fitted, outputs=[mapping[query.label]], label=query.label,
                     label_mapping=json.dumps(mapping, sort_keys=True), num_demos=len(taken),
                     demos_per_label=json.dumps(dict(sorted(shown.items()))))


declare_settings("acadlm_icl", {"icl_path": path_check("icl_path")})


def icl_dataset(task: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset of ``acadlm_icl``: ``icl_path`` rows, else domain-labelled corpus snippets."""
    path = data_path(metadata, "icl_path", None, task=task)
    source: LabelSource = FileLabels(load_icl(path, task=task, key="icl_path")) if path \
        else CorpusLabels()
    return build_length_dataset(task, metadata,
                                partial(build_icl_sample, source, metadata, task, "icl_path"))


def parse_label(generation: str, gen_prefix: str = "") -> str:
    """The answer an ICL generation gives, read as HELMET reads it: the answer prefix the
    prompt ended with (``gen_prefix``: "label:" in plain text, none under a chat template) is
    put back in front of the generation (``eval.py``), then ``parse_output(..., "label:")``
    (``load_icl``'s ``post_process``) takes the rest of the line after the first "label:",
    else the first line, dropping a "label:" the model repeats. The whole line is the answer,
    scored by exact match: " 3 (location)" answers "3 (location)", not the label 3."""
    return answer_line(gen_prefix + generation, ICL_LAYOUT.prefix)


# ------------------------------------------------------------------- long documents: QA, summ


class LongDocument:
    """A document cut into whitespace-keeping pieces, with its token count (once measured)."""

    def __init__(self, key: str, text: str) -> None:
        self.key = key
        self.text = text
        self._pieces: list[str] | None = None

    @property
    def pieces(self) -> list[str]:
        if self._pieces is None:
            self._pieces = pieces_of(self.text)
        return self._pieces


_TOKEN_COUNTS: dict[tuple[str, str], int] = {}


def _document_tokens(tokenizer: LengthTokenizer, document: LongDocument) -> int:
    cache_key = (tokenizer.source, document.key)
    if cache_key not in _TOKEN_COUNTS:
        _TOKEN_COUNTS[cache_key] = tokenizer.count(document.text)
    return _TOKEN_COUNTS[cache_key]


def long_enough(documents: Sequence[LongDocument], needed: int, tokenizer: LengthTokenizer,
                order: Sequence[int], want: int) -> list[int]:
    """Indices (in ``order``) of documents of at least ``needed`` tokens, up to ``want`` of them;
    documents of fewer UTF-8 bytes than that are rejected before any tokenization (a token
    covers at least one byte)."""
    found: list[int] = []
    for i in order:
        document = documents[i]
        if len(document.text) * 4 >= needed and len(document.text.encode("utf-8")) >= needed \
                and _document_tokens(tokenizer, document) >= needed:
            found.append(i)
            if len(found) >= want:
                break
    return found


_ELIGIBLE: dict[tuple[Any, ...], list[int]] = {}


def pick_long_document(documents: Sequence[LongDocument], source_key: str, needed: int,
                       metadata: Mapping[str, Any], task: str, key: str, length: int, index: int,
                       tokenizer: LengthTokenizer) -> int:
    """The document of sample ``index``: the seeded order of :func:`sample_order`, the same at
    every length, restricted to documents that can fill ``needed`` tokens (repeating them if
    there are fewer than the samples). When every document fills every length, all lengths ask
    about the same documents; otherwise a longer length skips those too short for it and takes
    the next long-enough ones of the same order."""
    want = int_setting(metadata, "num_samples", DEFAULT_NUM_SAMPLES, task=task)
    cache_key = (task, source_key, tokenizer.source, length, needed,
                 int_setting(metadata, "seed", DEFAULT_SEED, task=task, minimum=0), want)
    if cache_key not in _ELIGIBLE:
        order = sample_order(task, metadata, len(documents))
        _ELIGIBLE[cache_key] = long_enough(documents, needed, tokenizer, order, want)
        if 0 < len(_ELIGIBLE[cache_key]) < want:
            log.warning("%s @ %d: only %d document(s) can fill the prompt; %d samples repeat "
                        "them.", task, length, len(_ELIGIBLE[cache_key]), want)
    eligible = _ELIGIBLE[cache_key]
    if not eligible:
        longest = max(len(d.text) for d in documents)
        raise task_error(task, key, f"no document is long enough for a {length}-token prompt "
                         f"(needs about {needed} tokens; the longest has {longest} characters).",
                         f"Evaluate at shorter lengths, or give longer documents through "
                         f"`{key}`.")
    return eligible[index % len(eligible)]


def fit_document(head: str, tail: str, document: LongDocument, tokenizer: LengthTokenizer,
                 frame: HelmetFrame, *, task: str, key: str) -> FittedPrompt:
    """``head`` + the longest prefix of ``document`` that fits the frame's budget + ``tail``,
    laid out by ``frame`` (a piece holds at least one token, so ``budget + 1`` pieces always
    overflow)."""
    pieces = document.pieces
    return fit_units(lambda n: frame.render(head + "".join(pieces[:n]).strip() + tail),
                     tokenizer, frame.budget, max_units=min(len(pieces), frame.budget + 1),
                     task=task, key=key)


#: Demonstrations of the long-document tasks leave their documents out, as HELMET's do (its
#: NarrativeQA, InfiniteBench and Multi-LexSum demonstrations give a question and its answer, or
#: a summary, from other documents): they show the form of the answer, not the reading.
EXAMPLES_HEAD = "Examples, with the texts they are about left out:\n\n"
EXAMPLES_TAIL = "Now the document to work on.\n\n"
QUESTION_EXAMPLE = "Question: {question}\nAnswer: {answer}\n\n"


def examples_block(entries: Sequence[str]) -> str:
    """The demonstrations of a long-document prompt ("" when there are none)."""
    return EXAMPLES_HEAD + "".join(entries) + EXAMPLES_TAIL if entries else ""


@lru_cache(maxsize=16)
def examples_bound(tokenizer: LengthTokenizer, entries: tuple[str, ...], shots: int) -> int:
    """Tokens that ``shots`` demonstrations drawn from ``entries`` can take at most (those of
    the longest entries): what to leave free when choosing a document long enough."""
    longest = sorted(entries, key=len, reverse=True)[:shots]
    return tokenizer.count(examples_block(longest)) if longest else 0


LONGQA_INTRO = "Below is a long document. Read it, then answer the question that follows it.\n\n"
LONGQA_HEAD = LONGQA_INTRO + "Document:\n"
LONGQA_TAIL = "\n\nQuestion: {question}\nGive a short answer, a few words only."
#: The long-document QA stand-in: HELMET's longqa category (chat template), 32 tokens.
LONGQA_LAYOUT = HelmetLayout("longqa", "Answer:", "\n", 32)
PLAY_HEAD = ("Below is a long excerpt from the plays of Shakespeare: each speech opens with the "
             "name of its speaker on a line of its own. Read it, then answer the question that "
             "follows it.\n\n")
PLAY_TAIL = ("\n\nQuestion: Which character speaks the line \"{line}\"?\nReply with the "
             "character's name only, as the text gives it.")
SPEAKER_TAG = re.compile(r"(?<=\n\n)([A-Z][A-Za-z' .-]{1,30})\.\n(?=[^\n\[])")
_GENERIC_SPEAKER = re.compile(r"^(first|second|third|fourth|fifth|all|both|several|another|"
                              r"some|lords?|servants?|messengers?|citizens?|soldiers?|"
                              r"gentlemen|attendants?|officers?)\b", re.IGNORECASE)


@dataclass(frozen=True)
class SpokenLine:
    """A line of a speech: its speaker's tag and where the speech and the line lie."""

    speaker: str
    line: str
    speech_start: int  # character offset of the speaker tag
    line_end: int  # character offset just past the line


@dataclass(frozen=True)
class PlayText:
    """The embedded Shakespeare plays as one document, with lines that make good questions."""

    document: LongDocument
    piece_ends: tuple[int, ...]  # character offset where each piece ends
    questions: tuple[SpokenLine, ...]


@lru_cache(maxsize=1)
def shakespeare_plays(corpus: str) -> PlayText:
    """Plays of ``corpus/long/books.jsonl`` with their speakers marked (``NAME.`` on a line of
    its own), joined; questions are speech lines of 7+ words that occur once in all the plays,
    spoken by a named character who speaks at least 10 times in the play."""
    texts = []
    with (Path(corpus) / "long" / "books.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if row["id"].startswith("shakespeare/"):
                text = row["text"].replace("\r\n", "\n")
                if len(SPEAKER_TAG.findall(text)) >= 100:
                    texts.append(text.strip())
    text = "\n\n\n".join(texts)
    line_counts = Counter(line.strip() for line in text.split("\n"))
    questions: list[SpokenLine] = []
    for play_start, play in zip(_offsets(texts, 3), texts):
        speakers = Counter(SPEAKER_TAG.findall(play))
        for match in SPEAKER_TAG.finditer(play):
            speaker = match.group(1).strip()
            if speakers[speaker] < 10 or _GENERIC_SPEAKER.match(speaker):
                continue
            end = play.find("\n\n", match.end())
            speech = play[match.end(): end if end >= 0 else len(play)]
            offset = match.end()
            for line in speech.split("\n"):
                stripped = line.strip()
                if (len(stripped.split()) >= 7 and "[" not in stripped and '"' not in stripped
                        and line_counts[stripped] == 1):
                    questions.append(SpokenLine(speaker, stripped, play_start + match.start(),
                                                play_start + offset + len(line)))
                offset += len(line) + 1
    document = LongDocument("shakespeare", text)
    ends, position = [], 0
    for piece in document.pieces:
        position += len(piece)
        ends.append(position)
    return PlayText(document, tuple(ends), tuple(questions))


def _offsets(texts: Sequence[str], gap: int) -> Iterator[int]:
    position = 0
    for text in texts:
        yield position
        position += len(text) + gap


def build_play_question(plays: PlayText, metadata: Mapping[str, Any], task: str,
                        rng: random.Random, length: int, index: int,
                        tokenizer: LengthTokenizer) -> dict[str, Any]:
    """A window of the plays filling ``length`` tokens whose speech holding the quoted line sits
    at the sample's depth; the answer is the speaker's tag."""
    frame = LONGQA_LAYOUT.frame(metadata, length, tokenizer, task=task)
    order = sample_order(task, metadata, len(plays.questions))
    question = plays.questions[order[index % len(order)]]
    depth = depth_setting(metadata, index, rng, task=task, spread=True)
    pieces = plays.document.pieces
    first = bisect.bisect_right(plays.piece_ends, question.speech_start)
    last = bisect.bisect_left(plays.piece_ends, question.line_end)
    span = last - first + 1
    tail = PLAY_TAIL.format(line=question.line)
    demos = pick_demos(plays.questions, num_shots_setting(metadata, task=task), metadata,
                       task=task, item=question.line, key="longqa_path",
                       allowed=lambda other: other.line != question.line)
    head = PLAY_HEAD + examples_block([QUESTION_EXAMPLE.format(
        question=f"Which character speaks the line \"{demo.line}\"?", answer=demo.speaker)
        for demo in demos])

    def window(units: int) -> tuple[int, int]:
        units = max(units, span)
        start = first - round(depth * (units - span))
        start = min(max(start, 0), len(pieces) - units)
        return start, start + units

    def render(units: int) -> str:
        start, stop = window(units)
        return frame.render(head + "".join(pieces[start:stop]).strip() + tail)

    fitted = fit_units(render, tokenizer, frame.budget,
                       max_units=min(len(pieces), frame.budget + 1), task=task,
                       key="longqa_path")
    start, stop = window(fitted.num_words)
    return frame.row(fitted, outputs=[question.speaker], depth=depth,
                     question=f"Which character speaks the line \"{question.line}\"?",
                     evidence_position=(first - start) / max(stop - start, 1),
                     demo_ids=json.dumps([demo.line for demo in demos]))


def build_document_question(records: Sequence[DocumentQA], documents: Sequence[LongDocument],
                            metadata: Mapping[str, Any], task: str, rng: random.Random,
                            length: int, index: int,
                            tokenizer: LengthTokenizer) -> dict[str, Any]:
    """A user question over the start of its document, cut to fill ``length`` tokens, after
    ``num_shots`` questions and answers about other documents."""
    frame = LONGQA_LAYOUT.frame(metadata, length, tokenizer, task=task)
    shots = num_shots_setting(metadata, task=task)
    entries = tuple(QUESTION_EXAMPLE.format(question=r.question, answer=r.answers[0])
                    for r in records)
    needed = (frame.budget - _frame_tokens(tokenizer, frame, tuple(r.question for r in records))
              - examples_bound(tokenizer, entries, shots))
    chosen = pick_long_document(documents, documents[0].key, needed, metadata, task,
                                "longqa_path", length, index, tokenizer)
    record = records[chosen]
    demos = pick_demos(range(len(records)), shots, metadata, task=task, item=record.id,
                       key="longqa_path",
                       allowed=lambda j: records[j].document != record.document)
    head = LONGQA_INTRO + examples_block([entries[j] for j in demos]) + "Document:\n"
    fitted = fit_document(head, LONGQA_TAIL.format(question=record.question),
                          documents[chosen], tokenizer, frame, task=task, key="longqa_path")
    return frame.row(fitted, outputs=list(record.answers), document_id=record.id,
                     question=record.question, depth=-1.0, evidence_position=-1.0,
                     demo_ids=json.dumps([records[j].id for j in demos]))


@lru_cache(maxsize=8)
def _frame_tokens(tokenizer: LengthTokenizer, frame: HelmetFrame,
                  questions: tuple[str, ...]) -> int:
    """Tokens of the long-document QA template around the document, laid out by ``frame``, for
    its longest question."""
    longest = max(questions, key=len)
    return tokenizer.count(frame.render(LONGQA_HEAD + LONGQA_TAIL.format(question=longest)))


declare_settings("acadlm_longqa", {"longqa_path": path_check("longqa_path")})


def longqa_dataset(task: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset of ``acadlm_longqa``: ``longqa_path`` rows, else speaker questions over the
    Shakespeare plays of the embedded corpus."""
    path = data_path(metadata, "longqa_path", None, task=task)
    if path is None:
        from acadlm_plugins.defaults.paths import require_default_corpus

        plays = shakespeare_plays(str(require_default_corpus()))
        builder = partial(build_play_question, plays, metadata, task)
    else:
        records = load_longqa(path, task=task, key="longqa_path")
        stamp = file_stamp(path)
        documents = [LongDocument(f"{stamp}:{i}", r.document) for i, r in enumerate(records)]
        builder = partial(build_document_question, records, documents, metadata, task)
    return build_length_dataset(task, metadata, judged_builder(task, LONGQA, metadata, builder))


@dataclass(frozen=True)
class SummaryStyle:
    """The template of a summarization prompt: ``intro``, demonstrations, ``label``, the
    document, then the answer prefix ``answer`` (which also opens each demonstration's
    summary)."""

    intro: str
    label: str
    answer: str

    def head(self, demos: Sequence[str]) -> str:
        """Everything before the document, with the demonstration summaries ``demos``."""
        return (self.intro + examples_block([f"{self.answer} {summary}\n\n" for summary in demos])
                + self.label)

    @property
    def layout(self) -> HelmetLayout:
        """HELMET's summ category (chat template), the answer prefix after a blank line, 200
        tokens to generate (the task YAML's)."""
        return HelmetLayout("summ", self.answer, "\n\n", 200)


SUMM_STYLE = SummaryStyle(
    intro=("Below is a long document. Read it, then write a short summary of it: one or two "
           "sentences.\n\n"), label="Document:\n", answer="Summary:")
CODE_STYLE = SummaryStyle(
    intro=("Below is the source code of a Python module whose opening docstring has been "
           "removed. Read it, then write the first paragraph of that docstring: one or two "
           "sentences saying what the module is for.\n\n"), label="",
    answer="First paragraph of the module's docstring:")


def strip_docstring(source: str) -> tuple[str, str] | None:
    """``source`` without its module docstring, and that docstring's first paragraph (whitespace
    squeezed); None if there is no usable docstring (fewer than 4 words, or restated verbatim
    elsewhere in the module).

    Only the head of the module is tokenized (the docstring is its first statement), which keeps
    reading the whole standard library fast.
    """
    docstring = None
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING):
                continue
            if docstring is None and token.type == tokenize.STRING:
                docstring = token
                continue
            if docstring is None or token.type not in (tokenize.NEWLINE, tokenize.ENDMARKER):
                return None
            break
    except (tokenize.TokenError, SyntaxError):
        return None
    if docstring is None:
        return None
    try:
        value = ast.literal_eval(docstring.string)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(value, str):
        return None
    first = " ".join(inspect.cleandoc(value).split("\n\n")[0].split())
    if len(first.split()) < 4:
        return None
    lines = source.split("\n")
    rest = "\n".join(lines[: docstring.start[0] - 1] + lines[docstring.end[0]:]).strip("\n")
    if first in " ".join(rest.split()):
        return None
    return rest, first


@lru_cache(maxsize=1)
def stdlib_summaries(corpus: str) -> tuple[tuple[DocumentSummary, ...], tuple[LongDocument, ...]]:
    """Standard-library modules of the embedded corpus (code domain, both splits) and packages
    (``long/code_packages.jsonl``, summarized by their ``__init__`` docstring)."""
    records: list[DocumentSummary] = []
    root = Path(corpus)
    for name in ("code/train.jsonl", "code/validation.jsonl"):
        with (root / name).open(encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                stripped = strip_docstring(row["text"])
                if stripped:
                    records.append(DocumentSummary(row["id"], stripped[0], (stripped[1],)))
    packages = root / "long" / "code_packages.jsonl"
    if packages.is_file():
        with packages.open(encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                record = _package_summary(row["id"], row["text"])
                if record:
                    records.append(record)
    # Generated modules share one formulaic docstring (e.g. ~100 "Python Character Mapping
    # Codec ..." encodings); keep two of each so that they do not crowd out the rest.
    openings = Counter(" ".join(r.summaries[0].split()[:4]) for r in records)
    kept, seen = [], Counter[str]()
    for record in records:
        opening = " ".join(record.summaries[0].split()[:4])
        seen[opening] += 1
        if openings[opening] <= 2 or seen[opening] <= 2:
            kept.append(record)
    documents = tuple(LongDocument(f"stdlib:{r.id}", r.document) for r in kept)
    return tuple(kept), documents


def _package_summary(package_id: str, text: str) -> DocumentSummary | None:
    """A package (files joined under ``# file: <path>`` headers) with the docstring of its
    ``__init__.py`` removed."""
    parts = re.split(r"(?m)^(# file: .*\n)", text)
    for i in range(1, len(parts) - 1, 2):
        if parts[i].rstrip().endswith("/__init__.py"):
            stripped = strip_docstring(parts[i + 1])
            if stripped is None:
                return None
            body = parts[:i + 1] + [stripped[0] + "\n\n"] + parts[i + 2:]
            rest = "".join(body)
            if stripped[1] in " ".join(rest.split()):
                return None
            return DocumentSummary(package_id, rest, (stripped[1],))
    return None


def build_summary_sample(records: Sequence[DocumentSummary], documents: Sequence[LongDocument],
                         style: SummaryStyle, source_key: str, metadata: Mapping[str, Any],
                         task: str, rng: random.Random, length: int, index: int,
                         tokenizer: LengthTokenizer) -> dict[str, Any]:
    """A document long enough to fill ``length`` tokens, cut to fit, with its references, after
    ``num_shots`` summaries of other documents."""
    frame = style.layout.frame(metadata, length, tokenizer, task=task)
    shots = num_shots_setting(metadata, task=task)
    summaries = tuple(f"{style.answer} {r.summaries[0]}\n\n" for r in records)
    needed = (frame.budget - tokenizer.count(frame.render(style.head([])))
              - examples_bound(tokenizer, summaries, shots))
    chosen = pick_long_document(documents, source_key, needed, metadata, task, "summ_path",
                                length, index, tokenizer)
    record = records[chosen]
    demos = pick_demos(range(len(records)), shots, metadata, task=task, item=record.id,
                       key="summ_path", allowed=lambda j: records[j].document != record.document
                       and records[j].summaries[0] != record.summaries[0])
    fitted = fit_document(style.head([records[j].summaries[0] for j in demos]), "",
                          documents[chosen], tokenizer, frame, task=task, key="summ_path")
    return frame.row(fitted, outputs=list(record.summaries), document_id=record.id,
                     demo_ids=json.dumps([records[j].id for j in demos]))


declare_settings("acadlm_summ", {"summ_path": path_check("summ_path")})


def summ_dataset(task: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset of ``acadlm_summ``: ``summ_path`` rows, else standard-library modules."""
    path = data_path(metadata, "summ_path", None, task=task)
    if path is None:
        from acadlm_plugins.defaults.paths import require_default_corpus

        records, documents = stdlib_summaries(str(require_default_corpus()))
        builder = partial(build_summary_sample, records, documents, CODE_STYLE, "stdlib",
                          metadata, task)
    else:
        records = load_summ(path, task=task, key="summ_path")
        stamp = file_stamp(path)
        documents = tuple(LongDocument(f"{stamp}:{i}", r.document) for i, r in enumerate(records))
        builder = partial(build_summary_sample, records, documents, SUMM_STYLE, str(stamp),
                          metadata, task)
    return build_length_dataset(task, metadata, judged_builder(task, SUMM, metadata, builder))


# --------------------------------------------------------------- citations: ALCE (`cite`)


@dataclass(frozen=True)
class AlceItem:
    """A question of ALCE (Gao et al. 2023) with its retrieved passages, in retrieval order.

    ``answer_sets`` holds, for ASQA, the acceptable short answers of each sub-question of the
    ambiguous question and, for QAMPARI, the aliases of each answer of the list.
    """

    id: str
    question: str
    answer_sets: tuple[tuple[str, ...], ...]
    docs: tuple[Passage, ...]
    answer: str  # what a demonstration answers: ASQA's long answer, QAMPARI's list


@dataclass(frozen=True)
class AlceDataset:
    """What differs between ASQA and QAMPARI: keys, ALCE's file, instruction and metrics."""

    name: str
    key: str  # metadata key of the data file
    demo_key: str  # metadata key of a prompt file with hand-written demonstrations
    file: str  # the data file HELMET's cite config reads (data/alce/ of its download)
    prompt_file: str  # the prompt file HELMET's cite config reads (its prompts/ folder)
    instruction: str
    extra_metrics: tuple[str, ...]  # reported next to the main one, per length


# HELMET's configs/cite.yaml reads data/alce/{asqa,qampari}_eval_gtr_top2000.json with
# prompts/{asqa,qampari}_revised.json; the instructions below say in our words what the revised
# ones ask (the prompt file's own instruction replaces them when it is given).
ASQA = AlceDataset(
    name="asqa", key="asqa_path", demo_key="asqa_demo_path", file="asqa_eval_gtr_top2000.json",
    prompt_file="prompts/asqa_revised.json",
    instruction=("Instruction: Write an accurate, engaging and concise answer to the question "
                 "below in a neutral, journalistic tone, using only the search results given "
                 "(some may be irrelevant). Cite them for every factual claim: the ID of a "
                 "supporting result in square brackets, like [1], or several, like [1][2]. Cite "
                 "one to three results per sentence, as few as suffice."),
    extra_metrics=("str_hit",))
QAMPARI = AlceDataset(
    name="qampari", key="qampari_path", demo_key="qampari_demo_path",
    file="qampari_eval_gtr_top2000.json", prompt_file="prompts/qampari_revised.json",
    instruction=("Instruction: Give a list of accurate answers to the question below, separated "
                 "by commas, using only the search results given (some may be irrelevant). Cite "
                 "exactly one result for each answer: its ID in square brackets, like [1], after "
                 "the answer. If there are more than 5 answers, give at least 5."),
    extra_metrics=("qampari_prec", "qampari_rec", "qampari_f1", "qampari_f1_top5"))
ALCE_DATASETS = {dataset.name: dataset for dataset in (ASQA, QAMPARI)}
# Read by cite_dataset (its data and prompt files) and nli_model_setting.
declare_settings("the cite tasks", {
    **{key: path_check(key) for dataset in ALCE_DATASETS.values()
       for key in (dataset.key, dataset.demo_key)},
    "nli_model_path": text_check("nli_model_path")})
#: Citation metrics, computed only with an NLI model (``nli_model_path``).
CITATION_METRICS = ("citation_rec", "citation_prec")
#: Passages shown with each demonstration drawn from the data (ALCE's demonstrations have 5).
ALCE_DEMO_DOCS = 5
#: The question asked, as HELMET's ``load_alce`` writes it whatever the prompt file (its
#: ``user_template``); ``Answer:`` follows after a blank line (:data:`CITE_LAYOUT`).
ALCE_QUESTION = "{instruction}\n\nQuestion: {question}\n\n{documents}"
#: cite.yaml: the chat template, 300 tokens to generate, "Answer:" after a blank line.
CITE_LAYOUT = HelmetLayout("cite", "Answer:", "\n\n", 300)
#: A passage's title clause, left out for a passage without a title (ALCE's passages all have
#: one), as HELMET's re-ranking template does for untitled passages.
ALCE_TITLE_CLAUSE = "(Title: {title})"


@dataclass(frozen=True)
class AlceLayout:
    """How ALCE's prompt files lay out demonstrations and passages, field by field:
    ``demo_prompt`` is one answered demonstration (``{instruction}``, ``{question}``,
    ``{context}``: its passages, ``{answer}``), ``doc_prompt`` one passage (``{ID}``: its number
    from 1, ``{title}``, ``{text}``), ``demo_sep`` what follows each demonstration. The templates
    are held in these names (HELMET's); :func:`alce_layout` renames ALCE's own.

    HELMET's ``load_alce`` fills demonstrations from the prompt file's ``demo_prompt`` and
    every passage (the demonstrations' and the question's) from its ``doc_prompt``; the files
    differ (QAMPARI's demonstration puts ``Answer:`` on the line after its passages, ASQA's
    after a blank line), so the layout is read from the file, with :data:`ALCE_LAYOUT` for a field
    the file lacks and for demonstrations drawn from the data. HELMET joins the
    demonstrations with two blank lines, the ``demo_sep`` of both of its files; ALCE reads
    ``demo_sep``, and so do we.

    A file written for ALCE's own ``run.py`` (its ``prompts/*_default.json``) is rendered as
    ``run.py`` renders it, which differs from HELMET's ``load_alce`` in two ways, each kept
    where the file's field uses ALCE's names: ``doc_sep`` is what joins the passages (HELMET
    puts a blank line between them; ALCE nothing, its ``doc_prompt`` ending in a line break),
    and ``answer_glued`` puts the answer right after the text before ``{answer}``, stripped of
    trailing white space (ALCE's ``make_demo``: ``Answer: {A}`` becomes ``Answer:`` and the
    answer, with no space). In both, the demonstrations' passage titles and texts go in as the
    file writes them, as HELMET's ``load_alce`` and ALCE's ``make_doc_prompt`` put them in (the
    QAMPARI demonstrations have a title ending in a space).
    """

    demo_prompt: str
    doc_prompt: str
    demo_sep: str
    doc_sep: str = "\n\n"
    answer_glued: bool = False

    def passage(self, number: int, passage: Passage) -> str:
        """Passage ``number`` (from 1) in ``doc_prompt``; without a title, without the title
        clause where ``doc_prompt`` has ALCE's."""
        template = self.doc_prompt
        if not passage.title:
            template = template.replace(ALCE_TITLE_CLAUSE, "")
        return template.format(ID=number, title=passage.title, text=passage.text)

    def documents(self, passages: Sequence[Passage]) -> str:
        """``passages`` numbered from 1, joined by ``doc_sep`` (HELMET: a blank line apart)."""
        return self.doc_sep.join(self.passage(i + 1, p) for i, p in enumerate(passages))

    def question_documents(self, passages: Sequence[Passage]) -> str:
        """The question's passages for :data:`ALCE_QUESTION`, which puts a blank line before
        ``Answer:``: :meth:`documents` without the line break ALCE's ``doc_prompt`` ends the last
        one with, so that the prompt ends with the last passage, one blank line and ``Answer:``,
        as ALCE's test prompt (``{D}``, a line break, ``Answer:``) does, not two blank lines."""
        documents = self.documents(passages)
        return documents.removesuffix("\n") if self.doc_sep == "" else documents

    def demo(self, instruction: str, demo: AlceItem) -> str:
        """One answered demonstration in ``demo_prompt`` (``answer_glued``: as ALCE's
        ``make_demo`` writes it)."""
        fields = {"instruction": instruction, "question": demo.question,
                  "context": self.documents(demo.docs)}
        if self.answer_glued:
            return self.demo_prompt.format(**fields, answer="").rstrip() + demo.answer
        return self.demo_prompt.format(**fields, answer=demo.answer)

    def demo_text(self, instruction: str, demos: Sequence[AlceItem]) -> str:
        """The demonstrations as HELMET lays them out: each a whole answered prompt
        (``demo_prompt``) followed by ``demo_sep``."""
        return "".join(self.demo(instruction, demo) + self.demo_sep for demo in demos)


#: The layout of HELMET's ``prompts/asqa_revised.json``: what demonstrations drawn from the data
#: use, and any field a prompt file leaves out.
ALCE_LAYOUT = AlceLayout(
    demo_prompt="{instruction}\n\nQuestion: {question}\n\n{context}\n\nAnswer: {answer}",
    doc_prompt="Document [{ID}]" + ALCE_TITLE_CLAUSE + ": {text}", demo_sep="\n\n\n")


@dataclass(frozen=True)
class AlcePrompts:
    """What an ALCE prompt file gives: the instruction, the hand-written demonstrations and
    their layout."""

    instruction: str
    demos: tuple[AlceItem, ...]
    layout: AlceLayout


def _alce_error(task: str, key: str, where: str, problem: str, example: str) -> Exception:
    return task_error(task, key, f"{where}: {problem}", f"Give ALCE's own file, whose items "
                      f"look like {example} (a JSON list, or one object per line).")


def _alce_passages(value: Any, fail: Callable[[str], Exception]) -> tuple[Passage, ...]:
    """The passages of an item's ``docs``, checked; each title and text as written (HELMET's
    ``load_alce`` and ALCE's ``make_doc_prompt`` put them in verbatim)."""
    if not isinstance(value, list) or not value:
        raise fail("field `docs` must be a non-empty list of {\"title\", \"text\"} objects.")
    passages = []
    for i, doc in enumerate(value):
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str) \
                or not doc["text"].strip():
            raise fail(f"field `docs[{i}].text` must be a non-empty string.")
        passages.append(Passage(doc["text"], str(doc.get("title") or "")))
    return tuple(passages)


def _string_lists(value: Any) -> tuple[tuple[str, ...], ...] | None:
    """A list of non-empty lists of non-empty strings, or None if ``value`` is not one."""
    if not isinstance(value, list) or not value:
        return None
    groups = []
    for group in value:
        group = [group] if isinstance(group, str) else group
        if not isinstance(group, list) or not group or not all(
                isinstance(alias, str) and alias.strip() for alias in group):
            return None
        groups.append(tuple(alias.strip() for alias in group))
    return tuple(groups)


def parse_alce_item(row: Mapping[str, Any], dataset: AlceDataset, *, task: str, key: str,
                    where: str, number: int) -> AlceItem:
    """One item of ALCE's ASQA or QAMPARI file, checked; errors name the file and the item."""
    example = ('{"question": "...", "qa_pairs": [{"short_answers": ["..."]}], "answer": "...", '
               '"docs": [{"title": "...", "text": "..."}]}' if dataset is ASQA else
               '{"id": "...", "question": "...", "answers": [["...", "alias"]], '
               '"docs": [{"title": "...", "text": "..."}]}')

    def fail(problem: str) -> Exception:
        return _alce_error(task, key, where, problem, example)

    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise fail("field `question` must be a non-empty string.")
    docs = _alce_passages(row.get("docs"), fail)
    if dataset is ASQA:
        pairs = row.get("qa_pairs")
        sets = _string_lists([pair.get("short_answers") for pair in pairs]) \
            if isinstance(pairs, list) and all(isinstance(p, dict) for p in pairs) else None
        if sets is None:
            raise fail("field `qa_pairs` must be a non-empty list of objects whose "
                       "`short_answers` are non-empty lists of strings.")
        answer = row.get("answer")
        if not isinstance(answer, str) or not answer.strip():
            notes = row.get("annotations")
            answer = notes[0].get("long_answer") if isinstance(notes, list) and notes and \
                isinstance(notes[0], dict) else None
        if not isinstance(answer, str) or not answer.strip():
            answer = " ".join(f"{group[0]}." for group in sets)
    else:
        sets = _string_lists(row.get("answers"))
        if sets is None:
            raise fail("field `answers` must be a non-empty list of alias lists, e.g. "
                       "[[\"Paris\"], [\"Rome\", \"Roma\"]].")
        answer = ", ".join(group[0] for group in sets) + "."
    item_id = row.get("sample_id", row.get("id", f"item{number}"))
    return AlceItem(str(item_id), question, sets, docs, " ".join(answer.split()))


def _alce_rows(path: Path, *, task: str, key: str) -> Iterator[tuple[str, int, Any]]:
    """(where, number, row) for every item of an ALCE file: a JSON list (ALCE's release), an
    object holding it under ``data``, or one object per line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        check_utf8_file(path, task=task, key=key)  # names the line of the byte
        raise
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError:  # one object per line: read (and checked) line by line
        for number, row in iter_json_objects(path, task=task, key=key,
                                             example='{"question": "...", "docs": [...]}'):
            yield f"{path}:{number}", number, row
        return
    rows = loaded.get("data") if isinstance(loaded, dict) else loaded
    if isinstance(loaded, dict) and not isinstance(rows, list):
        rows = [loaded]  # a one-line jsonl file
    if not isinstance(rows, list):
        raise task_error(task, key, f"{path} holds a JSON {type(loaded).__name__}, not a list of "
                         "items.", "Give ALCE's file as released (a JSON list of items).")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise task_error(task, key, f"{path} item {number} is not a JSON object.",
                             "Give ALCE's file as released (a JSON list of items).")
        yield f"{path} item {number}", number, row


@lru_cache(maxsize=8)
def _load_alce(stamp: tuple[str, int, int], name: str, task: str,
               key: str) -> tuple[AlceItem, ...]:
    dataset = ALCE_DATASETS[name]
    items = tuple(parse_alce_item(row, dataset, task=task, key=key, where=where, number=number)
                  for where, number, row in _alce_rows(Path(stamp[0]), task=task, key=key))
    if not items:
        raise task_error(task, key, f"{stamp[0]} has no items.", "Give ALCE's file as released.")
    return items


def load_alce(path: Path, dataset: AlceDataset, *, task: str, key: str) -> tuple[AlceItem, ...]:
    """The items of an ALCE ASQA or QAMPARI file (ALCE's own JSON format), checked once."""
    return _load_alce(file_stamp(path), dataset.name, task, key)


def load_alce_prompts(path: Path, dataset: AlceDataset, *, task: str) -> AlcePrompts:
    """The instruction, hand-written demonstrations and layout of an ALCE-format prompt file
    (HELMET's ``prompts/asqa_revised.json`` and ``qampari_revised.json``, or ALCE's own
    ``prompts/*_default.json``: ``instruction``, ``demos`` with ``question``, ``answer`` and
    ``docs``, and :class:`AlceLayout`'s ``demo_prompt``, ``doc_prompt`` and ``demo_sep``, the
    templates in HELMET's placeholder names or ALCE's: :func:`alce_layout`), whose answers carry
    citations as ALCE expects them."""
    key = dataset.demo_key
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise task_error(task, key, f"{path} is not valid JSON ({err.msg} at line {err.lineno}).",
                         "Give one of ALCE's prompt files (prompts/*.json).") from None
    instruction = loaded.get("instruction") if isinstance(loaded, dict) else None
    demos = loaded.get("demos") if isinstance(loaded, dict) else None
    if not isinstance(instruction, str) or not isinstance(demos, list) or not demos:
        raise task_error(task, key, f"{path} lacks an `instruction` string or a `demos` list.",
                         "Give one of ALCE's prompt files (prompts/*.json).")
    layout = alce_layout(loaded, path, task=task, key=key)
    items = []
    for number, demo in enumerate(demos, start=1):
        where = f"{path} demo {number}"
        answer = demo.get("answer") if isinstance(demo, dict) else None
        question = demo.get("question") if isinstance(demo, dict) else None
        if not isinstance(answer, str) or not isinstance(question, str):
            raise task_error(task, key, f"{where}: needs `question` and `answer` strings.",
                             "Give one of ALCE's prompt files (prompts/*.json).")
        docs = _alce_passages(demo.get("docs"), lambda problem, where=where: task_error(
            task, key, f"{where}: {problem}", "Give one of ALCE's prompt files."))
        items.append(AlceItem(f"demo{number}", question, (), docs, answer))
    return AlcePrompts(instruction, tuple(items), layout)


#: The placeholders each template of a prompt file may use: HELMET's names (its
#: ``prompts/*_revised.json`` and ``load_alce``), or ALCE's (its ``prompts/*_default.json`` and
#: ``run.py``), each of ALCE's mapped to HELMET's; a template uses one set or the other.
ALCE_PLACEHOLDERS: dict[str, dict[str, str]] = {
    "demo_prompt": {"INST": "instruction", "Q": "question", "D": "context", "A": "answer"},
    "doc_prompt": {"ID": "ID", "T": "title", "P": "text"},
}


def _placeholders(template: str) -> set[str] | None:
    """The placeholder names of a ``str.format`` template, or None if it is not one."""
    try:
        return {field for _, field, _, _ in string.Formatter().parse(template)
                if field is not None}
    except ValueError:
        return None


def _renamed(template: str, names: Mapping[str, str]) -> str:
    """``template`` with its placeholders renamed by ``names`` (braces of its text kept)."""
    parts = []
    for text, field, spec, conversion in string.Formatter().parse(template):
        parts.append(text.replace("{", "{{").replace("}", "}}"))
        if field is not None:
            parts.append("{" + names[field] + (f"!{conversion}" if conversion else "")
                         + (f":{spec}" if spec else "") + "}")
    return "".join(parts)


def _placeholder_list(names: Iterable[str]) -> str:
    return ", ".join("{" + name + "}" for name in names)


def alce_layout(loaded: Mapping[str, Any], path: Path, *, task: str, key: str) -> AlceLayout:
    """The :class:`AlceLayout` of a prompt file's fields (:data:`ALCE_LAYOUT`'s for those it
    lacks), each checked to be a string, the templates using either HELMET's placeholders or
    ALCE's (:data:`ALCE_PLACEHOLDERS`), so that a wrong file stops before any prompt is built.
    A template in ALCE's names is renamed to HELMET's and rendered as ALCE's ``run.py`` does
    (:class:`AlceLayout`: passages joined by nothing and put in verbatim, the answer glued to
    ``Answer:``)."""
    fields: dict[str, Any] = {}
    for name in ("demo_prompt", "doc_prompt", "demo_sep"):
        value = loaded.get(name, getattr(ALCE_LAYOUT, name))
        if not isinstance(value, str):
            raise task_error(task, key, f"{path}: `{name}` must be a string.",
                             f"Write `{name}` as a JSON string.")
        fields[name] = value
        alce_names = ALCE_PLACEHOLDERS.get(name)
        if alce_names is None:
            continue  # demo_sep is written as it is (never formatted): any text will do.
        helmet_names = list(alce_names.values())
        used = _placeholders(value)
        if used is not None and used <= set(helmet_names):
            continue
        if used is not None and used <= set(alce_names):
            fields[name] = _renamed(value, alce_names)
            if name == "doc_prompt":
                fields["doc_sep"] = ""
            else:
                fields["answer_glued"] = True
            continue
        raise task_error(
            task, key, f"{path}: `{name}` must be a string whose placeholders are HELMET's "
            f"({_placeholder_list(helmet_names)}) or ALCE's ({_placeholder_list(alce_names)}), "
            "one set or the other, with any other brace doubled.",
            f"Write `{name}` with those placeholders only (HELMET's prompts/*_revised.json use "
            "the first set, ALCE's prompts/*_default.json the second).")
    return AlceLayout(**fields)


def build_cite_sample(dataset: AlceDataset, items: Sequence[AlceItem],
                      demo_pool: Sequence[AlceItem], instruction: str, nli_model: str,
                      metadata: Mapping[str, Any], task: str, rng: random.Random, length: int,
                      index: int, tokenizer: LengthTokenizer, *,
                      every_item: Sequence[AlceItem] = (),
                      layout: AlceLayout = ALCE_LAYOUT) -> dict[str, Any]:
    """A question of ``items`` with as many passages as fit ``length`` tokens, in retrieval
    order (ALCE and HELMET vary the number of passages with the length): the item's own, then
    those of ``every_item`` (default ``items``) and extra passages if they run out. The last one
    may be cut; citations number them from 1. Demonstrations and passages are laid out by
    ``layout`` (the prompt file's)."""
    item = items[sample_order(task, metadata, len(items))[index % len(items)]]
    frame = CITE_LAYOUT.frame(metadata, length, tokenizer, task=task)
    demos = pick_demos(demo_pool, num_shots_setting(metadata, task=task), metadata, task=task,
                       item=item.id, key=dataset.key,
                       allowed=lambda demo: demo.question.split() != item.question.split())
    demo_text = layout.demo_text(instruction, demos)

    def stream() -> Iterator[tuple[str, Passage]]:
        yield from (("retrieved", p) for p in item.docs)
        others = [p for other in every_item or items if other is not item for p in other.docs]
        yield from (("other_question", p) for p in _shuffled(others, rng))
        yield from _extra_stream(metadata, rng, task=task)

    pool = draw_pool(stream(), lambda entry: _passage_tokens(tokenizer, entry[1]), length,
                     task=task, key=dataset.key, what="passages", more=EXTRA_HINT)
    sizes = [len(entry[1].text.split()) for entry in pool]  # words each passage can show

    def shown(taken: Taken) -> list[Passage]:
        return [Passage(leading_words(pool[i][1].text, n), pool[i][1].title) for i, n in taken]

    def render(taken: Taken) -> str:
        return frame.render(demo_text + ALCE_QUESTION.format(
            instruction=instruction, question=item.question,
            documents=layout.question_documents(shown(taken))))

    # Passages are shown in retrieval order; to land within 1% of the length, fit_items may
    # exchange the last whole one for a later one (never one of the question's own retrieved
    # passages; only the last one shown is cut).
    fitted, taken = fit_items(render, sizes, tokenizer, frame.budget,
                              task=task, key=dataset.key, keep=len(item.docs))
    passages = shown(taken)
    row = frame.row(fitted, outputs=[group[0] for group in item.answer_sets],
                    answer_sets=[list(group) for group in item.answer_sets],
                    oracle_answer=", ".join(group[0] for group in item.answer_sets) + ".",
                    question_id=item.id, question=item.question, alce_dataset=dataset.name,
                    num_passages=len(passages),
                    num_retrieved=sum(pool[i][0] == "retrieved" for i, _ in taken),
                    nli_model_path=nli_model, demo_ids=json.dumps([demo.id for demo in demos]))
    if nli_model:
        row["passages"] = json.dumps([[p.title, p.text] for p in passages])
    return row


def _alce_file(metadata: Mapping[str, Any], key: str, *, task: str, what: str) -> Path:
    """The local file named by ``key``: ALCE's data is not shipped and nothing is downloaded,
    so an unset or missing file stops the task with where to get it."""
    value = metadata.get(key)
    fix = (f"ALCE's data is not shipped with acadlm-plugins and is never downloaded. On a machine "
           f"with network access get {what} (github.com/princeton-nlp/HELMET: data/alce/ "
           "comes with `bash scripts/download_data.sh`, prompts/ with the repository; ALCE's own "
           "`bash download_data.sh` in github.com/princeton-nlp/ALCE gives its shorter "
           "*_gtr_top100.json files and prompts/*_default.json), copy it here and pass "
           f"--metadata '{{\"{key}\": \"/path/to/file\"}}'.")
    if not value:
        raise task_error(task, key, f"no file given; this task needs {what}.", fix)
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise task_error(task, key, f"{path} does not exist.", fix)
    return path


def nli_model_setting(metadata: Mapping[str, Any], *, task: str) -> str:
    """``nli_model_path`` of the metadata ("" when unset): a registered judge's name or a local
    model directory, checked before any prompt is built."""
    value = str(metadata.get("nli_model_path") or "")
    if value and value not in ENTAILMENT_JUDGES and not Path(value).expanduser().is_dir():
        raise task_error(task, "nli_model_path", f"{value} is not a local model directory.",
                         "Point it at a downloaded NLI model (ALCE uses "
                         "google/t5_xxl_true_nli_mixture), or leave it unset to skip citation "
                         "scoring.")
    return value


def cite_dataset(task: str, dataset: AlceDataset, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset of ``acadlm_cite_<name>``: ALCE's items from the file named by
    ``<name>_path`` (HELMET's ``*_eval_gtr_top2000.json``), with demonstrations from the prompt
    file named by ``<name>_demo_path`` (HELMET's ``prompts/*_revised.json``) or, without one,
    from a held-out part of the file (answers without citations, so give the prompt file when
    citations are scored)."""
    path = _alce_file(metadata, dataset.key, task=task, what=f"HELMET's {dataset.file}")
    items = load_alce(path, dataset, task=task, key=dataset.key)
    shots = num_shots_setting(metadata, task=task)
    instruction, layout = dataset.instruction, ALCE_LAYOUT
    if shots and metadata.get(dataset.demo_key):
        demo_path = _alce_file(metadata, dataset.demo_key, task=task,
                               what=f"HELMET's {dataset.prompt_file}")
        prompts = load_alce_prompts(demo_path, dataset, task=task)
        instruction, pool, layout = prompts.instruction, prompts.demos, prompts.layout
        asked: Sequence[AlceItem] = items
    else:
        kept, held = hold_out_demos(task, metadata, len(items), shots, key=dataset.key)
        asked = [items[i] for i in kept]
        pool = tuple(AlceItem(items[i].id, items[i].question, items[i].answer_sets,
                              items[i].docs[:ALCE_DEMO_DOCS], items[i].answer) for i in held)
    nli_model = nli_model_setting(metadata, task=task)
    if not nli_model:
        log.warning("%s: %s are not computed (reported as absent, not 0): they need an NLI "
                    "model. Give a local copy of one (ALCE uses google/t5_xxl_true_nli_mixture) "
                    "through --metadata nli_model_path, or register a judge with "
                    "acadlm_plugins.evaluation.helmet.register_entailment_judge.", task,
                    " and ".join(CITATION_METRICS))
    return build_length_dataset(task, metadata, partial(
        build_cite_sample, dataset, asked, pool, instruction, nli_model, metadata, task,
        every_item=items, layout=layout))


#: Entailment judges for citation scoring, by the ``nli_model_path`` value that selects them.
#: This is the hook for other NLI backends (an OpenAI-compatible judge, a test double):
#: register a callable ``(premise, hypothesis) -> bool`` under a name and give that name as
#: ``nli_model_path``. A local directory not registered is loaded on first use.
ENTAILMENT_JUDGES: dict[str, Entails] = {}


def register_entailment_judge(name: str, judge: Entails) -> None:
    """Make ``judge`` the entailment model that ``nli_model_path=name`` selects."""
    ENTAILMENT_JUDGES[name] = judge


def entailment_judge(name: str) -> Entails:
    """The judge registered as ``name``, else a TRUE-style NLI model loaded from the local
    directory ``name`` (and registered)."""
    if name not in ENTAILMENT_JUDGES:
        ENTAILMENT_JUDGES[name] = load_true_nli(Path(name).expanduser())
    return ENTAILMENT_JUDGES[name]


def load_true_nli(path: Path) -> Entails:
    """An entailment judge from a local sequence-to-sequence NLI model in the TRUE format
    (Honovich et al. 2022), as ALCE uses ``google/t5_xxl_true_nli_mixture``: the input is
    "premise: ... hypothesis: ...", and the answer "1" means entailed."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(str(path), local_files_only=True).to(
        device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval()

    def entails(premise: str, hypothesis: str) -> bool:
        ids = tokenizer(f"premise: {premise} hypothesis: {hypothesis}",
                        return_tensors="pt").input_ids.to(device)
        with torch.inference_mode():
            output = model.generate(ids, max_new_tokens=10)
        return tokenizer.decode(output[0], skip_special_tokens=True).strip() == "1"

    return entails


def alce_metric_names(dataset: AlceDataset, with_citations: bool) -> tuple[str, ...]:
    """The measures a cite task reports at each length: its main one (named by the length
    alone), the others (``<length>_<measure>``) and, with an NLI model, the citation ones."""
    return ("", *dataset.extra_metrics, *(CITATION_METRICS if with_citations else ()))


def process_results_cite(doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    """ALCE's model-free scores of a cited answer (STR-EM for ASQA, recall-top5 for QAMPARI
    under the length's name; the others as ``<length>_<measure>``) and, when the documents
    name an NLI model, citation recall and precision."""
    prediction, length = results[0], str(doc["max_length"])
    scores: dict[str, float] = {}
    if doc["alce_dataset"] == ASQA.name:
        scores[""], scores["str_hit"] = asqa_string_em(prediction, doc["answer_sets"])
    else:
        listed = qampari_scores(prediction, doc["answer_sets"])
        scores.update({"": listed.recall_top5, "qampari_prec": listed.precision,
                       "qampari_rec": listed.recall, "qampari_f1": listed.f1,
                       "qampari_f1_top5": listed.f1_top5})
    if doc.get("nli_model_path"):
        passages = [tuple(p) for p in json.loads(doc["passages"])]
        cited = citation_scores(prediction, passages, entailment_judge(doc["nli_model_path"]),
                                list_question=None if doc["alce_dataset"] == ASQA.name
                                else doc["question"])
        if cited is not None:  # ALCE leaves an empty answer out of the citation means
            scores["citation_rec"], scores["citation_prec"] = cited.recall, cited.precision
    return {f"{length}_{name}" if name else length: value for name, value in scores.items()}


class CiteTask(HelmetTask):
    """A cite task: besides the per-length main metric, lm-eval is told of the other measures
    of :func:`alce_metric_names` so that it aggregates them as means (higher is better)."""

    category = "cite"
    alce: AlceDataset = ASQA

    @classmethod
    def measure_names(cls, metadata: Mapping[str, Any]) -> tuple[str, ...]:
        """ALCE's further measures, and the citation ones when an NLI model is given."""
        return alce_metric_names(cls.alce, bool(metadata.get("nli_model_path")))[1:]


class AsqaTask(CiteTask):
    """``acadlm_cite_asqa``."""

    alce = ASQA


class QampariTask(CiteTask):
    """``acadlm_cite_qampari``."""

    alce = QAMPARI


class RecallTask(HelmetTask):
    """HELMET's recall category: ``acadlm_json_kv`` and the needle tasks of
    :data:`HELMET_NEEDLE_TASKS`, plain text whatever the run's chat template."""

    category = "recall"


class RagTask(HelmetTask):
    """``acadlm_rag``."""

    category = "rag"


class RerankTask(HelmetTask):
    """``acadlm_rerank``."""

    category = "rerank"


class IclTask(HelmetTask):
    """``acadlm_icl``."""

    category = "icl"


class LongQATask(HelmetTask):
    """``acadlm_longqa``, the long-document QA stand-in: substring EM, and HELMET's judge
    metrics with a judge."""

    category, measures, judge_kind = "longqa", ("substring_exact_match",), LONGQA


class SummTask(HelmetTask):
    """``acadlm_summ``, the summarization stand-in: ROUGE-L F1, and HELMET's judge metrics with
    a judge."""

    category, measures, judge_kind = "summ", ("rougeL_f1",), SUMM


# ------------------------------------------------------------------------------- entry points


def json_kv_dataset(task: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset of ``acadlm_json_kv``."""
    return build_length_dataset(task, metadata, partial(build_json_kv_sample, metadata, task))


def rag_dataset(task: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset of ``acadlm_rag``, from ``rag_path`` or the shipped example."""
    return passage_qa_dataset(task, RAG_STYLE, metadata)


def process_results_substring_em(doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    """HELMET's substring exact match: 100 if a normalized answer occurs in the generation."""
    return per_length(doc, substring_exact_match(results[0], doc["outputs"]))


def process_results_document_qa(doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    """The long-document QA stand-in: substring exact match (``<length>_substring_exact_match``)
    and, for a judged document, HELMET's judge metrics (``<length>_judge_*``); the metric named
    by the length is what HELMET's category counts: the judge score when a judge was asked,
    else the substring exact match."""
    return _with_judge(doc, results[0], {"substring_exact_match": substring_exact_match(
        results[0], doc["outputs"])}, main="substring_exact_match", judge_main="judge_score")


def process_results_document_summary(doc: Mapping[str, Any],
                                     results: list[str]) -> dict[str, float]:
    """The summarization stand-in: ROUGE-L F1 against the best reference (``<length>_rougeL_f1``)
    and, for a judged document, HELMET's key-point F1, recall, precision and fluency; the metric
    named by the length is the judge F1 when a judge was asked, else ROUGE-L F1."""
    return _with_judge(doc, results[0], {"rougeL_f1": rouge_l(clean_prediction(results[0]),
                                                              doc["outputs"])},
                       main="rougeL_f1", judge_main="judge_f1")


def _with_judge(doc: Mapping[str, Any], prediction: str, scores: dict[str, float], *, main: str,
                judge_main: str) -> dict[str, float]:
    """``scores`` and the judge's metrics as ``<length>_<name>``, and the category score under
    the length alone: the judge's ``judge_main`` for a judged document (absent when the judge
    could not score it: left out of the mean, never 0), else ``scores[main]``."""
    length = str(doc["max_length"])
    judged = judge_scores(doc, prediction)
    named = {f"{length}_{name}": value for name, value in {**scores, **judged}.items()}
    category = judged.get(judge_main) if doc.get(DOC_FIELD) else scores[main]
    return named if category is None else {length: category, **named}


def process_results_ndcg(doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    """NDCG@10 of the ranking written in the generation against the graded judgments."""
    relevance = dict(zip(doc["relevant_ids"], doc["relevant_grades"]))
    ranking = parse_ranking(results[0])
    return per_length(doc, ndcg_at_k(ranking, relevance, k=10))


def process_results_label(doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    """Accuracy as HELMET's ICL exact match: 100 if the answer :func:`parse_label` reads is the
    expected number once both are normalized (SQuAD's normalization, as HELMET's)."""
    return per_length(doc, exact_match(parse_label(results[0], doc.get("gen_prefix") or ""),
                                       doc["outputs"]))
