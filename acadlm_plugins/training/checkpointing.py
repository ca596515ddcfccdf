"""Atomic, resumable run checkpoints.

Layout of a run's ``output_dir``::

    step_000040/
        model/             a Hugging Face model directory (loads in transformers and torchtune)
        recipe_state.pt    optimizer, data position, domain weights, RNG, plugin state
    LATEST                 the name of the newest complete checkpoint

A checkpoint is written into a hidden ``.step_N.partial`` folder, fsynced and renamed into
place, and ``LATEST`` is replaced atomically afterwards, so a run killed at any moment (or a
power loss) leaves the previous checkpoint intact and never a half-written one that looks
complete. A checkpoint is deleted (pruned, or replaced by a re-save of its step) the same way
round: renamed to a hidden ``.step_N.deleting.partial`` first, then removed, so a run killed
while deleting never leaves a ``step_N`` with its weights gone and ``recipe_state.pt`` still
there (the ``.partial`` suffix lets ``run_checks.clean_interrupted_writes`` sweep it at the
next start). A folder that lacks weights all the same (left by an older version) is not
complete: it is never resumed from, and the next save removes it. A recipe builds its
``recipe_state.pt`` with :func:`recipe_state`, writes it with :func:`write_recipe_checkpoint`,
and on restart finds it with :func:`find_resume_checkpoint` and reads it back, checked against
the config, with :func:`load_resume_state`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.optim.lr_scheduler import LRScheduler

from acadlm_plugins.errors import ConfigError, DataError

LATEST_FILENAME = "LATEST"
RECIPE_STATE_FILENAME = "recipe_state.pt"
MODEL_DIRNAME = "model"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# The hidden name a checkpoint folder takes while it is deleted (see _set_aside).
_DELETING_SUFFIX = ".deleting.partial"
_WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth"})
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d+)-of-(?P<total>\d+)(?P<suffix>\.[A-Za-z]+)$")

log = logging.getLogger(__name__)


def step_dirname(step: int) -> str:
    return f"step_{step:06d}"


def step_of(folder: Path) -> int:
    """The step of a checkpoint folder named by :func:`step_dirname`."""
    match = _STEP_DIR.match(folder.name)
    if match is None:
        raise ValueError(f"{folder} is not a step_<N> checkpoint folder")
    return int(match.group(1))


def write_checkpoint(output_dir: str | Path, step: int, write: Callable[[Path], None], *,
                     keep_last: int = 2, keep: Path | None = None) -> Path:
    """Create ``output_dir/step_<step>`` atomically; ``write(folder)`` fills the folder.

    Older complete checkpoints beyond ``keep_last`` are removed after the new one is in place,
    except ``keep`` (e.g. the rater's best one), which does not count towards ``keep_last``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / step_dirname(step)
    partial = output_dir / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    write(partial)
    fsync_tree(partial)  # the files' data and names on disk before the name step_N says "done"
    # Re-saving the same step (e.g. the last step after a resume): the old folder is renamed
    # away whole, never deleted in place, where a kill would leave a step_N without weights.
    replaced = _set_aside(final) if final.exists() else None
    os.replace(partial, final)
    fsync_dir(output_dir)  # the rename itself, before LATEST names it and older ones are pruned
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    _write_text_atomically(output_dir / LATEST_FILENAME, final.name)
    _prune(output_dir, keep_last, written=final, keep=keep)
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of ``output_dir`` (the one ``LATEST`` names, else
    the highest complete step), or None. A folder whose weights are missing (see
    :func:`missing_weights`) is not complete, whatever else it holds."""
    output_dir = Path(output_dir)
    candidate = _named_by_latest(output_dir)
    if candidate is not None and is_complete_checkpoint(candidate):
        return candidate
    complete = [p for p in _step_dirs(output_dir) if is_complete_checkpoint(p)]
    return complete[-1] if complete else None


def is_complete_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds ``recipe_state.pt`` (written last) and every weight file its
    model folders call for."""
    return (folder / RECIPE_STATE_FILENAME).is_file() and not missing_weights(folder)


def missing_weights(checkpoint: Path) -> list[str]:
    """The weight files a checkpoint folder evidently lacks (paths relative to it), as a
    deletion killed half-way by an older version left them (``recipe_state.pt`` and
    ``model/config.json`` still there, the safetensors gone). Only the model folders the recipes
    write are looked at: ``model/`` and ``<name>/model/`` (the rater's ``rater/model/``), not
    what else a checkpoint holds (hidden scratch folders of an unfinished quantized copy, files
    torchtune copies from sub-folders of the source model). Such a folder lacks: the files its
    ``*.index.json`` weight map names, the other shards of a sharded file
    (``model-00001-of-00002.safetensors``), or, holding a ``config.json`` and none of these, any
    weight file at all (then the folder itself is listed, ``model/ (config.json and no weight
    file)``). Empty where nothing is evidently missing (a few directory listings; weights are
    not read)."""
    missing: list[str] = []
    if not checkpoint.is_dir():
        return missing
    folders = [checkpoint / MODEL_DIRNAME, *(sub / MODEL_DIRNAME for sub in sorted(
        checkpoint.iterdir()) if sub.is_dir() and not sub.name.startswith("."))]
    for folder in folders:
        if not folder.is_dir():
            continue
        names = {entry.name for entry in folder.iterdir() if entry.is_file()}
        expected: set[str] = set()
        for name in sorted(n for n in names if n.endswith(".index.json")):
            try:
                weight_map = json.loads((folder / name).read_text()).get("weight_map", {})
                expected.update(str(file) for file in weight_map.values())
            except (OSError, ValueError, AttributeError):
                continue  # an unreadable index: the loader names it
        for name in names:
            shard = _SHARD.match(name)
            if shard and shard["suffix"] in _WEIGHT_SUFFIXES:
                width, total = len(shard["index"]), int(shard["total"])
                expected.update(f"{shard['stem']}-{i:0{width}d}-of-{shard['total']}"
                                f"{shard['suffix']}" for i in range(1, total + 1))
        where = folder.relative_to(checkpoint)
        missing.extend(str(where / name) for name in sorted(expected - names))
        if (not expected and "config.json" in names
                and not any(Path(name).suffix in _WEIGHT_SUFFIXES for name in names)):
            missing.append(f"{where}/ (config.json and no weight file)")
    return missing


def find_resume_checkpoint(output_dir: Path, resume: object) -> Path | None:
    """The checkpoint a run continues from under the config's ``resume`` mode, or None to start
    fresh: ``auto`` takes the newest complete one if there is one, ``true`` insists on one and
    ``false`` refuses an ``output_dir`` that holds one rather than overwrite it."""
    mode = str(resume).lower()
    if mode not in {"auto", "true", "false"}:
        raise ConfigError("resume", f"unknown value {mode!r}.", "use auto, true or false.")
    latest = latest_checkpoint(output_dir)
    if mode != "false":
        named = _named_by_latest(output_dir)
        if (named is not None and named != latest
                and (named / RECIPE_STATE_FILENAME).is_file()):
            _refuse_missing_weights(named)  # LATEST's own checkpoint damaged: say so, not skip it
    if mode == "false" and latest is not None:
        raise ConfigError("resume", f"`output_dir` {output_dir} already holds "
                          f"checkpoint {latest.name} and resume is false, so it would be "
                          "overwritten.", "set `resume: auto` to continue it, or choose a "
                          "new `output_dir`.")
    if mode == "true" and latest is None:
        raise ConfigError("resume", f"no complete checkpoint in {output_dir}.",
                          "use `resume: auto` to start fresh when there is none.")
    return None if mode == "false" else latest


def plain_value(value: Any) -> Any:
    """An OmegaConf node as plain resolved Python containers (comparable, picklable without
    omegaconf); any other value as it is."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


RECIPE_KEY = "_recipe"
# Where the run folder was when the identity was recorded (absolute, resolved): bookkeeping that
# lets a run folder moved together with its inputs be recognised (see `relocation`), never a
# value that must match.
OUTPUT_DIR_KEY = "_output_dir"
# The working directory of the recorded run (absolute, resolved): a relative path in its config
# (the pipelines' default `outputs/...`) names the place it names from there.
WORKING_DIR_KEY = "_working_dir"
BOOKKEEPING_KEYS = (OUTPUT_DIR_KEY, WORKING_DIR_KEY)


def config_values(cfg: DictConfig, keys: Iterable[str], *, recipe: str | None = None,
                  defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``cfg[key]`` as plain resolved values for each of ``keys`` (dotted keys such as
    ``checkpointer.checkpoint_dir`` reach into blocks): where unset, the value the run uses in
    its place from ``defaults`` (so an unset key and its default spelled out are one run), else
    None; and with ``recipe`` the
    recipe's name, the run folder ``output_dir`` (absolute) and the working directory: the
    run's identity, which a checkpoint records so a resumed run can be checked against it
    (:func:`config_mismatch`), and where the run was, so that a path spelled otherwise (relative
    then, absolute now) or into a run folder that moved with its inputs still matches."""
    values = {key: _with_default(key, plain_value(OmegaConf.select(cfg, key, default=None)),
                                 defaults) for key in keys}
    if recipe is not None:
        values[RECIPE_KEY] = recipe
        output_dir = OmegaConf.select(cfg, "output_dir", default=None)
        if output_dir is not None:
            values[OUTPUT_DIR_KEY] = str(_absolute(output_dir))
        values[WORKING_DIR_KEY] = str(Path.cwd().resolve())
    return values


def _with_default(key: str, value: Any, defaults: Mapping[str, Any] | None) -> Any:
    """``value``, or where it is None (unset) the default the run uses in its place."""
    if value is None and defaults:
        return defaults.get(key)
    return value


def load_resume_state(checkpoint: Path, cfg: DictConfig, must_match: Iterable[str], *,
                      recipe: str | None = None, defaults: Mapping[str, Any] | None = None
                      ) -> dict[str, Any]:
    """The recipe state saved in ``checkpoint``, once it is found to be a checkpoint of
    ``recipe`` and every ``must_match`` key of ``cfg`` is as the checkpoint recorded it:
    resuming another recipe's run, or on another model, data or seed, would silently mix two
    runs, so a difference is a :class:`ConfigError` naming the key. Keys a checkpoint of an
    older version did not record are not compared; ``defaults`` stand for unset keys on both
    sides (:func:`config_values`). A run folder moved with its inputs resumes:
    recorded paths under the moved root match the same paths under the new one (see
    :func:`config_mismatch`)."""
    saved = read_recipe_state(checkpoint)
    recorded = saved["config"]
    if recipe is not None and recorded.get(RECIPE_KEY, recipe) != recipe:
        raise ConfigError("output_dir", f"{checkpoint.parent} holds a checkpoint of the "
                          f"`{recorded[RECIPE_KEY]}` recipe ({checkpoint.name}); this is the "
                          f"`{recipe}` recipe, which cannot continue it.",
                          "choose a new `output_dir` for this run.")
    difference = config_mismatch(recorded, config_values(cfg, must_match, defaults=defaults),
                                 checkpoint.parent, defaults=defaults)
    if difference is not None:
        where, before, now = difference
        raise ConfigError(where, f"differs from the checkpoint being resumed ({checkpoint}): "
                          f"was {before}, is {now}.", f"restore `{where}` as it was, or "
                          "start a new `output_dir`.")
    return saved


#: ``mixed_precision`` unset: pure ``dtype`` (the training recipes' resume default).
PRECISION_DEFAULTS: dict[str, Any] = {"mixed_precision": False}
#: Keys a checkpoint records since a later version, with what a checkpoint written before then
#: had in force: such a checkpoint is compared as if it recorded that value (any other key an
#: older version did not record is not compared).
UNRECORDED_MEANS: dict[str, Any] = {**PRECISION_DEFAULTS}


def config_mismatch(recorded: dict[str, Any], now: dict[str, Any], output_dir: str | Path, *,
                    defaults: Mapping[str, Any] | None = None) -> tuple[str, Any, Any] | None:
    """The first of the config values ``now`` that is not as ``recorded`` (a checkpoint's or a
    one-shot export's identity from :func:`config_values`), for a run whose folder is
    ``output_dir`` now: its dotted key (the innermost that differs), the recorded value and the
    value now; None when every value matches. The one comparison of resumed and reused runs.

    Values compare exactly, except paths, where the identity recorded its working directory
    and run folder: a recorded path (a relative one from the recorded working directory)
    matches a path now that names the same place, and, where the run folder has moved since
    (:func:`relocation`), one under the moved root matches the same path under the new root:
    a run folder moved together with its inputs (a scratch disk copied home) resumes, while a
    path that changed otherwise, or any other value, is still a difference. The starting
    weights' content is checked apart from this (:func:`check_starting_weights`). Keys not
    recorded (by an older version) are not compared, nor the recorded places themselves. A key
    recorded unset (None, by a version that did not fill in ``defaults``) counts as its default."""
    moved = relocation(recorded.get(OUTPUT_DIR_KEY), output_dir,
                       recorded.get(WORKING_DIR_KEY))
    for key, value in now.items():
        if key in BOOKKEEPING_KEYS or (key not in recorded and key not in UNRECORDED_MEANS):
            continue
        before = _with_default(key, recorded.get(key, UNRECORDED_MEANS.get(key)), defaults)
        value = _with_default(key, value, defaults)
        if not same_config_value(before, value, moved):
            return first_difference(key, before, value, moved)
    return None


@dataclass(frozen=True)
class Relocation:
    """Where a recorded run's paths are now: a relative one counts from ``recorded_cwd`` (when
    recorded), and, for a run folder moved with its inputs, what was under ``old_root`` is
    under ``new_root`` (all absolute and resolved)."""

    old_root: Path | None = None
    new_root: Path | None = None
    recorded_cwd: Path | None = None

    def same_path(self, recorded: str, now: str) -> bool:
        """Whether ``recorded`` (relative: from the recorded working directory) names the place
        ``now`` names, where it was or moved from the old root to the new one. Both are
        compared resolved; a relative ``now`` against the working directory, where the recipes
        open it. The recorded path is tried as written and with the symlinks that still exist
        resolved (the root was recorded resolved)."""
        try:
            before = Path(recorded).expanduser()
            if not before.is_absolute():
                if self.recorded_cwd is None:
                    return False
                before = self.recorded_cwd / before
            target = _absolute(now)
            candidates = (Path(os.path.normpath(before)), before.resolve())
        except (ValueError, OSError, RuntimeError):
            return False  # not a path (a NUL byte, `~nosuchuser`): an ordinary value that differs
        for candidate in candidates:
            if candidate == target:
                return True
            if (self.old_root is not None and self.new_root is not None
                    and candidate.is_relative_to(self.old_root)
                    and _absolute(self.new_root / candidate.relative_to(self.old_root)) == target):
                return True
        return False


def relocation(recorded_output_dir: object, output_dir: str | Path,
               recorded_cwd: object = None) -> Relocation | None:
    """How the run folder moved since an identity recorded it at ``recorded_output_dir`` (with
    ``recorded_cwd`` its working directory, when recorded); None when nothing was recorded, or
    the folder did not move and no working directory was recorded (then values compare
    exactly).

    The rule: both output_dirs are made absolute and resolved, the trailing path components
    they share are stripped, and what remains of each is the moved root (``/a/x/run/continue``
    now ``/b/run/continue``: ``/a/x`` moved to ``/b``, so ``/a/x/run/prune/pruned_model`` is now
    ``/b/run/prune/pruned_model``); all shared components go, so ``/s/me/run`` now
    ``/h/me/run`` gives ``/s`` to ``/h``, which maps the run's own paths alike. A run folder
    that was renamed as well (no shared trailing component) relocates only itself: the two
    output_dirs are the roots. No relocation when either root would be a filesystem root
    (``/run`` now ``/b/run``), as that would map every absolute path. A relocation only ever
    makes a recorded path match; it never refuses."""
    cwd = Path(recorded_cwd) if isinstance(recorded_cwd, str) else None
    roots = _moved_roots(recorded_output_dir, output_dir)
    if roots is None:
        return None if cwd is None else Relocation(recorded_cwd=cwd)
    return Relocation(*roots, cwd)


def _moved_roots(recorded_output_dir: object, output_dir: str | Path
                 ) -> tuple[Path, Path] | None:
    """The old and new root of :func:`relocation`'s rule, or None (nothing recorded, not
    moved, or a root would be a filesystem root)."""
    if not isinstance(recorded_output_dir, str):
        return None
    old, new = _absolute(recorded_output_dir), _absolute(output_dir)
    if old == new:
        return None
    shared = 0
    # At least the anchor stays on each side: at worst a root, which is refused below.
    while (shared < min(len(old.parts), len(new.parts)) - 1
           and old.parts[-1 - shared] == new.parts[-1 - shared]):
        shared += 1
    old_root = Path(*old.parts[:len(old.parts) - shared])
    new_root = Path(*new.parts[:len(new.parts) - shared])
    if old_root == Path(old_root.anchor) or new_root == Path(new_root.anchor):
        return None
    return old_root, new_root


def same_config_value(before: Any, now: Any, moved: Relocation | None = None) -> bool:
    """Whether a recorded config value and the one now are the same: equal, or, with a
    relocation, alike in shape (dicts with the same keys, lists of the same length) with every
    string that differs a path ``moved`` relocates (see :meth:`Relocation.same_path`)."""
    if before == now:
        return True
    if moved is None:
        return False
    if isinstance(before, str) and isinstance(now, str):
        return moved.same_path(before, now)
    if isinstance(before, dict) and isinstance(now, dict):
        return before.keys() == now.keys() and all(
            same_config_value(before[name], now[name], moved) for name in before)
    if isinstance(before, (list, tuple)) and type(before) is type(now):
        return len(before) == len(now) and all(
            same_config_value(b, n, moved) for b, n in zip(before, now))
    return False


def _absolute(path: object) -> Path:
    """A configured path as the recipes open it: ``~`` expanded, relative to the working
    directory, with symlinks resolved."""
    return Path(str(path)).expanduser().resolve()


# What torch.load raises for a truncated or garbled state file.
UNREADABLE_STATE_ERRORS = (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError)


def read_recipe_state(checkpoint: Path) -> dict[str, Any]:
    """``checkpoint``'s ``recipe_state.pt``; a file that cannot be read (truncated by a full
    disk, say) is a :class:`DataError` naming it and the way out, not torch's zip error."""
    _refuse_missing_weights(checkpoint)
    path = checkpoint / RECIPE_STATE_FILENAME
    try:
        return torch.load(path, weights_only=False)
    except UNREADABLE_STATE_ERRORS as err:
        raise DataError(f"{path} cannot be read ({type(err).__name__}: {err}), so the run cannot "
                        f"resume from {checkpoint.name}. Fix: {_fallback(checkpoint)}, or choose "
                        "a new `output_dir`.") from err


def _refuse_missing_weights(checkpoint: Path) -> None:
    """A :class:`DataError` naming ``checkpoint`` when its weight files are missing: resuming it
    would fail later as a model that does not fit its checkpoint, blaming the config."""
    missing = missing_weights(checkpoint)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3
                                          else "")
        raise DataError(f"{checkpoint} holds {RECIPE_STATE_FILENAME} but its weights are missing "
                        f"({shown}): a checkpoint whose deletion was interrupted, or damaged, so "
                        f"the run cannot resume from {checkpoint.name}. Fix: "
                        f"{_fallback(checkpoint)}, or choose a new `output_dir`.")


