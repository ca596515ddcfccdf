"""ProLong's short SFT stage: UltraChat-schema rows checked up front, only assistant turns
trained, a token-averaged loss, and torchtune's stock recipe running it end to end."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tiny_setup import REPO_ROOT, run_tune_subprocess, write_tiny_model_dir, write_tiny_tokenizer
from torchtune import config as tune_config
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message

from acadlm_plugins.data.sft import SHIPPED_EXAMPLES, check_ultrachat_file, ultrachat_dataset
from acadlm_plugins.defaults.paths import default_model_dir
from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.models.tokenizer import SmolLM2Tokenizer, smollm2_tokenizer

TINY_SFT_CONFIG = REPO_ROOT / "configs" / "tiny" / "sft.yaml"
SMOLLM2_SFT_CONFIG = REPO_ROOT / "configs" / "smollm2" / "long_context_sft.yaml"

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "The answer is 5."},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "It is 8."},
]


def _row(messages: list[dict], **extra) -> dict:
    return {"prompt": messages[0]["content"], "prompt_id": "p0", "messages": messages, **extra}


GOOD = _row([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> SmolLM2Tokenizer:
    """Our SmolLM2 tokenizer class over the tiny ChatML BPE of tests/tiny_setup.py."""
    return smollm2_tokenizer(str(write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))))


@pytest.fixture(scope="module")
def smollm2() -> SmolLM2Tokenizer:
    """The embedded SmolLM2 tokenizer; a missing embedded default fails the integration tests
    that use it (``DefaultsMissingError`` names the build command) rather than skipping them."""
    return smollm2_tokenizer(max_seq_len=None)


# ------------------------------------------------------------------------------- row validation

BAD_ROWS = {
    "not_json": ('{"messages": [', "not valid JSON"),
    "not_an_object": ('["user", "hi"]', "expected a JSON object"),
    "no_messages": (json.dumps({"prompt": "Hi", "prompt_id": "p"}), "has no `messages`"),
    "empty_messages": (json.dumps(_row([{"role": "user", "content": "x"}]) | {"messages": []}),
                       "empty or non-list `messages`"),
    "unknown_role": (json.dumps(_row([{"role": "user", "content": "Hi"},
                                      {"role": "tool", "content": "{}"}])), "unknown role 'tool'"),
    "empty_content": (json.dumps(_row([{"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "  \n"}])),
                      "assistant content is empty"),
    "missing_content": (json.dumps(_row([{"role": "user", "content": "Hi"},
                                         {"role": "assistant"}])), "content is missing"),
    "two_user_turns": (json.dumps(_row([{"role": "user", "content": "Hi"},
                                        {"role": "user", "content": "Hello?"},
                                        {"role": "assistant", "content": "Yes."}])),
                       "messages[1]: expected role 'assistant', got 'user'"),
    "starts_with_assistant": (json.dumps(_row([{"role": "assistant", "content": "Hi"},
                                               {"role": "user", "content": "Hello"}])),
                              "messages[0]: expected role 'user', got 'assistant'"),
    "ends_with_user": (json.dumps(_row([{"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": "Hello"},
                                        {"role": "user", "content": "Bye"}])),
                       "ends with a user turn"),
    "system_only": (json.dumps(_row([{"role": "system", "content": "Be nice."}])),
                    "ends with a system turn"),
    "late_system": (json.dumps(_row([{"role": "user", "content": "Hi"},
                                     {"role": "system", "content": "Be nice."},
                                     {"role": "assistant", "content": "Hello"}])),
                    "system message may only come first"),
    "prompt_id_not_string": (json.dumps(_row([{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Yo"}],
                                             prompt_id=7)), "`prompt_id` is int"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_row_is_reported_with_file_and_line(case, tmp_path, tiny_tokenizer):
    line, problem = BAD_ROWS[case]
    path = _write_jsonl(tmp_path / "chat.jsonl", [json.dumps(GOOD), "", line, json.dumps(GOOD)])
    with pytest.raises(DataError) as err:
        ultrachat_dataset(tiny_tokenizer, data_files=str(path))
    assert f"{path}:3" in str(err.value)
    assert problem in str(err.value)


def test_missing_or_non_jsonl_files_and_empty_files_are_refused(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        ultrachat_dataset(tiny_tokenizer, data_files=str(tmp_path / "absent.jsonl"))
    parquet = tmp_path / "chat.parquet"
    parquet.write_bytes(b"")
    with pytest.raises(DataError, match="is not a .jsonl file"):
        ultrachat_dataset(tiny_tokenizer, data_files=str(parquet))
    empty = _write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="holds no conversation"):
        check_ultrachat_file(empty)


def test_packing_needs_the_tokenizers_max_seq_len(tiny_tokenizer):
    assert tiny_tokenizer.max_seq_len is None
    with pytest.raises(ConfigError, match="dataset.packed"):
        ultrachat_dataset(tiny_tokenizer, packed=True)


def test_the_shipped_set_is_valid_and_small():
    rows = [json.loads(line) for line in SHIPPED_EXAMPLES.read_text(encoding="utf-8").splitlines()]
    assert check_ultrachat_file(SHIPPED_EXAMPLES) == len(rows) == 40
    turns = [sum(m["role"] == "assistant" for m in row["messages"]) for row in rows]
    assert set(turns) <= {1, 2, 3} and len(set(turns)) > 1
    assert len({row["prompt_id"] for row in rows}) == 40
    assert all(row["prompt"] == row["messages"][0]["content"] or
               row["messages"][0]["role"] == "system" for row in rows)


# ---------------------------------------------------------------------------------- label masking

def _assert_only_assistant_turns_are_trained(tokenizer: SmolLM2Tokenizer, tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "chat.jsonl", [json.dumps(_row(CONVERSATION))])
    sample = ultrachat_dataset(tokenizer, data_files=str(path))[0]
    expected_tokens: list[int] = []
    expected_labels: list[int] = []
    for turn in CONVERSATION:
        ids = tokenizer.tokenize_message(Message(role=turn["role"], content=turn["content"]))
        expected_tokens += ids
        trained = turn["role"] == "assistant"
        expected_labels += ids if trained else [CROSS_ENTROPY_IGNORE_IDX] * len(ids)
    assert sample["tokens"] == expected_tokens
    assert [int(label) for label in sample["labels"]] == expected_labels

    # The trained spans, decoded, are exactly the assistant turns in SmolLM2's chat format.
    spans, current = [], []
    for token, label in zip(sample["tokens"], sample["labels"]):
        if label != CROSS_ENTROPY_IGNORE_IDX:
            current.append(token)
        elif current:
            spans, current = [*spans, current], []
    spans += [current] if current else []
    assert [tokenizer.decode(span, skip_special_tokens=False) for span in spans] == [
        f"<|im_start|>assistant\n{turn['content']}<|im_end|>\n"
        for turn in CONVERSATION if turn["role"] == "assistant"]

    with_input = ultrachat_dataset(tokenizer, data_files=str(path), train_on_input=True)[0]
    assert [int(label) for label in with_input["labels"]] == with_input["tokens"]


def test_only_assistant_tokens_are_trained_tiny_tokenizer(tiny_tokenizer, tmp_path):
    _assert_only_assistant_turns_are_trained(tiny_tokenizer, tmp_path)


@pytest.mark.integration
def test_only_assistant_tokens_are_trained_smollm2_tokenizer(smollm2, tmp_path):
    _assert_only_assistant_turns_are_trained(smollm2, tmp_path)


@pytest.mark.integration
def test_every_shipped_conversation_fits_512_smollm2_tokens(smollm2):
    dataset = ultrachat_dataset(smollm2)
    assert len(dataset) == 40
    for index in range(len(dataset)):
        sample = dataset[index]
        assert len(sample["tokens"]) <= 512, index
        assert sum(label != CROSS_ENTROPY_IGNORE_IDX for label in sample["labels"]) > 0


# ----------------------------------------------------------------------------------------- loss

@pytest.mark.parametrize("config_path", [TINY_SFT_CONFIG, SMOLLM2_SFT_CONFIG])
def test_the_configured_loss_averages_over_trained_tokens(config_path):
    """Two conversations with 3 and 12 trained tokens: the loss is the mean over all 15
    tokens (ProLong's token averaging), not the mean of the two per-conversation means."""
    loss_fn = tune_config.instantiate(OmegaConf.load(config_path).loss)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 16, 11, generator=generator)
    labels = torch.randint(0, 11, (2, 16), generator=generator)
    labels[0, 3:] = CROSS_ENTROPY_IGNORE_IDX
    labels[1, :4] = CROSS_ENTROPY_IGNORE_IDX
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 11), labels.reshape(-1), reduction="none",
        ignore_index=CROSS_ENTROPY_IGNORE_IDX).reshape(2, 16)
    token_mean = per_token.sum() / 15
    sequence_mean = (per_token[0].sum() / 3 + per_token[1].sum() / 12) / 2
    chunks = list(logits.chunk(getattr(loss_fn, "num_output_chunks", 1), dim=1))
    got = loss_fn(chunks, labels)
    assert torch.allclose(got, token_mean, atol=1e-6)
    assert not torch.allclose(got, sequence_mean, atol=1e-3)


