"""The RULER-style synthetic tasks: 8 needle-in-a-haystack variants, variable tracking, common
and frequent words extraction.

Prompts are built with a small byte-level BPE tokenizer and a prose file written by
``eval_fixtures`` (no model download, no embedded corpus), except for one integration test that
sizes every task with the embedded SmolLM2 tokenizer (``test_task_build_scaling.py`` times them
up to 128K). Scoring goes through lm-eval itself with a perfect model (must score 100) and a
constant one (must score 0); the sizing, depth and error checks call the dataset builders
directly, which is much faster.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from eval_doubles import (
    CHAT_TEMPLATE,
    BlankLineFirstOracleLM,
    ChatOracleLM,
    ConstantLM,
    OracleLM,
)
from eval_fixtures import (
    EVAL_MAX_POSITIONS,
    MAX_SENTENCE_WORDS,
    EvalFiles,
    time_limit,
    write_eval_files,
)

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.evaluation import TASKS_DIR, task_manager
from acadlm_plugins.evaluation.haystack import (
    ADJECTIVES,
    COMPOUND_SPACE,
    NOUNS,
    PLAIN_WORDS,
    compound_words,
)
from acadlm_plugins.evaluation.lengths import (
    LengthTokenizer,
    load_length_tokenizer,
    model_max_length,
    parse_lengths,
)
from acadlm_plugins.evaluation.prompting import fit_prompt, random_uuid
from acadlm_plugins.evaluation.report import length_table
from acadlm_plugins.evaluation.ruler import (
    CWE_NUM_CW,
    FWE_NOISE,
    NIAH_VARIANTS,
    TOKENS_TO_GENERATE,
    VT_NUM_HOPS,
    PromptFrame,
    cwe_counts,
    cwe_dataset,
    cwe_plan,
    fit_units,
    fit_words,
    fwe_dataset,
    fwe_vocab_size,
    niah_dataset,
    pick_answers,
    vt_dataset,
    zipf_counts,
)
from acadlm_plugins.evaluation.task_base import process_results_match_all

BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {
    **{name: partial(niah_dataset, name) for name in NIAH_VARIANTS},
    "acadlm_vt": vt_dataset,
    "acadlm_cwe": cwe_dataset,
    "acadlm_fwe": fwe_dataset,
}
TASKS = sorted(BUILDERS)
NIAH_TASKS = sorted(NIAH_VARIANTS)
KIND = {**{name: "niah" for name in NIAH_TASKS}, "acadlm_vt": "vt", "acadlm_cwe": "cwe",
        "acadlm_fwe": "fwe"}
SIZED_LENGTHS = [1024, 2048]  # the 1% contract holds from 1K tokens up
SCORED_LENGTHS = [1024, 2048]
CONSTANT_ANSWER = "I do not know."
COMPOUND_KEY = re.compile(r"[a-z]{4,12}-[a-z]{4,12}")
#: A chat template in the shape of SmolLM2's, for the tiny test tokenizer.
@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> EvalFiles:
    """The tiny tokenizer folder (max_position_embeddings 4096) and prose haystack."""
    return write_eval_files(tmp_path_factory.mktemp("ruler"))


def build(files: EvalFiles, task: str, **metadata: Any) -> list[dict[str, Any]]:
    """The rows of ``task`` built from ``files`` with ``metadata`` on top."""
    return BUILDERS[task](**files.metadata(**metadata))["test"].to_list()


def plain_prompt(row: dict[str, Any]) -> str:
    """The prompt lm-eval writes for a row without a chat template."""
    return PromptFrame(0).lay_out(row["input"], row["gen_prefix"])


@pytest.fixture(scope="module")
def sized(files: EvalFiles) -> dict[str, list[dict[str, Any]]]:
    """Every task's rows at 1K and 2K tokens, three samples each, built once for the module."""
    return {task: build(files, task, max_seq_lengths=SIZED_LENGTHS, num_samples=3)
            for task in TASKS}


