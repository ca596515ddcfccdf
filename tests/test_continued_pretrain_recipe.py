"""The continued pre-training recipe end to end on a 2-layer, 64-dim model."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from recipe_runs import run_recipe_main
from tiny_setup import tiny_run_args, write_tiny_checkpoint

from acadlm_plugins import hookimpl
from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.plugins.nonfinite_loss_guard import NonFiniteLossError
from acadlm_plugins.training.checkpointing import latest_checkpoint, save_torch_atomically

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
    # tokens_seen counts the loss tokens since step 0, across the resume
    counts = step_values(tmp_path / "a" / "run", "step_tokens", "tokens_seen")
    assert sorted(counts) == list(range(1, 7))
    running = 0
    for step in range(1, 7):
        running += counts[step]["step_tokens"]
        assert counts[step]["tokens_seen"] == running > 0
    resumed_counts = step_values(tmp_path / "b" / "run", "tokens_seen")
    assert resumed_counts[6]["tokens_seen"] == counts[6]["tokens_seen"]


def test_a_run_moved_with_its_inputs_resumes_and_still_refuses_other_data(tmp_path, monkeypatch):
    """A killed run whose folder, starting model and data are moved together (a scratch disk
    copied home) and rerun with the paths rewritten resumes from its checkpoint and ends as the
    uninterrupted run does; pointed at other data as well, it is refused naming the key (not a
    path the move explains), and the checkpoint stays as it was."""
    straight = run_recipe(monkeypatch, tiny_run_args(tmp_path / "a"))
    monkeypatch.setitem(sys.modules, "_acadlm_test_interrupt", type(sys)("_acadlm_test_interrupt"))
    sys.modules["_acadlm_test_interrupt"].Interrupt = _Interrupt
    scratch, home = tmp_path / "scratch" / "exp", tmp_path / "home" / "me" / "exp"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(monkeypatch, [*tiny_run_args(scratch),
                                 "plugins=[_acadlm_test_interrupt:Interrupt]"])
    shutil.move(scratch, home)
    args = tiny_run_args(home)  # the moved model and corpus, at their new paths
    state = home / "run" / "step_000003" / "recipe_state.pt"
    before = state.read_bytes()
    with pytest.raises(ConfigError, match="differs from the checkpoint being resumed") as err:
        run_recipe(monkeypatch, [*args, "dataset.split=validation"])
    assert err.value.key == "dataset.split"
    assert state.read_bytes() == before and latest_checkpoint(home / "run").name == "step_000003"
    resumed = run_recipe(monkeypatch, args)
    assert resumed["val_loss_after"] == pytest.approx(straight["val_loss_after"], rel=1e-6)
    assert resumed["domain_weights"] == pytest.approx(straight["domain_weights"], rel=1e-6)
    logged = [int(line.split()[1]) for line in logged_metrics(home / "run")
              if line.startswith("Step ") and " | " in line]
    assert logged.count(1) == 1 and 6 in logged  # continued from step 3, not started over
    final = torch.load(home / "run" / "step_000006" / "recipe_state.pt", weights_only=False)
    assert final["config"]["_output_dir"] == str((home / "run").resolve())
    assert final["config"]["dataset"]["data_dir"] == str(home / "tiny_corpus")


def test_a_run_started_with_relative_paths_resumes_once_moved(tmp_path, monkeypatch):
    """The pipelines pass relative paths (`outputs/...` under the working directory): a run
    started that way, then moved with its inputs and rerun with absolute paths to the new
    place, resumes (the relative paths count from the recorded working directory)."""
    monkeypatch.setitem(sys.modules, "_acadlm_test_interrupt", type(sys)("_acadlm_test_interrupt"))
    sys.modules["_acadlm_test_interrupt"].Interrupt = _Interrupt
    workdir, home = tmp_path / "repo", tmp_path / "home" / "me" / "outputs"
    (workdir / "outputs").mkdir(parents=True)
    monkeypatch.chdir(workdir)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(monkeypatch, [*tiny_run_args(Path("outputs")),
                                 "plugins=[_acadlm_test_interrupt:Interrupt]"])
    state = torch.load(workdir / "outputs/run/step_000003/recipe_state.pt", weights_only=False)
    assert state["config"]["checkpointer.checkpoint_dir"] == "outputs/tiny_model"
    shutil.move(workdir / "outputs", home)
    monkeypatch.chdir(tmp_path)
    resumed = run_recipe(monkeypatch, tiny_run_args(home))
    logged = [int(line.split()[1]) for line in logged_metrics(home / "run")
              if line.startswith("Step ") and " | " in line]
    assert logged.count(1) == 1 and 6 in logged  # continued from step 3, not started over
    assert resumed["steps"] == 6


def test_a_rerun_with_no_step_left_reports_the_training_wall_time(tmp_path, monkeypatch):
    first = run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=3"))
    state = torch.load(tmp_path / "run/step_000003/recipe_state.pt", weights_only=False)
    assert 0 < state["history"]["wall_seconds"] <= first["wall_seconds"]
    rerun = run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=3"))
    assert rerun["steps"] == 3
    # the rerun trains nothing; it reports the first run's time, not its own near-zero one
    assert rerun["wall_seconds"] >= state["history"]["wall_seconds"] > 0


@pytest.mark.parametrize("schedule", [
    [],
    ["lr_scheduler._component_=torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
     "lr_scheduler.num_warmup_steps=1"],
], ids=["constant", "cosine"])
def test_a_run_resumed_with_a_lower_lr_trains_at_the_lower_lr(tmp_path, monkeypatch, schedule):
    """After a NaN the error says to lower `optimizer.lr` and resume; loading the checkpoint
    used to put its own rate back, so the resumed run repeated the old one. The schedule goes
    on at its step, on the new peak."""
    args = tiny_run_args(tmp_path, *schedule)
    run_recipe(monkeypatch, [*args, "max_steps=3"])
    run_recipe(monkeypatch, [*args, "max_steps=6", "optimizer.lr=1.0e-5"])
    rates = {step: values["lr"] for step, values in step_values(tmp_path / "run", "lr").items()}
    if not schedule:
        assert [rates[step] for step in (1, 2, 3)] == pytest.approx([3e-3] * 3)
        assert [rates[step] for step in (4, 5, 6)] == pytest.approx([1e-5] * 3)
        return
    # the same steps of a run at the new peak from the start: the schedule did not restart
    straight = tiny_run_args(tmp_path / "straight", *schedule)
    run_recipe(monkeypatch, [*straight, "max_steps=6", "optimizer.lr=1.0e-5"])
    wanted = step_values(tmp_path / "straight" / "run", "lr")
    assert [rates[step] for step in (4, 5, 6)] == pytest.approx(
        [wanted[step]["lr"] for step in (4, 5, 6)], rel=1e-6)
    assert rates[4] < 1e-5 and rates[2] != wanted[2]["lr"]  # steps 1-3 ran at the old peak


def test_a_run_resumed_with_more_steps_trains_on_the_longer_schedule(tmp_path, monkeypatch):
    """The loaded optimizer held the rate the 3-step schedule gave; the first resumed step
    trained at it (the old schedule's end) before the 6-step schedule took over. The logged
    `lr` is the rate each step trained at."""
    cosine = "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup"
    schedule = (f"lr_scheduler._component_={cosine}", "lr_scheduler.num_warmup_steps=2")
    run_recipe(monkeypatch, [*tiny_run_args(tmp_path, *schedule), "max_steps=3"])
    run_recipe(monkeypatch, [*tiny_run_args(tmp_path, *schedule), "max_steps=6"])
    straight = tiny_run_args(tmp_path / "straight", *schedule)
    run_recipe(monkeypatch, [*straight, "max_steps=6"])
    rates = step_values(tmp_path / "run", "lr")
    wanted = step_values(tmp_path / "straight" / "run", "lr")
    assert [rates[step]["lr"] for step in range(1, 7)] == pytest.approx(
        [wanted[step]["lr"] for step in range(1, 7)], rel=1e-6)
    # torchtune's warm-up of 2 trains step 1 at 0 and step 2 at half the peak (the log used to
    # show each step the next one's rate)
    assert wanted[1]["lr"] == 0.0 and wanted[2]["lr"] == pytest.approx(3e-3 / 2)


def test_a_finished_run_rerun_with_another_lr_is_refused_not_reported_as_trained(
        tmp_path, monkeypatch):
    """A rerun of a finished run trains no step; with a changed `optimizer.lr` its old results
    were reported as the new setting's (a pipeline rerun with `--set stage:optimizer.lr=...`
    exited 0 with the first run's losses). Refused, naming the key; unchanged, it still
    resumes."""
    args = tiny_run_args(tmp_path, "max_steps=3")
    first = run_recipe(monkeypatch, args)
    with pytest.raises(ConfigError) as refused:
        run_recipe(monkeypatch, [*args, "optimizer.lr=1.0e-5"])
    assert refused.value.key == "optimizer.lr" and "already at its last step" in str(
        refused.value)
    assert run_recipe(monkeypatch, args)["val_loss_after"] == first["val_loss_after"]


def step_values(output_dir: Path, *names: str) -> dict[int, dict[str, float]]:
    """The named metrics per step from the DiskLogger files (a later line wins)."""
    out: dict[int, dict[str, float]] = {}
    for line in logged_metrics(output_dir):
        head, _, rest = line.partition(" | ")
        if not head.startswith("Step ") or not rest:
            continue
        fields = dict(item.split(":", 1) for item in rest.split() if ":" in item)
        values = {name: float(fields[name]) for name in names if name in fields}
        if len(values) == len(names):
            out[int(head.split()[1])] = values
    return out


def test_example_third_party_plugin_changes_the_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN_DIR))
    plain = run_recipe(monkeypatch, tiny_run_args(tmp_path / "plain"))
    with_plugin = run_recipe(monkeypatch, tiny_run_args(
        tmp_path / "plugin", "plugins=[acadlm_example_plugin:ZLossPlugin]",
        "z_loss_coefficient=0.5"))
    assert with_plugin["val_loss_after"] != pytest.approx(plain["val_loss_after"], rel=1e-6)
    metrics = logged_metrics(tmp_path / "plugin" / "run")
    assert any("loss/z_loss" in line for line in metrics)


def test_a_validation_domain_without_training_data_is_named(tmp_path, monkeypatch):
    """A train file that never arrived leaves its domain validated but untrained: say so."""
    import acadlm_plugins.continued_pretrain_recipe as recipe

    args = tiny_run_args(tmp_path, "max_steps=1", "dynamic_batch_loading.enabled=False")
    (tmp_path / "tiny_corpus" / "code" / "train.jsonl").unlink()
    warned: list[str] = []
    monkeypatch.setattr(recipe.log, "warning", lambda msg, *a: warned.append(msg % a))
    summary = run_recipe(monkeypatch, args)
    assert "code" in summary["val_loss_after"]  # validated and reported ...
    assert any("validation domains ['code'] have no training split" in m for m in warned)


@pytest.mark.parametrize("inside", ["", "run"])
def test_an_output_dir_in_the_model_folder_is_refused_before_loading(tmp_path, monkeypatch,
                                                                     inside):
    """torchtune's checkpointer refused it with a traceback after the model loaded."""
    args = tiny_run_args(tmp_path)
    model = tmp_path / "tiny_model"
    before = sorted(p.name for p in model.iterdir())
    with pytest.raises(ConfigError) as err:
        run_recipe(monkeypatch, [*args, f"output_dir={model / inside}"])
    assert err.value.key == "output_dir" and "checkpointer.checkpoint_dir" in str(err.value)
    assert sorted(p.name for p in model.iterdir()) == before


def test_a_training_step_folder_given_as_the_model_points_at_its_model(tmp_path, monkeypatch):
    run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=1"))
    step = tmp_path / "run" / "step_000001"
    with pytest.raises(ConfigError) as err:
        run_recipe(monkeypatch, tiny_run_args(tmp_path / "again",
                                              f"checkpointer.checkpoint_dir={step}"))
    assert err.value.key == "checkpointer.checkpoint_dir"
    assert f"point it at {step / 'model'}" in str(err.value)


def test_a_cut_short_weights_file_is_named_with_the_fix(tmp_path, monkeypatch):
    args = tiny_run_args(tmp_path, "max_steps=1")
    weights = tmp_path / "tiny_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    with pytest.raises(ConfigError, match="cannot be read.*download or export") as err:
        run_recipe(monkeypatch, args)
    assert err.value.key == "checkpointer.checkpoint_dir"


def test_a_typo_in_a_top_level_key_is_named_with_a_suggestion(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"`max_step`.*did you mean `max_steps`"):
        run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_step=3"))


@pytest.mark.parametrize("override, key", [
    ("validation_dataset.max_seq_len=abc", "validation_dataset.max_seq_len"),
    ("validation_dataset.max_seq_len=0", "validation_dataset.max_seq_len"),
    ("validation_dataset.positions=bogus", "validation_dataset.positions"),
    ("dataset.weights.prose=x", "dataset.weights.prose"),
])
def test_a_bad_dataset_value_names_its_block(tmp_path, monkeypatch, override, key):
    """The mixture builder learns its block's key from the recipe (its `config_key`
    parameter), so a bad value says whether it is the training or the validation data."""
    with pytest.raises(ConfigError) as err:
        run_recipe(monkeypatch, tiny_run_args(tmp_path, override))
    assert err.value.key == key


def built_with_its_key(value: int, config_key: str | None = None) -> tuple[int, str | None]:
    return value, config_key


def test_instantiate_component_tells_a_builder_its_key_only_if_it_asks():
    from omegaconf import OmegaConf

    from acadlm_plugins.training.components import instantiate_component

    cfg = OmegaConf.create({
        "asks": {"_component_": "test_continued_pretrain_recipe.built_with_its_key", "value": 1},
        "given": {"_component_": "test_continued_pretrain_recipe.built_with_its_key",
                  "value": 2, "config_key": "mine"},
        "plain": {"_component_": "builtins.dict", "a": 1}})
    assert instantiate_component(cfg, "asks") == (1, "asks")
    assert instantiate_component(cfg, "given") == (2, "mine")
    assert instantiate_component(cfg, "plain") == {"a": 1}


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


def test_resume_refuses_training_data_whose_text_changed(tmp_path, monkeypatch):
    """A selection rewritten in place (QuRating's select stage reruns into the same folder)
    with the same pack counts used to be resumed as if it were the data the run started on."""
    run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=3"))
    train = tmp_path / "tiny_corpus" / "prose" / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    rows[0]["text"] = rows[0]["text"].swapcase()  # same length: same packs, other tokens
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=r"the text of domains \['prose'\] changed"):
        run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=6"))


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
    with pytest.raises(NonFiniteLossError, match="at step 5;"):
        run_recipe(monkeypatch, tiny_run_args(tmp_path, "plugins=[_acadlm_test_poison:Poison]"))
    last = latest_checkpoint(tmp_path / "run")
    assert last.name == "step_000003"
    from safetensors.torch import load_file

    weights = load_file(next((last / "model").glob("*.safetensors")))
    assert all(torch.isfinite(w).all() for w in weights.values())


