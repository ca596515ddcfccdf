"""Write a materialized model as a Hugging Face checkpoint (which torchtune also loads).

Weights are renamed by torchtune's own ``convert_weights.tune_to_hf``; ``config.json`` is the
source's with the new dimensions, so ``transformers.AutoModelForCausalLM.from_pretrained`` and
torchtune's ``FullModelHFCheckpointer`` (with ``acadlm_plugins.models.llama.llama_from_hf_config``
as the model) both load the directory. Written into a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torchtune.models.convert_weights import tune_to_hf

from acadlm_plugins.pruning.architecture import Architecture

WEIGHTS_FILENAME = "model.safetensors"
TORCHTUNE_FILENAME = "torchtune_model.pt"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                "special_tokens_map.json", "chat_template.jinja")


def export_pruned_model(model: nn.Module, arch: Architecture, source_dir: str | Path,
                        dest: str | Path, *, provenance: dict | None = None) -> Path:
    """Save ``model`` (of shape ``arch``) to ``dest`` as an HF directory plus the torchtune
    state dict; tokenizer files come from the source model directory ``source_dir``."""
    source_dir, dest = Path(source_dir), Path(dest)
    staging = dest.parent / f".{dest.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, staging / TORCHTUNE_FILENAME)
    hf_state = tune_to_hf(state, num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads,
                          dim=arch.embed_dim, head_dim=arch.head_dim)
    save_file({k: v.contiguous() for k, v in hf_state.items()}, staging / WEIGHTS_FILENAME,
              metadata={"format": "pt"})
    config = json.loads((source_dir / "config.json").read_text())
    config.update({"num_hidden_layers": arch.num_layers, "num_attention_heads": arch.num_heads,
                   "num_key_value_heads": arch.num_kv_heads, "hidden_size": arch.embed_dim,
                   "intermediate_size": arch.intermediate_dim, "head_dim": arch.head_dim,
                   "tie_word_embeddings": arch.tie_word_embeddings})
    config.pop("quantization_config", None)
    if provenance:
        config["acadlm_pruning"] = provenance
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in COPIED_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, staging / name)
    return publish_dir(staging, dest)


def publish_dir(staging: Path, dest: Path) -> Path:
    """Move a completely written ``staging`` folder to ``dest``, replacing what was there, so
    ``dest`` is always a whole model folder or absent."""
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(staging, dest)
    return dest
