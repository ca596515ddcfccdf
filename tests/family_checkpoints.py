"""Tiny random-weight Hugging Face checkpoints of every supported model family, for tests.

Each family is written by transformers itself with its real layout at toy size: Llama 3.2 (GQA,
tied embeddings, its real llama3 RoPE scaling), Llama 2 (multi-head, untied, plain RoPE),
Mistral (head size not hidden / heads) and Qwen2 (q/k/v biases, θ 1e6, half-split RoPE). The
weights are drawn far from transformers' init (biases and norm scales included), so every part
of a layout shows in the logits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

VOCAB = 256
TOLERANCE = 1e-4
# Llama-3.2-1B's RoPE scaling, exactly as its config.json states it.
LLAMA32_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
SHAPE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
         "rms_norm_eps": 1e-5}
FAMILY_CONFIGS: dict[str, Callable[..., PretrainedConfig]] = {
    "llama3.2": lambda **shape: LlamaConfig(**{**SHAPE, **shape}, head_dim=16,
                                            rope_theta=500_000.0,
                                            rope_scaling=dict(LLAMA32_SCALING),
                                            max_position_embeddings=131_072,
                                            tie_word_embeddings=True),
    "llama2": lambda **shape: LlamaConfig(**{**SHAPE, "num_key_value_heads": 4, **shape},
                                          rope_theta=10_000.0, max_position_embeddings=4096,
                                          tie_word_embeddings=False),
    "mistral": lambda **shape: MistralConfig(**{**SHAPE, **shape}, head_dim=32, rope_theta=1e6,
                                             sliding_window=None,
                                             max_position_embeddings=32_768,
                                             tie_word_embeddings=False),
    "qwen2": lambda **shape: Qwen2Config(**{**SHAPE, **shape}, rope_theta=1e6,
                                         max_position_embeddings=32_768,
                                         tie_word_embeddings=True, use_sliding_window=False),
}
# The FullModelHFCheckpointer model_type that converts each family's weights.
EXPECTED_MODEL_TYPE = {"llama3.2": "LLAMA3_2", "llama2": "LLAMA3_2", "mistral": "MISTRAL",
                       "qwen2": "QWEN2"}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from transformers' init, so every part of the layout shows in the logits:
    biases (zero at init) and norm scales (one at init) included."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name:
                parameter.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                parameter.copy_(0.3 * noise)
            elif "embed" in name:
                parameter.copy_(noise)
            else:
                parameter.copy_(0.08 * noise)


def write_family(name: str, folder: Path, **shape: int) -> Path:
    """A random-weight checkpoint of family ``name`` saved with transformers in ``folder``;
    ``shape`` overrides :data:`SHAPE` entries (a larger ``vocab_size`` for a tokenizer's ids,
    fewer layers for speed)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILY_CONFIGS[name](**shape))
    randomize(model, seed=len(name))
    model.save_pretrained(folder)
    if name == "llama3.2":  # a per-layer list in a Llama config too: export must cut it
        config = json.loads((folder / "config.json").read_text())
        config["layer_types"] = ["full_attention"] * config["num_hidden_layers"]
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def tokens(length: int, vocab_size: int = VOCAB) -> torch.Tensor:
    """``1 x length`` token ids drawn with ``length`` as the seed."""
    return torch.randint(0, vocab_size, (1, length),
                         generator=torch.Generator().manual_seed(length))


def transformers_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """The logits transformers' ``AutoModelForCausalLM`` gives ``ids`` from ``folder`` (fp32)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def use_hub_rope_keys(folder: Path) -> Path:
    """Rewrite ``folder``'s config.json with RoPE stated as released checkpoints on the Hub
    state it (Llama-3.2-1B's config.json: top-level ``rope_theta`` plus a ``rope_scaling``
    block, or ``rope_scaling: null``), instead of transformers 5's ``rope_parameters``."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    block = dict(config.pop("rope_parameters"))
    config["rope_theta"] = block.pop("rope_theta")
    config["rope_scaling"] = block if block.get("rope_type", "default") != "default" else None
    path.write_text(json.dumps(config, indent=2))
    return folder


def write_family_tokenizer(name: str, folder: Path) -> Path:
    """The tiny byte-level BPE tokenizer (``tiny_setup.write_tiny_tokenizer``, ids < 512) in
    ``folder``, with the family's special-token convention: Qwen2 declares no BOS in
    tokenizer_config.json and names ``<|endoftext|>`` (id 0) in generation_config.json, as
    Qwen2.5's own files do; the others keep ``<|im_start|>`` (id 1) as BOS."""
    from tiny_setup import write_tiny_tokenizer

    write_tiny_tokenizer(folder)
    if name == "qwen2":
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["bos_token"] = None
        config_file.write_text(json.dumps(config, indent=2) + "\n")
        (folder / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}, indent=2) + "\n")
    return folder
