"""The continued pre-training recipe end to end on a 2-layer, 64-dim model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from recipe_runs import run_recipe_main
from tiny_setup import tiny_run_args

from acadlm_plugins import hookimpl
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.plugins.nonfinite_loss_guard import NonFiniteLossError
from acadlm_plugins.training.checkpointing import latest_checkpoint

EXAMPLE_PLUGIN_DIR = Path(__file__).parent / "example_plugin"


@pytest.fixture(autouse=True)
def quiet_isolated_runs(monkeypatch):
    monkeypatch.setenv("ACADLM_NO_PROGRESS", "1")
    monkeypatch.setenv("ACADLM_PLUGINS_DISABLE_AUTOLOAD", "1")


def run_recipe(monkeypatch, args: list[str]) -> dict:
    output_dir = run_recipe_main(monkeypatch, "acadlm_plugins.continued_pretrain_recipe", args)
    return json.loads((output_dir / "summary.json").read_text())


def logged_metrics(output_dir: Path) -> list[str]:
    return "\n".join(p.read_text() for p in (output_dir / "logs").glob("*.txt")).splitlines()


def test_training_lowers_every_domain_loss_and_moves_the_weights(tmp_path, monkeypatch):
    summary = run_recipe(monkeypatch, tiny_run_args(tmp_path))
    before, after = summary["val_loss_before"], summary["val_loss_after"]
    assert set(before) == {"code", "numbers", "prose"}
    assert all(after[d] < before[d] - 0.5 for d in before)
    weights = summary["domain_weights"]
    assert sum(weights.values()) == pytest.approx(1.0)
    assert max(weights.values()) - min(weights.values()) > 0.01  # DBL moved away from uniform
    run = tmp_path / "run"
    assert (run / "domain_weights.png").stat().st_size > 1000
    assert latest_checkpoint(run).name == "step_000006"
    metrics = logged_metrics(run)
    assert any("domain_weight/code" in line for line in metrics)
    assert any("train_loss/prose" in line for line in metrics)


def test_checkpoint_is_a_hugging_face_model_with_the_trained_weights(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=3"))
    model_dir = latest_checkpoint(tmp_path / "run") / "model"
    hf = AutoModelForCausalLM.from_pretrained(model_dir)
    initial = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny_model")
    trained = hf.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(trained, initial.model.layers[0].self_attn.q_proj.weight)
    assert not any(p.name.startswith(".") for p in (tmp_path / "run").iterdir()
                   if p.is_dir()), "no partial checkpoint folder may remain"


class _Interrupt:
    """Simulates a kill right after step 5 (checkpoints exist at step 3)."""

    @hookimpl
    def acadlm_after_optimizer_step(self, step, metrics):
        if step == 5:
            raise KeyboardInterrupt


def test_killed_run_resumes_to_the_same_result_as_an_uninterrupted_one(tmp_path, monkeypatch):
    straight = run_recipe(monkeypatch, tiny_run_args(tmp_path / "a"))
    sys.modules["_acadlm_test_interrupt"] = type(sys)("_acadlm_test_interrupt")
    sys.modules["_acadlm_test_interrupt"].Interrupt = _Interrupt
    args_b = tiny_run_args(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        run_recipe(monkeypatch, [*args_b, "plugins=[_acadlm_test_interrupt:Interrupt]"])
    assert latest_checkpoint(tmp_path / "b" / "run").name == "step_000003"
    resumed = run_recipe(monkeypatch, args_b)
    assert resumed["val_loss_after"] == pytest.approx(straight["val_loss_after"], rel=1e-6)
    assert resumed["domain_weights"] == pytest.approx(straight["domain_weights"], rel=1e-6)
    a = torch.load(tmp_path / "a/run/step_000006/recipe_state.pt", weights_only=False)
    b = torch.load(tmp_path / "b/run/step_000006/recipe_state.pt", weights_only=False)
    assert a["sampler"]["cursor"] == b["sampler"]["cursor"]
    assert torch.equal(a["sampler"]["weights"], b["sampler"]["weights"])


def test_example_third_party_plugin_changes_the_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN_DIR))
    plain = run_recipe(monkeypatch, tiny_run_args(tmp_path / "plain"))
    with_plugin = run_recipe(monkeypatch, tiny_run_args(
        tmp_path / "plugin", "plugins=[acadlm_example_plugin:ZLossPlugin]",
        "z_loss_coefficient=0.5"))
    assert with_plugin["val_loss_after"] != pytest.approx(plain["val_loss_after"], rel=1e-6)
    metrics = logged_metrics(tmp_path / "plugin" / "run")
    assert any("loss/z_loss" in line for line in metrics)


def test_a_typo_in_a_top_level_key_is_named_with_a_suggestion(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"`max_step`.*did you mean `max_steps`"):
        run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_step=3"))


def test_a_wrong_component_path_names_the_key(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"`model._component_`.*nope"):
        run_recipe(monkeypatch, tiny_run_args(tmp_path, "model._component_=acadlm_plugins.nope"))


def test_an_unknown_plugin_names_the_plugins_key(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="plugins"):
        run_recipe(monkeypatch, tiny_run_args(tmp_path, "plugins=[no_such_pkg.plugin]"))


def test_resume_refuses_a_changed_dataset_and_an_overwrite(tmp_path, monkeypatch):
    run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=3"))
    with pytest.raises(ConfigError, match=r"`dataset.max_seq_len`: differs from the checkpoint"):
        run_recipe(monkeypatch, tiny_run_args(tmp_path, "dataset.max_seq_len=32"))
    with pytest.raises(ConfigError, match=r"`resume`.*would be overwritten"):
        run_recipe(monkeypatch, tiny_run_args(tmp_path, "resume=false"))


class _Poison:
    """Turns the model's weights to NaN before step 5's forward pass."""

    model = None

    @hookimpl
    def acadlm_model_built(self, model):
        type(self).model = model

    @hookimpl
    def acadlm_batch_ready(self, batch, step):
        if step == 4:
            with torch.no_grad():
                for p in type(self).model.parameters():
                    p.fill_(float("nan"))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    sys.modules["_acadlm_test_poison"] = type(sys)("_acadlm_test_poison")
    sys.modules["_acadlm_test_poison"].Poison = _Poison
    with pytest.raises(NonFiniteLossError, match="step 4"):
        run_recipe(monkeypatch, tiny_run_args(tmp_path, "plugins=[_acadlm_test_poison:Poison]"))
    last = latest_checkpoint(tmp_path / "run")
    assert last.name == "step_000003"
    from safetensors.torch import load_file

    weights = load_file(next((last / "model").glob("*.safetensors")))
    assert all(torch.isfinite(w).all() for w in weights.values())
