"""config.json files of public models, shipped without weights, so a paper-scale config can be
planned (and checked in CI) on a machine that has never downloaded the model.

Each file under ``acadlm_plugins/models/reference_configs/`` holds the architecture fields of
the model's published ``config.json`` (docs/planning.md lists the sources). A folder holding one
of them as ``config.json`` is all ``acadlm-plan`` needs for ``model_dir=``.
"""

from __future__ import annotations

from pathlib import Path

from acadlm_plugins.errors import ConfigError

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "models" / "reference_configs"


def reference_names() -> list[str]:
    """The shipped reference configs, e.g. ``llama-2-7b``, ``llama-3.1-8b``."""
    return sorted(p.stem for p in REFERENCE_DIR.glob("*.json"))


def reference_config(name: str) -> Path:
    """The shipped config.json of ``name`` (one of :func:`reference_names`)."""
    path = REFERENCE_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError("--reference", f"no reference config named {name!r}.",
                          f"use one of {reference_names()}.")
    return path


def write_reference_model_dir(name: str, folder: str | Path) -> Path:
    """Make ``folder`` a weightless model folder: the reference config of ``name`` as its
    ``config.json``. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(reference_config(name).read_text())
    return folder