@pytest.fixture(scope="module")
def chat_files(files: EvalFiles, tmp_path_factory: pytest.TempPathFactory) -> EvalFiles:
    """The tiny model folder with a chat template."""
    model = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(files.model_dir, model)
    (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return EvalFiles(model, files.haystack)


@pytest.fixture(scope="module")
def scores(files: EvalFiles, chat_files: EvalFiles) -> dict[str, dict[str, Any]]:
    """lm-eval results of the oracle and the constant model on all tasks at 1024 and 2048
    tokens, two samples each, and of the oracle under a chat template at 1024 tokens.

    The task manager skips lm-eval's own task index (several seconds) since only ours are run.
    """
    from lm_eval import simple_evaluate

    manager = task_manager(files.metadata(max_seq_lengths=SCORED_LENGTHS, num_samples=2),
                           include_defaults=False)
    results = {}
    for name, model in (("oracle", OracleLM()), ("constant", ConstantLM(CONSTANT_ANSWER))):
        results[name] = simple_evaluate(model=model, tasks=TASKS, task_manager=manager,
                                        log_samples=True)
    chat_manager = task_manager(chat_files.metadata(max_seq_lengths=[1024], num_samples=1,
                                                    apply_chat_template=True),
                                include_defaults=False)
    results["chat"] = simple_evaluate(model=ChatOracleLM(), tasks=TASKS,
                                      task_manager=chat_manager, log_samples=True,
                                      apply_chat_template=True)
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
        doc = sample["doc"]
        assert sample["arguments"][0][0] == plain_prompt(doc)
        assert doc["input"] == doc["input"].strip() and doc["input"].endswith("?")
        assert plain_prompt(doc).endswith(" " + doc["gen_prefix"])


@pytest.mark.parametrize("task", TASKS)
def test_chat_template_puts_the_answer_prefix_after_the_assistant_header(
        scores, chat_files: EvalFiles, task: str) -> None:
    """Under ``--apply_chat_template`` the input is the user's turn and the answer prefix opens
    the assistant's; with ``apply_chat_template`` in the metadata the whole chat prompt, its
    generation included, fits the length."""
    tokenizer = load_length_tokenizer(chat_files.metadata(), task=task)
    [sample] = scores["chat"]["samples"][task]
    doc, prompt = sample["doc"], sample["arguments"][0][0]
    assert prompt == (f"<|im_start|>user\n{doc['input']}<|im_end|>\n<|im_start|>assistant\n"
                      f"{doc['gen_prefix']}")
    assert tokenizer.count(prompt) == doc["input_tokens"]
    assert doc["input_tokens"] + doc["tokens_to_generate"] <= 1024
    assert doc["input_tokens"] >= 0.99 * (1024 - doc["tokens_to_generate"])
    assert _length_scores(scores["chat"], task) == {1024: 100.0}


@pytest.mark.parametrize("task", TASKS)
def test_generation_budget_comes_from_the_yaml_and_is_rulers(scores, task: str) -> None:
    config = scores["oracle"]["configs"][task]
    assert config["generation_kwargs"]["max_gen_toks"] == TOKENS_TO_GENERATE[KIND[task]]
    for sample in scores["oracle"]["samples"][task]:
        assert sample["doc"]["tokens_to_generate"] == TOKENS_TO_GENERATE[KIND[task]]
    assert config["gen_prefix"] == "{{gen_prefix}}"


@pytest.mark.parametrize("task", TASKS)
def test_generation_stops_at_no_string_as_rulers(scores, task: str) -> None:
    """RULER generates without stop words (config_tasks.sh: STOP_WORDS=""), as lm-eval's own
    ``ruler`` tasks (``until: []``): a generation ends at ``max_gen_toks`` or at EOS."""
    assert scores["oracle"]["configs"][task]["generation_kwargs"]["until"] == []
    for sample in scores["oracle"]["samples"][task]:
        assert sample["arguments"][0][1]["until"] == []


def test_an_answer_after_a_blank_line_is_scored_on_its_content(files: EvalFiles) -> None:
    """A model that opens its answer with a blank line (SmolLM2 on FWE) is scored on what
    follows it, at the level of the scoring function and through lm-eval."""
    from lm_eval import simple_evaluate

    doc = {"outputs": ["ahvzqe", "pmlrto"], "max_length": 1024}
    assert process_results_match_all(doc, ["\n\n ahvzqe, pmlrto"]) == {"1024": 100.0}
    manager = task_manager(files.metadata(max_seq_lengths=[1024], num_samples=1),
                           include_defaults=False)
    results = simple_evaluate(model=BlankLineFirstOracleLM(), tasks=TASKS, task_manager=manager,
                              log_samples=True)
    for task in TASKS:
        [sample] = results["samples"][task]
        assert sample["resps"][0][0].startswith("\n\n")
        assert _length_scores(results, task) == {1024: 100.0}, task


class _NeedlesOnlyLM(OracleLM):
    """Right on the needle-in-a-haystack tasks, wrong on the others."""

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        right = super().generate_until(requests)
        return [answer if request.task_name.startswith("acadlm_niah_") else CONSTANT_ANSWER
                for request, answer in zip(requests, right, strict=True)]


def test_the_ruler_group_prints_the_plain_mean_of_its_tasks(files: EvalFiles) -> None:
    """RULER's score is the unweighted mean of its tasks' scores: 8 NIAH tasks right and VT,
    CWE and FWE wrong give 800 / 11 per length."""
    from lm_eval import simple_evaluate

    manager = task_manager(files.metadata(max_seq_lengths=[1024], num_samples=1),
                           include_defaults=False)
    results = simple_evaluate(model=_NeedlesOnlyLM(), tasks=["acadlm_ruler"],
                              task_manager=manager)
    assert set(results["results"]) >= set(TASKS)
    assert {task: _length_scores(results, task)[1024] for task in TASKS} == {
        task: 100.0 if task in NIAH_TASKS else 0.0 for task in TASKS}
    assert _length_scores(results, "acadlm_ruler") == {1024: pytest.approx(800 / 11)}
    # The report sees the group as a group: its rows are the tasks, its `ruler` row the same mean.
    table = length_table(results)
    assert table.tasks == TASKS
    assert table.suites() == {"ruler": {1024: pytest.approx(800 / 11)}}


def test_yaml_generation_budget_reaches_the_builder(files: EvalFiles, tmp_path: Path) -> None:
    """A task YAML that generates 40 tokens sizes its prompts for 40 (RulerTask)."""
    folder = tmp_path / "tasks"
    shutil.copytree(TASKS_DIR / "acadlm_ruler", folder)
    text = (folder / "acadlm_fwe.yaml").read_text()
    assert "max_gen_toks: 50\n" in text
    # A name of its own: the package's acadlm_fwe may already be indexed in this process.
    assert "task: acadlm_fwe\n" in text
    (folder / "acadlm_fwe.yaml").write_text(text.replace("max_gen_toks: 50", "max_gen_toks: 40")
                                            .replace("task: acadlm_fwe\n", "task: fwe_at_40\n"))
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False,
                          metadata=files.metadata(max_seq_lengths=[1024], num_samples=1))
    task = manager.load_task_or_group(["fwe_at_40"])["fwe_at_40"]
    [doc] = list(task.test_docs())
    assert doc["tokens_to_generate"] == 40 and doc["budget_tokens"] == 1024 - 40


INSTRUCTION = "You are a careful assistant. Read every document in full before you answer."