# ------------------------------------------------------------- gradients that are not finite


class _Overflow:
    """Turns the final norm's gradient infinite in step 2's backward, the loss staying finite
    (an overflow in backward, as fp16 or a plugin's hook can produce)."""

    step = -1

    @hookimpl
    def acadlm_model_built(self, model):
        model.norm.scale.register_hook(
            lambda grad: grad * float("inf") if _Overflow.step == 2 else grad)

    @hookimpl
    def acadlm_batch_ready(self, batch, step):
        _Overflow.step = step


@pytest.mark.parametrize("clip", [None, 1.0], ids=["no_clipping", "clipping"])
def test_non_finite_gradients_of_a_finite_loss_stop_the_run_before_the_step(
        tmp_path, monkeypatch, clip):
    from safetensors.torch import load_file

    monkeypatch.setitem(sys.modules, "_acadlm_test_overflow", type(sys)("_acadlm_test_overflow"))
    sys.modules["_acadlm_test_overflow"].Overflow = _Overflow
    args = tiny_run_args(tmp_path, "plugins=[_acadlm_test_overflow:Overflow]",
                         "save_every_n_steps=2", "max_steps=4",
                         *([f"clip_grad_norm={clip}"] if clip is not None else []))
    # the hook's step 2 is the third step, "Step 3" in the logs: the error names it so
    with pytest.raises(NonFiniteLossError, match="`grad_norm` is (inf|nan) at step 3") as err:
        run_recipe(monkeypatch, args)
    assert err.value.name == "grad_norm" and err.value.step == 3
    last = latest_checkpoint(tmp_path / "run")
    assert last.name == "step_000002"  # written before the bad step, and nothing after it
    weights = load_file(next((last / "model").glob("*.safetensors")))
    assert all(torch.isfinite(w).all() for w in weights.values())
    grad_norms = [line for line in logged_metrics(tmp_path / "run") if "grad_norm:" in line]
    assert len(grad_norms) == 2  # logged every step, clipping or not