def _fallback(checkpoint: Path) -> str:
    """The way out of a damaged ``checkpoint``: delete it, and what is resumed then."""
    older = [p for p in _step_dirs(checkpoint.parent)
             if p.name < checkpoint.name and is_complete_checkpoint(p)]
    return (f"delete the folder {checkpoint} to resume from the checkpoint before it "
            f"({older[-1].name})" if older else f"delete the folder {checkpoint} (there is no "
            "older checkpoint, so the run starts over)")


def check_resume_step(step: int, max_steps: int, checkpoint: Path) -> None:
    """A checkpoint past the run's ``max_steps`` cannot be resumed: the run would report the
    longer run's results as those of a ``max_steps`` run."""
    if step > max_steps:
        raise ConfigError("max_steps", f"is {max_steps}, but the checkpoint being resumed "
                          f"({checkpoint}) is already at step {step}.",
                          f"set `max_steps` to at least {step}, or choose a new `output_dir` "
                          f"for a {max_steps}-step run.")


STARTING_WEIGHTS_KEY = "starting_weights"
# How starting weights are fingerprinted: a weight file up to _WHOLE_FILE_BYTES is hashed whole,
# a larger one by its safetensors header and _SAMPLE_BLOCKS evenly spaced blocks of its data, so a
# multi-GB model costs a few MB of reading. The content, not the modification time, is compared:
# re-exporting the same model (a rerun pipeline) keeps the fingerprint.
_FINGERPRINT_METHOD = "sha256, whole up to 64 MiB, else header + 64 blocks of 64 KiB"
_WHOLE_FILE_BYTES = 64 << 20
_SAMPLE_BLOCKS = 64
_SAMPLE_BLOCK_BYTES = 64 << 10


