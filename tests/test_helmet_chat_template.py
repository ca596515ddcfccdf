"""HELMET's chat template per category (helmet_frame.py): under ``--apply_chat_template`` the
categories HELMET runs with it (long-document QA, summarization, cite) render the user template
as the user's turn with no answer prefix, the others stay plain text with HELMET's prefix; the
run's flag reaches the tasks' metadata through acadlm-lm-eval and the eval recipe, and a task
whose metadata disagrees with the run refuses it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from eval_doubles import CHAT_TEMPLATE, ChatOracleLM
from eval_fixtures import haystack_text
from helmet_fixtures import (
    longqa_rows,
    write_jsonl,
    write_tokenizer_dir,
)
from lm_eval import simple_evaluate
from omegaconf import OmegaConf

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.evaluation import helmet, task_manager
from acadlm_plugins.evaluation.cli import pass_run_settings_to_tasks
from acadlm_plugins.evaluation.helmet_frame import uses_chat_template
from acadlm_plugins.evaluation.lengths import load_length_tokenizer

LENGTH = 2048
TASKS = ["acadlm_rag", "acadlm_narrativeqa", "acadlm_longqa"]
OPENING, CLOSING = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def chat_meta(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("chat")
    model = write_tokenizer_dir(root / "model")
    (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    rows = write_jsonl(root / "qa.jsonl", longqa_rows(count=6, words=3000))
    return {"pretrained": str(model), "max_seq_lengths": [LENGTH], "num_samples": 2,
            "narrativeqa_path": str(rows), "longqa_path": str(rows),
            "apply_chat_template": True, "home": str(root / "empty_home")}


def evaluate(meta: dict[str, Any], tasks: list[str], *, chat: bool = True,
             system_instruction: str | None = None) -> dict[str, Any]:
    settings = {k: v for k, v in meta.items() if k != "home"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACADLM_HOME", meta["home"])
        return simple_evaluate(model=ChatOracleLM(), tasks=tasks, log_samples=True,
                               apply_chat_template=chat, verbosity="ERROR",
                               system_instruction=system_instruction,
                               task_manager=task_manager(settings, include_defaults=False))


@pytest.fixture(scope="module")
def chat_run(chat_meta: dict[str, Any]) -> dict[str, Any]:
    return evaluate(chat_meta, TASKS)


def test_long_document_qa_is_a_user_turn_without_an_answer_prefix(
        chat_run: dict[str, Any], chat_meta: dict[str, Any]) -> None:
    """HELMET's longqa category runs with the chat template: the user template is the user's
    message and the assistant's turn opens empty; template and generation fit the length."""
    tokenizer = load_length_tokenizer(chat_meta, task="t")
    for task in ("acadlm_narrativeqa", "acadlm_longqa"):
        for sample in chat_run["samples"][task]:
            doc, prompt = sample["doc"], sample["arguments"][0][0]
            assert doc["chat_template"] and doc["gen_prefix"] == ""
            assert prompt == OPENING + doc["input"] + CLOSING
            assert doc["input"].endswith(("?", "words only."))
            assert tokenizer.count(prompt) == doc["input_tokens"]
            assert 0.99 * doc["budget_tokens"] <= doc["input_tokens"] <= doc["budget_tokens"]
            assert doc["budget_tokens"] == LENGTH - doc["tokens_to_generate"]
        assert chat_run["results"][task][f"{LENGTH},none"] == 100.0


def test_rag_stays_plain_text_as_helmet_runs_it(chat_run: dict[str, Any]) -> None:
    """rag.yaml sets use_chat_template: false: the prompt is plain text ending in HELMET's
    "Answer:", even though the run applies a chat template."""
    for sample in chat_run["samples"]["acadlm_rag"]:
        doc, prompt = sample["doc"], sample["arguments"][0][0]
        assert not doc["chat_template"] and "<|im_start|>" not in prompt
        assert prompt == doc["input"] + "Answer:" and doc["input"].endswith("?\n")
    assert chat_run["results"]["acadlm_rag"][f"{LENGTH},none"] == 100.0


#: HELMET's runs of RULER's recall tasks and their tokens to generate (configs/recall.yaml).
HELMET_NEEDLES = {"acadlm_helmet_niah_multikey_2": 50, "acadlm_helmet_niah_multikey_3": 100,
                  "acadlm_helmet_niah_multivalue": 50}