def test_clip_and_step_checks_the_norm_before_the_optimizer_and_scheduler_move():
    from acadlm_plugins.training.runtime import clip_and_step

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 3)).sum().backward()
    model.bias.grad[0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="`grad_norm` is nan at step 7"):
        clip_and_step(model, optimizer, scheduler, None, step=7)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert optimizer.param_groups[0]["lr"] == 0.1
    model.bias.grad[0] = 30.0
    norm = clip_and_step(model, optimizer, scheduler, 1.0, step=8)
    assert float(norm) > 30  # the norm before clipping is returned
    assert not torch.equal(model.bias, before[1])


@pytest.mark.parametrize("value, words", [
    ("-1.0", "above 0"), ("0", "above 0"), ("abc", "not a number"), ("inf", "not a finite"),
])
def test_a_bad_clip_grad_norm_is_refused_before_any_work(tmp_path, monkeypatch, value, words):
    with pytest.raises(ConfigError, match=words) as err:
        run_recipe(monkeypatch, tiny_run_args(tmp_path, f"clip_grad_norm={value}"))
    assert err.value.key == "clip_grad_norm"
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------- config checks


def test_a_pruning_block_is_refused_outside_the_prune_recipe(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="only the prune recipe reads this block") as err:
        run_recipe(monkeypatch, tiny_run_args(tmp_path, "pruning.target.num_layers=1"))
    assert err.value.key == "pruning"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, key, words", [
    ("validation.max_pack_per_domain=1", "validation.max_pack_per_domain",
     "did you mean `validation.max_packs_per_domain`"),
    ("validation.batch_size=0", "validation.batch_size", "below its minimum 1"),
    ("validation.max_packs_per_domain=two", "validation.max_packs_per_domain", "not an integer"),
])
def test_bad_validation_settings_are_refused_before_loading(tmp_path, monkeypatch, override,
                                                            key, words):
    from acadlm_plugins.continued_pretrain_recipe import ContinuedPretrainRecipe

    loaded = []
    monkeypatch.setattr(ContinuedPretrainRecipe, "_build_checked_model",
                        lambda self, cfg: loaded.append(cfg) or pytest.fail("model loaded"))
    with pytest.raises(ConfigError, match=words) as err:
        run_recipe(monkeypatch, tiny_run_args(tmp_path, override))
    assert err.value.key == key and not loaded


