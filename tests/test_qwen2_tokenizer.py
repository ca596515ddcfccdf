"""`smollm2_tokenizer` on a Qwen2-style ChatML tokenizer, whose tokenizer_config.json names no BOS.

Qwen2's and Qwen2.5's tokenizer_config.json say ``"bos_token": null``; transformers then takes
generation_config.json's ``bos_token_id`` (``<|endoftext|>``) as the BOS for generation. torchtune
0.6.1's ``HuggingFaceBaseTokenizer`` refuses such a config, so the ProLong stage configs (whose
tokenizer component is ``smollm2_tokenizer``) stopped at tokenizer setup for a Qwen2 base model.
The tiny test tokenizer (tests/family_checkpoints.py ``write_family_tokenizer("qwen2", ...)``)
has Qwen2.5's convention: no BOS in tokenizer_config.json, ids in generation_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from family_checkpoints import write_family_tokenizer
from torchtune.data import Message

from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.models import SmolLM2Tokenizer, smollm2_tokenizer
from acadlm_plugins.models.tokenizer import load_hf_base_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "alpha beta gamma?"},
    {"role": "assistant", "content": "delta."},
]


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory) -> Path:
    return write_family_tokenizer("qwen2", tmp_path_factory.mktemp("qwen2") / "model")


@pytest.fixture(scope="module")
def hf_tokenizer(qwen2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen2_folder))


def _messages(conversation) -> list[Message]:
    return [Message(role=m["role"], content=m["content"], masked=m["role"] != "assistant")
            for m in conversation]


def _hf_ids(hf_tokenizer, messages, **kwargs) -> list[int]:
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _rewrite(folder: Path, name: str, **changes) -> None:
    path = folder / name
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


def _copy(folder: Path, destination: Path) -> Path:
    destination.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (destination / name).write_bytes((folder / name).read_bytes())
    return destination


def test_the_qwen2_tokenizer_loads_with_generation_configs_bos(qwen2_folder, hf_tokenizer):
    """BOS from generation_config.json; EOS and pad as transformers reads tokenizer_config.json
    (Qwen2.5-Instruct: eos `<|im_end|>`, pad `<|endoftext|>`); the ChatML ids as SmolLM2's."""
    assert json.loads((qwen2_folder / "tokenizer_config.json").read_text())["bos_token"] is None
    generation = json.loads((qwen2_folder / "generation_config.json").read_text())
    tokenizer = smollm2_tokenizer(path=str(qwen2_folder))
    assert isinstance(tokenizer, SmolLM2Tokenizer)
    assert tokenizer.bos_id == generation["bos_token_id"] == 0
    assert hf_tokenizer.bos_token_id is None  # transformers' tokenizer has none either
    assert (tokenizer.eos_id, tokenizer.pad_id) == (hf_tokenizer.eos_token_id,
                                                    hf_tokenizer.pad_token_id) == (2, 0)
    assert (tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.document_separator_id) == (
        1, 2, 0)
    assert tokenizer.stop_tokens == [2, 0]
    assert tokenizer.vocab_size == len(hf_tokenizer)


def test_the_qwen2_tokenizer_encodes_and_renders_chatml(qwen2_folder, hf_tokenizer):
    tokenizer = smollm2_tokenizer(path=str(qwen2_folder), max_seq_len=4096)
    text = "alpha beta gamma delta"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert ids[1:-1] == hf_tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    tokens, mask = tokenizer.tokenize_messages(_messages(CONVERSATION))
    assert tokens == _hf_ids(hf_tokenizer, CONVERSATION)
    assert tokenizer.decode(tokens, skip_special_tokens=False).startswith(
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user\n")
    assert len(mask) == len(tokens) and mask[0] is True and mask[-1] is False
    prompt = _messages(CONVERSATION[:2]) + [Message(role="assistant", content="")]
    open_tokens, _ = tokenizer.tokenize_messages(prompt, add_end_tokens=False)
    assert open_tokens == _hf_ids(hf_tokenizer, CONVERSATION[:2], add_generation_prompt=True)


def test_a_qwen2_base_tokenizer_ends_text_with_endoftext(qwen2_folder, tmp_path):
    """Qwen2.5 (base): eos_token `<|endoftext|>`; generation_config.json may list several
    eos ids. tokenizer_config.json's token wins, as in transformers."""
    folder = _copy(qwen2_folder, tmp_path / "base")
    _rewrite(folder, "tokenizer_config.json", eos_token="<|endoftext|>")
    _rewrite(folder, "generation_config.json", eos_token_id=[2, 0])
    tokenizer = smollm2_tokenizer(path=str(folder))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 0, 0)
    # no eos_token in tokenizer_config.json: the first of generation_config.json's eos ids
    _rewrite(folder, "tokenizer_config.json", eos_token=None, pad_token=None)
    base = load_hf_base_tokenizer(folder / "tokenizer.json", folder / "tokenizer_config.json",
                                  folder / "generation_config.json")
    assert (base.bos_id, base.eos_id) == (0, 2)
    assert base.config["eos_token"] is None  # tokenizer_config.json is kept for pad readers
    assert smollm2_tokenizer(path=str(folder)).pad_id == 0  # generation_config's pad_token_id


def test_a_tokenizer_with_no_bos_anywhere_is_refused_naming_the_file(qwen2_folder, tmp_path):
    folder = _copy(qwen2_folder, tmp_path / "no_bos")
    (folder / "generation_config.json").unlink()
    with pytest.raises(DataError, match=r"tokenizer\.json: cannot tell the BOS/EOS tokens.*"
                                        r"generation_config\.json"):
        smollm2_tokenizer(path=str(folder))
    from acadlm_plugins.evaluation.lm_adapter import AcadTokenizer

    with pytest.raises(ConfigError, match="cannot tell the BOS/EOS tokens"):
        AcadTokenizer(folder)


def test_the_eval_adapter_reads_the_same_ids_through_the_shared_loader(qwen2_folder):
    from acadlm_plugins.evaluation.lm_adapter import AcadTokenizer

    ours, adapter = smollm2_tokenizer(path=str(qwen2_folder)), AcadTokenizer(qwen2_folder)
    assert (adapter.bos_id, adapter.eos_id, adapter.pad_id) == (
        ours.bos_id, ours.eos_id, ours.pad_id)
