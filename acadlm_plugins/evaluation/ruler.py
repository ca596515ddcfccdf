"""RULER-style synthetic tasks (Hsieh et al. 2024), rebuilt offline in our own words.

Needle-in-a-haystack retrieval in eight variants, variable tracking, common/frequent word
extraction and QA over distractor documents. Every prompt is sized with the evaluated model's
tokenizer; every random choice comes from a stream seeded by (task, seed, length).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import pairwise
from typing import Any

from acadlm_plugins.evaluation.haystack import noise_words, prose_words
from acadlm_plugins.evaluation.lengths import LengthTokenizer, task_error
from acadlm_plugins.evaluation.prompting import (
    FittedPrompt,
    fit_prompt,
    insert_at_depths,
    key_vocabulary,
    random_number,
    random_uuid,
)
from acadlm_plugins.evaluation.task_base import DEFAULT_NUM_SAMPLES, build_length_dataset

NIAH_INTRO = ("Special magic {plural} are hidden in the text below. Remember them: you will be "
              "asked about them afterwards.\n\n")
NIAH_QUESTION = ("\n\nQuestion: What {verb} the special magic {noun} for {query} mentioned in the "
                 "text above?\nAnswer: The special magic {noun} for {query} mentioned in the text "
                 "above {verb}")
NEEDLE = "One of the special magic {singular} for {key} is: {value}."

#: A prompt of a 1K+ target must fill at least this share of it (the suite's sizing contract).
FILL_RATIO = 0.99


@dataclass(frozen=True)
class NeedleSpec:
    """One RULER needle variant: where the needles hide and what they look like."""

    haystack: str  # "noise", "prose" or "needle"
    key_kind: str  # "words" or "uuids"
    value_kind: str  # "numbers" or "uuids"
    num_needles: int = 1  # needles with distinct keys in the haystack (1 queried unless multi-query)
    num_values: int = 1  # values stored under the queried key (multi-value)
    num_queries: int = 1  # keys asked about at once (multi-query)


NIAH_VARIANTS: dict[str, NeedleSpec] = {
    "acadlm_niah_single_1": NeedleSpec("noise", "words", "numbers"),
    "acadlm_niah_single_2": NeedleSpec("prose", "words", "numbers"),
    "acadlm_niah_single_3": NeedleSpec("prose", "words", "uuids"),
    "acadlm_niah_multikey_1": NeedleSpec("prose", "words", "numbers", num_needles=4),
    "acadlm_niah_multikey_2": NeedleSpec("needle", "words", "numbers"),
    "acadlm_niah_multikey_3": NeedleSpec("needle", "uuids", "uuids"),
    "acadlm_niah_multivalue": NeedleSpec("prose", "words", "numbers", num_values=4),
    "acadlm_niah_multiquery": NeedleSpec("prose", "words", "numbers", num_needles=4,
                                         num_queries=4),
}

_NOUNS = {"numbers": ("number", "numbers"), "uuids": ("uuid", "uuids")}


def _value(rng: random.Random, kind: str) -> str:
    return random_number(rng) if kind == "numbers" else random_uuid(rng)


def _key(rng: random.Random, kind: str, vocab: Sequence[str], used: set[str]) -> str:
    while True:
        key = rng.choice(vocab) if kind == "words" else random_uuid(rng)
        if key not in used:
            used.add(key)
            return key


def needle_depths(metadata: Mapping[str, Any], index: int, count: int, num_samples: int,
                  rng: random.Random, *, task: str) -> list[float]:
    """Depths of the queried needles: ``depth`` if set, else spread evenly over samples
    for a single needle (0%, ..., 100%), random for several."""
    fixed = metadata.get("depth")
    if fixed is not None:
        depth = float(fixed)
        if not 0.0 <= depth <= 1.0:
            raise task_error(task, "depth", f"{fixed} is outside [0, 1].",
                             "Give a fraction of the context, e.g. 0.5 for the middle.")
        return [depth] * count
    if count == 1:
        return [index / (num_samples - 1) if num_samples > 1 else 0.5]
    return [rng.random() for _ in range(count)]


#: The most distinct words a task draws; beyond it, words repeat more often (see cwe_plan).
#: key_vocabulary tops the haystack's words up with made-up words, 8000 of which exist.
VOCAB_CAP = 7000


@lru_cache(maxsize=64)
def _vocabulary(haystack_path: str | None, task: str, size: int) -> tuple[str, ...]:
    """``size`` distinct words of the prose haystack (``prompting.key_vocabulary``), cached
    because every sample of a task draws from the same list."""
    return tuple(key_vocabulary(prose_words(haystack_path, task=task, min_words=1), size))


def top_up(coarse: FittedPrompt, render: Callable[[int], str], tokenizer: LengthTokenizer,
           target: int, *, max_units: int, task: str) -> tuple[FittedPrompt, int]:
    """``coarse`` topped up with finer units when it fills less than :data:`FILL_RATIO` of
    ``target``: the longest ``render(k)`` (the coarse prompt plus ``k`` <= ``max_units`` finer
    units; ``render(0)`` is the coarse prompt) that fits. Returns the prompt and ``k``.

    Coarse units (whole haystack words, list entries, steps of a word-count law) can each cost
    more than 1% of a 1K prompt; the finer units of the second pass close the gap.
    """
    if coarse.num_tokens >= FILL_RATIO * target or max_units < 1:
        return coarse, 0
    fine = fit_prompt(render, tokenizer, target, max_units=max_units, task=task)
    return fine, fine.num_words


def fit_words(render: Callable[[Sequence[str]], str], words: Sequence[str],
              tokenizer: LengthTokenizer, target: int, *, task: str) -> FittedPrompt:
    """The longest ``render(words[:n])`` that fits ``target`` tokens, topped up with a prefix of
    the next word when whole words miss the target by more than 1%.

    A haystack word may cost many tokens (a UUID is 36 tokens for a digit-splitting tokenizer,
    more than 1% of a 1K prompt), so a whole-word fit alone can fall short; cutting the first
    word that does not fit, character by character, closes the gap. The cut word ends the
    haystack (it is never a needle: needles are inserts, not haystack words).
    """
    coarse = fit_prompt(lambda units: render(words[:units]), tokenizer, target,
                        max_units=len(words), task=task)
    units = coarse.num_words
    if units >= len(words):
        return coarse
    kept, cut = list(words[:units]), words[units]

    def topped_up(chars: int) -> str:
        return render([*kept, cut[:chars]] if chars else kept)

    fine, chars = top_up(coarse, topped_up, tokenizer, target, max_units=len(cut), task=task)
    return FittedPrompt(fine.text, fine.num_tokens, units + (chars > 0))


def build_niah_sample(spec: NeedleSpec, task: str, metadata: Mapping[str, Any],
                      rng: random.Random, length: int, index: int,
                      tokenizer: LengthTokenizer) -> dict[str, Any]:
    """One needle-in-a-haystack prompt of ``length`` tokens and its expected values."""
    prose = prose_words(metadata.get("haystack_path"), task=task, min_words=4 * length)
    vocab = _vocabulary(metadata.get("haystack_path") or None, task, 2000)
    singular, plural = _NOUNS[spec.value_kind]
    used: set[str] = set()
    keys = [_key(rng, spec.key_kind, vocab, used) for _ in range(spec.num_needles)]
    needles: list[tuple[str, str]] = []
    for position, key in enumerate(keys):
        values = spec.num_values if position == 0 else 1
        needles.extend((key, _value(rng, spec.value_kind)) for _ in range(values))
    queried = keys[: spec.num_queries]
    answers = [value for key, value in needles if key in queried]
    num_samples = int(metadata.get("num_samples", DEFAULT_NUM_SAMPLES))
    depths = needle_depths(metadata, index, len(needles), num_samples, rng, task=task)
    inserts = [(depth, NEEDLE.format(singular=singular, key=key, value=value))
               for depth, (key, value) in zip(depths, needles)]
    query = ", ".join(queried[:-1]) + (" and " if len(queried) > 1 else "") + queried[-1]
    several = len(answers) > 1
    noun = plural if several else singular
    head = NIAH_INTRO.format(plural=plural)
    tail = NIAH_QUESTION.format(verb="are" if several else "is", noun=noun, query=query)

    if spec.haystack == "needle":
        # The haystack is itself made of needles: distractor keys with their own values.
        # Split into words so the fit is exact to the token, not to the needle.
        filler = " ".join(
            NEEDLE.format(singular=singular, key=_key(rng, spec.key_kind, vocab, used),
                          value=_value(rng, spec.value_kind))
            for _ in range(length // 8)).split()
    elif spec.haystack == "noise":
        filler = list(noise_words(length))
    else:
        # Two words per target token (wrapping round the end of the text): enough even for a
        # tokenizer that spends a single token on every word.
        start = rng.randrange(len(prose))
        span = 2 * length
        filler = list(prose[start:start + span]) + list(prose[:max(0, start + span - len(prose))])

    def render(words: Sequence[str]) -> str:
        return head + insert_at_depths(words, inserts) + tail

    fitted = fit_words(render, filler, tokenizer, length, task=task)
    return {"input": fitted.text, "outputs": answers, "input_tokens": fitted.num_tokens,
            "depths": depths, "needles": [inserts[i][1] for i in range(len(inserts))],
            "haystack": spec.haystack}


def niah_dataset(task: str, **metadata: Any) -> dict[str, Any]:
    """The dataset of the NIAH variant ``task`` (see :data:`NIAH_VARIANTS`)."""
    spec = NIAH_VARIANTS[task]
    return build_length_dataset(task, metadata, partial(build_niah_sample, spec, task, metadata))


# --- Variable tracking ---------------------------------------------------------------------------

VT_INTRO = ("Variables are assigned among the filler sentences below; a variable can take its "
            "value from another one.\n\n")
VT_EXAMPLE = ("An example:\n{text}\nThe variables holding {value} there are: {names}.\n\n"
              "The text:\n\n")
VT_QUESTION = ("\n\nQuestion: Which variables hold the value {value}, directly or through other "
               "variables, in the text above?\nAnswer: The {count} variables holding the value "
               "{value} in the text above are:")
VT_NUM_CHAINS = 1  # RULER's default: one chain (more chains would act as distractors)
VT_NUM_HOPS = 4  # RULER's default: a value copied four times, five variables in all
VT_EXAMPLE_FILLER = 14  # noise words (two sentences) around the one-shot example's chain


def _variable_names(rng: random.Random, count: int, used: set[str]) -> list[str]:
    """``count`` fresh five-letter upper-case names (RULER's variable names), none in ``used``."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in used:
            used.add(name)
            names.append(name)
    return names


def variable_chain(names: Sequence[str], value: str) -> list[str]:
    """The statements of one chain: the first name gets ``value``, each next one the previous."""
    first = [f"VAR {names[0]} = {value}."]
    return first + [f"VAR {name} = VAR {previous}." for previous, name in pairwise(names)]


def _chains(rng: random.Random, num_chains: int, num_hops: int, used_names: set[str],
            used_values: set[str]) -> list[tuple[str, list[str], list[str]]]:
    """``num_chains`` chains of ``num_hops`` copies each, as (value, names, statements), with
    distinct five-digit values and names."""
    chains = []
    for _ in range(num_chains):
        value = random_number(rng, digits=5)
        while value in used_values:
            value = random_number(rng, digits=5)
        used_values.add(value)
        names = _variable_names(rng, num_hops + 1, used_names)
        chains.append((value, names, variable_chain(names, value)))
    return chains


def _chain_inserts(rng: random.Random, chains: Sequence[tuple[str, list[str], list[str]]]
                   ) -> list[tuple[float, str]]:
    """Each chain's statements at sorted random depths, so every assignment comes after the one
    it copies from (the order :func:`insert_at_depths` keeps for equal depths too)."""
    inserts: list[tuple[float, str]] = []
    for _, _, statements in chains:
        depths = sorted(rng.random() for _ in statements)
        inserts.extend(zip(depths, statements))
    return inserts


def build_vt_sample(task: str, rng: random.Random, length: int, index: int,
                    tokenizer: LengthTokenizer, *, num_chains: int = VT_NUM_CHAINS,
                    num_hops: int = VT_NUM_HOPS) -> dict[str, Any]:
    """One variable-tracking prompt of ``length`` tokens: ``num_chains`` chains of assignments
    in the noise haystack, preceded by a one-shot example; the answer is every variable of the
    first chain. As in RULER, the haystack is always the noise one (``haystack_path`` unused).

    The example (about 100 tokens) is left out of prompts too short to hold it and a haystack
    at least as long as the rest of the prompt, so that the task still runs at 256-512 tokens.
    """
    used_names: set[str] = set()
    used_values: set[str] = set()
    example_value, example_names, example_statements = _chains(
        rng, 1, num_hops, used_names, used_values)[0]
    chains = _chains(rng, num_chains, num_hops, used_names, used_values)
    example_text = insert_at_depths(
        noise_words(VT_EXAMPLE_FILLER)[:VT_EXAMPLE_FILLER],
        _chain_inserts(rng, [(example_value, example_names, example_statements)]))
    value, names, statements = chains[0]
    tail = VT_QUESTION.format(value=value, count=len(names))
    inserts = _chain_inserts(rng, chains)
    head = VT_INTRO + VT_EXAMPLE.format(text=example_text, value=example_value,
                                        names=", ".join(example_names))
    if 2 * tokenizer.count(head + insert_at_depths([], inserts) + tail) > length:
        head = VT_INTRO

    def render(words: Sequence[str]) -> str:
        return head + insert_at_depths(words, inserts) + tail

    fitted = fit_words(render, noise_words(2 * length), tokenizer, length, task=task)
    return {"input": fitted.text, "outputs": names, "input_tokens": fitted.num_tokens,
            "needles": statements, "haystack": "noise"}


def vt_dataset(**metadata: Any) -> dict[str, Any]:
    """The dataset of ``acadlm_vt`` (variable tracking, RULER's num_chains=1, num_hops=4).

    Its haystack is the built-in noise, yet a ``haystack_path`` given to the whole suite is still
    checked here, so that a wrong path is reported by every task that receives it.
    """
    task = "acadlm_vt"
    if metadata.get("haystack_path"):
        prose_words(metadata["haystack_path"], task=task, min_words=1)
    return build_length_dataset(task, metadata, partial(build_vt_sample, task))


# --- Word lists shared by common- and frequent-word extraction -----------------------------------

def word_pool(metadata: Mapping[str, Any], task: str, size: int) -> tuple[str, ...]:
    """At least ``size`` (at most :data:`VOCAB_CAP`) distinct words for the word-list tasks,
    taken from the prose haystack; the size is rounded up so that samples share one list."""
    rounded = min(VOCAB_CAP, max(1000, -(-size // 1000) * 1000))
    return _vocabulary(metadata.get("haystack_path") or None, task, rounded)


def pick_answers(words: Sequence[str], count: int, *, task: str) -> tuple[list[str], list[str]]:
    """Split ``words`` into ``count`` answers and the rest, taking as answers only words that
    are not part of another word of the list: matching is by substring, so an answer inside a
    longer word ("then" in "thence") would earn credit for naming the wrong word."""
    answers: list[str] = []
    for word in words:
        if len(answers) == count:
            break
        if not any(word in other for other in words if other != word):
            answers.append(word)
    if len(answers) < count:
        raise task_error(task, "haystack_path", f"the haystack's vocabulary has fewer than {count} "
                         "words that are not part of other words.", "Give a longer haystack text.")
    chosen = set(answers)
    return answers, [word for word in words if word not in chosen]


# --- Common words extraction ---------------------------------------------------------------------

CWE_INTRO = ("Below is a numbered list of words. A few of the words come up much more often than "
             "all the others.\n\n")
CWE_QUESTION = ("\n\nQuestion: Which {num} words come up most often in the numbered list above?\n"
                "Answer: The {num} words that come up most often in the numbered list above are:")
CWE_NUM_CW = 10  # common words, the answer (RULER num_cw)
CWE_FREQ_CW = 30  # occurrences of each common word (RULER freq_cw)
CWE_FREQ_UCW = 3  # occurrences of each other word (RULER freq_ucw)
CWE_COMMON_SHARE = 0.4  # at most this share of the list goes to the common words (RULER at 4K)
CWE_TOP_UP_WORDS = 64  # unused words among which the top-up picks the cheapest


@dataclass(frozen=True)
class WordListPlan:
    """How a common-words list of a given length is made: word counts and pool sizes."""

    freq_cw: int
    freq_ucw: int
    num_uncommon: int  # distinct uncommon words drawn
    pool_entries: int  # most uncommon entries the fit may use


def cwe_plan(entries: int, *, num_cw: int = CWE_NUM_CW, freq_cw: int = CWE_FREQ_CW,
             freq_ucw: int = CWE_FREQ_UCW) -> WordListPlan:
    """Word frequencies for a list of about ``entries`` entries (an over-estimate).

    RULER's 30/3 frequencies fill 40% of a 4K list with the common words; shorter lists scale
    ``freq_cw`` down to that share (never below 2) and keep the uncommon words at most half as
    frequent; lists too long for :data:`VOCAB_CAP` distinct words scale both frequencies up by
    the same factor, so the common words keep their lead (10 to 1 at RULER's settings).
    """
    freq_cw = min(freq_cw, max(2, int(CWE_COMMON_SHARE * entries / num_cw)))
    freq_ucw = min(freq_ucw, max(1, (freq_cw - 1) // 2))
    pool = max(0, entries - num_cw * freq_cw)
    scale = max(1, -(-pool // (freq_ucw * (VOCAB_CAP - num_cw))))
    freq_cw, freq_ucw = freq_cw * scale, freq_ucw * scale
    return WordListPlan(freq_cw, freq_ucw, -(-pool // freq_ucw), pool)


def numbered_list(words: Sequence[str]) -> str:
    """``1. word 2. word ...`` on one line, as RULER writes the list."""
    return " ".join(f"{number}. {word}" for number, word in enumerate(words, start=1))


def build_cwe_sample(task: str, metadata: Mapping[str, Any], rng: random.Random, length: int,
                     index: int, tokenizer: LengthTokenizer) -> dict[str, Any]:
    """One common-words prompt of ``length`` tokens: a shuffled numbered list in which
    :data:`CWE_NUM_CW` words occur ``freq_cw`` times and the others ``freq_ucw`` times; the
    answer is the common words. The list grows one entry at a time until the prompt fits."""
    head, tail = CWE_INTRO, CWE_QUESTION.format(num=CWE_NUM_CW)
    probe = rng.sample(word_pool(metadata, task, 1000), 200)
    per_entry = tokenizer.count(numbered_list(probe)) / len(probe)
    budget = max(0, length - tokenizer.count(head + tail))
    # Numbers grow longer further down the list, so this over-estimates the entries; a margin
    # covers the words' spread in length.
    plan = cwe_plan(int(1.25 * budget / per_entry) + 50)
    words = rng.sample(word_pool(metadata, task, CWE_NUM_CW + plan.num_uncommon),
                       CWE_NUM_CW + plan.num_uncommon)
    common, uncommon = pick_answers(words, CWE_NUM_CW, task=task)
    common_entries = [word for word in common for _ in range(plan.freq_cw)]
    pool = [word for word in uncommon for _ in range(plan.freq_ucw)][: plan.pool_entries]
    shuffle_seed = rng.randrange(2**32)

    def render(units: int, extras: Sequence[str] = ()) -> str:
        entries = [*common_entries, *pool[:units], *extras]
        random.Random(shuffle_seed).shuffle(entries)
        return head + numbered_list(entries) + tail

    coarse = fit_prompt(render, tokenizer, length, max_units=len(pool), task=task)
    # An entry ("734. word") can cost over 1% of a 1K prompt; the top-up adds single entries of
    # the cheapest words not yet in the list (once each, far below the common words' count).
    first_unused = -(-coarse.num_words // plan.freq_ucw)
    spare = sorted(uncommon[first_unused:first_unused + CWE_TOP_UP_WORDS],
                   key=lambda word: tokenizer.count(" " + word))
    fitted, _ = top_up(coarse, lambda extra: render(coarse.num_words, spare[:extra]), tokenizer,
                       length, max_units=len(spare), task=task)
    return {"input": fitted.text, "outputs": common, "input_tokens": fitted.num_tokens,
            "freq_cw": plan.freq_cw, "freq_ucw": plan.freq_ucw}


def cwe_dataset(**metadata: Any) -> dict[str, Any]:
    """The dataset of ``acadlm_cwe`` (common words extraction, RULER freq_cw=30, freq_ucw=3)."""
    task = "acadlm_cwe"
    return build_length_dataset(task, metadata, partial(build_cwe_sample, task, metadata))


# --- Frequent words extraction -------------------------------------------------------------------

FWE_INTRO = ("Below is a text written in coded words. Keep a count of how often each coded word "
             "comes up.\n\n")
FWE_QUESTION = ("\n\nQuestion: Leaving the dots '...' aside, which {num} coded words come up most "
                "often in the text above?\nAnswer: Leaving the dots aside, the {num} coded words "
                "that come up most often in the text above are:")
FWE_NUM_ANSWERS = 3  # RULER asks for the three most frequent words
FWE_ALPHA = 2.0  # RULER's Zipf exponent
FWE_VOCAB = 2000  # RULER's vocabulary size
FWE_NOISE = "..."  # the most frequent "word", as in RULER: filler the question says to skip


def zipf_counts(total: int, ranks: int, alpha: float = FWE_ALPHA) -> list[int]:
    """Occurrences of the words of rank 1..``ranks`` in a text of about ``total`` words:
    ``floor(total * k**-alpha / Z)``, Z normalizing over the ranks (RULER's law)."""
    weights = [rank ** -alpha for rank in range(1, ranks + 1)]
    norm = sum(weights)
    return [int(total * weight / norm) for weight in weights]


def build_fwe_sample(task: str, metadata: Mapping[str, Any], rng: random.Random, length: int,
                     index: int, tokenizer: LengthTokenizer) -> dict[str, Any]:
    """One frequent-words prompt of ``length`` tokens: a shuffled text in which the word of rank
    k occurs in proportion to k**-2; rank 1 is the dots, so the answer is ranks 2 to 4.

    The words stand in for RULER's random coded words: they come from the haystack's vocabulary
    in random order, so their frequency in ordinary prose tells nothing. The text grows by
    about one word per unit until the prompt fits.
    """
    vocab = list(word_pool(metadata, task, FWE_VOCAB))
    rng.shuffle(vocab)
    answers, others = pick_answers(vocab[:FWE_VOCAB], FWE_NUM_ANSWERS, task=task)
    ranked = [FWE_NOISE, *answers, *others]
    shuffle_seed = rng.randrange(2**32)
    head, tail = FWE_INTRO, FWE_QUESTION.format(num=FWE_NUM_ANSWERS)

    def render(units: int, extra: int = 0) -> str:
        counts = zipf_counts(units, len(ranked))
        seen = sum(count > 0 for count in counts)
        words = [word for word, count in zip(ranked, counts) for _ in range(count)]
        words += ranked[seen:seen + extra]
        random.Random(shuffle_seed).shuffle(words)
        return head + " ".join(words) + tail

    # Every word costs at least one token and flooring loses under one word per rank, so
    # ``length + len(ranked)`` units already overflow; twice that is a safe ceiling.
    coarse = fit_prompt(render, tokenizer, length, max_units=2 * (length + len(ranked)),
                        task=task)
    counts = zipf_counts(coarse.num_words, len(ranked))
    # One step of the law can add several words at once; the top-up adds, once each, words of
    # the ranks the law has not reached yet.
    unseen = len(ranked) - sum(count > 0 for count in counts)
    fitted, extra = top_up(coarse, lambda more: render(coarse.num_words, more), tokenizer,
                           length, max_units=unseen, task=task)
    if counts[FWE_NUM_ANSWERS] <= max(counts[FWE_NUM_ANSWERS + 1], 1 if extra else 0):
        raise task_error(task, "max_seq_lengths", f"{length} tokens hold too few words to tell "
                         f"the {FWE_NUM_ANSWERS} most frequent apart.", "Use a longer length.")
    return {"input": fitted.text, "outputs": answers, "input_tokens": fitted.num_tokens,
            "answer_counts": counts[1:FWE_NUM_ANSWERS + 1]}


def fwe_dataset(**metadata: Any) -> dict[str, Any]:
    """The dataset of ``acadlm_fwe`` (frequent words extraction, RULER alpha=2.0)."""
    task = "acadlm_fwe"
    return build_length_dataset(task, metadata, partial(build_fwe_sample, task, metadata))