def test_validation_max_packs_per_domain_limits_the_evaluation(tmp_path, monkeypatch):
    from acadlm_plugins import continued_pretrain_recipe as recipe

    seen = []
    evaluate = recipe.evaluate_domain_losses

    def spy(model, corpus, **kwargs):
        seen.append((kwargs["batch_size"], kwargs["max_packs_per_domain"]))
        return evaluate(model, corpus, **kwargs)

    monkeypatch.setattr(recipe, "evaluate_domain_losses", spy)
    run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=1", "validation.batch_size=2",
                                          "validation.max_packs_per_domain=1"))
    assert seen and set(seen) == {(2, 1)}


def test_a_checkpoint_of_another_size_names_model_and_checkpoint_dir(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "wider_mlp"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                                 rope_theta=10_000.0, tie_word_embeddings=True)
                     ).save_pretrained(other)
    with pytest.raises(ConfigError) as err:
        run_recipe(monkeypatch, tiny_run_args(tmp_path, f"checkpointer.checkpoint_dir={other}"))
    message = str(err.value)
    assert err.value.key == "model"
    assert "`checkpointer.checkpoint_dir`" in message and str(other) in message
    assert ("layers.0.mlp.w1.weight` is [96, 64] in the checkpoint, [128, 64] in the model"
            in message)
    assert "acadlm_plugins.models.decoder_from_hf_config" in message
    assert not latest_checkpoint(tmp_path / "run")