def starting_weights_fingerprint(cfg: DictConfig, key: str = "checkpointer"
                                 ) -> dict[str, Any] | None:
    """A fingerprint of the weight files a fresh run starts from (``<key>.checkpoint_dir`` and
    its ``checkpoint_files``): per file its size and a digest of its content (see above). A run
    records it at step 0 in every checkpoint, and :func:`check_starting_weights` compares it on
    resume. None when the config names no checkpoint folder."""
    node = cfg.get(key, None)
    if not isinstance(node, DictConfig) or node.get("checkpoint_dir", None) is None:
        return None
    folder = Path(str(node.checkpoint_dir)).expanduser()
    return files_fingerprint(
        folder, _checkpoint_file_names(folder, plain_value(node.get("checkpoint_files", None))))


def files_fingerprint(folder: str | Path, names: Iterable[str]) -> dict[str, Any]:
    """The fingerprint of the files ``names`` in ``folder`` (``method``, ``folder`` and per
    file its size and content digest, None for an absent file), as
    :func:`starting_weights_fingerprint` records the starting weights and
    :func:`changed_files` compares."""
    folder = Path(folder).expanduser()
    return {"method": _FINGERPRINT_METHOD, "folder": str(folder),
            "files": {str(name): _file_fingerprint(folder / str(name)) for name in names}}


