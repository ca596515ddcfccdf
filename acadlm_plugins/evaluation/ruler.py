"""RULER-style synthetic tasks (Hsieh et al. 2024), rebuilt offline in our own words.

Needle-in-a-haystack retrieval in eight variants, variable tracking, and common/frequent word
extraction. Every prompt is sized with the evaluated model's tokenizer; every random choice comes
from a stream seeded by (task, seed, length).

A document is the user's text (``input``) and the answer prefix (``gen_prefix``), which lm-eval
writes after the input, or after the assistant header under ``--apply_chat_template``, as RULER
and lm-eval's own ``ruler`` tasks do. With ``length_budget: ruler`` (the default) a prompt of
length *L* leaves room inside *L* for the generation and the chat template, as RULER sizes
them; ``length_budget: prompt`` fits the text alone to *L*.
"""

from __future__ import annotations

import json
import math
import random
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import pairwise
from pathlib import Path
from typing import Any

from acadlm_plugins.evaluation.haystack import (
    PLAIN_WORDS,
    coded_words,
    compound_words,
    noise_words,
    prose_vocabulary,
    prose_words,
)
from acadlm_plugins.evaluation.lengths import (
    LengthTokenizer,
    model_max_length,
    parse_lengths,
    task_error,
)
from acadlm_plugins.evaluation.prompting import (
    FittedPrompt,
    insert_at_depths,
    random_number,
    random_uuid,
)
from acadlm_plugins.evaluation.task_base import (
    DEFAULT_NUM_SAMPLES,
    LengthSweepTask,
    build_length_dataset,
    depth_setting_value,
    int_setting,
)
from acadlm_plugins.evaluation.task_settings import declare_settings, path_check, text_check

#: A prompt of a 1K+ target must fill at least this share of its budget (the sizing contract).
FILL_RATIO = 0.99
#: Interpolation steps :func:`fit_units` takes before it falls back on bisection.
SECANT_STEPS = 8

# --- Length budget: what a prompt of length L must leave room for ---------------------------------

LENGTH_BUDGETS = ("ruler", "prompt")
#: RULER's ``tokens_to_generate`` (scripts/data/synthetic/constants.py); each task YAML's
#: ``max_gen_toks`` is the same number and reaches the builders through :class:`RulerTask`.
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
_PLACEHOLDER_USER = "acadlmuserturnplaceholder"
_PLACEHOLDER_ANSWER = "acadlmanswerprefixplaceholder"


@dataclass(frozen=True)
class BudgetSettings:
    """How a task's lengths are spent, read from its metadata (see :func:`budget_settings`)."""

    mode: str  # "ruler": prompt + generation + chat template <= L; "prompt": prompt <= L
    tokens_to_generate: int
    chat_template: bool  # the prompt is rendered with the model folder's chat template
    #: The run's ``--system_instruction``, counted under the ``ruler`` budget: as the chat
    #: template's system turn, or in plain text where lm-eval writes it, before the prompt.
    system_instruction: str = ""

    def room(self, length: int) -> int:
        """Tokens of length ``length`` that the prompt text may take (before special tokens)."""
        return length - self.tokens_to_generate if self.mode == "ruler" else length


def length_budget_setting(metadata: Mapping[str, Any], *, task: str) -> str:
    """``length_budget`` of the metadata (default ``ruler``), checked."""
    mode = str(metadata.get("length_budget") or "ruler")
    if mode not in LENGTH_BUDGETS:
        raise task_error(task, "length_budget", f"{mode!r} is not a length budget.",
                         "Use `ruler` (prompt + generation + chat template fit the length, as "
                         "RULER and HELMET size them) or `prompt` (the prompt alone fits it).")
    return mode


def budget_settings(metadata: Mapping[str, Any], *, task: str, kind: str) -> BudgetSettings:
    """``length_budget`` (``ruler`` or ``prompt``), ``tokens_to_generate`` (default RULER's for
    ``kind``; the task YAML passes its ``max_gen_toks``), ``apply_chat_template`` and
    ``system_instruction`` from a task's metadata, checked."""
    mode = length_budget_setting(metadata, task=task)
    generate = int_setting(metadata, "tokens_to_generate", TOKENS_TO_GENERATE[kind], task=task,
                           minimum=0)
    chat = metadata.get("apply_chat_template", False)
    if isinstance(chat, str):
        chat = chat.strip().lower() not in ("", "false", "0", "no")
    return BudgetSettings(mode, generate, bool(chat) and mode == "ruler",
                          str(metadata.get("system_instruction") or ""))


def check_generation_room(metadata: Mapping[str, Any], settings: BudgetSettings, *,
                          task: str) -> None:
    """Refuse lengths whose prompt and generation cannot both fit in the model's context.

    With ``length_budget: ruler`` that is any length above the model's maximum (``lengths``
    refuses those); with ``prompt`` the generation comes on top of the length, so a length above
    the maximum minus ``tokens_to_generate`` would leave the model no room to answer in full.
    """
    limit = model_max_length(metadata)
    if limit is None or settings.mode != "prompt":
        return
    for length in parse_lengths(metadata.get("max_seq_lengths"), task=task):
        if length + settings.tokens_to_generate > limit:
            raise task_error(task, "max_seq_lengths", f"{length}: a {length}-token prompt plus "
                             f"{settings.tokens_to_generate} generated tokens exceed the model's "
                             f"maximum context of {limit} tokens (length_budget: prompt).",
                             f"Evaluate at lengths <= {limit - settings.tokens_to_generate}, or "
                             "use length_budget: ruler, which fits the generation inside the "
                             "length.")