MAPPING = "dynamic_batch_loading.reference_losses={prose: 3.0, numbers: 3.0, code: 3.0}"


@pytest.mark.parametrize(("first", "resumed", "key"), [
    ([], ["dynamic_batch_loading.reference_losses.prose=2.5"],
     "dynamic_batch_loading.reference_losses.prose"),
    ([], ["dynamic_batch_loading.reference_losses=initial"],      # mapping -> initial
     "dynamic_batch_loading.reference_losses"),
    (["dynamic_batch_loading.reference_losses=initial"], [MAPPING],  # initial -> mapping
     "dynamic_batch_loading.reference_losses"),
    (["dynamic_batch_loading.reference_losses=initial", "dynamic_batch_loading.reference_scale=0.9"],
     ["dynamic_batch_loading.reference_losses=initial", "dynamic_batch_loading.reference_scale=0.8"],
     "dynamic_batch_loading.reference_scale"),
])
def test_resuming_with_changed_reference_losses_is_refused(tmp_path, monkeypatch, first, resumed,
                                                           key):
    """The reference losses steer every domain-weight update: a resumed run that changed them
    is refused, naming the key, and the checkpoint is left as it was."""
    run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=2", *first))
    with pytest.raises(ConfigError, match="differs from the checkpoint being resumed") as err:
        run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=4", *resumed))
    assert err.value.key == key
    assert latest_checkpoint(tmp_path / "run").name == "step_000002"