@pytest.fixture(scope="module")
def instructed(files: EvalFiles, chat_files: EvalFiles) -> dict[str, dict[str, Any]]:
    """lm-eval results of the oracle on every task at 1024 tokens (one sample) with a system
    instruction given to the run and the tasks, in plain text and under a chat template."""
    from lm_eval import simple_evaluate

    runs = {}
    for mode, folder, model in (("plain", files, OracleLM()), ("chat", chat_files,
                                                                ChatOracleLM())):
        chat = {"apply_chat_template": True} if mode == "chat" else {}
        meta = folder.metadata(max_seq_lengths=[1024], num_samples=1,
                               system_instruction=INSTRUCTION, **chat)
        runs[mode] = simple_evaluate(model=model, tasks=TASKS, log_samples=True,
                                     task_manager=task_manager(meta, include_defaults=False),
                                     apply_chat_template=bool(chat),
                                     system_instruction=INSTRUCTION)
    return runs


@pytest.mark.parametrize("mode", ["plain", "chat"])
@pytest.mark.parametrize("task", TASKS)
def test_a_system_instruction_counts_in_the_length_budget(instructed, chat_files: EvalFiles,
                                                          task: str, mode: str) -> None:
    """lm-eval writes the run's system instruction into every prompt (the chat template's
    system turn; in plain text, right before the input): prompt, instruction and generation fit
    the length, and the prompt still fills 99% of its room."""
    tokenizer = load_length_tokenizer(chat_files.metadata(), task=task)
    [sample] = instructed[mode]["samples"][task]
    doc, prompt = sample["doc"], sample["arguments"][0][0]
    if mode == "chat":
        assert prompt == (f"<|im_start|>system\n{INSTRUCTION}<|im_end|>\n<|im_start|>user\n"
                          f"{doc['input']}<|im_end|>\n<|im_start|>assistant\n{doc['gen_prefix']}")
    else:
        assert prompt == INSTRUCTION + plain_prompt(doc)
    assert tokenizer.count(prompt) == doc["input_tokens"]
    assert doc["input_tokens"] + doc["tokens_to_generate"] <= 1024
    assert doc["input_tokens"] >= 0.99 * doc["budget_tokens"]
    assert _length_scores(instructed[mode], task) == {1024: 100.0}


def test_a_system_instruction_the_metadata_does_not_name_is_refused(files: EvalFiles) -> None:
    """The prompts were sized without it, so the run stops, naming the field and the fix."""
    from lm_eval import simple_evaluate

    for meta, given, problem in (
            ({}, INSTRUCTION, "the run passes a system instruction that the task metadata"),
            ({"system_instruction": INSTRUCTION}, None, "the task metadata names a system"),
            ({"system_instruction": INSTRUCTION}, "Be brief.", "the run's system instruction")):
        manager = task_manager(files.metadata(max_seq_lengths=[1024], num_samples=1, **meta),
                               include_defaults=False)
        with pytest.raises(ConfigError, match=rf"`acadlm_niah_single_1: system_instruction`: "
                                              rf"{problem}.*Fix: Run through acadlm-lm-eval"):
            simple_evaluate(model=OracleLM(), tasks=["acadlm_niah_single_1"],
                            task_manager=manager, system_instruction=given)


@pytest.mark.parametrize("task", ["acadlm_niah_single_1", "acadlm_vt"])
def test_a_chat_template_flag_the_metadata_does_not_name_is_refused(chat_files: EvalFiles,
                                                                     task: str) -> None:
    """Plain ``lm_eval --apply_chat_template`` with no ``apply_chat_template`` in the metadata:
    the prompts were sized without the template, which would push prompt and generation past
    the length, so the run stops, naming the field and the fix (as HELMET's tasks do); so does
    a run without the template whose metadata names one."""
    from lm_eval import simple_evaluate

    for meta, applied, problem in (
            ({}, True, "the run applies a chat template but the task metadata does not"),
            ({"apply_chat_template": True}, False, "the task metadata says the run applies")):
        manager = task_manager(chat_files.metadata(max_seq_lengths=[1024], num_samples=1,
                                                   **meta), include_defaults=False)
        with pytest.raises(ConfigError, match=rf"`{task}: apply_chat_template`: {problem}.*"
                                              r"Fix: Run through acadlm-lm-eval"):
            simple_evaluate(model=ChatOracleLM(), tasks=[task], task_manager=manager,
                            apply_chat_template=applied)


def test_rows_come_sample_by_sample_each_length_with_its_own_prompts(files: EvalFiles) -> None:
    """Sample 0 at every length, then sample 1, ...; a length's prompts are those it gets when
    built alone (each length draws from a stream of its own)."""
    rows = build(files, "acadlm_fwe", max_seq_lengths=[1024, 2048], num_samples=3)
    assert [(row["index"], row["max_length"]) for row in rows] == [
        (0, 1024), (0, 2048), (1, 1024), (1, 2048), (2, 1024), (2, 2048)]
    alone = build(files, "acadlm_fwe", max_seq_lengths=[2048], num_samples=3)
    assert [row for row in rows if row["max_length"] == 2048] == alone


def test_a_limit_keeps_every_length(files: EvalFiles, caplog: pytest.LogCaptureFixture) -> None:
    """lm-eval's ``limit`` takes the first rows: 4 of 3 lengths x 4 samples score every length
    (the audit's limit.py), and a limit below the number of lengths is warned about."""
    from lm_eval import simple_evaluate

    task = "acadlm_niah_single_1"
    manager = task_manager(files.metadata(max_seq_lengths=[1024, 2048, 4096], num_samples=4),
                           include_defaults=False)
    results = simple_evaluate(model=OracleLM(), tasks=[task], task_manager=manager, limit=4,
                              log_samples=True)
    assert _length_scores(results, task) == {1024: 100.0, 2048: 100.0, 4096: 100.0}
    assert [(s["doc"]["index"], s["doc"]["max_length"]) for s in results["samples"][task]] == [
        (0, 1024), (0, 2048), (0, 4096), (1, 1024)]
    assert length_table(results).scores[task] == {1024: 100.0, 2048: 100.0, 4096: 100.0}
    with caplog.at_level(logging.WARNING, logger="acadlm_plugins.evaluation.task_base"):
        simple_evaluate(model=OracleLM(), tasks=[task], task_manager=manager, limit=2)
    assert "limit=2 evaluates only the first 2 of its 3 lengths; [4096] are left out" in \
        caplog.text