def check_system_instruction(metadata: Mapping[str, Any], given: str | None, *,
                             task: str) -> None:
    """Refuse a run whose system instruction (lm-eval's ``--system_instruction``, ``given``) is
    not the ``system_instruction`` of the task's metadata: lm-eval writes it into every prompt
    but never tells the task, whose prompts were sized for the metadata's."""
    expected, given = str(metadata.get("system_instruction") or ""), str(given or "")
    if given == expected:
        return
    if not expected:
        problem = "the run passes a system instruction that the task metadata does not name"
    elif not given:
        problem = "the task metadata names a system instruction that the run does not pass"
    else:
        problem = "the run's system instruction is not the one in the task metadata"
    raise task_error(task, "system_instruction", f"{problem}, and the prompts were sized for "
                     "the metadata's (the instruction's tokens count in the length budget).",
                     "Run through acadlm-lm-eval or the eval recipe (they pass the instruction "
                     "on to the tasks), or give the same text in --metadata "
                     "'{\"system_instruction\": \"...\"}'.")


def check_chat_template_flag(metadata: Mapping[str, Any], applied: Any, *, task: str) -> None:
    """Refuse a run that applies a chat template (lm-eval's ``--apply_chat_template``,
    ``applied``) when the task's metadata does not say so, or the reverse: lm-eval renders the
    template but never tells the task, whose prompts were laid out (answer prefix) and sized
    (the template's tokens count in the length budget) for the metadata's flag. Without this, a
    prompt sized without the template overflows its length once the template is added."""
    expected = metadata.get("apply_chat_template", False)
    if isinstance(expected, str):
        expected = expected.strip().lower() not in ("", "false", "0", "no")
    if bool(applied) == bool(expected):
        return
    problem = ("the run applies a chat template but the task metadata does not say so"
               if applied else "the task metadata says the run applies a chat template but it "
               "does not")
    raise task_error(task, "apply_chat_template", f"{problem}, and the prompts were laid out and "
                     "sized for the metadata's (the template's tokens count in the length "
                     "budget).", "Run through acadlm-lm-eval or the eval recipe (they pass "
                     "--apply_chat_template on to the tasks), or give the same value in "
                     "--metadata '{\"apply_chat_template\": true}'.")


