"""SFT conversations cut by ``tokenizer.max_seq_len``: one whose assistant turns all lie beyond
the cut would keep no trained token, and a step of only such conversations divides a zero loss
by zero trained tokens in torchtune's stock recipe (NaN). ``ultrachat_dataset`` drops them, says
how many, and refuses a length at which nothing is left."""

from __future__ import annotations

import json
import logging

import pytest
from tiny_setup import write_tiny_tokenizer
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message

from acadlm_plugins.data.sft import SHIPPED_EXAMPLES, ultrachat_dataset
from acadlm_plugins.errors import DataError
from acadlm_plugins.models.tokenizer import smollm2_tokenizer

TINY_SFT_MAX_SEQ_LEN = 256  # configs/tiny/sft.yaml
LOGGER = "acadlm_plugins.data.sft"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return str(write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok")))


def _rows() -> list[dict]:
    return [json.loads(line) for line in SHIPPED_EXAMPLES.read_text(encoding="utf-8").splitlines()]


def _render(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """Tokens and labels of a row as the dataset renders it with ``train_on_input=False``."""
    messages = [Message(role=m["role"], content=m["content"], masked=m["role"] != "assistant")
                for m in row["messages"]]
    tokens, mask = tokenizer.tokenize_messages(messages)
    return tokens, [CROSS_ENTROPY_IGNORE_IDX if m else t for t, m in zip(tokens, mask)]


def _trained(labels) -> int:
    return sum(int(label) != CROSS_ENTROPY_IGNORE_IDX for label in labels)


@pytest.mark.parametrize("max_seq_len", [TINY_SFT_MAX_SEQ_LEN, 64])
def test_conversations_without_trained_tokens_are_dropped_and_counted(tokenizer_dir,
                                                                      max_seq_len, caplog):
    tokenizer = smollm2_tokenizer(tokenizer_dir, max_seq_len=max_seq_len)
    rendered = [_render(tokenizer, row) for row in _rows()]
    kept = [(tokens, labels) for tokens, labels in rendered if _trained(labels)]
    dropped = len(rendered) - len(kept)
    assert dropped > 0  # the shipped set does hold such conversations at these lengths

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = ultrachat_dataset(tokenizer)
    samples = [dataset[i] for i in range(len(dataset))]
    assert all(_trained(sample["labels"]) > 0 for sample in samples)
    # The conversations that keep trained tokens are all there, in order, unchanged.
    assert [(s["tokens"], [int(x) for x in s["labels"]]) for s in samples] == kept
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 1
    assert f"dropped {dropped} of {len(rendered)} conversations" in messages[0]
    assert "tokenizer.max_seq_len" in messages[0]


def test_the_tiny_config_length_drops_five_shipped_conversations(tokenizer_dir):
    tokenizer = smollm2_tokenizer(tokenizer_dir, max_seq_len=TINY_SFT_MAX_SEQ_LEN)
    assert len(ultrachat_dataset(tokenizer)) == 35


def test_every_pack_holds_trained_tokens(tokenizer_dir, caplog):
    tokenizer = smollm2_tokenizer(tokenizer_dir, max_seq_len=64)
    kept = [labels for _, labels in (_render(tokenizer, row) for row in _rows())
            if _trained(labels)]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        packed = ultrachat_dataset(tokenizer, packed=True)
    packs = [packed[i] for i in range(len(packed))]
    assert all(_trained(pack["labels"]) > 0 for pack in packs)
    assert sum(_trained(pack["labels"]) for pack in packs) == sum(map(_trained, kept))
    assert any(f"dropped {40 - len(kept)} of 40" in r.getMessage() for r in caplog.records)


def test_packs_hold_whole_conversations(tokenizer_dir):
    """At 256 tokens the 35 kept conversations are 88 to 256 tokens long; a conversation that
    does not fit in what is left of a pack starts the next one, and the rest is padding (its
    own entry in ``seq_lens``), so each conversation is one segment of one pack."""
    tokenizer = smollm2_tokenizer(tokenizer_dir, max_seq_len=TINY_SFT_MAX_SEQ_LEN)
    lengths = [len(tokens) for tokens, labels in (_render(tokenizer, row) for row in _rows())
               if _trained(labels)]
    expected, current = [], []

    def close(pack: list[int]) -> list[int]:
        rest = TINY_SFT_MAX_SEQ_LEN - sum(pack)
        return pack + [rest] if rest else pack

    for length in lengths:  # greedy packing, no conversation split
        if sum(current) + length > TINY_SFT_MAX_SEQ_LEN:
            expected.append(close(current))
            current = []
        current.append(length)
    expected.append(close(current))
    packed = ultrachat_dataset(tokenizer, packed=True)
    packs = [[int(n) for n in packed[i]["seq_lens"]] for i in range(len(packed))]
    assert packs == expected
    assert len(packs) == 35 and packs[12:14] == [[151, 105], [256]]
    padding = packed[12]["labels"][151:]
    assert [int(x) for x in padding] == [CROSS_ENTROPY_IGNORE_IDX] * 105


def test_the_dropped_count_is_of_the_split_read(tokenizer_dir, caplog):
    tokenizer = smollm2_tokenizer(tokenizer_dir, max_seq_len=64)
    kept = sum(bool(_trained(_render(tokenizer, row)[1])) for row in _rows()[:10])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = ultrachat_dataset(tokenizer, split="train[:10]")
    assert len(dataset) == kept == 7
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 1 and "dropped 3 of 10 conversations" in messages[0]


def test_train_on_input_keeps_every_conversation(tokenizer_dir, caplog):
    tokenizer = smollm2_tokenizer(tokenizer_dir, max_seq_len=64)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = ultrachat_dataset(tokenizer, train_on_input=True)
    assert len(dataset) == 40
    assert all(_trained(dataset[i]["labels"]) > 0 for i in range(len(dataset)))
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_a_length_that_leaves_no_conversation_is_refused(tokenizer_dir):
    tokenizer = smollm2_tokenizer(tokenizer_dir, max_seq_len=8)
    with pytest.raises(DataError) as err:
        ultrachat_dataset(tokenizer)
    assert "tokenizer.max_seq_len" in str(err.value)
    assert "none of the 40 conversations" in str(err.value)
    with pytest.raises(DataError, match="tokenizer.max_seq_len"):
        ultrachat_dataset(tokenizer, packed=True)
