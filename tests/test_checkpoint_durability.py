"""A checkpoint survives a power loss: everything in ``step_N`` is fsynced before the folder is
renamed into place, and the run folder is fsynced after each rename into it (the step folder,
then LATEST), so resume never picks a renamed folder whose files are empty or truncated."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tiny_setup import write_tiny_checkpoint

from acadlm_plugins._compat import save_hf_model_dir
from acadlm_plugins.qurating.rater import hf_checkpointer
from acadlm_plugins.training import checkpointing
from acadlm_plugins.training.checkpointing import (
    LATEST_FILENAME,
    MODEL_DIRNAME,
    RECIPE_STATE_FILENAME,
    latest_checkpoint,
    write_recipe_checkpoint,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(),
                                reason="maps fds to paths through /proc (Linux)")


@pytest.fixture(autouse=True)
def quiet_isolated_runs(monkeypatch):
    monkeypatch.setenv("ACADLM_NO_PROGRESS", "1")
    monkeypatch.setenv("ACADLM_PLUGINS_DISABLE_AUTOLOAD", "1")


def _identity(path: str | Path) -> tuple[int, int]:
    info = os.stat(path, follow_symlinks=False)
    return info.st_dev, info.st_ino


def record_fsyncs_and_renames(monkeypatch) -> list[tuple]:
    """Events in order: ("fsync", (dev, inode), path) and ("replace", src, dst). Inodes, as a
    renamed file or folder keeps its inode (recipe_state.pt is fsynced under its temp name)."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", (info.st_dev, info.st_ino), os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        events.append(("replace", os.fspath(src), os.fspath(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def fsynced_between(events: list[tuple], identity: tuple[int, int], start: int, end: int
                    ) -> bool:
    return any(event[0] == "fsync" and event[1] == identity for event in events[start:end])


def test_a_recipe_checkpoint_is_fsynced_before_and_after_it_is_published(tmp_path, monkeypatch):
    torch.manual_seed(0)
    base = write_tiny_checkpoint(tmp_path / "base")
    checkpointer = hf_checkpointer(base, tmp_path / "checkpointer_out")
    model_state = checkpointer.load_checkpoint()["model"]
    output_dir = tmp_path / "run"
    state = {"step": 3, "config": {}}
    events = record_fsyncs_and_renames(monkeypatch)

    final = write_recipe_checkpoint(  # as the recipes' save_checkpoint call it
        output_dir, 3, state,
        lambda folder: save_hf_model_dir(checkpointer, model_state, folder / MODEL_DIRNAME),
        keep_last=2)

    assert latest_checkpoint(output_dir) == final
    partial = str(output_dir / f".{final.name}.partial")
    publish = events.index(("replace", partial, str(final)))
    latest = next(i for i, event in enumerate(events)
                  if event[0] == "replace" and event[2] == str(output_dir / LATEST_FILENAME))

    files = [p for p in final.rglob("*") if p.is_file() and not p.is_symlink()]
    folders = [final, *(p for p in final.rglob("*") if p.is_dir() and not p.is_symlink())]
    assert final / RECIPE_STATE_FILENAME in files
    assert any(p.suffix == ".safetensors" for p in files)
    not_synced = [str(p.relative_to(final)) for p in files
                  if not fsynced_between(events, _identity(p), 0, publish)]
    assert not not_synced, f"files renamed into place without fsync: {not_synced}"
    for folder in folders:
        # after the last rename into it, so that name is durable too, and before publishing
        staged = partial + str(folder)[len(str(final)):]
        last_entry = max((i for i, event in enumerate(events[:publish])
                          if event[0] == "replace" and os.path.dirname(event[2]) == staged),
                         default=0)
        assert fsynced_between(events, _identity(folder), last_entry, publish), (
            f"folder {folder.relative_to(output_dir)} not fsynced before it was published")
    run_folder = _identity(output_dir)
    assert fsynced_between(events, run_folder, publish + 1, latest), (
        "the run folder was not fsynced after step_N was renamed into it (before LATEST)")
    assert fsynced_between(events, run_folder, latest + 1, len(events)), (
        "the run folder was not fsynced after LATEST was renamed into it")


def test_write_atomically_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    events = record_fsyncs_and_renames(monkeypatch)
    path = tmp_path / "note.txt"
    checkpointing.write_atomically(path, lambda handle: handle.write(b"hello\n"))
    assert path.read_bytes() == b"hello\n"
    renamed = next(i for i, event in enumerate(events)
                   if event[0] == "replace" and event[2] == str(path))
    assert fsynced_between(events, _identity(path), 0, renamed)
    assert fsynced_between(events, _identity(tmp_path), renamed + 1, len(events))
