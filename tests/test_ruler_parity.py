"""Our needle-in-a-haystack tasks against lm-eval's own ``ruler`` tasks, on the embedded model.

lm-eval's RULER builds its prompts with ``wonderwords`` (key words) and ``nltk`` (sentence
splitting), and its essay haystack is downloaded (``baber/paul_graham_essays``). Offline, the
three variants without essays can be built: ``niah_single_1`` (noise haystack, "repeat" in
lm-eval), ``niah_multikey_2`` and ``niah_multikey_3`` (haystacks of needles). They need
``wonderwords`` only for its adjective and noun lists: when it is not installed, a stand-in
module hands lm-eval our own lists (``haystack.ADJECTIVES`` and ``NOUNS``), and ``nltk.download``
is held off while lm-eval imports (it would fetch ``punkt_tab``, which these variants never use).
The other five variants need the essays and are not compared here.

Checked for those three, on every prompt of 1K and 2K tokens of both: the same structure
(instruction, then the haystack with the needles, then the question; the answer prefix apart,
as ``gen_prefix``), the same needle sentence, the same question and answer prefix up to their
last words ("in the text above" / "in the provided text"), the same kinds of keys, values and
haystack. Then the scores of SmolLM2-135M-Instruct on a few 1K prompts of each, within the noise
of so few samples (see :func:`score_tolerance`).
"""

from __future__ import annotations

import math
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from acadlm_plugins.evaluation import TASKS_DIR
from acadlm_plugins.evaluation.haystack import ADJECTIVES, NOUNS
from acadlm_plugins.evaluation.lengths import load_length_tokenizer
from acadlm_plugins.evaluation.ruler import niah_dataset

pytestmark = pytest.mark.integration

#: Our task -> lm-eval's, for the variants lm-eval can build offline.
OFFLINE = {"acadlm_niah_single_1": "niah_single_1",
           "acadlm_niah_multikey_2": "niah_multikey_2",
           "acadlm_niah_multikey_3": "niah_multikey_3"}
LENGTHS = [1024, 2048]
#: Scored on the model: the two variants with 7-digit answers (UUIDs need 30+ tokens).
SCORED = ["acadlm_niah_single_1", "acadlm_niah_multikey_2"]
SCORED_LENGTH = 1024
SCORED_SAMPLES = 8
ANSWER_TOKENS = 16  # " 1234567." is 9 tokens of SmolLM2's; both sides get the same budget

NEEDLE = re.compile(r"One of the special magic (\w+) for (\S+) is: (\S+)\.")
QUESTION = re.compile(r"What is the special magic (\w+) for (\S+) mentioned in the "
                      r"(?:provided text|text above)\?")
ANSWER_PREFIX = re.compile(r"The special magic (\w+) for (\S+) mentioned in the "
                           r"(?:provided text|text above) is")
WORD_KEY = re.compile(r"[a-z]+-[a-z]+")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}")
SEVEN_DIGITS = re.compile(r"[1-9]\d{6}")
KINDS = {"niah_single_1": ("noise", WORD_KEY, SEVEN_DIGITS, "number"),
         "niah_multikey_2": ("needle", WORD_KEY, SEVEN_DIGITS, "number"),
         "niah_multikey_3": ("needle", UUID, UUID, "uuid")}


class _WordLists:
    """What lm-eval reads from ``wonderwords.RandomWord``: its adjective and noun lists."""

    def __init__(self) -> None:
        self._categories = {"adjectives": list(ADJECTIVES), "nouns": list(NOUNS), "verbs": []}


@pytest.fixture(scope="module")
def lm_eval_niah() -> Iterator[types.ModuleType]:
    """lm-eval's ``niah_utils``, imported offline (see the module docstring)."""
    nltk = pytest.importorskip("nltk")
    with pytest.MonkeyPatch.context() as patch:
        try:
            import wonderwords  # noqa: F401
        except ImportError:
            patch.setitem(sys.modules, "wonderwords",
                          types.SimpleNamespace(RandomWord=_WordLists))
        patch.setattr(nltk, "download", lambda *args, **kwargs: False)
        from lm_eval.tasks.ruler import niah_utils

        yield niah_utils


@pytest.fixture(scope="module")
def model_dir() -> str:
    from acadlm_plugins.defaults import require_default_model

    return str(require_default_model())


@pytest.fixture(scope="module")
def prompts(lm_eval_niah: types.ModuleType, model_dir: str) -> dict[str, dict[str, list]]:
    """Rows of both sides at 1K and 2K: lm-eval builds 500 per length (its fixed number), we
    build 20."""
    built: dict[str, dict[str, list]] = {}
    for ours, theirs in OFFLINE.items():
        built[theirs] = {
            "ours": niah_dataset(ours, tokenizer=model_dir, max_seq_lengths=LENGTHS,
                                 num_samples=20)["test"].to_list(),
            "theirs": getattr(lm_eval_niah, theirs)(pretrained=model_dir,
                                                    max_seq_lengths=LENGTHS)["test"].to_list()}
    return built


def parts(text: str) -> tuple[str, str, str]:
    """(instruction, haystack, question) of a NIAH input: its first line, the lines between and
    its last line (lm-eval separates them by one line break, we by a blank line)."""
    lines = [line for line in text.split("\n") if line.strip()]
    return lines[0], "\n".join(lines[1:-1]), lines[-1]