@pytest.mark.parametrize(("first", "resumed"), [
    (["dynamic_batch_loading.reference_losses=initial"],           # scale unset -> its default
     ["dynamic_batch_loading.reference_losses=initial", "dynamic_batch_loading.reference_scale=1.0"]),
    (["dynamic_batch_loading.reference_losses=initial", "dynamic_batch_loading.reference_scale=1.0"],
     ["~dynamic_batch_loading.reference_losses"]),                 # both unset: their defaults
])
def test_an_unset_reference_key_and_its_default_resume_alike(tmp_path, monkeypatch, first,
                                                              resumed):
    """``reference_scale`` unset is 1.0 and ``reference_losses`` unset is ``initial``: writing
    the default out (or leaving it out) on resume is the same run, and resumes."""
    run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=2", *first))
    assert run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=3", *resumed))["steps"] == 3


def test_a_checkpoint_recording_the_reference_keys_unset_compares_them_as_defaults(
        tmp_path, monkeypatch):
    """Checkpoints of earlier versions recorded an unset key as None: it counts as the default,
    so a run that spells the default out resumes and one that changes it is refused."""
    run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=2",
                                          "dynamic_batch_loading.reference_losses=initial"))
    path = tmp_path / "run" / "step_000002" / "recipe_state.pt"
    state = torch.load(path, weights_only=False)
    state["config"]["dynamic_batch_loading.reference_scale"] = None   # as an older version wrote
    torch.save(state, path)
    with pytest.raises(ConfigError, match="was 1.0, is 0.9") as err:
        run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=3",
                                              "dynamic_batch_loading.reference_losses=initial",
                                              "dynamic_batch_loading.reference_scale=0.9"))
    assert err.value.key == "dynamic_batch_loading.reference_scale"
    assert run_recipe(monkeypatch, tiny_run_args(
        tmp_path, "max_steps=3", "dynamic_batch_loading.reference_losses=initial",
        "dynamic_batch_loading.reference_scale=1.0"))["steps"] == 3


# ------------------------------------------------------------------ resume refusals
def test_resuming_after_the_starting_model_changed_is_refused(tmp_path, monkeypatch):
    """A pipeline that re-exports the starting model at the same path (a pruning stage rerun
    with more steps) must not have this run resume checkpoints trained from the old model; the
    same model re-exported (new mtime, same bytes) resumes."""
    run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=2"))
    state = tmp_path / "run" / "step_000002" / "recipe_state.pt"
    before = state.read_bytes()
    write_tiny_checkpoint(tmp_path / "tiny_model", seed=1)
    with pytest.raises(ConfigError) as err:
        run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=4"))
    assert err.value.key == "checkpointer.checkpoint_dir"
    assert "starting model" in str(err.value) and "changed since the checkpoints" in str(err.value)
    assert "new `output_dir`" in str(err.value)
    assert state.read_bytes() == before and latest_checkpoint(tmp_path / "run").name == "step_000002"
    recorded = torch.load(state, weights_only=False)["starting_weights"]
    write_tiny_checkpoint(tmp_path / "tiny_model", seed=0)  # the old model, written again
    assert run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=3"))["steps"] == 3
    resumed = torch.load(tmp_path / "run" / "step_000003" / "recipe_state.pt", weights_only=False)
    assert resumed["starting_weights"] == recorded


