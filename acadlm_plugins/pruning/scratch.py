"""The from-scratch baseline: a model of the pruned shape with fresh random weights.

Sheared-LLaMA's claim is that pruning + continued pre-training beats training a model of the
same shape from random initialization on the same tokens. This writes that model, as a Hugging
Face folder our recipes load like any other: the architecture and tokenizer of a given folder
(e.g. the pruned model), weights initialized by transformers' own scheme for the architecture
(normal with the config's ``initializer_range``, tied embeddings kept tied).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from acadlm_plugins.pruning.export import COPIED_FILES, publish_dir


def write_random_init_model(like: str | Path, dest: str | Path, *, seed: int = 0) -> Path:
    """Write ``dest``: ``like``'s config and tokenizer files with random weights (seeded).

    Written into a staging folder and renamed into place, so ``dest`` is complete or absent.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    like, dest = Path(like), Path(dest)
    config = AutoConfig.from_pretrained(like)
    staging = dest.parent / f".{dest.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    model.save_pretrained(staging, safe_serialization=True)
    written = json.loads((staging / "config.json").read_text())
    written.pop("acadlm_pruning", None)
    written["acadlm_init"] = {"kind": "random", "seed": seed, "shape_of": str(like)}
    (staging / "config.json").write_text(json.dumps(written, indent=2) + "\n")
    for name in COPIED_FILES:
        if (like / name).is_file():
            shutil.copy2(like / name, staging / name)
    return publish_dir(staging, dest)
