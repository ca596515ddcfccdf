"""The RULER-style synthetic tasks: 8 needle-in-a-haystack variants, variable tracking, common
and frequent words extraction.

Prompts are built with a small byte-level BPE tokenizer and a prose file written by
``eval_fixtures`` (no model download, no embedded corpus), except for one integration test that
sizes every task with the embedded SmolLM2 tokenizer. Scoring goes through lm-eval itself with a
perfect model (must score 100) and a constant one (must score 0); the sizing, depth and error
checks call the dataset builders directly, which is much faster.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from eval_doubles import ConstantLM, OracleLM
from eval_fixtures import EVAL_MAX_POSITIONS, MAX_SENTENCE_WORDS, EvalFiles, write_eval_files

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.evaluation import task_manager
from acadlm_plugins.evaluation.lengths import load_length_tokenizer
from acadlm_plugins.evaluation.prompting import fit_prompt, random_uuid
from acadlm_plugins.evaluation.ruler import (
    CWE_NUM_CW,
    FWE_NOISE,
    NIAH_VARIANTS,
    VOCAB_CAP,
    VT_NUM_HOPS,
    cwe_dataset,
    cwe_plan,
    fit_words,
    fwe_dataset,
    niah_dataset,
    pick_answers,
    vt_dataset,
    zipf_counts,
)

BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {
    **{name: partial(niah_dataset, name) for name in NIAH_VARIANTS},
    "acadlm_vt": vt_dataset,
    "acadlm_cwe": cwe_dataset,
    "acadlm_fwe": fwe_dataset,
}
TASKS = sorted(BUILDERS)
NIAH_TASKS = sorted(NIAH_VARIANTS)
SIZED_LENGTHS = [1024, 2048]  # the 1% contract holds from 1K tokens up
SCORED_LENGTHS = [512, 1024]
CONSTANT_ANSWER = "I do not know."


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> EvalFiles:
    """The tiny tokenizer folder (max_position_embeddings 4096) and prose haystack."""
    return write_eval_files(tmp_path_factory.mktemp("ruler"))


def build(files: EvalFiles, task: str, **metadata: Any) -> list[dict[str, Any]]:
    """The rows of ``task`` built from ``files`` with ``metadata`` on top."""
    return BUILDERS[task](**files.metadata(**metadata))["test"].to_list()


@pytest.fixture(scope="module")
def sized(files: EvalFiles) -> dict[str, list[dict[str, Any]]]:
    """Every task's rows at 1K and 2K tokens, three samples each, built once for the module."""
    return {task: build(files, task, max_seq_lengths=SIZED_LENGTHS, num_samples=3)
            for task in TASKS}


@pytest.fixture(scope="module")
def scores(files: EvalFiles) -> dict[str, dict[str, Any]]:
    """lm-eval results of the oracle and the constant model on all tasks at 512 and 1024
    tokens, two samples each.

    The task manager skips lm-eval's own task index (several seconds) since only ours are run.
    """
    from lm_eval import simple_evaluate

    manager = task_manager(files.metadata(max_seq_lengths=SCORED_LENGTHS, num_samples=2),
                           include_defaults=False)
    results = {}
    for name, model in (("oracle", OracleLM()), ("constant", ConstantLM(CONSTANT_ANSWER))):
        results[name] = simple_evaluate(model=model, tasks=TASKS, task_manager=manager,
                                        log_samples=True)
    return results


def _length_scores(results: dict[str, Any], task: str) -> dict[int, float]:
    return {int(key.split(",")[0]): value for key, value in results["results"][task].items()
            if re.fullmatch(r"\d+,none", key)}


@pytest.mark.parametrize("task", TASKS)
def test_oracle_scores_100_and_constant_model_0_at_every_length(scores, task: str) -> None:
    oracle = _length_scores(scores["oracle"], task)
    constant = _length_scores(scores["constant"], task)
    assert oracle == {length: 100.0 for length in SCORED_LENGTHS}
    assert constant == {length: 0.0 for length in SCORED_LENGTHS}
    samples = scores["oracle"]["samples"][task]
    assert len(samples) == 2 * len(SCORED_LENGTHS)
    for sample in samples:  # the model saw the prompt as built, answer prefix last
        assert sample["arguments"][0][0] == sample["doc"]["input"]
        assert sample["doc"]["input"].rstrip().endswith(("are:", "is", "are"))


@pytest.mark.parametrize("task", TASKS)
def test_prompts_fill_their_length_within_one_percent(files: EvalFiles, sized, task: str) -> None:
    tokenizer = load_length_tokenizer(files.metadata(), task=task)
    rows = sized[task]
    assert sorted({row["max_length"] for row in rows}) == SIZED_LENGTHS
    for row in rows:
        assert tokenizer.count(row["input"]) == row["input_tokens"]
        assert 0.99 * row["max_length"] <= row["input_tokens"] <= row["max_length"], row["index"]


