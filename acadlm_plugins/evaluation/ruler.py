"""RULER-style synthetic tasks (Hsieh et al. 2024), rebuilt offline in our own words.

Needle-in-a-haystack retrieval in eight variants, variable tracking, common/frequent word
extraction and QA over distractor documents. Every prompt is sized with the evaluated model's
tokenizer; every random choice comes from a stream seeded by (task, seed, length).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from acadlm_plugins.evaluation.haystack import noise_words, prose_words
from acadlm_plugins.evaluation.lengths import LengthTokenizer, task_error
from acadlm_plugins.evaluation.prompting import (
    fit_prompt,
    insert_at_depths,
    key_vocabulary,
    random_number,
    random_uuid,
)
from acadlm_plugins.evaluation.task_base import build_length_dataset

NIAH_INTRO = ("Special magic {plural} are hidden in the text below. Remember them: you will be "
              "asked about them afterwards.\n\n")
NIAH_QUESTION = ("\n\nQuestion: What {verb} the special magic {noun} for {query} mentioned in the "
                 "text above?\nAnswer: The special magic {noun} for {query} mentioned in the text "
                 "above {verb}")
NEEDLE = "One of the special magic {singular} for {key} is: {value}."


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
    """Depths of the queried needles: ``needle_depth`` if set, else spread evenly over samples
    for a single needle (0%, ..., 100%), random for several."""
    fixed = metadata.get("needle_depth")
    if fixed is not None:
        depth = float(fixed)
        if not 0.0 <= depth <= 1.0:
            raise task_error(task, "needle_depth", f"{fixed} is outside [0, 1].",
                             "Give a fraction of the context, e.g. 0.5 for the middle.")
        return [depth] * count
    if count == 1:
        return [index / (num_samples - 1) if num_samples > 1 else 0.5]
    return [rng.random() for _ in range(count)]


def build_niah_sample(spec: NeedleSpec, task: str, metadata: Mapping[str, Any],
                      rng: random.Random, length: int, index: int,
                      tokenizer: LengthTokenizer) -> dict[str, Any]:
    """One needle-in-a-haystack prompt of ``length`` tokens and its expected values."""
    prose = prose_words(metadata.get("haystack_path"), task=task, min_words=4 * length)
    vocab = key_vocabulary(prose)
    singular, plural = _NOUNS[spec.value_kind]
    used: set[str] = set()
    keys = [_key(rng, spec.key_kind, vocab, used) for _ in range(spec.num_needles)]
    needles: list[tuple[str, str]] = []
    for position, key in enumerate(keys):
        values = spec.num_values if position == 0 else 1
        needles.extend((key, _value(rng, spec.value_kind)) for _ in range(values))
    queried = keys[: spec.num_queries]
    answers = [value for key, value in needles if key in queried]
    num_samples = int(metadata.get("num_samples", 1))
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
        start = rng.randrange(len(prose))
        filler = list((prose[start:] + prose[:start])[:length])

    def render(units: int) -> str:
        return head + insert_at_depths(filler[:units], inserts) + tail

    fitted = fit_prompt(render, tokenizer, length, max_units=len(filler), task=task)
    return {"input": fitted.text, "outputs": answers, "input_tokens": fitted.num_tokens,
            "depths": depths, "needles": [inserts[i][1] for i in range(len(inserts))],
            "haystack": spec.haystack}


def niah_dataset(task: str, **metadata: Any) -> dict[str, Any]:
    """The dataset of the NIAH variant ``task`` (see :data:`NIAH_VARIANTS`)."""
    spec = NIAH_VARIANTS[task]
    return build_length_dataset(task, metadata, partial(build_niah_sample, spec, task, metadata))