def test_a_limit_below_every_sample_warns_which_depths_it_covers(
        files: EvalFiles, caplog: pytest.LogCaptureFixture) -> None:
    """Sample i of n sits at depth i/(n-1) and rows come sample by sample, so lm-eval's
    ``limit`` (the first rows) evaluates only the shallowest needles: 4 rows of 2 lengths x 5
    samples reach depths 0 and 0.25 of 0-1. The warning says so (the depths are not
    reordered); with one fixed ``depth`` it names no range, and a limit covering every row
    says nothing."""
    from lm_eval import simple_evaluate

    task = "acadlm_niah_single_1"
    settings = files.metadata(max_seq_lengths=[1024, 2048], num_samples=5)
    logger = "acadlm_plugins.evaluation.task_base"
    with caplog.at_level(logging.WARNING, logger=logger):
        results = simple_evaluate(model=OracleLM(), tasks=[task], limit=4, log_samples=True,
                                  task_manager=task_manager(settings, include_defaults=False))
    assert sorted({s["doc"]["depths"][0] for s in results["samples"][task]}) == [0.0, 0.25]
    assert ("limit=4 evaluates only the first 4 of its 10 rows, which come sample by sample: "
            "the first samples of each length (2 at 1024, 2 at 2048), not a random subset; "
            "their evidence sits at depths 0.00-0.25 of the context, of the 0.00-1.00 the "
            "whole run covers") in caplog.text
    assert "lower `num_samples`" in caplog.text
    for extra, limit, expected in (({"depth": 0.5}, 4, "not a random subset. For"),
                                   ({}, 10, None)):
        caplog.clear()
        manager = task_manager({**settings, **extra}, include_defaults=False)
        with caplog.at_level(logging.WARNING, logger=logger):
            simple_evaluate(model=OracleLM(), tasks=[task], task_manager=manager, limit=limit)
        if expected is None:
            assert "evaluates only" not in caplog.text
        else:
            assert expected in caplog.text and "depths" not in caplog.text


@pytest.mark.parametrize("depth", ["middle", [0.5], True, "nan"])
def test_a_depth_that_is_not_a_number_names_the_field(files: EvalFiles, depth: Any) -> None:
    with pytest.raises(ConfigError, match=r"`acadlm_niah_single_2: depth`: .* is not a number\. "
                                          r"Fix: Give one fraction .* 0\.5 for the middle"):
        build(files, "acadlm_niah_single_2", max_seq_lengths=[1024], num_samples=1, depth=depth)


@pytest.mark.parametrize("value", ["4k", "auto", 0, -2048])
def test_a_max_length_that_is_not_a_positive_integer_names_the_model_arg(
        files: EvalFiles, value: Any) -> None:
    """``max_length`` (from --model_args) caps the lengths; ``4k`` or ``0`` is an error naming
    it, never a bare ValueError or a silently ignored cap."""
    with pytest.raises(ConfigError, match=r"`--model_args max_length`"):
        build(files, "acadlm_niah_single_1", max_seq_lengths=[1024], num_samples=1,
              max_length=value)
    assert model_max_length({"max_length": "2048"}) == 2048
    assert model_max_length({"max_length": None, "pretrained": str(files.model_dir)}) == \
        EVAL_MAX_POSITIONS


def test_max_seq_lengths_takes_a_whole_number_of_any_type() -> None:
    assert parse_lengths(1024.0) == [1024] and parse_lengths("1.5k,2048") == [1536, 2048]
    with pytest.raises(ConfigError, match=r"`acadlm: max_seq_lengths`: '1000\.5' is not a length"):
        parse_lengths("1000.5")


def test_lengths_are_sorted_once_each_and_max_seq_len_caps_like_max_length() -> None:
    assert parse_lengths("8k,4k,4k") == [4096, 8192]
    assert model_max_length({"max_seq_len": 1024}) == 1024


