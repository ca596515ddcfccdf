"""Where ``write_quantized_copy`` / ``acadlm-quantize`` may write: a new folder, or a copy it
wrote before; the model folder, a folder holding it, and any other existing folder or file are
refused before any work, leaving them as they were."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_setup import write_tiny_model_dir

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.quantization import (
    QUANTIZATION_FILE,
    WEIGHTS_FILE,
    is_quantized_copy,
    write_quantized_copy,
)
from acadlm_plugins.quantization import main as quantize_cli

SCHEME = "int8_weight_only"


@pytest.fixture
def outputs(tmp_path) -> Path:
    """``outputs/`` holding a model folder and an unrelated file, as a run leaves them."""
    root = tmp_path / "outputs"
    write_tiny_model_dir(root / "model")
    (root / "notes.txt").write_text("keep me\n")
    return root


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the model is loaded: a refusal must come before any work."""
    from acadlm_plugins.evaluation import lm_adapter

    def refuse_to_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the destination was checked")

    monkeypatch.setattr(lm_adapter, "load_decoder", refuse_to_load)


@pytest.mark.parametrize("where", ["the model folder", "its parent", "an unrelated folder",
                                   "a file"])
def test_cli_output_that_would_delete_something_is_refused_and_left_intact(outputs, where,
                                                                          no_work, capsys):
    model = outputs / "model"
    unrelated = outputs / "plots"
    unrelated.mkdir()
    (unrelated / "loss.png").write_bytes(b"png")
    dest = {"the model folder": model, "its parent": outputs,
            "an unrelated folder": unrelated, "a file": outputs / "notes.txt"}[where]
    before = _snapshot(outputs)
    assert quantize_cli([str(model), "--scheme", SCHEME, "--output", str(dest)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: config `--output`") and str(dest) in error
    assert "Fix:" in error and "Traceback" not in error
    assert _snapshot(outputs) == before


def test_cli_refuses_a_model_dir_that_is_no_model_or_a_quantized_copy_naming_it(
        outputs, tmp_path, capsys):
    """No traceback and the CLI's own field: a missing folder, then a quantized copy given
    as the source."""
    missing = tmp_path / "nowhere"
    assert quantize_cli([str(missing), "--scheme", SCHEME]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: config `model_dir`") and str(missing) in error
    assert not (tmp_path / f"nowhere-{SCHEME}").exists()
    assert quantize_cli([str(outputs / "model"), "--scheme", SCHEME]) == 0
    copy = outputs / f"model-{SCHEME}"
    capsys.readouterr()
    assert quantize_cli([str(copy), "--scheme", SCHEME]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: config `model_dir`") and "already a quantized copy" in error


def test_a_folder_at_the_default_destination_is_refused_naming_the_field(outputs, no_work):
    """The torchao plugin writes ``<model>-<scheme>``; a folder of the user's there is kept."""
    model = outputs / "model"
    squatter = outputs / f"model-{SCHEME}"
    squatter.mkdir()
    (squatter / "results.json").write_text("{}")
    with pytest.raises(ConfigError) as refused:
        write_quantized_copy(model, SCHEME, field="torchao.quantized_export")
    assert refused.value.key == "torchao.quantized_export"
    assert (squatter / "results.json").read_text() == "{}"


def test_our_own_previous_copy_is_replaced(outputs):
    model = outputs / "model"
    dest = outputs / "q"
    dest.mkdir()  # an empty folder is no one's work either
    first = write_quantized_copy(model, SCHEME, dest=dest)
    (first / "stale.txt").write_text("from the first copy")
    quantize_cli([str(model), "--scheme", SCHEME, "--output", str(dest)])
    assert is_quantized_copy(dest) and (dest / WEIGHTS_FILE).is_file()
    assert not (dest / "stale.txt").exists()
    assert (outputs / "notes.txt").read_text() == "keep me\n"
    assert (model / "model.safetensors").is_file()
    assert sorted(p.name for p in outputs.iterdir()) == ["model", "notes.txt", "q"]  # no scratch
    assert (dest / QUANTIZATION_FILE).is_file()