class RulerTask(LengthSweepTask):
    """A :class:`LengthSweepTask` whose dataset builder learns the generation budget from the
    task's own ``generation_kwargs.max_gen_toks``, so the YAML states it once, and which
    refuses a run whose chat template flag or system instruction its prompts were not sized
    for."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        config = dict(config or {})
        metadata = dict(config.get("metadata") or {})
        budget = (config.get("generation_kwargs") or {}).get("max_gen_toks")
        if budget is not None:
            metadata.setdefault("tokens_to_generate", int(budget))
        config["metadata"] = metadata
        super().__init__(config=config)

    def build_all_requests(self, **kwargs: Any) -> Any:
        """lm-eval's request building, once the run's chat template flag and system
        instruction are known to be those the prompts were sized for
        (:func:`check_chat_template_flag`, :func:`check_system_instruction`)."""
        metadata, task = self.config.metadata or {}, self.config.task or "?"
        check_chat_template_flag(metadata, kwargs.get("apply_chat_template"), task=task)
        check_system_instruction(metadata, kwargs.get("system_instruction"), task=task)
        return super().build_all_requests(**kwargs)


# The settings read above and by HELMET's tasks (helmet_frame): the budget, and the run's chat
# template flag and system instruction (any value: a flag is read as true unless it is false,
# "false", "0", "no" or "").
declare_settings("RULER's and HELMET's tasks", {
    "length_budget": length_budget_setting, "apply_chat_template": None,
    "system_instruction": text_check("system_instruction")})


@dataclass(frozen=True)
class PromptFrame:
    """The text lm-eval wraps around a document and the tokens that text may have.

    Without a chat template lm-eval writes ``opening`` (the system instruction, if any, with
    nothing after it), ``input``, a space where neither side has one, and the answer prefix;
    with one, ``opening`` + input + ``closing`` + prefix, the prefix left open for the model to
    continue. ``budget`` is the most tokens this laid-out text may count.
    """

    budget: int
    opening: str = ""
    closing: str | None = None  # None: plain text
    length: int = 0  # the length the budget was taken from

    def check_room(self, tokens: int, *, task: str) -> None:
        """Refuse the length when the budget cannot hold a prompt of ``tokens`` (the task's
        template and inserts with no filler), naming the length and what was kept from it."""
        if tokens <= self.budget:
            return
        kept = self.length - self.budget
        less = f" less {kept} kept for the generation" if kept > 0 else ""
        raise task_error(task, "max_seq_lengths", f"{self.length} tokens{less} cannot hold even "
                         f"the task's template and inserts ({tokens} tokens).",
                         "Use a longer length" + (", or length_budget: prompt." if kept > 0
                                                  else "."))

    def lay_out(self, text: str, prefix: str) -> str:
        """The prompt the model reads for user text ``text`` and answer prefix ``prefix``."""
        if self.closing is not None:
            return self.opening + text + self.closing + prefix
        return self.opening + text + self._delimiter(text, prefix) + prefix

    def user_text(self, laid_out: str, prefix: str) -> str:
        """The user text of a prompt written by :meth:`lay_out` (our inputs never end in
        whitespace, so a trailing space here is lm-eval's delimiter)."""
        core = laid_out[len(self.opening):len(laid_out) - len(prefix)]
        if self.closing is not None:
            return core[:len(core) - len(self.closing)]
        return core[:-1] if prefix and core.endswith(" ") else core

    @staticmethod
    def _delimiter(text: str, prefix: str) -> str:
        from lm_eval.api.utils import requires_delimiter

        return " " if prefix and requires_delimiter(text, prefix) else ""


def _chat_template(folder: Path, *, task: str) -> tuple[str, dict[str, str]]:
    """The chat template of a model folder (``chat_template.jinja`` or ``tokenizer_config.json``,
    as the ``acadlm`` adapter reads it) and the special-token strings templates refer to."""
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates
        template = {item.get("name"): item.get("template") for item in template}.get("default")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if not isinstance(template, str):
        raise task_error(task, "apply_chat_template", f"{folder} has no chat template to size "
                         "prompts with.", "Add one to the model folder, or drop "
                         "apply_chat_template.")
    tokens = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            tokens[key] = value
    return template, tokens


@lru_cache(maxsize=32)
def _frame(settings: BudgetSettings, length: int, tokenizer: LengthTokenizer,
           task: str) -> PromptFrame:
    opening, closing = "", None
    if settings.chat_template:
        from acadlm_plugins.evaluation.lm_adapter import render_chat

        template, special = _chat_template(Path(tokenizer.source).parent, task=task)
        system = ([{"role": "system", "content": settings.system_instruction}]
                  if settings.system_instruction else [])
        text = render_chat(template, [*system, {"role": "user", "content": _PLACEHOLDER_USER},
                                      {"role": "assistant", "content": _PLACEHOLDER_ANSWER}],
                           add_generation_prompt=False, special_tokens=special)
        start, end = text.find(_PLACEHOLDER_USER), text.rfind(_PLACEHOLDER_ANSWER)
        if start < 0 or end < start or not text.endswith(_PLACEHOLDER_ANSWER):
            raise task_error(task, "apply_chat_template", "the model folder's chat template "
                             "does not write a user message and an open assistant message "
                             "verbatim, so prompts cannot be sized inside it.",
                             "Drop apply_chat_template, or use length_budget: prompt.")
        opening, closing = text[:start], text[start + len(_PLACEHOLDER_USER):end]
    elif settings.mode == "ruler":
        # lm-eval's plain-text prompt: the system instruction, then the user text, unseparated.
        opening = settings.system_instruction
    sample = PromptFrame(0, opening, closing).lay_out("Text.", "Answer:")
    # Tokens the tokenizer adds around a whole prompt (a BOS) count as well.
    added = len(tokenizer.tokenizer.encode(sample, add_special_tokens=True).ids) \
        - tokenizer.count(sample)
    budget = settings.room(length) - (added if settings.mode == "ruler" else 0)
    if budget <= 0:
        raise task_error(task, "max_seq_lengths", f"{length} tokens leave no room for a prompt "
                         f"after {settings.tokens_to_generate} generated tokens.",
                         "Use a longer length or a smaller tokens_to_generate.")
    return PromptFrame(budget, opening, closing, length)


def prompt_frame(settings: BudgetSettings, length: int, tokenizer: LengthTokenizer, *,
                 task: str) -> PromptFrame:
    """The frame of ``task``'s prompts at ``length``: plain text or the chat template around
    them (under the ``ruler`` budget with the system instruction, if any), and their token budget
    (``settings.room(length)``, less the tokens the tokenizer adds around a prompt under the
    ``ruler`` budget)."""
    return _frame(settings, length, tokenizer, task)


def finish_row(frame: PromptFrame, settings: BudgetSettings, fitted: FittedPrompt, prefix: str,
               **fields: Any) -> dict[str, Any]:
    """A dataset row from a fitted, laid-out prompt: the user text, the answer prefix and the
    facts tests and logs need about its size."""
    return {"input": frame.user_text(fitted.text, prefix), "gen_prefix": prefix,
            "input_tokens": fitted.num_tokens, "budget_tokens": frame.budget,
            "tokens_to_generate": settings.tokens_to_generate, "length_budget": settings.mode,
            **fields}


# --- Fitting a prompt to its budget in a handful of tokenizations --------------------------------

def fit_units(render: Callable[[int], str], tokenizer: LengthTokenizer, target: int, *,
              max_units: int, task: str) -> FittedPrompt:
    """The longest ``render(n)`` (0 <= n <= ``max_units``) of at most ``target`` tokens.

    The contract of :func:`prompting.fit_prompt`, found by secant steps on the measured counts
    instead of bisection: a prompt's tokens grow almost linearly with its units, so a guess from
    the tokens per unit seen so far lands within a few units of the answer, and a 128K-token
    prompt needs about six tokenizations instead of twenty. After :data:`SECANT_STEPS` steps
    without an answer it bisects, so a prompt whose count is far from linear costs at most that
    many tokenizations more than bisection.
    """
    measured: dict[int, int] = {}

    def count(units: int) -> int:
        if units not in measured:
            measured[units] = tokenizer.count(render(units))
        return measured[units]

    empty = count(0)
    if empty > target:
        raise task_error(task, "max_seq_lengths", f"{target} tokens cannot hold even the task's "
                         f"template and inserts ({empty} tokens).", "Use a longer length.")
    low, high = 0, max_units + 1  # count(low) fits; high overflows (max_units + 1: never tried)
    probe = min(max_units, 256)
    guess = probe
    if probe:
        rate = max(count(probe) - empty, 1) / probe
        guess = round(probe + (target - count(probe)) / rate)
    steps = 0
    while high - low > 1:
        units = min(max(guess, low + 1), high - 1)
        if count(units) <= target:
            low = units
        else:
            high = units
        steps += 1
        if steps >= SECANT_STEPS:
            guess = (low + high) // 2
            continue
        if high <= max_units:  # a bracket: interpolate between its ends
            rate = max(count(high) - count(low), 1) / (high - low)
        else:
            rate = max(count(low) - empty, 1) / max(low, 1)
        guess = low + math.floor((target - count(low)) / rate)
    if low == max_units and count(low) < FILL_RATIO * target:
        raise task_error(task, "haystack_path", f"the haystack ran out at {count(low)} of "
                         f"{target} tokens.", "Give a longer haystack text.")
    return FittedPrompt(render(low), count(low), low)


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
    fine = fit_units(render, tokenizer, target, max_units=max_units, task=task)
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
    coarse = fit_units(lambda units: render(words[:units]), tokenizer, target,
                       max_units=len(words), task=task)
    units = coarse.num_words
    if units >= len(words):
        return coarse
    kept, cut = list(words[:units]), words[units]

    def topped_up(chars: int) -> str:
        return render([*kept, cut[:chars]] if chars else kept)

    fine, chars = top_up(coarse, topped_up, tokenizer, target, max_units=len(cut), task=task)
    return FittedPrompt(fine.text, fine.num_tokens, units + (chars > 0))


def ruler_dataset(task: str, kind: str, metadata: Mapping[str, Any],
                  build_sample: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """The dataset of a RULER task: its budget settings read and checked, then
    ``build_sample(settings, rng, length, index, tokenizer)`` for every length and sample."""
    settings = budget_settings(metadata, task=task, kind=kind)
    check_generation_room(metadata, settings, task=task)
    return build_length_dataset(task, metadata, partial(build_sample, settings))


# --- Needle in a haystack ------------------------------------------------------------------------

# RULER's rule: the singular ("A special magic number is hidden ...") when one value is asked
# for, else the plural, and then "all" of them.
NIAH_INTRO = {False: ("A special magic {noun} is hidden in the text below. Remember it: you will "
                      "be asked about it afterwards.\n\n"),
              True: ("Special magic {noun} are hidden in the text below. Remember them: you will "
                     "be asked about them afterwards.\n\n")}
NIAH_QUESTION = {False: "\n\nWhat is the special magic {noun} for {query} mentioned in the text "
                        "above?",
                 True: "\n\nWhat are all the special magic {noun} for {query} mentioned in the "
                       "text above?"}
NIAH_ANSWER = "The special magic {noun} for {query} mentioned in the text above {verb}"
#: RULER's needle depths (``niah.py``: 40 points from 0% to 100%, rounded to whole percents);
#: several needles take distinct ones, so no two sit side by side.
NEEDLE_DEPTHS = tuple(round(100 * i / 39) / 100 for i in range(40))
#: RULER's needle sentence, with the plural noun whatever the number of needles ("One of the
#: special magic numbers for ... is: ...").
NEEDLE = "One of the special magic {plural} for {key} is: {value}."


@dataclass(frozen=True)
class NeedleSpec:
    """One RULER needle variant: where the needles hide and what they look like."""

    haystack: str  # "noise", "prose" or "needle"
    key_kind: str  # "words" (adjective-noun pairs) or "uuids"
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
_EXAMPLE_KEYS = {"words": "wise-falcon", "uuids": "0f8a1c2e-3b4d-4e5f-8a6b-7c8d9e0f1a2b"}


def _value(rng: random.Random, kind: str) -> str:
    return random_number(rng) if kind == "numbers" else random_uuid(rng)


def needle_keys(rng: random.Random, kind: str, count: int, *, task: str) -> list[str]:
    """``count`` distinct keys: adjective-noun pairs as RULER's word keys, or UUIDs. The cost is
    linear in ``count``: the pairs are drawn without replacement, and UUIDs practically never
    repeat."""
    if kind == "words":
        return compound_words(rng, count, task=task)
    keys: dict[str, None] = {}
    while len(keys) < count:
        keys.setdefault(random_uuid(rng), None)
    return list(keys)


def needle_depths(metadata: Mapping[str, Any], index: int, count: int, num_samples: int,
                  rng: random.Random, *, task: str) -> list[float]:
    """Depths of the queried needles: ``depth`` if set, else spread evenly over samples
    for a single needle (0%, ..., 100%), and for several distinct depths drawn from RULER's
    grid of 40 (:data:`NEEDLE_DEPTHS`), so that needles are at least 2.5% of the text apart."""
    depth = depth_setting_value(metadata, task=task)
    if depth is not None:
        return [depth] * count
    if count == 1:
        return [index / (num_samples - 1) if num_samples > 1 else 0.5]
    if count > len(NEEDLE_DEPTHS):  # more needles than grid points: RULER has no such task
        return [rng.random() for _ in range(count)]
    return rng.sample(NEEDLE_DEPTHS, count)


def _distractor_count(spec: NeedleSpec, tokenizer: LengthTokenizer, budget: int) -> int:
    """Distractor needles enough to fill ``budget`` tokens with a quarter to spare, from the
    tokens of a typical needle (a fixed key and value of the variant's kinds)."""
    plural = _NOUNS[spec.value_kind][1]
    value = "1234567" if spec.value_kind == "numbers" else _EXAMPLE_KEYS["uuids"]
    typical = NEEDLE.format(plural=plural, key=_EXAMPLE_KEYS[spec.key_kind], value=value)
    per_needle = tokenizer.count(" ".join([typical] * 8)) / 8
    return int(1.25 * budget / per_needle) + 8


@dataclass(frozen=True)
class NeedlePrompt:
    """What one needle-in-a-haystack prompt says, drawn before it is laid out and fitted: the
    text around the haystack, the needles and their depths, the filler words the haystack is
    cut from, and the expected values. RULER's tasks and HELMET's recall variants of them
    (:mod:`acadlm_plugins.evaluation.helmet`) draw the same prompt and differ only in layout."""

    head: str
    question: str
    prefix: str  # the answer prefix
    inserts: tuple[tuple[float, str], ...]  # (depth, needle sentence)
    filler: tuple[str, ...]
    answers: tuple[str, ...]
    depths: tuple[float, ...]

    def text(self, words: Sequence[str]) -> str:
        """The user text with ``words`` of the filler as the haystack, needles inserted."""
        return self.head + insert_at_depths(words, list(self.inserts)) + self.question

    @property
    def needles(self) -> list[str]:
        """The needle sentences, in the order they were drawn."""
        return [text for _, text in self.inserts]


def draw_needle_prompt(spec: NeedleSpec, task: str, metadata: Mapping[str, Any],
                       rng: random.Random, index: int, budget: int,
                       tokenizer: LengthTokenizer) -> NeedlePrompt:
    """The needles, question and filler of sample ``index`` of the variant ``spec``, drawn
    from ``rng`` for a prompt of at most ``budget`` tokens (enough filler to overfill it)."""
    singular, plural = _NOUNS[spec.value_kind]
    distractors = (_distractor_count(spec, tokenizer, budget)
                   if spec.haystack == "needle" else 0)
    all_keys = needle_keys(rng, spec.key_kind, spec.num_needles + distractors, task=task)
    keys, other_keys = all_keys[:spec.num_needles], all_keys[spec.num_needles:]
    needles: list[tuple[str, str]] = []
    for position, key in enumerate(keys):
        values = spec.num_values if position == 0 else 1
        needles.extend((key, _value(rng, spec.value_kind)) for _ in range(values))
    queried = keys[: spec.num_queries]
    answers = [value for key, value in needles if key in queried]
    num_samples = int_setting(metadata, "num_samples", DEFAULT_NUM_SAMPLES, task=task)
    depths = needle_depths(metadata, index, len(needles), num_samples, rng, task=task)
    inserts = [(depth, NEEDLE.format(plural=plural, key=key, value=value))
               for depth, (key, value) in zip(depths, needles)]
    query = ", ".join(queried[:-1]) + (" and " if len(queried) > 1 else "") + queried[-1]
    several = len(answers) > 1
    noun, verb = (plural, "are") if several else (singular, "is")

    if spec.haystack == "needle":
        # The haystack is itself made of needles: distractor keys with their own values (never
        # one of the answers). Split into words so the fit is exact to the token.
        taken = set(answers)
        filler = []
        for key in other_keys:
            value = _value(rng, spec.value_kind)
            while value in taken:
                value = _value(rng, spec.value_kind)
            filler.append(NEEDLE.format(plural=plural, key=key, value=value))
        filler = " ".join(filler).split()
    elif spec.haystack == "noise":
        filler = list(noise_words(2 * budget))
    else:
        # Two words per target token (wrapping round the end of the text): enough even for a
        # tokenizer that spends a single token on every word.
        prose = prose_words(metadata.get("haystack_path"), task=task, min_words=4 * budget)
        start = rng.randrange(len(prose))
        span = 2 * budget
        filler = list(prose[start:start + span]) + list(prose[:max(0, start + span - len(prose))])
    return NeedlePrompt(NIAH_INTRO[several].format(noun=noun),
                        NIAH_QUESTION[several].format(noun=noun, query=query),
                        NIAH_ANSWER.format(verb=verb, noun=noun, query=query), tuple(inserts),
                        tuple(filler), tuple(answers), tuple(depths))


def build_niah_sample(spec: NeedleSpec, task: str, metadata: Mapping[str, Any],
                      settings: BudgetSettings, rng: random.Random, length: int, index: int,
                      tokenizer: LengthTokenizer) -> dict[str, Any]:
    """One needle-in-a-haystack prompt of ``length`` tokens and its expected values."""
    frame = prompt_frame(settings, length, tokenizer, task=task)
    drawn = draw_needle_prompt(spec, task, metadata, rng, index, frame.budget, tokenizer)

    def render(words: Sequence[str]) -> str:
        return frame.lay_out(drawn.text(words), drawn.prefix)

    frame.check_room(tokenizer.count(render([])), task=task)
    fitted = fit_words(render, drawn.filler, tokenizer, frame.budget, task=task)
    return finish_row(frame, settings, fitted, drawn.prefix, outputs=list(drawn.answers),
                      depths=list(drawn.depths), needles=drawn.needles, haystack=spec.haystack)


def niah_dataset(task: str, **metadata: Any) -> dict[str, Any]:
    """The dataset of the NIAH variant ``task`` (see :data:`NIAH_VARIANTS`)."""
    spec = NIAH_VARIANTS[task]
    if spec.haystack != "prose" and metadata.get("haystack_path"):
        prose_words(metadata["haystack_path"], task=task, min_words=1)  # report a wrong path
    return ruler_dataset(task, "niah", metadata, partial(build_niah_sample, spec, task, metadata))


# --- Variable tracking ---------------------------------------------------------------------------

VT_INTRO = ("Variables are assigned among the filler sentences below; a variable can take its "
            "value from another one.\n\n")
VT_QUESTION = ("\n\nQuestion: Which variables hold the value {value}, directly or through other "
               "variables, in the text above?")
VT_ANSWER = "Answer: The {count} variables holding the value {value} in the text above are:"
VT_NUM_CHAINS = 1  # RULER's default: one chain (more chains would act as distractors)
VT_NUM_HOPS = 4  # RULER's default: a value copied four times, five variables in all
VT_EXAMPLE_TOKENS = 500  # RULER's one-shot example: a whole solved task of 500 tokens
VT_NAME_LETTERS, VT_EXAMPLE_NAME_LETTERS = 5, 3  # RULER's variable names: 5 letters, 3 in the example


def _variable_names(rng: random.Random, count: int, used: set[str],
                    letters: int = VT_NAME_LETTERS) -> list[str]:
    """``count`` fresh upper-case names of ``letters`` letters (RULER's), none in ``used``."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(letters))
        if name not in used:
            used.add(name)
            names.append(name)
    return names


def variable_chain(names: Sequence[str], value: str) -> list[str]:
    """The statements of one chain: the first name gets ``value``, each next one the previous."""
    first = [f"VAR {names[0]} = {value}."]
    return first + [f"VAR {name} = VAR {previous}." for previous, name in pairwise(names)]


def _chains(rng: random.Random, num_chains: int, num_hops: int, used_names: set[str],
            used_values: set[str], letters: int = VT_NAME_LETTERS
            ) -> list[tuple[str, list[str], list[str]]]:
    """``num_chains`` chains of ``num_hops`` copies each, as (value, names, statements), with
    distinct five-digit values and names."""
    chains = []
    for _ in range(num_chains):
        value = random_number(rng, digits=5)
        while value in used_values:
            value = random_number(rng, digits=5)
        used_values.add(value)
        names = _variable_names(rng, num_hops + 1, used_names, letters)
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


def vt_example(rng: random.Random, tokenizer: LengthTokenizer, size: int, *, num_hops: int,
               used_names: set[str], used_values: set[str], task: str) -> str:
    """RULER's one-shot example: a whole solved task of at most ``size`` tokens (intro, noise
    with one chain of three-letter names, question, answer prefix and the answer), or "" when
    not even the example's chain fits in ``size``."""
    [(value, names, statements)] = _chains(rng, 1, num_hops, used_names, used_values,
                                           VT_EXAMPLE_NAME_LETTERS)
    inserts = _chain_inserts(rng, [(value, names, statements)])
    solved = (VT_QUESTION.format(value=value) + " "
              + VT_ANSWER.format(count=len(names), value=value) + " " + " ".join(names))

    def render(words: Sequence[str]) -> str:
        return VT_INTRO + insert_at_depths(words, inserts) + solved

    if tokenizer.count(render([])) > size:
        return ""
    return fit_words(render, noise_words(2 * size), tokenizer, size, task=task).text


def build_vt_sample(task: str, settings: BudgetSettings, rng: random.Random, length: int,
                    index: int, tokenizer: LengthTokenizer, *, num_chains: int = VT_NUM_CHAINS,
                    num_hops: int = VT_NUM_HOPS) -> dict[str, Any]:
    """One variable-tracking prompt of ``length`` tokens: a one-shot example, then
    ``num_chains`` chains of assignments in the noise haystack; the answer is every variable of
    the first chain. As in RULER, the haystack is always the noise one (``haystack_path``
    unused).

    The example is RULER's (:func:`vt_example`, 500 tokens) but never takes more than a quarter
    of the budget, and is left out of prompts too short for a smaller one, so that the task
    still runs at 512 tokens.
    """
    frame = prompt_frame(settings, length, tokenizer, task=task)
    used_names: set[str] = set()
    used_values: set[str] = set()
    example = vt_example(rng, tokenizer, min(VT_EXAMPLE_TOKENS, frame.budget // 4),
                         num_hops=num_hops, used_names=used_names, used_values=used_values,
                         task=task)
    chains = _chains(rng, num_chains, num_hops, used_names, used_values)
    value, names, statements = chains[0]
    question = VT_QUESTION.format(value=value)
    prefix = VT_ANSWER.format(count=len(names), value=value)
    inserts = _chain_inserts(rng, chains)
    head = (example + "\n\n" if example else "") + VT_INTRO

    def render(words: Sequence[str]) -> str:
        return frame.lay_out(head + insert_at_depths(words, inserts) + question, prefix)

    frame.check_room(tokenizer.count(render([])), task=task)
    fitted = fit_words(render, noise_words(2 * frame.budget), tokenizer, frame.budget, task=task)
    return finish_row(frame, settings, fitted, prefix, outputs=names, needles=statements,
                      haystack="noise", example=example)


def vt_dataset(**metadata: Any) -> dict[str, Any]:
    """The dataset of ``acadlm_vt`` (variable tracking, RULER's num_chains=1, num_hops=4).

    Its haystack is the built-in noise, yet a ``haystack_path`` given to the whole suite is still
    checked here, so that a wrong path is reported by every task that receives it.
    """
    task = "acadlm_vt"
    if metadata.get("haystack_path"):
        prose_words(metadata["haystack_path"], task=task, min_words=1)
    return ruler_dataset(task, "vt", metadata, partial(build_vt_sample, task))


# --- Word lists ----------------------------------------------------------------------------------

def word_source(metadata: Mapping[str, Any], task: str, count: int) -> Sequence[str]:
    """At least ``count`` distinct words to draw a word list from, as RULER chooses them: its
    own short list when that is enough (ours: :data:`haystack.PLAIN_WORDS`), else a larger
    dictionary (ours: the prose haystack's vocabulary, 36,000 words for the embedded books),
    and past that adjective-noun pairs (a quarter of a million)."""
    if count <= len(PLAIN_WORDS):
        return PLAIN_WORDS
    vocabulary = prose_vocabulary(metadata.get("haystack_path") or None, task=task)
    if count <= len(vocabulary):
        return vocabulary
    return compound_words(random.Random(f"{task}:words"), count, task=task)


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


def numbered_list(words: Sequence[str], start: int = 1) -> str:
    """``1. word 2. word ...`` on one line, as RULER writes the list."""
    return " ".join(f"{number}. {word}" for number, word in enumerate(words, start=start))


# --- Common words extraction ---------------------------------------------------------------------

CWE_INTRO = ("Below is a numbered list of words. A few of the words come up much more often than "
             "all the others.\n\n")
CWE_QUESTION = "\n\nQuestion: Which {num} words come up most often in the numbered list above?"
CWE_ANSWER = "Answer: The {num} words that come up most often in the numbered list above are:"
CWE_NUM_CW = 10  # common words, the answer (RULER num_cw)
CWE_COMMON_SHARE = 0.8  # at most this share of a short list goes to the common words
CWE_TOP_UP_WORDS = 64  # unused words among which the top-up picks the cheapest


@dataclass(frozen=True)
class CweCounts:
    """RULER's word counts at one length: of the list and of its one-shot example."""

    freq_cw: int  # occurrences of each common word
    freq_ucw: int  # occurrences of each other word
    example_words: int  # distinct words of the example
    example_freq_cw: int
    example_freq_ucw: int


def cwe_counts(length: int) -> CweCounts:
    """RULER's numbers (common_words_extraction.py): below 4K tokens the common words come 6
    times and the others once, with a 20-word example (3 and 1); from 4K on, at every length, 30
    and 3 (``freq_cw``, ``freq_ucw``) with a 40-word example (10 and 3)."""
    if length < 4096:
        return CweCounts(6, 1, 20, 3, 1)
    return CweCounts(30, 3, 40, 10, 3)


@dataclass(frozen=True)
class WordListPlan:
    """How a common-words list of a given length is made: word counts and pool sizes."""

    freq_cw: int
    freq_ucw: int
    num_uncommon: int  # distinct uncommon words drawn
    pool_entries: int  # most uncommon entries the fit may use


def cwe_plan(entries: int, counts: CweCounts, *, num_cw: int = CWE_NUM_CW) -> WordListPlan:
    """Word frequencies for a list of about ``entries`` entries (an over-estimate): RULER's
    ``counts``, except in lists too short for them, where the common words keep at most
    :data:`CWE_COMMON_SHARE` of the list (``freq_cw`` at least 2) and the others at most half
    their frequency."""
    freq_cw = min(counts.freq_cw, max(2, int(CWE_COMMON_SHARE * entries / num_cw)))
    freq_ucw = min(counts.freq_ucw, max(1, (freq_cw - 1) // 2))
    pool = max(0, entries - num_cw * freq_cw)
    return WordListPlan(freq_cw, freq_ucw, -(-pool // freq_ucw), pool)


def _word_list_entries(common: Sequence[str], uncommon: Sequence[str], freq_cw: int,
                       freq_ucw: int, rng: random.Random) -> list[str]:
    entries = [word for word in common for _ in range(freq_cw)]
    entries += [word for word in uncommon for _ in range(freq_ucw)]
    rng.shuffle(entries)
    return entries


def cwe_example(rng: random.Random, counts: CweCounts) -> str:
    """RULER's one-shot example: a solved task over a short list (:func:`cwe_counts`) of
    :data:`haystack.PLAIN_WORDS`, answered as RULER's is, with a numbered list."""
    words = rng.sample(PLAIN_WORDS, counts.example_words)
    common, uncommon = pick_answers(words, CWE_NUM_CW, task="acadlm_cwe")
    entries = _word_list_entries(common, uncommon, counts.example_freq_cw,
                                 counts.example_freq_ucw, rng)
    return (CWE_INTRO + numbered_list(entries) + CWE_QUESTION.format(num=CWE_NUM_CW) + " "
            + CWE_ANSWER.format(num=CWE_NUM_CW) + " " + numbered_list(common))


def _tokens_per_entry(tokenizer: LengthTokenizer, rng: random.Random, budget: int) -> float:
    """Tokens of a list entry ("734. word") in a list filling ``budget`` tokens: measured on 200
    entries numbered as the middle of such a list is, since numbers grow longer down the list."""
    probe = rng.sample(PLAIN_WORDS, 200)
    per_entry = tokenizer.count(numbered_list(probe)) / len(probe)
    middle = max(1, int(budget / per_entry) // 2)
    return tokenizer.count(numbered_list(probe, start=middle)) / len(probe)


def build_cwe_sample(task: str, metadata: Mapping[str, Any], settings: BudgetSettings,
                     rng: random.Random, length: int, index: int,
                     tokenizer: LengthTokenizer) -> dict[str, Any]:
    """One common-words prompt of ``length`` tokens: RULER's one-shot example, then a shuffled
    numbered list in which :data:`CWE_NUM_CW` words occur ``freq_cw`` times and the others
    ``freq_ucw`` times (:func:`cwe_counts`); the answer is the common words. The list grows one
    entry at a time until the prompt fits. The example is left out when it would take more
    than half of the budget (at 512 tokens with SmolLM2's tokenizer)."""
    frame = prompt_frame(settings, length, tokenizer, task=task)
    counts = cwe_counts(length)
    question, prefix = CWE_QUESTION.format(num=CWE_NUM_CW), CWE_ANSWER.format(num=CWE_NUM_CW)
    example = cwe_example(rng, counts)
    if 2 * tokenizer.count(example) > frame.budget:
        example = ""
    head = (example + "\n\n" if example else "") + CWE_INTRO
    budget = max(0, frame.budget - tokenizer.count(frame.lay_out(head + question, prefix)))
    entries = int(1.1 * budget / _tokens_per_entry(tokenizer, rng, budget)) + 20
    plan = cwe_plan(entries, counts)
    needed = CWE_NUM_CW + plan.num_uncommon
    words = rng.sample(word_source(metadata, task, needed), needed)
    common, uncommon = pick_answers(words, CWE_NUM_CW, task=task)
    # Common words may cost more tokens than the average entry: a list too short for their
    # repeats repeats them less (as a shorter list would).
    while plan.freq_cw > 2 and tokenizer.count(frame.lay_out(
            head + numbered_list(common * plan.freq_cw) + question, prefix)) > frame.budget:
        entries = int(0.8 * entries)
        plan = cwe_plan(entries, counts)
    common_entries = [word for word in common for _ in range(plan.freq_cw)]
    pool = [word for word in uncommon for _ in range(plan.freq_ucw)][: plan.pool_entries]
    shuffle_seed = rng.randrange(2**32)

    def render(units: int, extras: Sequence[str] = ()) -> str:
        entries = [*common_entries, *pool[:units], *extras]
        random.Random(shuffle_seed).shuffle(entries)
        return frame.lay_out(head + numbered_list(entries) + question, prefix)

    frame.check_room(tokenizer.count(render(0)), task=task)
    coarse = fit_units(render, tokenizer, frame.budget, max_units=len(pool), task=task)
    # An entry ("734. word") can cost over 1% of a 1K prompt; the top-up adds single entries of
    # the cheapest words not yet in the list (once each, far below the common words' count).
    first_unused = -(-coarse.num_words // plan.freq_ucw)
    spare = sorted(uncommon[first_unused:first_unused + CWE_TOP_UP_WORDS],
                   key=lambda word: tokenizer.count(" " + word))
    fitted, _ = top_up(coarse, lambda extra: render(coarse.num_words, spare[:extra]), tokenizer,
                       frame.budget, max_units=len(spare), task=task)
    return finish_row(frame, settings, fitted, prefix, outputs=common, freq_cw=plan.freq_cw,
                      freq_ucw=plan.freq_ucw, example=example)


def cwe_dataset(**metadata: Any) -> dict[str, Any]:
    """The dataset of ``acadlm_cwe`` (common words extraction, RULER's counts per length)."""
    task = "acadlm_cwe"
    if metadata.get("haystack_path"):
        prose_words(metadata["haystack_path"], task=task, min_words=1)
    return ruler_dataset(task, "cwe", metadata, partial(build_cwe_sample, task, metadata))


# --- Frequent words extraction -------------------------------------------------------------------

FWE_INTRO = ("Below is a text written in coded words. Keep a count of how often each coded word "
             "comes up.\n\n")
FWE_QUESTION = ("\n\nQuestion: Give no explanation. Leaving the dots '...' aside, which {num} "
                "coded words come up most often in the text above?")
FWE_ANSWER = ("Answer: Leaving the dots aside, the {num} coded words that come up most often in "
              "the text above are:")
FWE_NUM_ANSWERS = 3  # RULER asks for the three most frequent words
FWE_ALPHA = 2.0  # RULER's Zipf exponent
FWE_TOKENS_PER_WORD = 50  # RULER's vocabulary: one coded word per 50 tokens of the length
FWE_MIN_VOCAB = 8  # the dots, three answers and a few words to tell them apart, however short
FWE_NOISE = "..."  # the most frequent "word", as in RULER: filler the question says to skip


def fwe_vocab_size(room: int) -> int:
    """RULER's vocabulary size for a prompt of ``room`` tokens (the length less the generation
    budget): one word per 50 tokens, the dots included."""
    return max(FWE_MIN_VOCAB, room // FWE_TOKENS_PER_WORD)


def zeta(alpha: float) -> float:
    """Riemann's zeta(alpha) for alpha > 1: the first 1000 terms and the Euler-Maclaurin tail
    (exact to 1e-12 here), the normalizer of RULER's Zipf law."""
    terms = 1000
    head = sum(rank ** -alpha for rank in range(1, terms))
    return (head + terms ** (1 - alpha) / (alpha - 1) + terms ** -alpha / 2
            + alpha * terms ** (-alpha - 1) / 12)


def zipf_counts(total: int, ranks: int, alpha: float = FWE_ALPHA) -> list[int]:
    """Occurrences of the words of rank 1..``ranks`` in a text of about ``total`` words:
    ``floor(total * k**-alpha / zeta(alpha))`` (RULER's law)."""
    norm = zeta(alpha)
    return [int(total * rank ** -alpha / norm) for rank in range(1, ranks + 1)]


def build_fwe_sample(task: str, settings: BudgetSettings, rng: random.Random, length: int,
                     index: int, tokenizer: LengthTokenizer) -> dict[str, Any]:
    """One frequent-words prompt of ``length`` tokens: a shuffled text of RULER's coded words
    (six random letters, :func:`fwe_vocab_size` of them) in which the word of rank k occurs in
    proportion to k**-2; rank 1 is the dots, so the answer is ranks 2 to 4. The text grows by
    about one word per unit until the prompt fits.
    """
    frame = prompt_frame(settings, length, tokenizer, task=task)
    ranked = [FWE_NOISE, *coded_words(rng, fwe_vocab_size(settings.room(length)) - 1)]
    answers = ranked[1:FWE_NUM_ANSWERS + 1]
    shuffle_seed = rng.randrange(2**32)
    question, prefix = (FWE_QUESTION.format(num=FWE_NUM_ANSWERS),
                        FWE_ANSWER.format(num=FWE_NUM_ANSWERS))

    def render(units: int, extra: int = 0) -> str:
        counts = zipf_counts(units, len(ranked))
        seen = sum(count > 0 for count in counts)
        words = [word for word, count in zip(ranked, counts) for _ in range(count)]
        words += ranked[seen:seen + extra]
        random.Random(shuffle_seed).shuffle(words)
        return frame.lay_out(FWE_INTRO + " ".join(words) + question, prefix)

    # Every word costs at least one token and flooring loses under one word per rank, so
    # ``budget + len(ranked)`` units already overflow; twice that is a safe ceiling.
    frame.check_room(tokenizer.count(render(0)), task=task)
    coarse = fit_units(render, tokenizer, frame.budget,
                       max_units=2 * (frame.budget + len(ranked)), task=task)
    counts = zipf_counts(coarse.num_words, len(ranked))
    # One step of the law can add several words at once; the top-up adds, once each, words of
    # the ranks the law has not reached yet.
    unseen = len(ranked) - sum(count > 0 for count in counts)
    fitted, extra = top_up(coarse, lambda more: render(coarse.num_words, more), tokenizer,
                           frame.budget, max_units=unseen, task=task)
    if counts[FWE_NUM_ANSWERS] <= max(counts[FWE_NUM_ANSWERS + 1], 1 if extra else 0):
        raise task_error(task, "max_seq_lengths", f"{length} tokens hold too few words to tell "
                         f"the {FWE_NUM_ANSWERS} most frequent apart.", "Use a longer length.")
    return finish_row(frame, settings, fitted, prefix, outputs=answers,
                      answer_counts=counts[1:FWE_NUM_ANSWERS + 1], vocab_size=len(ranked))


def fwe_dataset(**metadata: Any) -> dict[str, Any]:
    """The dataset of ``acadlm_fwe`` (frequent words extraction, RULER's alpha=2.0 and
    vocabulary of one coded word per 50 tokens). Its words are made up, yet a ``haystack_path``
    given to the whole suite is still checked here."""
    task = "acadlm_fwe"
    if metadata.get("haystack_path"):
        prose_words(metadata["haystack_path"], task=task, min_words=1)
    return ruler_dataset(task, "fwe", metadata, partial(build_fwe_sample, task))


# RULER's NIAH (prose variants), CWE's vocabulary, and a wrong path reported by VT, FWE and the
# noise-haystack variants (HELMET's needle tasks read it too).
declare_settings("RULER's synthetic tasks, HELMET's needle tasks", {
    "haystack_path": path_check("haystack_path")})