def test_helmets_recall_runs_rulers_needles_plain_and_ruler_keeps_its_own(
        chat_meta: dict[str, Any], tmp_path: Path) -> None:
    """recall.yaml runs RULER's MK2, MK3 and MV without the chat template and with 50 / 100 / 50
    tokens to generate: under --apply_chat_template HELMET's runs of them are plain text with
    the answer prefix on a line of its own, sized for those tokens, while RULER's own MK2 in
    the same run keeps the template and RULER's 128 tokens (the reviewer's run counted the
    chat-formatted RULER tasks towards HELMET's recall)."""
    haystack = tmp_path / "hay.txt"
    haystack.write_text(haystack_text())
    meta = {**chat_meta, "haystack_path": str(haystack)}
    run = evaluate(meta, [*HELMET_NEEDLES, "acadlm_niah_multikey_2"])
    tokenizer = load_length_tokenizer(meta, task="t")
    for task, generation in HELMET_NEEDLES.items():
        for sample in run["samples"][task]:
            doc, (prompt, gen_kwargs) = sample["doc"], sample["arguments"][0]
            assert not doc["chat_template"] and "<|im_start|>" not in prompt
            assert doc["gen_prefix"].startswith("The special magic ")
            assert prompt == doc["input"] + doc["gen_prefix"] and doc["input"].endswith("?\n")
            assert gen_kwargs["max_gen_toks"] == doc["tokens_to_generate"] == generation
            assert doc["budget_tokens"] == LENGTH - generation
            assert tokenizer.count(prompt) == doc["input_tokens"]
            assert 0.99 * doc["budget_tokens"] <= doc["input_tokens"] <= doc["budget_tokens"]
        assert run["results"][task][f"{LENGTH},none"] == 100.0
    for sample in run["samples"]["acadlm_niah_multikey_2"]:
        doc, (prompt, gen_kwargs) = sample["doc"], sample["arguments"][0]
        assert prompt == OPENING + doc["input"] + CLOSING + doc["gen_prefix"]
        assert gen_kwargs["max_gen_toks"] == doc["tokens_to_generate"] == 128


def test_all_renders_every_category_with_the_chat_template(chat_meta: dict[str, Any]) -> None:
    run = evaluate({**chat_meta, "helmet_chat_template": "all"}, ["acadlm_rag"])
    for sample in run["samples"]["acadlm_rag"]:
        doc = sample["doc"]
        assert doc["chat_template"] and doc["gen_prefix"] == ""
        assert sample["arguments"][0][0] == OPENING + doc["input"] + CLOSING


def test_the_run_and_the_metadata_must_agree(chat_meta: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"`acadlm_narrativeqa: apply_chat_template`: the run "
                                          r"applies a chat template but the task metadata"):
        evaluate({**chat_meta, "apply_chat_template": False}, ["acadlm_narrativeqa"])
    with pytest.raises(ConfigError, match=r"`acadlm_rag: apply_chat_template`: the run does "
                                          r"not apply"):
        evaluate(chat_meta, ["acadlm_rag"], chat=False)


INSTRUCTION = ("You are a careful assistant. Read every document in full before you answer, "
               "and answer briefly.")


def test_a_system_instruction_is_the_system_turn_and_counts_in_the_budget(
        chat_meta: dict[str, Any]) -> None:
    """Under the chat template the run's system instruction is HELMET's system message: the
    whole prompt, system turn included, plus the generation fit the length."""
    tokenizer = load_length_tokenizer(chat_meta, task="t")
    run = evaluate({**chat_meta, "system_instruction": INSTRUCTION}, ["acadlm_narrativeqa"],
                   system_instruction=INSTRUCTION)
    for sample in run["samples"]["acadlm_narrativeqa"]:
        doc, prompt = sample["doc"], sample["arguments"][0][0]
        assert prompt == (f"<|im_start|>system\n{INSTRUCTION}<|im_end|>\n" + OPENING
                          + doc["input"] + CLOSING)
        assert tokenizer.count(prompt) == doc["input_tokens"]
        assert tokenizer.count(prompt) + doc["tokens_to_generate"] <= LENGTH
        assert doc["input_tokens"] >= 0.99 * doc["budget_tokens"]


@pytest.mark.parametrize("chat", [True, False])
def test_a_plain_prompt_gets_no_system_message_as_in_helmet(chat_meta: dict[str, Any],
                                                            chat: bool) -> None:
    """HELMET passes its system message only with the chat template: a plain-text prompt (a
    plain category under the template, or a run without one) leaves the instruction out, so
    prompt and generation fit the length."""
    tokenizer = load_length_tokenizer(chat_meta, task="t")
    run = evaluate({**chat_meta, "apply_chat_template": chat, "system_instruction": INSTRUCTION},
                   ["acadlm_rag"], chat=chat, system_instruction=INSTRUCTION)
    for sample in run["samples"]["acadlm_rag"]:
        doc, prompt = sample["doc"], sample["arguments"][0][0]
        assert INSTRUCTION not in prompt and prompt == doc["input"] + "Answer:"
        assert tokenizer.count(prompt) + doc["tokens_to_generate"] <= LENGTH