@pytest.mark.parametrize("task", NIAH_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.35, 0.8, 1.0])
def test_needles_appear_once_at_the_requested_depth(files: EvalFiles, task: str,
                                                    depth: float) -> None:
    """Each needle sits at ``depth`` of the haystack, measured in haystack words (the
    needles themselves left out). ``insert_at_depths`` moves an insert back to the end of the
    sentence before its depth, so it may lie up to one sentence early and never late; the
    longest sentence of the prose haystack here has MAX_SENTENCE_WORDS words (noise: 8, needle
    haystacks: 10)."""
    [row] = build(files, task, max_seq_lengths=[1024], num_samples=1, depth=depth)
    text = row["input"]
    assert row["depths"] == [depth] * len(row["needles"])
    for answer in row["outputs"]:
        assert text.count(answer) == 1
    haystack = text[text.index("\n\n") + 2: text.rindex("\n\nQuestion:")]
    bare = haystack
    for needle in row["needles"]:
        assert text.count(needle) == 1
        bare = bare.replace(needle, " ")
    total = len(bare.split())
    for needle in row["needles"]:
        before = haystack[: haystack.index(needle)]
        for other in row["needles"]:
            before = before.replace(other, " ")
        position, wanted = len(before.split()), round(depth * total)
        assert 0 <= wanted - position <= MAX_SENTENCE_WORDS, (position, wanted, total)
        assert abs(position / total - depth) <= (MAX_SENTENCE_WORDS + 1) / total


def test_vt_chain_appears_once_in_order_and_names_every_variable(sized) -> None:
    for row in sized["acadlm_vt"]:
        text = row["input"]
        body = text[text.index("The text:"):] if "The text:" in text else text
        positions = [body.index(statement) for statement in row["needles"]]
        assert all(text.count(statement) == 1 for statement in row["needles"])
        assert positions == sorted(positions)
        assert len(row["outputs"]) == VT_NUM_HOPS + 1
        value = row["needles"][0].split(" = ")[1].rstrip(".")
        assert text.endswith(f"holding the value {value} in the text above are:")
        for name, statement in zip(row["outputs"], row["needles"]):
            assert statement.startswith(f"VAR {name} = ")


def test_cwe_common_words_are_the_most_frequent_of_the_list(sized) -> None:
    for row in sized["acadlm_cwe"]:
        body = row["input"].split("\n\n")[1]
        tokens = body.split()
        numbers, words = tokens[0::2], tokens[1::2]
        assert numbers == [f"{i}." for i in range(1, len(words) + 1)]
        counts = Counter(words)
        assert len(row["outputs"]) == CWE_NUM_CW
        assert all(counts[word] == row["freq_cw"] for word in row["outputs"])
        others = [count for word, count in counts.items() if word not in row["outputs"]]
        assert max(others) <= row["freq_ucw"] < row["freq_cw"]


def test_fwe_answers_are_the_three_most_frequent_words(sized) -> None:
    for row in sized["acadlm_fwe"]:
        body = row["input"].split("\n\n")[1]
        counts = Counter(body.split())
        ranked = [word for word, _ in counts.most_common() if word != FWE_NOISE]
        assert ranked[:3] == row["outputs"]
        assert [counts[word] for word in row["outputs"]] == row["answer_counts"]
        assert counts[ranked[2]] > counts[ranked[3]]
        assert counts[FWE_NOISE] > counts[ranked[0]]


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_prompts_other_seed_other_prompts(files: EvalFiles, task: str) -> None:
    def prompts(seed: int) -> list[str]:
        rows = build(files, task, max_seq_lengths=[512], num_samples=2, seed=seed)
        return [row["input"] for row in rows]

    first = prompts(7)
    assert prompts(7) == first
    assert all(a != b for a, b in zip(prompts(8), first))


@pytest.mark.parametrize("task", TASKS)
def test_length_over_the_model_context_names_task_and_field(files: EvalFiles, task: str) -> None:
    with pytest.raises(ConfigError, match=rf"`{task}: max_seq_lengths`: \[8192\] exceed the "
                                          rf"model's maximum context of {EVAL_MAX_POSITIONS}"):
        build(files, task, max_seq_lengths=[1024, 8192], num_samples=1)


@pytest.mark.parametrize("task", TASKS)
def test_missing_haystack_file_names_task_and_field(files: EvalFiles, tmp_path: Path,
                                                    task: str) -> None:
    missing = tmp_path / "no_such_haystack.txt"
    with pytest.raises(ConfigError, match=rf"`{task}: haystack_path`: .*does not exist"):
        build(files, task, max_seq_lengths=[512], num_samples=1, haystack_path=str(missing))


