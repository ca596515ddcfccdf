"""Resume refusals of training/checkpointing.py: a corrupt recipe state, a checkpoint whose
weights are missing (and a kill while a checkpoint is deleted, which must not leave one), a
checkpoint past ``max_steps``, and starting weights that changed since the checkpoints were
written (checked here for the prune and long-context recipes, which share the continued
pre-training loop; tests/test_continued_pretrain_recipe.py checks that recipe); and the
comparison of recorded and current config values, which lets a run folder moved together with
its inputs resume."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from recipe_runs import run_recipe_main, torch_threads
from tiny_setup import REPO_ROOT, tiny_run_args, write_tiny_checkpoint

from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.training import checkpointing
from acadlm_plugins.training.checkpointing import (
    LATEST_FILENAME,
    MODEL_DIRNAME,
    RECIPE_STATE_FILENAME,
    check_resume_step,
    check_starting_weights,
    find_resume_checkpoint,
    latest_checkpoint,
    load_resume_state,
    save_torch_atomically,
    starting_weights_fingerprint,
    write_recipe_checkpoint,
)
from acadlm_plugins.training.run_checks import clean_interrupted_writes


@pytest.fixture(autouse=True)
def quiet_isolated_runs(monkeypatch):
    monkeypatch.setenv("ACADLM_NO_PROGRESS", "1")
    monkeypatch.setenv("ACADLM_PLUGINS_DISABLE_AUTOLOAD", "1")


def fake_checkpoint(output_dir: Path, step: int) -> Path:
    folder = output_dir / checkpointing.step_dirname(step)
    folder.mkdir(parents=True)
    save_torch_atomically({"step": step, "config": {}}, folder / RECIPE_STATE_FILENAME)
    return folder


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ------------------------------------------------------------------ corrupt recipe state
def test_a_truncated_recipe_state_names_the_file_and_the_older_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 1)
    newest = fake_checkpoint(tmp_path, 2)
    truncate(newest / RECIPE_STATE_FILENAME)
    with pytest.raises(DataError) as err:
        load_resume_state(newest, OmegaConf.create({}), [])
    message = str(err.value)
    assert str(newest / RECIPE_STATE_FILENAME) in message
    assert f"delete the folder {newest}" in message and "step_000001" in message
    assert "`output_dir`" in message
    shutil.rmtree(newest)  # the fix: the older checkpoint is resumed
    assert load_resume_state(latest_checkpoint(tmp_path), OmegaConf.create({}), [])["step"] == 1


def test_pruning_old_checkpoints_never_deletes_the_one_just_written(tmp_path):
    """A kill between renaming step 6 into place and writing LATEST leaves LATEST at step 4; the
    resumed run writes step 5 (below the stray step 6), which must survive keep_last=1."""
    def write(folder: Path) -> None:
        save_torch_atomically({"step": 0, "config": {}}, folder / RECIPE_STATE_FILENAME)

    checkpointing.write_checkpoint(tmp_path, 4, write, keep_last=1)
    fake_checkpoint(tmp_path, 6)  # renamed into place, LATEST not yet updated: then killed
    assert latest_checkpoint(tmp_path).name == "step_000004"
    written = checkpointing.write_checkpoint(tmp_path, 5, write, keep_last=1)
    assert written.is_dir() and latest_checkpoint(tmp_path) == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step_000005"]
    checkpointing.write_checkpoint(tmp_path, 6, write, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step_000005",
                                                          "step_000006"]


@pytest.mark.parametrize("keep_last", [1, 2, 3, 4, 6])
def test_pruning_keeps_exactly_keep_last_checkpoints(tmp_path, keep_last):
    """keep_last larger than the checkpoints written so far deletes nothing (a negative slice
    end once deleted all but the newest few), and then exactly keep_last are kept."""
    def write(folder: Path) -> None:
        save_torch_atomically({"step": 0, "config": {}}, folder / RECIPE_STATE_FILENAME)

    for step in range(1, 8):
        checkpointing.write_checkpoint(tmp_path, step, write, keep_last=keep_last)
        kept = sorted(p.name for p in tmp_path.glob("step_*"))
        assert kept == [f"step_{s:06d}" for s in range(max(1, step - keep_last + 1), step + 1)]


def test_a_corrupt_only_checkpoint_says_the_run_starts_over_once_deleted(tmp_path):
    only = fake_checkpoint(tmp_path, 3)
    (only / RECIPE_STATE_FILENAME).write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="no older checkpoint, so the run starts over"):
        load_resume_state(only, OmegaConf.create({}), [])


# ------------------------------------------------- a run killed while deleting a checkpoint
WEIGHTS = "model-00001-of-00001.safetensors"


def write_model_files(folder: Path) -> None:
    """Stand-ins for the files save_hf_model_dir leaves in ``model/``."""
    model = folder / MODEL_DIRNAME
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "generation_config.json").write_text("{}")
    (model / WEIGHTS).write_bytes(b"weights")
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": WEIGHTS}}))


def save(output_dir: Path, step: int, keep_last: int) -> Path:
    return write_recipe_checkpoint(output_dir, step, {"step": step, "config": {}},
                                   write_model_files, keep_last=keep_last)


class Killed(BaseException):
    """SIGKILL, as far as the code under test can tell: nothing catches it."""


def kill_while_deleting_a_checkpoint(monkeypatch) -> None:
    """``shutil.rmtree`` of a checkpoint folder (one holding recipe_state.pt) removes the weights
    and then the process dies, before recipe_state.pt goes: what killloop found."""
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if (path / RECIPE_STATE_FILENAME).is_file():
            for weights in path.rglob("*.safetensors"):
                weights.unlink()
            raise Killed(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)


def step_names(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.glob("step_*"))


def test_a_kill_while_pruning_leaves_no_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    """Killed while deleting step 1 (keep_last=1): step 1 is gone under its own name, the start
    after sweeps the rest, resume takes step 2, and once step 2 is damaged the advice (and
    following it) starts over rather than resuming a step 1 without weights."""
    save(tmp_path, 1, keep_last=1)
    with monkeypatch.context() as patch:
        kill_while_deleting_a_checkpoint(patch)
        with pytest.raises(Killed):
            save(tmp_path, 2, keep_last=1)
    assert step_names(tmp_path) == ["step_000002"]
    assert [p.name for p in clean_interrupted_writes(tmp_path)] == [
        ".step_000001.deleting.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILENAME, "step_000002"]
    resumed = find_resume_checkpoint(tmp_path, "auto")
    assert resumed == tmp_path / "step_000002"
    assert load_resume_state(resumed, OmegaConf.create({}), [])["step"] == 2

    truncate(resumed / RECIPE_STATE_FILENAME)
    with pytest.raises(DataError, match="no older checkpoint, so the run starts over"):
        load_resume_state(resumed, OmegaConf.create({}), [])
    shutil.rmtree(resumed)  # the advice followed
    assert find_resume_checkpoint(tmp_path, "auto") is None


def test_a_kill_while_replacing_a_resaved_step_keeps_the_new_one_whole(tmp_path, monkeypatch):
    """Re-saving a step (the last one after a resume) renames the old folder away before the
    new one goes in, so a kill while deleting it leaves the new step_N complete."""
    save(tmp_path, 2, keep_last=2)
    with monkeypatch.context() as patch:
        kill_while_deleting_a_checkpoint(patch)
        with pytest.raises(Killed):
            save(tmp_path, 2, keep_last=2)
    final = tmp_path / "step_000002"
    assert (final / MODEL_DIRNAME / WEIGHTS).is_file()
    assert latest_checkpoint(tmp_path) == final
    assert [p.name for p in clean_interrupted_writes(tmp_path)] == [
        ".step_000002.deleting.partial"]
    assert load_resume_state(final, OmegaConf.create({}), [])["step"] == 2


def test_a_run_killed_while_pruning_resumes_from_the_checkpoint_kept(tmp_path, monkeypatch):
    """The recipe end to end: killed while pruning step 1 after saving step 2, the next start
    sweeps the leftover and resumes from step 2, not from a step 1 without weights."""
    import acadlm_plugins.continued_pretrain_recipe as cpt

    args = tiny_run_args(tmp_path, "max_steps=3", "save_every_n_steps=1",
                         "keep_last_n_checkpoints=1")
    run = tmp_path / "run"
    with torch_threads():
        with monkeypatch.context() as patch:
            real_prune = checkpointing._prune

            def prune(output_dir, keep_last, *, written, keep=None):
                if written.name == "step_000002":
                    kill_while_deleting_a_checkpoint(patch)
                real_prune(output_dir, keep_last, written=written, keep=keep)

            patch.setattr(checkpointing, "_prune", prune)
            with pytest.raises(Killed):
                run_recipe_main(patch, "acadlm_plugins.continued_pretrain_recipe", args)
        assert step_names(run) == ["step_000002"]
        resumed_from: list[Path] = []
        real_load = cpt.load_resume_state

        def load(checkpoint, *rest, **kwargs):
            resumed_from.append(checkpoint)
            return real_load(checkpoint, *rest, **kwargs)

        monkeypatch.setattr(cpt, "load_resume_state", load)
        run_recipe_main(monkeypatch, "acadlm_plugins.continued_pretrain_recipe", args)
    assert resumed_from == [run / "step_000002"]
    assert step_names(run) == ["step_000003"]
    assert not list(run.glob(".step_*"))


def half_deleted(output_dir: Path, step: int) -> Path:
    """A checkpoint as an older version's interrupted deletion left it: recipe_state.pt and
    model/config.json there, the weights gone."""
    folder = output_dir / checkpointing.step_dirname(step)
    folder.mkdir(parents=True)
    write_model_files(folder)
    save_torch_atomically({"step": step, "config": {}}, folder / RECIPE_STATE_FILENAME)
    (folder / MODEL_DIRNAME / WEIGHTS).unlink()
    return folder


def test_a_half_deleted_checkpoint_is_never_offered_nor_resumed(tmp_path):
    """The reviewer's k_70 state: step 4 half-deleted, step 6 the newest with a truncated
    recipe_state.pt. The advice no longer names step 4, deleting step 6 starts over, step 4
    read directly is refused naming the folder, and the next save removes it."""
    newest = save(tmp_path, 6, keep_last=1)
    stale = half_deleted(tmp_path, 4)
    truncate(newest / RECIPE_STATE_FILENAME)
    with pytest.raises(DataError) as err:
        load_resume_state(newest, OmegaConf.create({}), [])
    assert "step_000004" not in str(err.value)
    assert "no older checkpoint, so the run starts over" in str(err.value)
    shutil.rmtree(newest)
    assert latest_checkpoint(tmp_path) is None
    assert find_resume_checkpoint(tmp_path, "auto") is None
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        find_resume_checkpoint(tmp_path, "true")
    with pytest.raises(DataError) as err:
        load_resume_state(stale, OmegaConf.create({}), [])
    assert str(stale) in str(err.value) and "weights are missing" in str(err.value)
    assert "model/" in str(err.value) and "delete the folder" in str(err.value)
    save(tmp_path, 2, keep_last=2)
    assert step_names(tmp_path) == ["step_000002"]


def test_a_latest_checkpoint_without_its_weights_is_refused_naming_it(tmp_path):
    """LATEST's own checkpoint damaged (weights deleted by hand, say) stops the run naming the
    folder and the older checkpoint, instead of a model that 'does not fit' its config."""
    save(tmp_path, 2, keep_last=2)
    newest = save(tmp_path, 3, keep_last=2)
    (newest / MODEL_DIRNAME / WEIGHTS).unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000002"
    for resume in ("auto", "true"):
        with pytest.raises(DataError) as err:
            find_resume_checkpoint(tmp_path, resume)
        message = str(err.value)
        assert str(newest) in message and f"model/{WEIGHTS}" in message
        assert "before it (step_000002)" in message


def test_missing_weights_reads_index_shards_and_model_folders(tmp_path):
    model = tmp_path / "rater" / "model"  # the rater recipe's layout
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert checkpointing.missing_weights(tmp_path) == [
        "rater/model/ (config.json and no weight file)"]
    (model / "model-00001-of-00003.safetensors").write_bytes(b"w")
    assert checkpointing.missing_weights(tmp_path) == [
        "rater/model/model-00002-of-00003.safetensors",
        "rater/model/model-00003-of-00003.safetensors"]
    for name in ("model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        (model / name).write_bytes(b"w")
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "extra.safetensors"}}))
    assert checkpointing.missing_weights(tmp_path) == ["rater/model/extra.safetensors"]
    (model / "extra.safetensors").write_bytes(b"w")
    assert checkpointing.missing_weights(tmp_path) == []
    only_state = fake_checkpoint(tmp_path / "run", 1)  # no model folder: nothing to tell
    assert checkpointing.is_complete_checkpoint(only_state)


def test_folders_the_recipes_do_not_write_as_models_are_not_weighed(tmp_path):
    """A finished checkpoint was refused ("its weights are missing") and pruned as incomplete
    when it held a folder with a config.json and no weights that is no model of ours: the
    scratch folder of a quantized copy killed half-way, or a sub-folder of the source model
    (an HF Trainer's checkpoint-500/) whose non-weight files torchtune copies into model/."""
    run = tmp_path / "run"
    step = fake_checkpoint(run, 2)
    model = step / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model-00001-of-00001.safetensors").write_bytes(b"w")
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    nested = model / "checkpoint-500"
    nested.mkdir()
    (nested / "config.json").write_text("{}")
    (nested / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    scratch = step / ".model-int8_weight_only.partial-2f800a2edf1f"
    scratch.mkdir()
    (scratch / "config.json").write_text("{}")
    assert checkpointing.missing_weights(step) == []
    assert checkpointing.latest_checkpoint(run) == step
    assert checkpointing.find_resume_checkpoint(run, "auto") == step


# ------------------------------------------------------------------------- max_steps
def test_a_checkpoint_past_max_steps_is_refused_naming_max_steps(tmp_path):
    check_resume_step(2, 2, tmp_path / "step_000002")  # a finished run is resumed as it is
    with pytest.raises(ConfigError) as err:
        check_resume_step(2, 1, tmp_path / "step_000002")
    assert err.value.key == "max_steps"
    assert "at step 2" in str(err.value) and "at least 2" in str(err.value)


# ------------------------------------------------------------------ starting weights
def weights_cfg(folder: Path, files=None):
    return OmegaConf.create({"checkpointer": {
        "checkpoint_dir": str(folder), "checkpoint_files": files or ["model.safetensors"]}})


def test_the_fingerprint_follows_content_not_modification_time(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "model", seed=0)
    first = starting_weights_fingerprint(weights_cfg(model))
    write_tiny_checkpoint(model, seed=0)  # re-exported identically: new mtime, same bytes
    assert starting_weights_fingerprint(weights_cfg(model)) == first
    write_tiny_checkpoint(model, seed=1)  # same architecture and header, other weights
    changed = starting_weights_fingerprint(weights_cfg(model))
    assert changed["files"]["model.safetensors"]["size"] == first["files"]["model.safetensors"]["size"]
    with pytest.raises(ConfigError) as err:
        check_starting_weights(first, changed, tmp_path / "run" / "step_000002")
    assert err.value.key == "checkpointer.checkpoint_dir"
    assert "changed since the checkpoints" in str(err.value)
    assert "model.safetensors" in str(err.value) and "new `output_dir`" in str(err.value)
    check_starting_weights(None, changed, tmp_path / "run" / "step_000002")  # older version


def test_large_files_are_fingerprinted_by_header_and_sampled_blocks(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setattr(checkpointing, "_WHOLE_FILE_BYTES", 1024)
    monkeypatch.setattr(checkpointing, "_SAMPLE_BLOCK_BYTES", 256)
    tensor = torch.arange(50_000, dtype=torch.float32)
    save_file({"w": tensor}, tmp_path / "model.safetensors")
    cfg = weights_cfg(tmp_path)
    sampled = []
    data_start = checkpointing._safetensors_data_start
    monkeypatch.setattr(checkpointing, "_safetensors_data_start",
                        lambda *a: sampled.append(data_start(*a)) or sampled[-1])
    first = starting_weights_fingerprint(cfg)
    assert sampled and sampled[0] > 8  # the sampled path, with the header found
    assert starting_weights_fingerprint(cfg) == first
    save_file({"w": tensor * 2}, tmp_path / "model.safetensors")  # same header, other data
    assert starting_weights_fingerprint(cfg) != first


def test_filename_format_checkpoint_files_are_fingerprinted(tmp_path):
    for i in (1, 2):
        (tmp_path / f"model-0000{i}-of-00002.safetensors").write_bytes(bytes([i]) * 100)
    cfg = weights_cfg(tmp_path, {"filename_format": "model-{}-of-{}.safetensors",
                                 "max_filename": "00002"})
    assert sorted(starting_weights_fingerprint(cfg)["files"]) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


# ---------------------------------------------------- the recipes built on the same loop
def prune_args(tmp_path: Path, *overrides: str) -> list[str]:
    args = [a for a in tiny_run_args(tmp_path) if not a.startswith("validation_dataset.")]
    args[1] = str(REPO_ROOT / "configs" / "tiny" / "prune.yaml")
    return [*args, *overrides]


def long_context_args(tmp_path: Path, *overrides: str) -> list[str]:
    model = tmp_path / "tiny_model"
    if not model.exists():
        write_tiny_checkpoint(model)
    corpus = Path(next(a for a in tiny_run_args(tmp_path)
                       if a.startswith("dataset.data_dir=")).split("=", 1)[1])
    long_docs = tmp_path / "long.jsonl"
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "lambda"]
    long_docs.write_text("".join(json.dumps({"id": f"long-{i}", "text": " ".join(
        rng.choice(words) for _ in range(rng.randint(30, 70)))}) + "\n" for i in range(12)))
    return ["--config", str(REPO_ROOT / "configs" / "tiny" / "long_context.yaml"),
            f"output_dir={tmp_path / 'run'}", f"checkpointer.checkpoint_dir={model}",
            f"dataset.sources.long.data_files={long_docs}",
            f"dataset.sources.short.data_files={corpus / 'prose' / 'train.jsonl'}",
            f"validation_dataset.data_dir={corpus}", *overrides]


@pytest.mark.parametrize("module, make_args", [
    ("acadlm_plugins.prune_recipe", lambda tmp: prune_args(tmp, "max_steps=2")),
    ("acadlm_plugins.long_context_recipe",
     lambda tmp: long_context_args(tmp, "long_context.token_budget=512")),
], ids=["prune", "long_context"])
def test_recipes_on_the_loop_refuse_a_replaced_starting_model(tmp_path, monkeypatch, module,
                                                              make_args):
    args = make_args(tmp_path)
    with torch_threads():
        run_recipe_main(monkeypatch, module, args)
        state = tmp_path / "run" / "step_000002" / RECIPE_STATE_FILENAME
        before = state.read_bytes()
        write_tiny_checkpoint(tmp_path / "tiny_model", seed=1)  # re-exported at the same path
        with pytest.raises(ConfigError) as err:
            run_recipe_main(monkeypatch, module, args)
        assert err.value.key == "checkpointer.checkpoint_dir"
        assert "changed since the checkpoints" in str(err.value)
        assert state.read_bytes() == before
        write_tiny_checkpoint(tmp_path / "tiny_model", seed=0)  # the same model again resumes
        run_recipe_main(monkeypatch, module, args)


# ------------------------------------------------------------ a run folder moved with its inputs
OLD_RUN, NEW_RUN = "/scratch/job42/exp/continue", "/home/me/exp/continue"


def moved_identity(**values):
    """An identity recorded for a run in OLD_RUN, with ``values`` as its config values."""
    return {"_recipe": "continued_pretrain", checkpointing.OUTPUT_DIR_KEY: OLD_RUN, **values}


def test_the_moved_root_is_what_remains_once_the_shared_tail_is_stripped():
    moved = checkpointing.relocation(OLD_RUN, NEW_RUN)
    assert (moved.old_root, moved.new_root) == (Path("/scratch/job42"), Path("/home/me"))
    shared = checkpointing.relocation("/scratch/me/exp/continue", "/home/me/exp/continue")
    assert (shared.old_root, shared.new_root) == (Path("/scratch"), Path("/home"))  # all of it
    assert checkpointing.relocation(OLD_RUN, OLD_RUN) is None  # not moved
    assert checkpointing.relocation(None, NEW_RUN) is None  # an older version recorded none
    assert checkpointing.relocation("/exp/continue", "/home/me/exp/continue") is None  # a root
    renamed = checkpointing.relocation("/scratch/run_a", "/home/me/run_b")
    assert (renamed.old_root, renamed.new_root) == (Path("/scratch/run_a"), Path("/home/me/run_b"))


def test_paths_under_the_moved_root_match_anything_else_compares_exactly(tmp_path, monkeypatch):
    recorded = moved_identity(
        model={"path": "/scratch/job42/exp/prune/pruned_model", "dtype": "bf16"},
        dataset={"sources": [{"path": "/scratch/job42/exp/data/a.jsonl", "weight": 0.5},
                             {"path": "/data/shared/b.jsonl", "weight": 0.5}],
                 "max_seq_len": 64},
        tokenizer={"path": "/scratch/job42/exp/tokenizer.json"}, seed=0)
    moved = {"model": {"path": "/home/me/exp/prune/pruned_model/", "dtype": "bf16"},
             "dataset": {"sources": [{"path": "/home/me/exp/data/a.jsonl", "weight": 0.5},
                                     {"path": "/data/shared/b.jsonl", "weight": 0.5}],
                         "max_seq_len": 64},
             "tokenizer": {"path": "/home/me/exp/tokenizer.json"}, "seed": 0}
    assert checkpointing.config_mismatch(recorded, moved, NEW_RUN) is None
    monkeypatch.chdir(tmp_path)  # a relative path counts from the working directory
    assert checkpointing.config_mismatch(
        recorded, {"tokenizer": {"path": "exp/tokenizer.json"}}, "exp/continue") is None

    def difference(**changes):
        return checkpointing.config_mismatch(recorded, {**moved, **changes}, NEW_RUN)

    # a path that changed otherwise than by the move: another folder under the new root, a
    # path outside the old root that "moved" too, a different list entry
    elsewhere = "/home/me/exp/prune_v2/pruned_model"
    assert difference(model={"path": elsewhere, "dtype": "bf16"}) == (
        "model.path", "/scratch/job42/exp/prune/pruned_model", elsewhere)
    shared_moved = [moved["dataset"]["sources"][0], {"path": "/home/me/data/shared/b.jsonl",
                                                      "weight": 0.5}]
    assert difference(dataset={**moved["dataset"], "sources": shared_moved})[0] == \
        "dataset.sources"
    assert difference(dataset={**moved["dataset"], "sources": moved["dataset"]["sources"][:1]}
                      )[0] == "dataset.sources"
    # a non-path value beside relocated paths is named, not the relocated path before it
    assert difference(dataset={**moved["dataset"], "max_seq_len": 128}) == (
        "dataset.max_seq_len", 64, 128)
    assert difference(seed=1) == ("seed", 0, 1)


def test_relative_recorded_paths_count_from_the_recorded_working_directory():
    """The pipelines write `outputs/<run>/...`: relative paths from the repository. Recorded
    with their working directory, they match the same place spelled absolute, before and after
    a move; without one (or pointing elsewhere) they are a difference."""
    recorded = {"_recipe": "continued_pretrain", checkpointing.WORKING_DIR_KEY: "/work/repo",
                checkpointing.OUTPUT_DIR_KEY: "/work/repo/outputs/demo/continued",
                "model": {"path": "outputs/demo/prune/pruned_model"}, "seed": 0}
    here = {"model": {"path": "/work/repo/outputs/demo/prune/pruned_model"}, "seed": 0}
    assert checkpointing.config_mismatch(recorded, here, "/work/repo/outputs/demo/continued") \
        is None
    moved = {"model": {"path": "/data/me/demo/prune/pruned_model"}, "seed": 0}
    assert checkpointing.config_mismatch(recorded, moved, "/data/me/demo/continued") is None
    other = {"model": {"path": "/data/me/demo/prune_v2/pruned_model"}, "seed": 0}
    assert checkpointing.config_mismatch(recorded, other, "/data/me/demo/continued")[0] == \
        "model.path"
    # strings that cannot be paths are values like any other: different, not a crash
    for odd in ("a\x00b", "~no_such_user_here/x", "p" * 5000):
        assert checkpointing.config_mismatch({**recorded, "prompt": "x"}, {"prompt": odd},
                                             "/data/me/demo/continued")[0] == "prompt"
    unplaced = {k: v for k, v in recorded.items() if k != checkpointing.WORKING_DIR_KEY}
    assert checkpointing.config_mismatch(unplaced, moved, "/data/me/demo/continued")[0] == \
        "model.path"


def test_an_identity_without_a_recorded_output_dir_compares_exactly():
    old_version = {"model": {"path": "/scratch/job42/exp/prune/pruned_model"}}
    moved = {"model": {"path": "/home/me/exp/prune/pruned_model"}}
    assert checkpointing.config_mismatch(old_version, moved, NEW_RUN) == (
        "model.path", "/scratch/job42/exp/prune/pruned_model", "/home/me/exp/prune/pruned_model")
    assert checkpointing.config_mismatch(old_version, old_version, NEW_RUN) is None


def test_a_checkpoint_records_its_run_folder_and_resumes_once_moved(tmp_path):
    """The recorded identity (config_values with the recipe) names the run folder absolute;
    load_resume_state accepts the moved folder's rewritten paths and refuses other data."""
    def cfg(root: Path, data: str = "corpus"):
        return OmegaConf.create({"output_dir": str(root / "continue"),
                                 "dataset": {"data_dir": str(root / data), "split": "train"}})

    old, new = tmp_path / "scratch" / "exp", tmp_path / "home" / "exp"
    identity = checkpointing.config_values(cfg(old), ["dataset"], recipe="continued_pretrain")
    assert identity[checkpointing.OUTPUT_DIR_KEY] == str((old / "continue").resolve())
    folder = old / "continue" / checkpointing.step_dirname(2)
    folder.mkdir(parents=True)
    save_torch_atomically({"step": 2, "config": identity}, folder / RECIPE_STATE_FILENAME)
    shutil.move(old, new)
    resumed = latest_checkpoint(new / "continue")
    assert load_resume_state(resumed, cfg(new), ["dataset"], recipe="continued_pretrain")[
        "step"] == 2
    with pytest.raises(ConfigError, match="differs from the checkpoint being resumed") as err:
        load_resume_state(resumed, cfg(new, "other_corpus"), ["dataset"])
    assert err.value.key == "dataset.data_dir"
