"""``mixed_precision: true``: fp32 weights and optimizer state, the math in bf16 (Hugging Face's
``--bf16``, Composer's ``amp_bf16``), where torchtune's ``dtype: bf16`` keeps the weights and
AdamW's moments in bf16 and loses every update below half a bf16 step of its weight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from recipe_runs import run_recipe_main
from safetensors.torch import load_file
from tiny_setup import run_tune_subprocess, tiny_run_args

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.training.checkpointing import latest_checkpoint

SMALL_LR = "optimizer.lr=1.0e-6"  # an update of ~1e-6 is far below half a bf16 step of 0.02
PROBE = "plugins=[matmul_dtype_probe:MatmulDtypeProbe]"


@pytest.fixture(autouse=True)
def quiet_isolated_runs(monkeypatch):
    monkeypatch.setenv("ACADLM_NO_PROGRESS", "1")
    monkeypatch.setenv("ACADLM_PLUGINS_DISABLE_AUTOLOAD", "1")


def trained_weights(run: Path) -> dict[str, torch.Tensor]:
    folder = latest_checkpoint(run) / "model"
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def changed_fraction(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((before.float() != after.float()).float().mean())


def test_small_updates_survive_in_fp32_weights_and_vanish_in_bf16_ones(tmp_path, monkeypatch):
    """Two steps at lr 1e-6 from the same weights: with `dtype: bf16` almost no weight moves
    (the update rounds away); with `mixed_precision: true` nearly every one does, the weights
    are saved in fp32, and the validation loss is a bf16 computation's (close to fp32's)."""
    key = "model.layers.0.mlp.down_proj.weight"
    runs = {}
    for name, extra in (("bf16", []), ("mixed", ["mixed_precision=true"]),
                        ("fp32", ["dtype=fp32"])):
        probe = tmp_path / f"{name}.dtype"
        monkeypatch.setenv("ACADLM_TEST_MATMUL_DTYPE_FILE", str(probe))
        args = tiny_run_args(tmp_path, f"output_dir={tmp_path / name}", "max_steps=2",
                             SMALL_LR, PROBE, *(["dtype=bf16"] if name != "fp32" else []),
                             *extra)
        run_recipe_main(monkeypatch, "acadlm_plugins.continued_pretrain_recipe", args)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        runs[name] = (trained_weights(tmp_path / name), summary, probe.read_text())
    assert [runs[n][2] for n in ("bf16", "mixed", "fp32")] == [
        "torch.bfloat16", "torch.bfloat16", "torch.float32"]  # what the math ran in
    initial = load_file(next((tmp_path / "tiny_model").glob("*.safetensors")))[key]
    # (the fp32 checkpoint loads rounded to bf16 in a bf16 run)
    assert changed_fraction(initial.bfloat16(), runs["bf16"][0][key]) < 0.05
    assert changed_fraction(initial, runs["mixed"][0][key]) > 0.9
    assert runs["mixed"][0][key].dtype == torch.float32
    assert runs["bf16"][0][key].dtype == torch.bfloat16
    # the same update as fp32 training, up to bf16 rounding of the math
    moved_fp32 = runs["fp32"][0][key] - initial.float()
    moved_mixed = runs["mixed"][0][key] - initial.float()
    assert torch.nn.functional.cosine_similarity(moved_fp32.flatten(), moved_mixed.flatten(),
                                                 dim=0) > 0.9
    for domain, loss in runs["fp32"][1]["val_loss_after"].items():
        assert runs["mixed"][1]["val_loss_after"][domain] == pytest.approx(loss, abs=0.05)


@pytest.mark.parametrize("overrides, problem", [
    (["dtype=fp32", "mixed_precision=true"], "only bf16"),
    (["dtype=bf16", "mixed_precision=maybe"], "mixed_precision"),
])
def test_mixed_precision_settings_that_cannot_work_are_refused(tmp_path, monkeypatch,
                                                               overrides, problem):
    with pytest.raises(ConfigError) as err:
        run_recipe_main(monkeypatch, "acadlm_plugins.continued_pretrain_recipe",
                        tiny_run_args(tmp_path, *overrides))
    assert err.value.key == "mixed_precision" and problem in str(err.value)


def test_resuming_with_the_other_precision_is_refused(tmp_path, monkeypatch):
    """The checkpoint's weights and moments are in the run's precision; resuming a bf16 run
    in mixed precision (or the reverse) would silently mix two runs."""
    run_recipe_main(monkeypatch, "acadlm_plugins.continued_pretrain_recipe",
                    tiny_run_args(tmp_path, "max_steps=3", "save_every_n_steps=3",
                                  "dtype=bf16"))
    with pytest.raises(ConfigError) as err:
        run_recipe_main(monkeypatch, "acadlm_plugins.continued_pretrain_recipe",
                        tiny_run_args(tmp_path, "max_steps=6", "dtype=bf16",
                                      "mixed_precision=true"))
    assert "mixed_precision" in str(err.value)


@pytest.mark.distributed
def test_two_ranks_train_fp32_shards_with_bf16_math(tmp_path, monkeypatch):
    """Under `--nproc_per_node 2` FSDP2's mixed precision gathers each layer in bf16 and
    reduces the gradients onto fp32 shards: small updates survive there too."""
    out = tmp_path / "two_ranks"
    monkeypatch.setenv("ACADLM_TEST_MATMUL_DTYPE_FILE", str(tmp_path / "matmul.dtype"))
    args = tiny_run_args(tmp_path, f"output_dir={out}", "max_steps=2", "batch_size=2",
                         SMALL_LR, "dtype=bf16", "mixed_precision=true", PROBE)
    run_tune_subprocess("acadlm_plugins/continued_pretrain_recipe", args, cwd=tmp_path,
                        log_file=tmp_path / "two_ranks.log", nproc=2, timeout=240)
    key = "model.layers.0.mlp.down_proj.weight"
    weights = trained_weights(out)
    initial = load_file(next((tmp_path / "tiny_model").glob("*.safetensors")))[key]
    assert weights[key].dtype == torch.float32
    assert changed_fraction(initial, weights[key]) > 0.9
    assert (tmp_path / "matmul.dtype").read_text() == "torch.bfloat16"
    summary = json.loads((out / "summary.json").read_text())
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["val_loss_after"].values())


def test_a_long_context_stage_trains_fp32_weights_with_bf16_math(tmp_path, monkeypatch):
    """The long-context recipe (ProLong's stages) builds on the same loop: its own forward and
    validation run in bf16, its export holds the fp32 weights."""
    from test_long_context_recipe import MODULE, stage_args, write_long_documents
    from tiny_setup import write_tiny_checkpoint, write_tiny_corpus

    data = {"model": write_tiny_checkpoint(tmp_path / "model"),
            "corpus": write_tiny_corpus(tmp_path / "corpus"),
            "long": write_long_documents(tmp_path / "long" / "docs.jsonl")}
    monkeypatch.setenv("ACADLM_TEST_MATMUL_DTYPE_FILE", str(tmp_path / "matmul.dtype"))
    out = tmp_path / "stage"
    run_recipe_main(monkeypatch, MODULE, stage_args(data, out, "dtype=bf16",
                                                    "mixed_precision=true", PROBE))
    assert (tmp_path / "matmul.dtype").read_text() == "torch.bfloat16"
    weights = trained_weights(out)
    assert all(v.dtype == torch.float32 for v in weights.values())


def test_learned_pruning_trains_its_masks_with_bf16_math_on_fp32_weights(tmp_path, monkeypatch):
    """The prune recipe (Sheared-LLaMA, `amp_bf16`) trains model and masks on the same loop;
    the materialized model still matches the masked one (the check runs in float32)."""
    from test_prune_recipe import prune_args, run

    monkeypatch.setenv("ACADLM_TEST_MATMUL_DTYPE_FILE", str(tmp_path / "matmul.dtype"))
    run(monkeypatch, "acadlm_plugins.prune_recipe", prune_args(
        tmp_path, "max_steps=4", "save_every_n_steps=4", "pruning.lagrangian_warmup_steps=2",
        "dynamic_batch_loading.update_interval=2", "dtype=bf16", "mixed_precision=true", PROBE))
    assert (tmp_path / "matmul.dtype").read_text() == "torch.bfloat16"
    summary = json.loads((tmp_path / "run" / "pruning_summary.json").read_text())
    assert summary["max_abs_loss_diff_masked_vs_pruned"] < 1e-4
    state = torch.load(latest_checkpoint(tmp_path / "run") / "recipe_state.pt",
                       weights_only=False)
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values() if "exp_avg" in s]
    assert moments and all(m.dtype == torch.float32 for m in moments)


def test_a_checkpoint_from_before_the_key_resumes_only_in_pure_precision(tmp_path, monkeypatch):
    """A checkpoint that does not record `mixed_precision` was written by a version without it,
    so in pure `dtype`: resuming it with `mixed_precision: true` (what the paper-scale configs
    now set) would switch precision halfway through a run; it is refused."""
    args = ("max_steps=6", "save_every_n_steps=3", "dtype=bf16")
    run_recipe_main(monkeypatch, "acadlm_plugins.continued_pretrain_recipe",
                    tiny_run_args(tmp_path, *args[1:], "max_steps=3"))
    state_path = latest_checkpoint(tmp_path / "run") / "recipe_state.pt"
    state = torch.load(state_path, weights_only=False)
    del state["config"]["mixed_precision"]  # as an older version wrote it
    torch.save(state, state_path)
    with pytest.raises(ConfigError) as err:
        run_recipe_main(monkeypatch, "acadlm_plugins.continued_pretrain_recipe",
                        tiny_run_args(tmp_path, *args, "mixed_precision=true"))
    assert "mixed_precision" in str(err.value)
    run_recipe_main(monkeypatch, "acadlm_plugins.continued_pretrain_recipe",
                    tiny_run_args(tmp_path, *args))  # the same precision resumes
    assert latest_checkpoint(tmp_path / "run").name == "step_000006"


def test_the_planner_refuses_what_the_recipe_refuses(tmp_path, capsys):
    from acadlm_plugins.planning.cli import main

    base = tiny_run_args(tmp_path)
    for extra in (["dtype=fp32", "mixed_precision=true"],
                  ["dtype=bf16", "mixed_precision=true", "torchao.float8=tensorwise"]):
        assert main([*base, *extra]) == 2
        assert "mixed_precision" in capsys.readouterr().err


def test_float8_switched_off_by_name_goes_with_mixed_precision(tmp_path, monkeypatch):
    """`torchao.float8: none` is the torchao plugin's "off", not a recipe."""
    run_recipe_main(monkeypatch, "acadlm_plugins.continued_pretrain_recipe",
                    tiny_run_args(tmp_path, "max_steps=1", "dtype=bf16",
                                  "mixed_precision=true", "torchao.float8=none"))


def test_the_rater_trains_fp32_weights_with_bf16_math(tmp_path, monkeypatch):
    """QuRating's TrainQuRater.sh `--bf16` keeps fp32 weights: the rater recipe reads
    `mixed_precision` too."""
    from test_qurating_rater import (
        rater_args,
        run_in_process,
        write_synthetic_judgments,
        write_tiny_model_dir,
    )

    from acadlm_plugins import rater_recipe

    seen: list[torch.dtype] = []

    class ProbedRater(rater_recipe.RaterModel):  # the recipe has no plugins: probe the model
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            linear = next(m for m in self.modules() if isinstance(m, torch.nn.Linear))
            linear.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))

    monkeypatch.setattr(rater_recipe, "RaterModel", ProbedRater)
    model_dir = write_tiny_model_dir(tmp_path / "model", weight_std=None)
    judgments = write_synthetic_judgments(tmp_path / "judgments.jsonl")
    run_in_process(monkeypatch, rater_args(
        tmp_path, model_dir, judgments, "max_steps=2", "batch_size=8", "save_every_n_steps=2",
        "dtype=bf16", "mixed_precision=true"))
    assert seen and set(seen) == {torch.bfloat16}
    state = torch.load(latest_checkpoint(tmp_path / "run") / "recipe_state.pt",
                       weights_only=False)
    assert state["config"]["mixed_precision"] is True
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values() if "exp_avg" in s]
    assert moments and all(m.dtype == torch.float32 for m in moments)