@pytest.mark.parametrize("task", ["acadlm_niah_single_2", "acadlm_vt", "acadlm_cwe",
                                  "acadlm_fwe"])
@pytest.mark.parametrize(("bad_line", "problem"), [
    ("{not json", "is not valid JSON"),
    ('{"content": "no text field"}', "field `text` is missing or not a string"),
])
def test_malformed_jsonl_haystack_names_file_and_line(files: EvalFiles, tmp_path: Path,
                                                      task: str, bad_line: str,
                                                      problem: str) -> None:
    haystack = tmp_path / "hay.jsonl"
    good = json.dumps({"text": files.haystack.read_text()})
    haystack.write_text(f"{good}\n\n{bad_line}\n{good}\n")
    with pytest.raises(ConfigError, match=rf"`{task}: haystack_path`: "
                                          rf"{re.escape(str(haystack))}:3:? {re.escape(problem)}"):
        build(files, task, max_seq_lengths=[512], num_samples=1, haystack_path=str(haystack))


@pytest.mark.parametrize("task", ["acadlm_niah_multikey_3", "acadlm_vt", "acadlm_fwe"])
def test_missing_tokenizer_is_a_clear_error(files: EvalFiles, tmp_path: Path, task: str) -> None:
    metadata = {"max_seq_lengths": [512], "haystack_path": str(files.haystack)}
    with pytest.raises(ConfigError, match=rf"`{task}: tokenizer`: no tokenizer"):
        BUILDERS[task](**metadata)
    with pytest.raises(ConfigError, match=rf"`{task}: pretrained`: .*not a local tokenizer"):
        BUILDERS[task](**metadata, pretrained=str(tmp_path))


def test_fit_words_tops_up_with_part_of_a_long_word(files: EvalFiles) -> None:
    """UUIDs cost about 36 tokens each here, more than 1% of 1024: whole words alone fall short
    for most targets, and the top-up with a prefix of the next UUID closes the gap."""
    import random

    tokenizer = load_length_tokenizer(files.metadata(), task="t")
    rng = random.Random(0)
    words = [random_uuid(rng) for _ in range(100)]

    def render(kept: list[str]) -> str:
        return "Codes: " + " ".join(kept)

    short = [target for target in range(1024, 1044)
             if fit_prompt(lambda n: render(words[:n]), tokenizer, target, max_units=len(words),
                           task="t").num_tokens < 0.99 * target]
    assert short, "whole UUIDs should miss 1% for some target"
    for target in short:
        fitted = fit_words(render, words, tokenizer, target, task="t")
        assert 0.99 * target <= fitted.num_tokens <= target
        last = fitted.text.split()[-1]
        assert last not in words and words[fitted.num_words - 1].startswith(last)


def test_cwe_plan_keeps_common_words_more_frequent_at_every_size() -> None:
    assert (cwe_plan(800).freq_cw, cwe_plan(800).freq_ucw) == (30, 3)  # RULER's 4K setting
    assert (cwe_plan(300).freq_cw, cwe_plan(300).freq_ucw) == (12, 3)  # 40% of a short list
    assert (cwe_plan(60).freq_cw, cwe_plan(60).freq_ucw) == (2, 1)  # the floor
    huge = cwe_plan(100_000)  # far more entries than VOCAB_CAP distinct words x 3
    assert huge.num_uncommon + CWE_NUM_CW <= VOCAB_CAP
    assert huge.freq_cw == 10 * huge.freq_ucw and huge.freq_ucw > 3
    assert huge.num_uncommon * huge.freq_ucw >= huge.pool_entries


def test_pick_answers_skips_words_found_inside_other_words() -> None:
    answers, rest = pick_answers(["then", "thence", "river", "rivers", "lamp", "hill"], 2,
                                 task="t")
    assert answers == ["thence", "rivers"]
    assert rest == ["then", "river", "lamp", "hill"]
    with pytest.raises(ConfigError, match="`t: haystack_path`"):
        pick_answers(["a", "ab", "abc"], 2, task="t")


def test_zipf_counts_follow_the_power_law() -> None:
    counts = zipf_counts(1000, 2000)
    assert counts[:5] == [608, 152, 67, 38, 24]
    assert counts == sorted(counts, reverse=True) and sum(counts) <= 1000


@pytest.mark.integration
def test_smollm2_tokenizer_sizes_every_task_at_4096_within_one_percent() -> None:
    from acadlm_plugins.defaults import require_default_model

    model_dir = str(require_default_model())
    tokenizer = load_length_tokenizer({"pretrained": model_dir}, task="t")
    for task in TASKS:
        rows = BUILDERS[task](pretrained=model_dir, max_seq_lengths=[4096], num_samples=2)
        for row in rows["test"]:
            assert 0.99 * 4096 <= row["input_tokens"] <= 4096, task
            assert tokenizer.count(row["input"]) == row["input_tokens"], task