def test_lengths_are_counted_without_the_tokenizers_special_tokens(tmp_path: Path) -> None:
    """A tokenizer whose post-processor prepends ``<s>`` (as Llama's does) counts "a b" as 2
    tokens, not 3: the prompt is measured as text, its special tokens come from the template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel({"<s>": 0, "a": 1, "b": 2, "[UNK]": 3},
                                           unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                             special_tokens=[("<s>", 0)])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert len(tokenizer.encode("a b").ids) == 3  # the post-processor does add <s>
    length_tokenizer = load_length_tokenizer({"pretrained": str(tmp_path)}, task="t")
    assert length_tokenizer.encode("a b") == [1, 2]
    assert length_tokenizer.count("a b") == 2


@pytest.mark.parametrize("task", TASKS)
def test_prompts_fill_their_budget_within_one_percent(files: EvalFiles, sized, task: str) -> None:
    """``length_budget: ruler``: prompt + generation <= L (the tiny tokenizer adds no special
    tokens), and the prompt fills at least 99% of the room it has."""
    tokenizer = load_length_tokenizer(files.metadata(), task=task)
    rows = sized[task]
    assert sorted({row["max_length"] for row in rows}) == SIZED_LENGTHS
    for row in rows:
        assert row["length_budget"] == "ruler"
        assert row["budget_tokens"] == row["max_length"] - TOKENS_TO_GENERATE[KIND[task]]
        assert tokenizer.count(plain_prompt(row)) == row["input_tokens"]
        assert 0.99 * row["budget_tokens"] <= row["input_tokens"] <= row["budget_tokens"]


@pytest.mark.parametrize("task", ["acadlm_niah_single_2", "acadlm_niah_multikey_3", "acadlm_vt",
                                  "acadlm_cwe", "acadlm_fwe"])
def test_prompt_budget_fits_the_prompt_alone_to_the_length(files: EvalFiles, task: str) -> None:
    tokenizer = load_length_tokenizer(files.metadata(), task=task)
    rows = build(files, task, max_seq_lengths=[1024], num_samples=2, length_budget="prompt")
    for row in rows:
        assert row["length_budget"] == "prompt" and row["budget_tokens"] == 1024
        assert 0.99 * 1024 <= tokenizer.count(plain_prompt(row)) <= 1024


@pytest.mark.parametrize("task", ["acadlm_niah_single_1", "acadlm_cwe"])
def test_prompt_budget_refuses_lengths_that_leave_no_room_to_generate(files: EvalFiles,
                                                                      task: str) -> None:
    """At L = the model's maximum (4096) the ``prompt`` budget would leave the model no room to
    answer; ``ruler`` takes that length (it is checked by building it)."""
    room = EVAL_MAX_POSITIONS - TOKENS_TO_GENERATE[KIND[task]]
    with pytest.raises(ConfigError, match=rf"`{task}: max_seq_lengths`: {EVAL_MAX_POSITIONS}: .*"
                                          rf"exceed the model's maximum context of "
                                          rf"{EVAL_MAX_POSITIONS}.*lengths <= {room}"):
        build(files, task, max_seq_lengths=[1024, EVAL_MAX_POSITIONS], num_samples=1,
              length_budget="prompt")
    [row] = build(files, task, max_seq_lengths=[EVAL_MAX_POSITIONS], num_samples=1)
    assert row["input_tokens"] + row["tokens_to_generate"] <= EVAL_MAX_POSITIONS


def test_length_too_short_for_template_and_generation_names_both(files: EvalFiles) -> None:
    """256 tokens less RULER's 128 to generate cannot hold a multi-query prompt here; the
    error says what was kept and how to get by."""
    with pytest.raises(ConfigError, match=r"`acadlm_niah_multiquery: max_seq_lengths`: 256 "
                                          r"tokens less 128 kept for the generation cannot hold "
                                          r"even the task's template.*length_budget: prompt"):
        build(files, "acadlm_niah_multiquery", max_seq_lengths=[256], num_samples=1)


def test_unknown_length_budget_names_the_field(files: EvalFiles) -> None:
    with pytest.raises(ConfigError, match=r"`acadlm_vt: length_budget`: 'tight'"):
        build(files, "acadlm_vt", max_seq_lengths=[1024], num_samples=1, length_budget="tight")


def test_chat_template_missing_is_a_clear_error(files: EvalFiles) -> None:
    with pytest.raises(ConfigError, match=r"`acadlm_fwe: apply_chat_template`: .*no chat "
                                          r"template"):
        build(files, "acadlm_fwe", max_seq_lengths=[1024], num_samples=1,
              apply_chat_template=True)


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
    haystack = text[text.index("\n\n") + 2: text.rindex("\n\n")]
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


@pytest.mark.parametrize("task", ["acadlm_niah_multikey_1", "acadlm_niah_multivalue",
                                  "acadlm_niah_multiquery"])
def test_several_needles_take_distinct_depths_of_rulers_grid(files: EvalFiles,
                                                            task: str) -> None:
    """RULER's ``niah.py`` draws several needles' depths without replacement from 40 points
    (0%, 3%, ..., 100%), so two needles are never side by side; independent random depths
    put them within a few words of each other in some prompts."""
    grid = {round(100 * i / 39) for i in range(40)}
    for row in build(files, task, max_seq_lengths=[1024], num_samples=8):
        percents = [round(100 * depth) for depth in row["depths"]]
        assert len(row["depths"]) == 4 and len(set(percents)) == 4, row["depths"]
        assert set(percents) <= grid


@pytest.mark.parametrize("task, singular", [("acadlm_niah_single_1", True),
                                            ("acadlm_niah_multikey_1", True),
                                            ("acadlm_niah_multivalue", False),
                                            ("acadlm_niah_multiquery", False)])
def test_one_value_asked_is_singular_and_several_are_asked_for_all(files: EvalFiles, task: str,
                                                                   singular: bool) -> None:
    """RULER's rule: "A special magic number is hidden ..." when one value is asked for, and
    "What are all the special magic numbers ..." when several are."""
    [row] = build(files, task, max_seq_lengths=[1024], num_samples=1)
    intro, question = row["input"].split("\n\n")[0], row["input"].rsplit("\n\n", 1)[1]
    if singular:
        assert intro.startswith("A special magic number is hidden")
        assert question.startswith("What is the special magic number for")
    else:
        assert intro.startswith("Special magic numbers are hidden")
        assert question.startswith("What are all the special magic numbers for")


def test_the_fwe_question_asks_for_no_explanation(files: EvalFiles) -> None:
    """RULER's FWE question says "Do not provide any explanation.": its 50 generated tokens
    leave no room for one."""
    [row] = build(files, "acadlm_fwe", max_seq_lengths=[1024], num_samples=1)
    assert "Give no explanation." in row["input"].rsplit("\n\n", 1)[1]


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_niah_keys_are_adjective_noun_pairs_or_uuids(sized, task: str) -> None:
    """RULER's word keys are adjective-noun pairs; its UUID keys stay UUIDs. The key asked about
    is in the question and the answer prefix, never in a distractor needle."""
    spec = NIAH_VARIANTS[task]
    uuid = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}")
    for row in sized[task]:
        keys = [re.search(r" for (\S+) is: ", needle).group(1) for needle in row["needles"]]
        assert all((COMPOUND_KEY if spec.key_kind == "words" else uuid).fullmatch(key)
                   for key in keys)
        assert keys[0] in row["gen_prefix"] and keys[0] in row["input"].rsplit("\n\n", 1)[1]
        assert row["input"].count(f" for {keys[0]} is: ") == spec.num_values


def test_multikey_2_haystack_is_distinct_distractor_needles(sized) -> None:
    for row in sized["acadlm_niah_multikey_2"]:
        keys = re.findall(r"for (\S+) is: ", row["input"])
        assert len(keys) > 10 and len(set(keys)) == len(keys)
        assert all(COMPOUND_KEY.fullmatch(key) for key in keys)


def test_multikey_2_builds_at_16k_within_the_time_bound(files: EvalFiles) -> None:
    """It used to loop for ever from 16K on: its distractor keys came from 2,000 words and it
    needed length // 8 distinct ones. Measured 0.2 s per prompt on 2 busy cores; bound 5x,
    with 2 s for loading the haystack."""
    metadata = {"tokenizer": str(files.model_dir), "haystack_path": str(files.haystack),
                "max_seq_lengths": [16384], "num_samples": 2}
    started = time.perf_counter()
    with time_limit(60):
        rows = niah_dataset("acadlm_niah_multikey_2", **metadata)["test"]
    assert time.perf_counter() - started < 2 + 2 * 5 * 0.2
    for row in rows:
        assert 0.99 * row["budget_tokens"] <= row["input_tokens"] <= row["budget_tokens"]
        assert row["budget_tokens"] == 16384 - TOKENS_TO_GENERATE["niah"]


def test_vt_one_shot_example_is_a_solved_task_of_rulers_shape(files: EvalFiles, sized) -> None:
    """RULER's example: the same instructions, a chain of three-letter variables in the noise,
    the question, the answer prefix and the answer; at most a quarter of the budget."""
    tokenizer = load_length_tokenizer(files.metadata(), task="acadlm_vt")
    rows = [row for row in sized["acadlm_vt"] if row["example"]]
    assert {row["max_length"] for row in rows} == {2048}  # 1K: a quarter is too small here
    for row in rows:
        example = row["example"]
        assert row["input"].startswith(example + "\n\n")
        assert tokenizer.count(example) <= row["budget_tokens"] // 4
        statements = re.findall(r"VAR ([A-Z]+) = (?:VAR [A-Z]+|\d{5})\.", example)
        assert len(statements) == VT_NUM_HOPS + 1 and all(len(n) == 3 for n in statements)
        value = re.search(r"VAR [A-Z]{3} = (\d{5})\.", example).group(1)
        assert example.endswith(f"holding the value {value} in the text above are: "
                                + " ".join(statements))
    [short] = build(files, "acadlm_vt", max_seq_lengths=[512], num_samples=1)
    assert short["example"] == ""  # too short for even a small example


def test_vt_chain_appears_once_in_order_and_names_every_variable(sized) -> None:
    for row in sized["acadlm_vt"]:
        text = row["input"]
        body = text[len(row["example"]):]
        positions = [body.index(statement) for statement in row["needles"]]
        assert all(text.count(statement) == 1 for statement in row["needles"])
        assert positions == sorted(positions)
        assert len(row["outputs"]) == VT_NUM_HOPS + 1
        value = row["needles"][0].split(" = ")[1].rstrip(".")
        assert row["gen_prefix"].endswith(f"holding the value {value} in the text above are:")
        for name, statement in zip(row["outputs"], row["needles"]):
            assert statement.startswith(f"VAR {name} = ")


def _word_list(text: str) -> list[str]:
    """The words of the last numbered list of a cwe input."""
    body = text.split("\n\n")[-2]
    tokens = body.split()
    numbers, words = tokens[0::2], tokens[1::2]
    assert numbers == [f"{i}." for i in range(1, len(words) + 1)]
    return words


def test_cwe_common_words_are_the_most_frequent_of_the_list(sized) -> None:
    for row in sized["acadlm_cwe"]:
        counts = Counter(_word_list(row["input"]))
        assert len(row["outputs"]) == CWE_NUM_CW
        assert all(counts[word] == row["freq_cw"] for word in row["outputs"])
        others = [count for word, count in counts.items() if word not in row["outputs"]]
        assert max(others) <= row["freq_ucw"] < row["freq_cw"]
        assert (row["freq_cw"], row["freq_ucw"]) == (6, 1)  # RULER's below 4K


def test_cwe_one_shot_example_is_rulers(sized) -> None:
    """Below 4K tokens RULER's example lists 20 words, 10 of them 3 times and 10 once, and
    answers with the ten as a numbered list. (Our plain words are costly for the tiny test
    tokenizer, so the example takes more than half of a 1K budget here and is left out.)"""
    rows = [row for row in sized["acadlm_cwe"] if row["example"]]
    assert {row["max_length"] for row in rows} >= {2048}  # left out only of short prompts
    for row in rows:
        example = row["example"]
        assert row["input"].startswith(example + "\n\n")
        counts = Counter(_word_list(example))
        assert sorted(counts.values()) == [1] * 10 + [3] * 10
        answer = example.rsplit(" are: ", 1)[1]
        common = sorted(word for word, count in counts.items() if count == 3)
        assert sorted(answer.split()[1::2]) == common
        assert answer.split()[0::2] == [f"{i}." for i in range(1, 11)]


def test_cwe_counts_are_rulers_at_every_length() -> None:
    assert cwe_counts(1024) == cwe_counts(4095)
    assert (cwe_counts(2048).freq_cw, cwe_counts(2048).freq_ucw) == (6, 1)
    assert (cwe_counts(2048).example_words, cwe_counts(2048).example_freq_cw) == (20, 3)
    for length in (4096, 65536, 131072, 1 << 20):  # above 64K too: no rescaling
        counts = cwe_counts(length)
        assert (counts.freq_cw, counts.freq_ucw, counts.example_words) == (30, 3, 40)
        assert (counts.example_freq_cw, counts.example_freq_ucw) == (10, 3)


def test_cwe_plan_keeps_rulers_counts_unless_the_list_is_too_short() -> None:
    long = cwe_counts(131072)
    assert cwe_plan(20_000, long).freq_cw == 30 and cwe_plan(20_000, long).freq_ucw == 3
    assert cwe_plan(20_000, long).num_uncommon == -(-(20_000 - 300) // 3)
    assert (cwe_plan(300, long).freq_cw, cwe_plan(300, long).freq_ucw) == (24, 3)  # 80% share
    short = cwe_counts(1024)
    assert (cwe_plan(150, short).freq_cw, cwe_plan(150, short).freq_ucw) == (6, 1)
    assert (cwe_plan(30, short).freq_cw, cwe_plan(30, short).freq_ucw) == (2, 1)  # the floor


def test_fwe_answers_are_the_three_most_frequent_coded_words(sized) -> None:
    for row in sized["acadlm_fwe"]:
        body = row["input"].split("\n\n")[1]
        counts = Counter(body.split())
        ranked = [word for word, _ in counts.most_common() if word != FWE_NOISE]
        assert ranked[:3] == row["outputs"]
        assert [counts[word] for word in row["outputs"]] == row["answer_counts"]
        assert counts[ranked[2]] > counts[ranked[3]]
        assert counts[FWE_NOISE] > counts[ranked[0]]
        assert all(re.fullmatch(r"[a-z]{6}", word) for word in ranked)
        assert row["vocab_size"] == fwe_vocab_size(row["max_length"] - TOKENS_TO_GENERATE["fwe"])


def test_fwe_vocabulary_grows_with_the_length_as_rulers() -> None:
    assert fwe_vocab_size(131072 - 50) == 2620  # RULER: (L - tokens_to_generate) // 50
    assert fwe_vocab_size(4096 - 50) == 80
    assert fwe_vocab_size(256) == 8  # our floor: the dots, 3 answers and a few more


def test_zipf_counts_follow_rulers_law() -> None:
    """floor(total * k**-2 / zeta(2)), zeta(2) = pi**2 / 6."""
    counts = zipf_counts(1000, 2000)
    assert counts[:5] == [607, 151, 67, 37, 24]
    assert counts == sorted(counts, reverse=True) and sum(counts) <= 1000


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_prompts_other_seed_other_prompts(files: EvalFiles, task: str) -> None:
    def prompts(seed: int) -> list[str]:
        rows = build(files, task, max_seq_lengths=[1024], num_samples=2, seed=seed)
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


def test_word_lists_are_distinct_plain_words() -> None:
    assert len(set(ADJECTIVES)) == len(ADJECTIVES) > 400
    assert len(set(NOUNS)) == len(NOUNS) > 500
    assert not set(ADJECTIVES) & set(NOUNS)
    assert all(re.fullmatch(r"[a-z]{4,12}", word) for word in PLAIN_WORDS)
    assert not [word for word in PLAIN_WORDS if word in CONSTANT_ANSWER.lower()]
    assert COMPOUND_SPACE == len(ADJECTIVES) * len(NOUNS) > 250_000


def test_compound_words_are_distinct_and_drawn_in_linear_time() -> None:
    rng = random.Random(0)
    started = time.perf_counter()
    keys = compound_words(rng, 100_000, task="t")
    assert time.perf_counter() - started < 2.0  # measured 0.1 s
    assert len(set(keys)) == len(keys) == 100_000
    assert all(COMPOUND_KEY.fullmatch(key) for key in keys[:1000])
    assert compound_words(random.Random(0), 5, task="t") == keys[:5]
    with pytest.raises(ConfigError, match=r"`t: max_seq_lengths`: .*adjective-noun pairs"):
        compound_words(rng, COMPOUND_SPACE + 1, task="t")


class _Words:
    """A tokenizer stand-in: one token per word."""

    def count(self, text: str) -> int:
        return len(text.split())


@pytest.mark.parametrize("seed", range(6))
def test_fit_units_finds_what_bisection_finds(seed: int) -> None:
    """The secant search returns the same longest fitting prompt as ``fit_prompt``'s bisection,
    for near-linear and for uneven unit costs."""
    rng = random.Random(seed)
    costs = [rng.choice([1, 1, 2, 3, 9]) for _ in range(3000)]
    totals = [0]
    for cost in costs:
        totals.append(totals[-1] + cost)

    def render(units: int) -> str:
        return "w " * (7 + totals[units])

    tokenizer: Any = _Words()
    for target in (10, 500, 4321, totals[-1] - 3):
        fast = fit_units(render, tokenizer, target, max_units=len(costs), task="t")
        slow = fit_prompt(render, tokenizer, target, max_units=len(costs), task="t")
        assert (fast.num_words, fast.num_tokens) == (slow.num_words, slow.num_tokens)


def test_fit_words_tops_up_with_part_of_a_long_word(files: EvalFiles) -> None:
    """UUIDs cost about 36 tokens each here, more than 1% of 1024: whole words alone fall short
    for most targets, and the top-up with a prefix of the next UUID closes the gap."""
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


def test_lm_evals_few_shot_and_request_cache_leave_the_prompts_as_built(
        files: EvalFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Every task says `num_fewshot: 0`, so lm-eval ignores `--num_fewshot 2` instead of
    prepending two test rows (a 1024-token prompt became about three times as long, still
    scored as `1024`). lm-eval's request cache is keyed by task name, not metadata: a cached run
    at 1024 tokens used to hand its prompts to a run at 2048, scored against the new documents
    (the oracle: 100 -> 0); our tasks no longer read or write it, and say so."""
    import lm_eval.caching.cache as request_cache
    from lm_eval import simple_evaluate
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    manager = task_manager(files.metadata(max_seq_lengths=[1024], num_samples=3),
                           include_defaults=False)
    ours = {name: entry.yaml_path for name, entry in manager.task_index.items()
            if entry.kind in (Kind.TASK, Kind.PY_TASK) and entry.yaml_path is not None
            and TASKS_DIR in entry.yaml_path.parents}
    assert len(ours) >= 26  # 13 RULER and 13 HELMET tasks
    for name, path in ours.items():
        assert load_yaml(path, resolve_func=False).get("num_fewshot") == 0, name

    task = "acadlm_niah_single_1"
    plain = simple_evaluate(model=OracleLM(), tasks=[task], task_manager=manager, log_samples=True)
    shots = simple_evaluate(model=OracleLM(), tasks=[task], task_manager=manager, log_samples=True,
                            num_fewshot=2)

    def prompts(results: dict[str, Any]) -> list[str]:
        return [sample["arguments"][0][0] for sample in results["samples"][task]]

    assert prompts(shots) == prompts(plain)

    monkeypatch.setattr(request_cache, "PATH", str(tmp_path / "requests"))
    scores = {}
    with caplog.at_level(logging.WARNING, logger="acadlm_plugins.evaluation.task_base"):
        for length in (1024, 2048):
            manager = task_manager(files.metadata(max_seq_lengths=[length], num_samples=1),
                                   include_defaults=False)
            results = simple_evaluate(model=OracleLM(), tasks=[task], task_manager=manager,
                                      cache_requests=True)
            scores[length] = results["results"][task][f"{length},none"]
    assert scores == {1024: 100, 2048: 100}
    assert "lm-eval's request cache is not used for this task" in caplog.text
    assert not list((tmp_path / "requests").glob(f"*{task}*"))