def changed_files(recorded: dict[str, Any] | None, now: dict[str, Any] | None) -> list[str]:
    """The names of the files whose fingerprint differs between two :func:`files_fingerprint`
    results (present in one only, or with another size or content), sorted; none when either
    is missing (a checkpoint of an older version recorded none) or they were made by different
    methods (not comparable)."""
    if not recorded or not now or recorded.get("method") != now.get("method"):
        return []
    before, after = recorded["files"], now["files"]
    return sorted(name for name in {*before, *after} if before.get(name) != after.get(name))


def check_starting_weights(recorded: dict[str, Any] | None, now: dict[str, Any] | None,
                           checkpoint: Path, key: str = "checkpointer.checkpoint_dir") -> None:
    """Refuse to resume ``checkpoint`` when the starting weights it was trained from (``recorded``
    at its step 0) are not those the config points at ``now``: a starting model re-exported at
    the same path (a rerun pruning stage with more steps, say) would otherwise continue the old
    run and report its results as the new model's. A checkpoint that recorded none (written by
    an older version) is not checked."""
    changed = changed_files(recorded, now)
    if changed:
        raise ConfigError(key, f"the starting model in {now['folder']} changed since the "
                          f"checkpoints in {checkpoint.parent} were written (weight files that "
                          f"differ: {', '.join(changed)}); resuming {checkpoint.name} would "
                          "continue a run trained from the old model and report its results "
                          "as the new model's.", "choose a new `output_dir` for a run from the "
                          "new starting model, or restore the starting model the checkpoints "
                          "were trained from.")


