"""Where ``write_quantized_copy`` / ``acadlm-quantize`` may write: a new folder, or a copy it
wrote before; the model folder, a folder holding it, and any other existing folder or file are
refused before any work, leaving them as they were."""

from __future__ import annotations

import json
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
    from acadlm_plugins.models.families import HFModelSpec

    def refuse_to_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the destination was checked")

    monkeypatch.setattr(HFModelSpec, "load", refuse_to_load)


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


def test_cli_output_whose_folder_cannot_be_made_is_refused_before_the_load(outputs, no_work,
                                                                           capsys):
    blocker = outputs / "notes.txt"
    assert quantize_cli([str(outputs / "model"), "--scheme", SCHEME, "--output",
                         str(blocker / "copy")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: config `--output`") and "Traceback" not in error
    assert blocker.read_text() == "keep me\n"


def test_cli_names_model_dir_for_a_folder_without_weights(outputs, capsys):
    (outputs / "model" / "model.safetensors").unlink()
    assert quantize_cli([str(outputs / "model"), "--scheme", SCHEME]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: config `model_dir`") and error.count("Fix:") == 1
    assert "--model_args" not in error and "--model hf" not in error


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


# ------------------------------------------------------------------ --device, int4 fit, pin


@pytest.mark.parametrize(("device", "words"), [
    ("cdua", "is not a device"), ("meta", "cpu or cuda"),
    pytest.param("cuda", "CUDA is not available", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="this machine has CUDA"))])
def test_cli_refuses_a_device_it_cannot_use_naming_it(outputs, no_work, capsys, device,
                                                      words) -> None:
    """``--device cuda`` on a CPU build raised ``AssertionError: Torch not compiled with CUDA
    enabled`` and ``--device cdua`` a raw RuntimeError, both with a traceback."""
    code = quantize_cli([str(outputs / "model"), "--scheme", "int4_weight_only",
                         "--device", device])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("error: config `--device`") and words in error, error
    assert "Fix:" in error and not (outputs / "model-int4_weight_only").exists()


def test_int4_fit_lists_skipped_layers_and_refuses_when_none_fit() -> None:
    from acadlm_plugins.quantization import check_int4_fit

    shapes = {"layers.0.attn.q_proj": (64, 64), "layers.0.mlp.w2": (128, 64)}
    assert check_int4_fit(shapes, 64, field="f") == []
    assert check_int4_fit(shapes, 128, field="f") == ["layers.0.attn.q_proj"]
    with pytest.raises(ConfigError) as refused:
        check_int4_fit(shapes, 256, field="torchao.group_size")
    assert refused.value.key == "torchao.group_size"
    assert "[64, 128]" in str(refused.value) and "[32, 64, 128]" in str(refused.value)
    # torchao's CPU int4 layout also needs output widths in multiples of 16
    uneven = {"layers.0.mlp.w1": (64, 1000), "layers.0.mlp.w2": (1000, 64),
              "layers.0.attn.q_proj": (64, 64)}
    assert check_int4_fit(uneven, 32, field="f") == ["layers.0.mlp.w1", "layers.0.mlp.w2"]
    assert check_int4_fit(uneven, 32, field="f", cpu_layout=False) == ["layers.0.mlp.w2"]
    with pytest.raises(ConfigError, match="output width that is a multiple of 16"):
        check_int4_fit({"x": (64, 1000)}, 32, field="torchao.group_size")


def test_an_int4_cpu_copy_leaves_layers_of_uneven_output_width_unquantized(tmp_path,
                                                                             capsys) -> None:
    """torchao's CPU int4 packing raised a bare RuntimeError (after training, at the export)
    for an output width that is not a multiple of 16, e.g. a pruned MLP of 1000 channels."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=1000,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True)
    tiny = write_tiny_model_dir(tmp_path / "tiny")
    model = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes((tiny / name).read_bytes())
    assert quantize_cli([str(model), "--scheme", "int4_weight_only"]) == 0
    meta = json.loads((tmp_path / "model-int4_weight_only" / "quantization.json").read_text())
    # w1/w3: 1000 outputs (CPU layout); w2: 1000 inputs (group size 32)
    assert meta["skipped_linears"] == ["layers.0.mlp.w1", "layers.0.mlp.w2", "layers.0.mlp.w3"]
    assert meta["quantized_linears"] == 4
    # ... and the command says so, not only quantization.json
    err = capsys.readouterr().err
    assert "3 of 7 linear layers kept unquantized" in err and "layers.0.mlp.w1" in err


def test_the_torchao_range_admits_only_versions_with_int4_config_version_1() -> None:
    """``Int4WeightOnlyConfig(version=1)`` needs torchao 0.13 (0.10-0.12 have no ``version``
    field: a TypeError after training); 0.14 makes version 2 the default and deprecates 1."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(Requirement(d).specifier for d in deps if Requirement(d).name == "torchao")
    assert not any(v in spec for v in ("0.10.0", "0.12.0", "0.14.0")), spec
    pinned = next(line.split("==")[1].strip() for line in (root / "constraints.txt")
                  .read_text().splitlines() if line.startswith("torchao=="))
    assert pinned in spec