def test_the_run_and_the_metadata_must_agree_on_the_system_instruction(
        chat_meta: dict[str, Any]) -> None:
    """Under the chat template the instruction's tokens are counted, so a run that passes one
    the metadata does not name (or another one) is refused."""
    with pytest.raises(ConfigError, match=r"`acadlm_narrativeqa: system_instruction`: the run "
                                          r"passes a system instruction that the task metadata"):
        evaluate(chat_meta, ["acadlm_narrativeqa"], system_instruction=INSTRUCTION)
    with pytest.raises(ConfigError, match=r"`acadlm_narrativeqa: system_instruction`: the task "
                                          r"metadata names"):
        evaluate({**chat_meta, "system_instruction": INSTRUCTION}, ["acadlm_narrativeqa"])


def test_categories_as_helmets_configs() -> None:
    chat = {"apply_chat_template": True}
    assert [uses_chat_template(chat, c, task="t") for c in
            ("recall", "rag", "rerank", "icl", "longqa", "summ", "cite")] == [
        False, False, False, False, True, True, True]
    assert not uses_chat_template({"apply_chat_template": "false"}, "longqa", task="t")
    assert uses_chat_template({**chat, "helmet_chat_template": "all"}, "icl", task="t")
    with pytest.raises(ConfigError, match=r"`t: helmet_chat_template`: 'some'"):
        uses_chat_template({**chat, "helmet_chat_template": "some"}, "icl", task="t")


def test_a_chat_template_needs_one_in_the_model_folder(chat_meta: dict[str, Any],
                                                       tmp_path: Path) -> None:
    plain = tmp_path / "model"
    shutil.copytree(chat_meta["pretrained"], plain)
    (plain / "chat_template.jinja").unlink()
    with pytest.raises(ConfigError, match="`acadlm_longqa: apply_chat_template`"):
        helmet.longqa_dataset("acadlm_longqa", {**chat_meta, "pretrained": str(plain)})


# ------------------------------------------------------------ passing the flag to the tasks


def parsed_metadata(argv: list[str]) -> dict[str, Any]:
    """What lm-eval's own parser makes of ``--metadata`` in ``argv``."""
    from lm_eval._cli.harness import HarnessCLI

    return HarnessCLI()._parser.parse_args(["run", *argv]).metadata or {}


def test_acadlm_lm_eval_passes_the_chat_template_to_the_tasks() -> None:
    argv = ["--model", "hf", "--tasks", "acadlm_helmet", "--metadata",
            '{"max_seq_lengths": [4096]}', "--apply_chat_template"]
    passed = pass_run_settings_to_tasks(argv)
    assert parsed_metadata(passed) == {"max_seq_lengths": [4096], "apply_chat_template": True}
    assert parsed_metadata(argv) == {"max_seq_lengths": [4096]}
    named = pass_run_settings_to_tasks(["--apply_chat_template", "chatml", "--tasks", "x",
                                        "--system_instruction", "Be brief."])
    assert json.loads(named[-1]) == {"apply_chat_template": True,
                                     "system_instruction": "Be brief."}
    for unchanged in (["--tasks", "x"], ["--apply_chat_template=false", "--tasks", "x"]):
        assert pass_run_settings_to_tasks(unchanged) == unchanged


def test_acadlm_lm_eval_passes_a_system_instruction_without_a_chat_template() -> None:
    """lm-eval writes the instruction in front of a plain prompt too, so the tasks must count
    it there as well."""
    for argv in (["--tasks", "x", "--system_instruction", "Be brief."],
                 ["--tasks", "x", "--system_instruction=Be brief.", "--apply_chat_template=no"]):
        assert json.loads(pass_run_settings_to_tasks(argv)[-1]) == {
            "system_instruction": "Be brief."}


def test_the_eval_recipe_passes_the_chat_template_to_the_tasks() -> None:
    from acadlm_plugins.eval_recipe import task_metadata

    chat = task_metadata(OmegaConf.create({"apply_chat_template": True}), {"pretrained": "x"})
    assert chat["apply_chat_template"] is True
    assert "apply_chat_template" not in task_metadata(OmegaConf.create({}), {"pretrained": "x"})
    instructed = task_metadata(OmegaConf.create({"system_instruction": "Be brief."}),
                               {"pretrained": "x"})
    assert instructed["system_instruction"] == "Be brief."
    assert "system_instruction" not in chat
