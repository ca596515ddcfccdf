"""``acadlm-defaults`` and the default model's guards: the fix hints it prints name the folder the
user pointed it at, a damaged model or manifest ends in the rebuild command (not a bare library
traceback), and builds clear what killed builds left behind."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess

import pytest
from omegaconf import OmegaConf

from acadlm_plugins.defaults import manifest as manifest_lib
from acadlm_plugins.defaults import model as model_lib
from acadlm_plugins.defaults.cli import main
from acadlm_plugins.defaults.paths import (
    HOME_ENV_VAR,
    default_model_dir,
    manifest_path,
    require_default_model,
)
from acadlm_plugins.errors import DataError, DefaultsMissingError


def test_verify_with_home_suggests_the_build_for_that_home(tmp_path, monkeypatch, capsys):
    """The hint used to be a bare `acadlm-defaults build`, which builds another folder."""
    monkeypatch.setenv(HOME_ENV_VAR, str(tmp_path / "elsewhere"))  # main() sets it; restored
    home = tmp_path / "my home"
    home.mkdir()
    assert main(["verify", "--home", str(home)]) == 1
    out = capsys.readouterr().out
    assert f"Fix: `acadlm-defaults build --home {shlex.quote(str(home.resolve()))}`" in out
    assert main(["info", "--home", str(home)]) == 0
    assert f"run `acadlm-defaults verify --home {shlex.quote(str(home.resolve()))}`" in \
        capsys.readouterr().out


@pytest.mark.parametrize("command", ["info", "verify", "build"])
def test_a_home_that_is_a_file_is_named_as_such(tmp_path, capsys, command):
    home = tmp_path / "a_file"
    home.write_text("mine")
    assert main(["--home", str(home), command]) == 2
    error = capsys.readouterr().err
    assert f"--home {home} is a file, not a folder" in error and "Fix:" in error
    assert home.read_text() == "mine"


def test_verify_without_home_suggests_the_plain_build(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(HOME_ENV_VAR, str(tmp_path))
    assert main(["verify"]) == 1
    assert "Fix: `acadlm-defaults build` rebuilds" in capsys.readouterr().out


# ----------------------------------------------------------------- a fake default model on disk

def _fake_model(home, files=("config.json", "model.safetensors", "tokenizer.json"), record=True):
    """A default model folder under ``home`` with small files, recorded in the manifest."""
    folder = default_model_dir(home)
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"{}" if name.endswith(".json") else b"\0" * 1000)
    if record:
        entries = [manifest_lib.file_record(home, folder / name, []) for name in files]
        manifest_lib.record_component(home, "model", {"recipe_version": model_lib.RECIPE_VERSION,
                                                      "files": entries})
    return folder


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_require_default_model_names_a_truncated_file_and_the_rebuild(tmp_acadlm_home):
    folder = _fake_model(tmp_acadlm_home)
    assert require_default_model() == folder
    with open(folder / "model.safetensors", "r+b") as handle:
        handle.truncate(600)
    with pytest.raises(DefaultsMissingError, match=r"model\.safetensors has 600 bytes, the "
                       r"manifest records 1,000.*`acadlm-defaults build --force --only model`"):
        require_default_model()
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(DefaultsMissingError, match=r"tokenizer\.json is missing"):
        require_default_model()


def test_require_default_model_skips_the_size_check_without_a_manifest_entry(tmp_acadlm_home):
    folder = _fake_model(tmp_acadlm_home, record=False)  # built before the manifest recorded it
    (folder / "model.safetensors").write_bytes(b"\0" * 10)
    assert require_default_model() == folder
    manifest_path(tmp_acadlm_home).write_text("{truncated", encoding="utf-8")
    assert require_default_model() == folder  # unreadable manifest: the build repairs it


def test_a_recipe_on_the_default_folder_gets_the_size_check(tmp_acadlm_home):
    from acadlm_plugins.training.run_checks import check_checkpoint_source

    folder = _fake_model(tmp_acadlm_home)
    cfg = OmegaConf.create({"checkpointer": {
        "checkpoint_dir": str(folder), "checkpoint_files": ["model.safetensors"]}})
    check_checkpoint_source(cfg)
    (folder / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(DefaultsMissingError, match=r"model\.safetensors has 10 bytes.*--force"):
        check_checkpoint_source(cfg)


def test_missing_tokenizer_in_the_default_folder_says_to_rebuild(tmp_acadlm_home, tmp_path):
    """It used to say to set `tokenizer.path` to the very folder it was reading."""
    from acadlm_plugins.models.tokenizer import smollm2_tokenizer

    folder = _fake_model(tmp_acadlm_home, files=("config.json", "model.safetensors"))
    for path in (None, str(folder), str(folder / "tokenizer.json")):
        with pytest.raises(DataError, match="acadlm-defaults build --force") as err:
            smollm2_tokenizer(path=path)
        assert "tokenizer.path" not in str(err.value)
    other = tmp_path / "other_model"
    other.mkdir()
    with pytest.raises(DataError, match=r"Set `tokenizer\.path` to the model folder"):
        smollm2_tokenizer(path=str(other))


# ------------------------------------------------------------------------- an unreadable manifest

def test_verify_and_info_report_an_unreadable_manifest(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(HOME_ENV_VAR, str(tmp_path / "elsewhere"))
    home = tmp_path / "home"
    _fake_model(home)
    manifest_path(home).write_text('{"format": 1, "compo', encoding="utf-8")
    assert main(["verify", "--home", str(home)]) == 1
    out = capsys.readouterr().out
    assert f"problem: {manifest_path(home.resolve())}: unreadable manifest (" in out
    assert (f"Fix: delete {shlex.quote(str(manifest_path(home.resolve())))} and run "
            f"`acadlm-defaults build --home {shlex.quote(str(home.resolve()))}`") in out
    assert main(["info", "--home", str(home)]) == 0
    assert "status:   1 problem(s)" in capsys.readouterr().out


def test_build_reads_an_unreadable_manifest_as_empty_and_clears_dead_builds(
        tmp_path, monkeypatch, capsys, caplog):
    """A corrupt manifest crashed `build` with a JSONDecodeError; killed builds' staging folders
    (named by their pid) stayed forever."""
    monkeypatch.setenv(HOME_ENV_VAR, str(tmp_path / "elsewhere"))
    home = tmp_path / "home"
    target = _fake_model(home)
    manifest_path(home).write_text("not json", encoding="utf-8")
    dead, live = _dead_pid(), os.getppid()
    leftovers = [target.with_name(f".{target.name}.{kind}-{dead}") for kind in ("tmp", "old")]
    kept = target.with_name(f".{target.name}.tmp-{live}")  # a build still running
    for folder in (*leftovers, kept):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"gguf")

    def fake_convert(gguf_path, out_dir):
        for name in ("config.json", "model.safetensors"):
            (out_dir / name).write_text(json.dumps({"built": name}), encoding="utf-8")
        return {"checkpoint_files": ["model.safetensors"]}

    monkeypatch.setattr(model_lib, "find_gguf_file", lambda: gguf)
    monkeypatch.setattr(model_lib, "_convert", fake_convert)
    with caplog.at_level(logging.INFO, logger="acadlm_plugins.defaults"):
        assert main(["build", "--only", "model", "--home", str(home)]) == 0
    assert "built model" in capsys.readouterr().out
    assert "unreadable manifest" in caplog.text and "removed 2 leftover(s)" in caplog.text
    assert not any(folder.exists() for folder in leftovers)
    assert kept.is_dir()
    assert json.loads((target / "model.safetensors").read_text()) == {"built": "model.safetensors"}
    assert manifest_lib.component_problems(home, "model", model_lib.RECIPE_VERSION) == []
    from acadlm_plugins.defaults.paths import remove_stale_staging

    assert remove_stale_staging(target) == []  # the live build's folder is never touched
    assert main(["verify", "--home", str(home)]) == 1  # the corpus is not built; no crash