def needle_fragment(text: str, plural: str) -> bool:
    """Whether ``text`` is empty or the start of a needle sentence: a haystack of needles cut to
    the token may end in part of one (ours does)."""
    opening = f"One of the special magic {plural} for "
    return text == "" or opening.startswith(text) or text.startswith(opening)


@pytest.mark.parametrize("theirs", sorted(KINDS))
def test_same_prompt_structure_as_lm_evals_ruler(prompts, theirs: str) -> None:
    haystack_kind, key_form, value_form, noun = KINDS[theirs]
    plural = noun + "s"
    for side in ("ours", "theirs"):
        rows = prompts[theirs][side]
        assert {row["max_length"] for row in rows} == set(LENGTHS)
        for row in rows:
            intro, haystack, question = parts(row["input"])
            # Instruction first: it names what is hidden.
            assert f"special magic {noun}" in intro.lower() and "hidden" in intro, (side, intro)
            # The question last, about one key; the answer prefix apart, about the same key.
            asked = QUESTION.fullmatch(question)
            prefixed = ANSWER_PREFIX.fullmatch(row["gen_prefix"])
            assert asked and prefixed, (side, question, row["gen_prefix"])
            assert asked.group(1) == prefixed.group(1) == noun
            key = asked.group(2)
            assert prefixed.group(2) == key and key_form.fullmatch(key)
            assert row["gen_prefix"] not in row["input"]
            # Needles: RULER's sentence, plural noun; the asked one holds the answer, once.
            needles = NEEDLE.findall(haystack)
            assert needles and {found[0] for found in needles} == {plural}
            assert all(key_form.fullmatch(k) and value_form.fullmatch(v) for _, k, v in needles)
            [answer] = row["outputs"]
            assert [v for _, k, v in needles if k == key] == [answer]
            assert row["input"].count(answer) == 1
            rest = NEEDLE.sub("", haystack)
            if haystack_kind == "noise":  # one needle among repeated plain sentences
                assert len(needles) == 1
                sentences = [s for s in re.split(r"(?<=\.)\s+", rest.strip()) if s]
                assert not re.search(r"\d", rest) and len(set(sentences)) <= 5
                assert len(sentences) >= 4 * len(set(sentences))
            else:  # the haystack is needles with other keys
                assert len(needles) > 5 and needle_fragment(rest.strip(), plural)


@pytest.mark.parametrize("theirs", sorted(KINDS))
def test_both_leave_rulers_generation_budget_inside_the_length(prompts, model_dir: str,
                                                               theirs: str) -> None:
    """RULER's sizing on both sides: prompt + 128 generated tokens <= L. Ours fills 99% of
    the rest; lm-eval's adds haystack units of 5-25 sentences and stops short."""
    tokenizer = load_length_tokenizer({"tokenizer": model_dir}, task="t")
    for row in prompts[theirs]["ours"]:
        assert 0.99 * (row["max_length"] - 128) <= row["input_tokens"]
        assert row["input_tokens"] + row["tokens_to_generate"] <= row["max_length"]
    for row in prompts[theirs]["theirs"][::50]:
        assert tokenizer.count(row["input"]) + 128 <= row["max_length"]


def score_tolerance(mean: float, samples: int) -> float:
    """How far two accuracies of ``samples`` prompts each may differ by chance alone: the 95%
    two-sided bound of the difference of two binomial proportions with the pooled ``mean``,
    1.96 * sqrt(2 p (1 - p) / n), plus one sample (1 / n) for the discreteness of so few
    prompts. At n = 8: 0.125 when both score 0 or both 1, 0.36 at p = 0.9375, 0.57 at p = 0.3,
    0.62 at p = 0.5. Greedy decoding makes each prompt's score fixed; the noise is in which
    keys, values and positions the two builders drew."""
    return 1.96 * math.sqrt(2 * mean * (1 - mean) / samples) + 1 / samples


def test_same_scores_as_lm_evals_ruler_on_the_embedded_model(lm_eval_niah: types.ModuleType,
                                                             model_dir: str) -> None:
    """SmolLM2-135M-Instruct (lm-eval's ``hf`` model, greedy) on the first eight 1K prompts of
    each side, both generating at most 16 tokens. lm-eval scores 0-1, we score 0-100."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm_eval_ruler = Path(sys.modules["lm_eval.tasks"].__file__).parent / "ruler"
    manager = TaskManager(include_path=[str(TASKS_DIR), str(lm_eval_ruler)],
                          include_defaults=False,
                          metadata={"pretrained": model_dir, "max_seq_lengths": [SCORED_LENGTH],
                                    "num_samples": SCORED_SAMPLES})
    model = HFLM(pretrained=model_dir, device="cpu", batch_size=SCORED_SAMPLES,
                 max_length=SCORED_LENGTH)
    tasks = [*SCORED, *(OFFLINE[task] for task in SCORED)]
    results = simple_evaluate(model=model, tasks=tasks, task_manager=manager,
                              limit=SCORED_SAMPLES, gen_kwargs=f"max_gen_toks={ANSWER_TOKENS}",
                              verbosity="ERROR")["results"]
    metric = f"{SCORED_LENGTH},none"
    for ours in SCORED:
        mine, theirs = results[ours][metric] / 100.0, results[OFFLINE[ours]][metric]
        tolerance = score_tolerance((mine + theirs) / 2, SCORED_SAMPLES)
        assert abs(mine - theirs) <= tolerance + 1e-9, (ours, mine, theirs, tolerance)
