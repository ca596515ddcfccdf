"""SmolLM2Tokenizer against the Hugging Face tokenizer of the embedded default model."""

from __future__ import annotations

import pytest
from torchtune.data import Message

from acadlm_plugins.defaults import require_default_model
from acadlm_plugins.models import SmolLM2Tokenizer, smollm2_tokenizer

pytestmark = pytest.mark.integration

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?\n  Answer in one word."},
    {"role": "assistant", "content": " Rome."},
]


@pytest.fixture(scope="module")
def tokenizer() -> SmolLM2Tokenizer:
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(require_default_model()))


def _hf_ids(hf_tokenizer, messages, **kwargs) -> list[int]:
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _messages(conversation) -> list[Message]:
    return [
        Message(role=m["role"], content=m["content"], masked=m["role"] != "assistant")
        for m in conversation
    ]


def test_special_ids(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)
    assert tokenizer.document_separator_id == 0
    assert tokenizer.stop_tokens == [2, 0]
    assert tokenizer.vocab_size == 49152


def test_encode_decode_round_trip(tokenizer, hf_tokenizer):
    text = "Shall I compare thee to a summer's day?\n\tdef f(x): return x ** 2  # café"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert ids[1:-1] == hf_tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text, add_bos=False, add_eos=False) == ids[1:-1]


def test_tokenize_messages_matches_the_hf_chat_template(tokenizer, hf_tokenizer):
    tokens, _ = tokenizer.tokenize_messages(_messages(CONVERSATION))
    assert tokens == _hf_ids(hf_tokenizer, CONVERSATION)


def test_inference_prompt_matches_add_generation_prompt(tokenizer, hf_tokenizer):
    prompt = _messages(CONVERSATION[:2]) + [Message(role="assistant", content="")]
    tokens, _ = tokenizer.tokenize_messages(prompt, add_end_tokens=False)
    assert tokens == _hf_ids(hf_tokenizer, CONVERSATION[:2], add_generation_prompt=True)


def test_mask_is_true_exactly_on_masked_messages(tokenizer):
    messages = _messages(CONVERSATION)
    tokens, mask = tokenizer.tokenize_messages(messages)
    expected = []
    for message in messages:
        expected += [message.masked] * len(tokenizer.tokenize_message(message))
    assert mask == expected and len(mask) == len(tokens)
    assert not all(mask) and any(mask)


def test_call_and_truncation(tokenizer):
    short = smollm2_tokenizer(max_seq_len=12)
    sample = short({"messages": _messages(CONVERSATION), "other": 1})
    assert set(sample) == {"tokens", "mask", "other"}
    assert len(sample["tokens"]) == 12 and sample["tokens"][-1] == short.eos_id
    assert sample["mask"][-1] is True


def test_conversation_that_fits_max_seq_len_matches_the_hf_chat_template(hf_tokenizer):
    """A max_seq_len the conversation fits in changes nothing: it still ends `<|im_end|>\\n`
    and its mask is the unlimited tokenizer's (torchtune's truncate would overwrite the last
    token with eos and mask it)."""
    expected = _hf_ids(hf_tokenizer, CONVERSATION)
    unlimited_tokens, unlimited_mask = smollm2_tokenizer().tokenize_messages(
        _messages(CONVERSATION))
    for max_seq_len in (len(expected), len(expected) + 1, 4096):
        limited = smollm2_tokenizer(max_seq_len=max_seq_len)
        tokens, mask = limited.tokenize_messages(_messages(CONVERSATION))
        assert tokens == expected
        assert hf_tokenizer.decode(tokens[-2:]) == "<|im_end|>\n"
        assert mask == unlimited_mask and tokens == unlimited_tokens
        assert mask[-1] is False  # the last assistant turn's end is learned


def test_truncation_keeps_torchtunes_convention(tokenizer):
    """One token too long: cut, last kept token replaced by eos and masked."""
    full, full_mask = tokenizer.tokenize_messages(_messages(CONVERSATION))
    short = smollm2_tokenizer(max_seq_len=len(full) - 1)
    tokens, mask = short.tokenize_messages(_messages(CONVERSATION))
    assert tokens == full[:len(full) - 2] + [short.eos_id]
    assert mask == full_mask[:len(full) - 2] + [True]
    # inference (no end tokens): cut without an eos
    open_full, _ = tokenizer.tokenize_messages(_messages(CONVERSATION), add_end_tokens=False)
    open_short = smollm2_tokenizer(max_seq_len=len(open_full) - 1)
    open_tokens, _ = open_short.tokenize_messages(_messages(CONVERSATION), add_end_tokens=False)
    assert open_tokens == open_full[:-1]


@pytest.mark.integration
def test_encode_batch_equals_encode_one_by_one():
    from acadlm_plugins.models.tokenizer import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    texts = ["def f(x):\n    return x", "And God said, Let there be light.", "é ü 漢字"]
    assert tokenizer.encode_batch(texts, add_bos=False) == [
        tokenizer.encode(t, add_bos=False) for t in texts]
