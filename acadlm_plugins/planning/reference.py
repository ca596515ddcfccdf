"""config.json files of public models, shipped without weights, so a paper-scale config can be
planned (and checked in CI) on a machine that has never downloaded the model.

Each file under ``acadlm_plugins/models/reference_configs/`` holds the architecture fields of
the model's published ``config.json`` (docs/planning.md lists the sources). A folder holding one
of them as ``config.json`` is all ``acadlm-plan`` needs for ``model_dir=``.

A few references are *derived*: a shipped config with the fields a recipe of this repository
changes when it exports the model (:data:`DERIVED`), so that a config whose ``model_dir`` is
that export (the SFT after ProLong's 512K stage) can be planned the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from acadlm_plugins.errors import ConfigError

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "models" / "reference_configs"

# name: (shipped reference, the fields the export changes). ProLong's stage 2
# (configs/llama3/prolong_512k_stage2.yaml) exports Meta-Llama-3-8B with its θ and length:
# long_context_recipe writes rope_theta = long_context.rope_base and max_position_embeddings =
# max(long_context.max_seq_len, the source's).
DERIVED: dict[str, tuple[str, dict[str, Any]]] = {
    "prolong-512k-stage2": ("meta-llama-3-8b",
                            {"rope_theta": 1.28e8, "max_position_embeddings": 524288}),
}


def reference_names() -> list[str]:
    """The shipped reference configs, e.g. ``llama-2-7b``, ``llama-3.1-8b``, and the derived
    ones (:data:`DERIVED`)."""
    return sorted([p.stem for p in REFERENCE_DIR.glob("*.json")] + list(DERIVED))


def reference_config(name: str) -> Path:
    """The shipped config.json of ``name`` (a shipped one of :func:`reference_names`; a derived
    one has no file: :func:`reference_json` or :func:`write_reference_model_dir`)."""
    path = REFERENCE_DIR / f"{name}.json"
    if not path.is_file():
        hint = (f"{name!r} is derived from {DERIVED[name][0]!r}: use reference_json or "
                "write_reference_model_dir." if name in DERIVED
                else f"use one of {reference_names()}.")
        raise ConfigError("--reference", f"no reference config file named {name!r}.", hint)
    return path


def reference_json(name: str) -> dict[str, Any]:
    """The config.json contents of ``name``, shipped or derived."""
    if name in DERIVED:
        base, changes = DERIVED[name]
        return {**json.loads(reference_config(base).read_text()), **changes}
    return json.loads(reference_config(name).read_text())


def write_reference_model_dir(name: str, folder: str | Path) -> Path:
    """Make ``folder`` a weightless model folder: the reference config of ``name`` as its
    ``config.json``. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if name in DERIVED:
        (folder / "config.json").write_text(json.dumps(reference_json(name), indent=2) + "\n")
    else:
        (folder / "config.json").write_text(reference_config(name).read_text())
    return folder
