"""Which files of a Hugging Face model folder are its weights (``_compat.hf_checkpoint_files``,
used by ``spec.load``, the rater and the continued-pretraining resume): the index's shards, else
``model*.safetensors``, else ``pytorch_model*.bin``; never Mistral's ``consolidated.safetensors``
or a LoRA run's ``adapter_model.safetensors`` lying beside them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_setup import write_tiny_checkpoint

from acadlm_plugins._compat import hf_checkpoint_files
from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.models import hf_model_spec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def _with_extras(source: Path, folder: Path) -> Path:
    """``source`` plus the weight-like files that are not its HF weights."""
    shutil.copytree(source, folder)
    hf = {k: v for shard in sorted(source.glob("model*.safetensors"))
          for k, v in load_file(shard).items()}
    # Mistral's repos: the same weights under Mistral's own names
    save_file({k.replace("model.layers.", "layers.").replace("self_attn.q_proj", "attention.wq"): v
               for k, v in hf.items()}, folder / "consolidated.safetensors")
    # a torchtune LoRA run's adapter (PEFT names)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
               torch.zeros(8, 64)}, folder / "adapter_model.safetensors")
    torch.save({"learning_rate": 1e-4}, folder / "training_args.bin")
    return folder


def _logits(folder: Path) -> torch.Tensor:
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        return hf_model_spec(folder).load(max_seq_len=64)(ids)


def test_consolidated_and_adapter_files_are_not_read_as_weights(tiny, tmp_path):
    folder = _with_extras(tiny, tmp_path / "model")
    assert hf_checkpoint_files(folder) == ["model.safetensors"]
    assert torch.equal(_logits(folder), _logits(tiny))


def test_an_index_names_the_shards(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(folder, max_shard_size="100KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    _with_extras(folder, tmp_path / "with_extras")
    assert hf_checkpoint_files(tmp_path / "with_extras") == shards
    assert torch.allclose(_logits(tmp_path / "with_extras"), _logits(tiny), atol=1e-6)


def test_pytorch_bin_weights_without_safetensors(tiny, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(tiny / "config.json", folder / "config.json")
    torch.save(load_file(tiny / "model.safetensors"), folder / "pytorch_model.bin")
    torch.save({"learning_rate": 1e-4}, folder / "training_args.bin")
    save_file({"x": torch.zeros(1)}, folder / "adapter_model.safetensors")
    assert hf_checkpoint_files(folder) == ["pytorch_model.bin"]


def test_a_folder_without_hf_weights_is_refused_by_name(tiny, tmp_path):
    folder = _with_extras(tiny, tmp_path / "native_only")
    (folder / "model.safetensors").unlink()
    assert hf_checkpoint_files(folder) == []
    with pytest.raises(ConfigError) as refused:
        hf_model_spec(folder).load(max_seq_len=64)
    assert refused.value.key == "checkpointer.checkpoint_dir"
    assert "consolidated" in str(refused.value)


@pytest.mark.parametrize("index_text, words", [
    ('{"weight_map": {"a": "model-00001-of-00002.safetensors"}}', "does not hold"),
    ('{"weight_map": ', "not a weight index"),
    ('{"metadata": {}}', "not a weight index"),
])
def test_a_broken_index_names_itself(tmp_path, index_text, words):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(index_text)
    with pytest.raises(DataError, match=words) as raised:
        hf_checkpoint_files(tmp_path)
    assert str(index) in str(raised.value) and "Fix:" in str(raised.value)


def test_the_index_is_read_as_json(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "model-00001-of-00001.safetensors"}}))
    save_file({"x": torch.zeros(1)}, tmp_path / "consolidated.safetensors")
    assert hf_checkpoint_files(tmp_path) == ["model-00001-of-00001.safetensors"]