def _checkpoint_file_names(folder: Path, files: Any) -> list[str]:
    """The file names ``checkpoint_files`` stands for: a list, torchtune's ``filename_format`` /
    ``max_filename`` form, or (unset or unreadable) every weight file in ``folder``."""
    if isinstance(files, (list, tuple)):
        return [str(name) for name in files]
    if isinstance(files, dict):
        from torchtune.training.checkpointing._utils import FormattedCheckpointFiles

        try:
            return FormattedCheckpointFiles.from_dict(files).build_checkpoint_filenames()
        except (ValueError, KeyError, TypeError):
            pass  # torchtune names the problem when it loads the checkpoint
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and p.suffix in {".safetensors", ".bin", ".pt", ".pth"})


def _file_fingerprint(path: Path) -> dict[str, Any] | None:
    """Size and content digest of a weight file (see ``_FINGERPRINT_METHOD``); None if absent."""
    if not path.is_file():
        return None
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= _WHOLE_FILE_BYTES:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        else:
            start = _safetensors_data_start(handle, size)
            handle.seek(0)
            digest.update(handle.read(start))
            span = size - start - _SAMPLE_BLOCK_BYTES
            for i in range(_SAMPLE_BLOCKS):
                handle.seek(start + span * i // (_SAMPLE_BLOCKS - 1))
                digest.update(handle.read(_SAMPLE_BLOCK_BYTES))
    return {"size": size, "sha256": digest.hexdigest()}


def _safetensors_data_start(handle: BinaryIO, size: int) -> int:
    """Where a safetensors file's tensor data begin (after its 8-byte length and JSON header);
    0 for any other file."""
    handle.seek(0)
    head = handle.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else size
    return 8 + length if 8 + length + _SAMPLE_BLOCK_BYTES <= size else 0


def first_difference(key: str, before: Any, now: Any, moved: Relocation | None = None
                     ) -> tuple[str, Any, Any]:
    """The dotted key of the first entry that differs inside two nested config values, with
    both values, so the error names ``pruning.target.num_layers`` rather than ``pruning``;
    entries that differ only by a path ``moved`` relocates are the same."""
    if isinstance(before, dict) and isinstance(now, dict):
        for name in [*before, *(k for k in now if k not in before)]:
            if not same_config_value(before.get(name), now.get(name), moved):
                return first_difference(f"{key}.{name}", before.get(name), now.get(name), moved)
    return key, before, now


class Stateful(Protocol):
    """A data sampler (or anything else) whose position is saved with a checkpoint."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def recipe_state(*, step: int, optimizer_state: dict[str, Any],
                 lr_scheduler: LRScheduler | None,
                 sampler: Stateful, history: dict[str, Any], config: dict[str, Any],
                 **extra: Any) -> dict[str, Any]:
    """What a training recipe saves beside its model to resume exactly: step, optimizer,
    scheduler, data position, ``extra`` (e.g. plugin state), RNG, history, and the config
    values a resumed run must match (see :func:`load_resume_state`)."""
    return {"step": step, "optimizer": optimizer_state,
            "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler else None,
            "sampler": sampler.state_dict(), **extra, "rng": rng_state(), "history": history,
            "config": config}


def write_recipe_checkpoint(output_dir: Path, step: int, state: dict[str, Any],
                            write_model: Callable[[Path], None], *, keep_last: int,
                            keep: Path | None = None) -> Path:
    """Write checkpoint ``step`` atomically: ``write_model(folder)`` saves the model, then
    ``state`` goes to ``recipe_state.pt`` (last, as its presence marks the checkpoint
    complete); only the newest ``keep_last`` checkpoints are kept, and ``keep``."""

    def write(folder: Path) -> None:
        write_model(folder)
        save_torch_atomically(state, folder / RECIPE_STATE_FILENAME)

    return write_checkpoint(output_dir, step, write, keep_last=keep_last, keep=keep)


def write_atomically(path: Path, write: Callable[[BinaryIO], None], *,
                     prefix: str = ".acadlm-") -> None:
    """Call ``write`` on a temporary file beside ``path``, fsync it, rename it into place and
    fsync the folder, so a reader (or a resumed run) sees the old file or the whole new one,
    never a part, and the new one survives a power loss once this returns."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync_tree(root: Path) -> None:
    """fsync every regular file under ``root``, then every folder (deepest first, ``root``
    last), so that what was written there is on disk before ``root`` is renamed into place.

    A rename can reach the disk before the data of the files it publishes: after a power loss,
    ``step_N`` would exist with empty or truncated weights and resume would pick it as the
    newest checkpoint. Folders are synced too, as a file's name in its folder is only durable
    once the folder is. Symbolic links are not followed.
    """
    folders: list[str] = []
    for folder, _, filenames in os.walk(root):
        folders.append(folder)
        for name in filenames:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    for folder in reversed(folders):
        fsync_dir(folder)


def fsync_dir(path: str | Path) -> None:
    """fsync the folder ``path``, making the names created, renamed or removed in it durable
    (what a rename into it needs after the rename). Some file systems (a few FUSE and network
    mounts) refuse fsync on a folder with EINVAL or ENOTSUP; nothing more can be done there."""
    if os.name != "posix":  # Windows cannot open a folder with os.open
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


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
    """Put back the RNGs :func:`rng_state` saved, so a resumed run draws the same numbers."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda handle: handle.write((text + "\n").encode()))


def _named_by_latest(output_dir: Path) -> Path | None:
    """The folder ``LATEST`` names (it may not exist), or None without a ``LATEST``."""
    pointer = output_dir / LATEST_FILENAME
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    return output_dir / name if name else None


def _set_aside(folder: Path) -> Path:
    """Rename checkpoint ``folder`` to its hidden ``.<name>.deleting.partial`` (removing a
    leftover of that name first) and return the new path. The rename is atomic, so a run killed
    while the folder is deleted leaves no ``step_N`` half-deleted that resume would take for
    complete; the caller fsyncs the parent folder before deleting."""
    doomed = folder.with_name(f".{folder.name}{_DELETING_SUFFIX}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    return doomed


def _step_dirs(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def _prune(output_dir: Path, keep_last: int, *, written: Path, keep: Path | None = None
           ) -> None:
    """Keep ``written`` (the checkpoint LATEST names) and the ``keep_last - 1`` newest other
    complete ones; folders whose weights are missing go too, and each is renamed away before it
    is deleted (see :func:`_set_aside`). Ordering by step alone could delete ``written`` itself:
    a run killed just after renaming a checkpoint into place, before LATEST named it, leaves a
    higher step behind that a resumed run (from the lower LATEST) then writes below."""
    if keep_last < 1:
        return
    others = [p for p in _step_dirs(output_dir)
              if p not in (written, keep) and (p / RECIPE_STATE_FILENAME).is_file()]
    complete = [p for p in others if not missing_weights(p)]
    # Beyond keep_last, and any whose weights are gone (a deletion an older version left
    # half-done): nothing resumes from those.
    doomed = [*complete[:max(0, len(complete) - (keep_last - 1))],
              *(p for p in others if p not in complete)]
    for old in doomed:
        try:
            _set_aside(old)
        except OSError as error:  # the next save tries again
            log.warning("could not remove old checkpoint %s: %s", old, error)
    if doomed:
        fsync_dir(output_dir)  # no step_N name of theirs survives a crash from here on
    # Those, and any an interrupted deletion left (clean_interrupted_writes removes them too).
    for leftover in sorted(output_dir.glob(f".step_*{_DELETING_SUFFIX}")):
        shutil.rmtree(leftover, ignore_errors=True)