# ------------------------------------------------------------------------------------ configs

def test_the_smollm2_config_builds_the_model_from_the_checkpoint_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("ACADLM_HOME", str(tmp_path))
    cfg = OmegaConf.load(SMOLLM2_SFT_CONFIG)
    model_dir = str(default_model_dir(tmp_path))
    assert cfg.checkpointer.checkpoint_dir == cfg.model.path == model_dir
    assert cfg.tokenizer.path == model_dir
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(["checkpointer.checkpoint_dir=/stage2"]))
    assert cfg.model.path == "/stage2" and cfg.tokenizer.path == model_dir
    assert cfg.model._component_ == "acadlm_plugins.models.llama.llama_from_hf_config"
    assert cfg.dataset._component_ == "acadlm_plugins.data.sft.ultrachat_dataset"


# ------------------------------------------------------------------------ stock recipe, tune run

def test_stock_full_finetune_recipe_runs_the_sft_stage_on_the_tiny_model(tmp_path):
    model_dir = write_tiny_model_dir(tmp_path / "model", weight_std=None)
    out = tmp_path / "out"
    run_tune_subprocess("full_finetune_single_device",
                        ["--config", str(TINY_SFT_CONFIG), f"output_dir={out}",
                         f"checkpointer.checkpoint_dir={model_dir}"],
                        cwd=tmp_path, log_file=tmp_path / "run.log")
    log_text = "\n".join(p.read_text() for p in (out / "logs").glob("*.txt"))
    losses = [float(x) for x in re.findall(r"loss:(\S+)", log_text)]
    assert len(losses) == 5  # max_steps_per_epoch
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
    assert list(out.glob("epoch_0/*.safetensors"))
    assert (out / "epoch_0" / "config.json").is_file()
