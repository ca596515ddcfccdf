"""The few places where we lean on torchtune 0.6.1 internals, kept together.

torchtune 0.6.1 is its last release and is no longer maintained, so we pin it; if a future
version moves one of these, only this module changes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch


def save_hf_model_dir(checkpointer: Any, model_state: dict[str, torch.Tensor], dest: Path) -> Path:
    """Write ``model_state`` as a Hugging Face model directory at ``dest`` (not yet existing).

    torchtune's ``FullModelHFCheckpointer`` converts the weights to HF names, shards them like
    the source checkpoint and copies config/tokenizer files, but always writes into
    ``<its output_dir>/epoch_<n>``. We point it at a staging folder beside ``dest`` and move
    the result into place, so the caller decides the layout (and atomicity) of checkpoints.
    """
    dest = Path(dest)
    staging = dest.parent / f".{dest.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    original = checkpointer._output_dir
    checkpointer._output_dir = staging
    try:
        checkpointer.save_checkpoint({"model": dict(model_state)}, epoch=0,
                                     intermediate_checkpoint=False)
    finally:
        checkpointer._output_dir = original
    os.replace(staging / "epoch_0", dest)
    shutil.rmtree(staging, ignore_errors=True)
    return dest


def hf_checkpoint_files(model_dir: Path) -> list[str]:
    """The weight files of an HF model directory, as torchtune's checkpointer wants them."""
    files = sorted(p.name for p in Path(model_dir).glob("*.safetensors"))
    if not files:
        files = sorted(p.name for p in Path(model_dir).glob("*.bin"))
    return files