def test_a_longer_generation_than_the_prompts_leave_room_for_is_refused(files: EvalFiles) -> None:
    """lm-eval applies `--gen_kwargs` after the documents are built, so `max_gen_toks=256`
    against prompts sized to leave 128 (NIAH) or 100 (HELMET's JSON KV) used to run with prompt
    plus answer past the length each score is named by; so did a metadata `tokens_to_generate`
    below the YAML's `max_gen_toks`. Both are refused, naming the metadata key that sizes the
    prompts; with that key given, or a shorter generation, the run goes ahead."""
    from lm_eval import simple_evaluate

    tasks = ["acadlm_niah_single_1", "acadlm_json_kv"]

    def evaluate(gen_kwargs: str, **metadata: Any) -> dict[str, Any]:
        manager = task_manager(files.metadata(max_seq_lengths=[1024], num_samples=1, **metadata),
                               include_defaults=False)
        return simple_evaluate(model=OracleLM(), tasks=tasks, task_manager=manager,
                               gen_kwargs=gen_kwargs, log_samples=True)

    with pytest.raises(ConfigError) as err:
        evaluate("max_gen_toks=256")
    assert err.value.key.split(": ")[0] in tasks and err.value.key.endswith(": tokens_to_generate")
    assert "generates up to 256 tokens" in str(err.value)
    assert """--metadata '{"tokens_to_generate": 256}'""" in str(err.value)
    with pytest.raises(ConfigError, match=r"up to 128 tokens .* room for 100.*max_gen_toks=100"):
        evaluate("temperature=0", tokens_to_generate=100)  # NIAH's YAML generates 128
    for gen_kwargs, metadata, room in (("max_gen_toks=256", {"tokens_to_generate": 256}, 256),
                                       ("max_gen_toks=16", {}, None)):
        results = evaluate(gen_kwargs, **metadata)
        for task in tasks:
            assert results["results"][task]["1024,none"] == 100
            doc = results["samples"][task][0]["doc"]
            if room is not None:
                assert doc["tokens_to_generate"] == room
                assert doc["input_tokens"] + room <= 1024


