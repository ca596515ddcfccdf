"""Build prompts of an exact token length: fill a template with haystack words, hide inserts at
chosen depths, and search for the number of words that lands just under the target.

Lengths are counted with the evaluated model's own tokenizer, so "8K" means 8K tokens of *that*
model; a prompt is never longer than its target and, for targets of 1K tokens or more, within 1%
of it.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from acadlm_plugins.evaluation.lengths import LengthTokenizer, task_error

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
_ALPHA_WORD = re.compile(r"^[a-z]{4,12}$")
_SYLLABLES = ("ba", "ko", "ri", "ten", "mu", "sal", "vor", "pi", "da", "len", "qui", "zo",
              "fer", "no", "ga", "lis", "tor", "wen", "ha", "bri")


@dataclass(frozen=True)
class FittedPrompt:
    """A prompt and the facts tests and logs need about it."""

    text: str
    num_tokens: int
    num_words: int


def insert_at_depths(words: Sequence[str], inserts: Sequence[tuple[float, str]]) -> str:
    """Join ``words`` into text with each insert placed at its depth (0 = start, 1 = end).

    An insert goes after the sentence that ends nearest before its depth, so it never splits a
    sentence of the haystack (if no sentence ends within 60 words, it goes at the exact word).
    """
    positions: list[tuple[int, int, str]] = []
    for order, (depth, text) in enumerate(inserts):
        index = round(min(max(depth, 0.0), 1.0) * len(words))
        for back in range(index, max(index - 60, 0) - 1, -1):
            if back == 0 or _SENTENCE_END.search(words[back - 1]):
                index = back
                break
        positions.append((index, order, text))
    pieces: list[str] = []
    cursor = 0
    for index, _, text in sorted(positions):
        pieces.extend(words[cursor:index])
        pieces.append(text)
        cursor = index
    pieces.extend(words[cursor:])
    return " ".join(pieces)


def fit_prompt(render: Callable[[int], str], tokenizer: LengthTokenizer, target: int, *,
               max_units: int, task: str) -> FittedPrompt:
    """The longest ``render(n)`` (n haystack units, 0..max_units) whose length is <= ``target``.

    ``render(0)`` (template, question and inserts with no filler) must already fit, otherwise the
    length is too short for the task and the error says so.
    """
    empty = tokenizer.count(render(0))
    if empty > target:
        raise task_error(task, "max_seq_lengths", f"{target} tokens cannot hold even the task's "
                         f"template and inserts ({empty} tokens).", "Use a longer length.")
    low, high = 0, max_units
    best = (0, empty)
    while low <= high:
        middle = (low + high) // 2
        count = tokenizer.count(render(middle))
        if count <= target:
            best = (middle, count)
            low = middle + 1
        else:
            high = middle - 1
    units, count = best
    if units == max_units and count < 0.99 * target:
        raise task_error(task, "haystack_path", f"the haystack ran out at {count} of {target} "
                         "tokens.", "Give a longer haystack text.")
    return FittedPrompt(render(units), count, units)


def key_vocabulary(words: Sequence[str], size: int = 2000) -> list[str]:
    """Distinct lowercase words (4-12 letters) to use as needle keys and word-list items.

    They come from the prose haystack so they read naturally; if it has too few, deterministic
    made-up words fill the list.
    """
    seen: dict[str, None] = {}
    for word in words:
        cleaned = word.strip(string.punctuation).lower()
        if _ALPHA_WORD.match(cleaned):
            seen.setdefault(cleaned, None)
            if len(seen) >= size:
                break
    vocab = list(seen)
    made = random.Random(0)
    while len(vocab) < size:
        candidate = "".join(made.choice(_SYLLABLES) for _ in range(3))
        if candidate not in seen:
            seen[candidate] = None
            vocab.append(candidate)
    return sorted(vocab)


def random_number(rng: random.Random, digits: int = 7) -> str:
    """A number of exactly ``digits`` digits (no leading zero)."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def random_uuid(rng: random.Random) -> str:
    """A UUID-4 formatted string drawn from ``rng`` (reproducible, unlike uuid.uuid4)."""
    hexdigits = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    return f"{hexdigits[:8]}-{hexdigits[8:12]}-4{hexdigits[13:16]}-{hexdigits[16:20]}-{hexdigits[20:]}"


def sample_rng(task: str, seed: int, length: int) -> random.Random:
    """The random stream of one task at one length: same seed, same prompts."""
    return random.Random(f"{task}:{seed}:{length}")