def test_a_checkpoint_without_a_starting_model_fingerprint_still_resumes(tmp_path, monkeypatch):
    """Checkpoints written before the fingerprint existed are resumed unchecked."""
    run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=2"))
    path = tmp_path / "run" / "step_000002" / "recipe_state.pt"
    state = torch.load(path, weights_only=False)
    del state["starting_weights"]
    save_torch_atomically(state, path)
    write_tiny_checkpoint(tmp_path / "tiny_model", seed=1)
    assert run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=3"))["steps"] == 3


def test_resuming_a_checkpoint_past_max_steps_is_refused(tmp_path, monkeypatch):
    run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=2"))
    with pytest.raises(ConfigError) as err:
        run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=1"))
    assert err.value.key == "max_steps"
    assert "already at step 2" in str(err.value) and "at least 2" in str(err.value)
    assert run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=2"))["steps"] == 2


def test_a_truncated_recipe_state_names_the_file_and_the_fix(tmp_path, monkeypatch):
    args = tiny_run_args(tmp_path, "max_steps=2", "save_every_n_steps=1")
    run_recipe(monkeypatch, args)
    newest = tmp_path / "run" / "step_000002"
    data = (newest / "recipe_state.pt").read_bytes()
    (newest / "recipe_state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        run_recipe(monkeypatch, args)
    message = str(err.value)
    assert str(newest / "recipe_state.pt") in message
    assert f"delete the folder {newest}" in message and "(step_000001)" in message
    shutil.rmtree(newest)  # the fix named: resume from step 1
    assert run_recipe(monkeypatch, args)["steps"] == 2


@pytest.mark.parametrize(("override", "key", "words"), [
    ("dtype=fp8", "dtype", "'fp8' cannot be used"),
    ("device=tpu", "device", "'tpu' cannot be used"),
    ("device=5", "device", "not a device name"),
    ("model.vocab_size=abc", "model.vocab_size", "takes int"),
    ("model.tie_word_embeddings=perhaps", "model.tie_word_embeddings", "takes bool"),
    ("enable_activation_checkpointing=maybe", "enable_activation_checkpointing", "maybe"),
    ("dataset.packed=maybe", "dataset.packed", "takes bool"),
])
def test_a_top_level_or_builder_value_of_the_wrong_kind_is_named_before_anything_is_written(
        tmp_path, monkeypatch, override, key, words):
    """torchtune's get_dtype / get_device and the model builder raised tracebacks for these
    (or, for the booleans, read `maybe` as true); now each is a ConfigError naming the key."""
    with pytest.raises(ConfigError) as err:
        run_recipe(monkeypatch, tiny_run_args(tmp_path, "max_steps=1", override))
    assert err.value.key == key and words in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["null", "''"])
def test_an_unset_output_dir_is_named(tmp_path, monkeypatch, value):
    with pytest.raises(ConfigError) as err:
        run_recipe(monkeypatch, [*tiny_run_args(tmp_path, "max_steps=1"), f"output_dir={value}"])
    assert err.value.key == "output_dir" and "not a folder path" in str(err.value)


def test_an_output_dir_with_a_tilde_keeps_the_whole_run_in_one_folder(tmp_path, monkeypatch):
    """The `${output_dir}` interpolations (checkpointer, metric logger) read the config's text,
    so the recipe must too: expanding `~` only in the recipe split a run between two folders."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    args = [a for a in tiny_run_args(tmp_path, "max_steps=1") if not a.startswith("output_dir=")]
    run_recipe_main(monkeypatch, "acadlm_plugins.continued_pretrain_recipe",
                    [*args, "output_dir=~/run"])
    run = tmp_path / "~" / "run"
    assert (run / "summary.json").is_file() and (run / "step_000001").is_dir()
    assert any((run / "logs").iterdir())
    assert not (tmp_path / "home" / "run").exists()