def test_pick_answers_skips_words_found_inside_other_words() -> None:
    answers, rest = pick_answers(["then", "thence", "river", "rivers", "lamp", "hill"], 2,
                                 task="t")
    assert answers == ["thence", "rivers"]
    assert rest == ["then", "river", "lamp", "hill"]
    with pytest.raises(ConfigError, match="`t: haystack_path`"):
        pick_answers(["a", "ab", "abc"], 2, task="t")


@pytest.mark.integration
def test_smollm2_tokenizer_sizes_every_task_at_4096_within_one_percent() -> None:
    from acadlm_plugins.defaults import require_default_model

    model_dir = str(require_default_model())
    tokenizer: LengthTokenizer = load_length_tokenizer({"pretrained": model_dir}, task="t")
    for task in TASKS:
        rows = BUILDERS[task](pretrained=model_dir, max_seq_lengths=[4096], num_samples=2)
        for row in rows["test"]:
            assert 0.99 * row["budget_tokens"] <= row["input_tokens"] <= row["budget_tokens"]
            assert row["input_tokens"] + row["tokens_to_generate"] <= 4096, task
            assert tokenizer.count(plain_prompt(row)) == row["input_tokens"], task


def test_match_all_gives_partial_credit():
    """RULER's string_match_all: the share of references found, not all-or-nothing."""
    from acadlm_plugins.evaluation.scoring import match_all

    assert match_all("the values are 1234 and 9999", ["1234", "5678"]) == 50.0
    assert match_all("A: 1234, 5678, 42", ["1234", "5678", "4242", "42"]) == 75.0
