"""Write a materialized model as a Hugging Face checkpoint (which torchtune also loads).

The source folder's family (``models.families.hf_model_spec``) decides everything
family-specific: weights are renamed by torchtune's own converter for that family (Llama and
Mistral q/k permuted back to HF's layout; Qwen2 renamed only, biases included), and
``config.json`` is the source's with the new dimensions, per-layer lists cut to the kept layers
and the RoPE the model was built with. So ``transformers.AutoModelForCausalLM.from_pretrained``
and torchtune's ``FullModelHFCheckpointer`` (with ``acadlm_plugins.models.llama.
llama_from_hf_config`` as the model) both load the directory. Written into a temporary folder
and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from acadlm_plugins.models.families import hf_model_spec
from acadlm_plugins.models.rope import rope_layout_of, rope_settings_of
from acadlm_plugins.pruning.architecture import Architecture

WEIGHTS_FILENAME = "model.safetensors"
TORCHTUNE_FILENAME = "torchtune_model.pt"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                "special_tokens_map.json", "chat_template.jinja")


def export_pruned_model(model: nn.Module, arch: Architecture, source_dir: str | Path,
                        dest: str | Path, *, provenance: dict | None = None,
                        kept_layers: Sequence[int] | None = None) -> Path:
    """Save ``model`` (of shape ``arch``) to ``dest`` as an HF directory plus the torchtune
    state dict; tokenizer files come from the source model directory ``source_dir``.

    ``kept_layers`` (the source indices of the kept layers) cuts per-layer config lists such
    as ``layer_types``; without it, such a list must be the same for every layer.
    """
    source_dir, dest = Path(source_dir), Path(dest)
    spec = hf_model_spec(source_dir)
    rope = model.layers[0].attn.pos_embeddings
    if rope_layout_of(rope) != spec.family.rope_layout:
        raise ValueError(f"the model's RoPE ({type(rope).__name__}) does not rotate the channel "
                         f"pairs of the {spec.family.name} family of {source_dir}; its weights "
                         "would be written in the wrong layout.")
    staging = dest.parent / f".{dest.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, staging / TORCHTUNE_FILENAME)
    hf_state = spec.hf_state_dict(state, arch)
    save_file({k: v.contiguous() for k, v in hf_state.items()}, staging / WEIGHTS_FILENAME,
              metadata={"format": "pt"})
    config = spec.pruned_config(arch, rope=rope_settings_of(rope), kept_layers=kept_layers,
                                dtype=next(iter(state.values())).dtype)
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
