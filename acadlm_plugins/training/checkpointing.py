"""Atomic, resumable run checkpoints.

Layout of a run's ``output_dir``::

    step_000040/
        model/             a Hugging Face model directory (loads in transformers and torchtune)
        recipe_state.pt    optimizer, data position, domain weights, RNG, plugin state
    LATEST                 the name of the newest complete checkpoint

A checkpoint is written into a hidden ``.step_N.partial`` folder and renamed into place, and
``LATEST`` is replaced atomically afterwards, so a run killed at any moment leaves the previous
checkpoint intact and never a half-written one that looks complete.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

LATEST_FILENAME = "LATEST"
RECIPE_STATE_FILENAME = "recipe_state.pt"
MODEL_DIRNAME = "model"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dirname(step: int) -> str:
    return f"step_{step:06d}"


def write_checkpoint(output_dir: str | Path, step: int, write: Callable[[Path], None], *,
                     keep_last: int = 2) -> Path:
    """Create ``output_dir/step_<step>`` atomically; ``write(folder)`` fills the folder.

    Older complete checkpoints beyond ``keep_last`` are removed after the new one is in place.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / step_dirname(step)
    partial = output_dir / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    write(partial)
    if final.exists():  # re-saving the same step (e.g. the last step after a resume)
        shutil.rmtree(final)
    os.replace(partial, final)
    _write_text_atomically(output_dir / LATEST_FILENAME, final.name)
    _prune(output_dir, keep_last)
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of ``output_dir``, or None."""
    output_dir = Path(output_dir)
    pointer = output_dir / LATEST_FILENAME
    if pointer.is_file():
        candidate = output_dir / pointer.read_text().strip()
        if (candidate / RECIPE_STATE_FILENAME).is_file():
            return candidate
    complete = [p for p in _step_dirs(output_dir) if (p / RECIPE_STATE_FILENAME).is_file()]
    return complete[-1] if complete else None


def write_atomically(path: Path, write: Callable[[BinaryIO], None], *, prefix: str = "") -> None:
    """Call ``write`` on a temporary file beside ``path``, fsync it, then rename it into place,
    so a reader (or a resumed run) sees the old file or the whole new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_torch_atomically(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename it into place."""
    write_atomically(path, lambda handle: torch.save(obj, handle))


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may touch."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda handle: handle.write((text + "\n").encode()))


def _step_dirs(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def _prune(output_dir: Path, keep_last: int) -> None:
    if keep_last < 1:
        return
    complete = [p for p in _step_dirs(output_dir) if (p / RECIPE_STATE_FILENAME).is_file()]
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
