"""Resume refusals of training/checkpointing.py: a corrupt recipe state, a checkpoint past
``max_steps``, and starting weights that changed since the checkpoints were written (checked
here for the prune and long-context recipes, which share the continued pre-training loop;
tests/test_continued_pretrain_recipe.py checks that recipe)."""

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
    RECIPE_STATE_FILENAME,
    check_resume_step,
    check_starting_weights,
    latest_checkpoint,
    load_resume_state,
    save_torch_atomically,
    starting_weights_fingerprint,
)


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


def test_a_corrupt_only_checkpoint_says_the_run_starts_over_once_deleted(tmp_path):
    only = fake_checkpoint(tmp_path, 3)
    (only / RECIPE_STATE_FILENAME).write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="no older checkpoint, so the run starts over"):
        load_resume_state(only, OmegaConf.create({}), [])


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
