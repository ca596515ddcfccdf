"""The Sheared-LLaMA pipeline with its baselines at equal tokens, on the tiny model: every arm
runs as its own `tune run`, the summary compares them, and a rerun resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from recipe_runs import run_until_first_stage
from tiny_setup import REPO_ROOT, write_tiny_checkpoint, write_tiny_corpus

from acadlm_plugins.errors import ConfigError

PIPELINE = REPO_ROOT / "recipes" / "sheared_llama" / "pipeline.py"
sys.path.insert(0, str(PIPELINE.parent))

import pipeline
from pipeline import DEFAULT_CONTINUE, DEFAULT_PRUNE, compare, token_budget


def tiny_pipeline_args(tmp_path: Path, *extra: str) -> list[str]:
    """The pipeline's arguments for the tiny configs in ``tmp_path`` (model and corpus written
    there once), with ``extra`` last."""
    model, corpus = tmp_path / "tiny_model", tmp_path / "tiny_corpus"
    if not model.exists():
        write_tiny_checkpoint(model)
        write_tiny_corpus(corpus)
    data = [f"dataset.data_dir={corpus}", f"validation_dataset.data_dir={corpus}"]
    return [
        "--output-dir", str(tmp_path / "out"),
        "--prune-config", str(REPO_ROOT / "configs/tiny/prune.yaml"),
        "--continue-config", str(REPO_ROOT / "configs/tiny/continued_pretrain.yaml"),
        *[f"--set=prune:{o}" for o in (f"checkpointer.checkpoint_dir={model}", *data,
                                       "max_steps=6", "save_every_n_steps=6",
                                       "dynamic_batch_loading.update_interval=3",
                                       "pruning.calibration.num_sequences=8")],
        *[f"--set=continue:{o}" for o in (
            *data, "model._component_=acadlm_plugins.models.llama.llama_from_hf_config",
            "~model.vocab_size", "max_steps=4", "save_every_n_steps=4")],
        *extra]


def run_pipeline(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(PIPELINE), *tiny_pipeline_args(tmp_path, *extra)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT)]),
           "OMP_NUM_THREADS": "1", "ACADLM_NO_PROGRESS": "1", "ACADLM_PLUGINS_DISABLE_AUTOLOAD": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_equal_token_budget_counts_pruning_and_continued_pretraining(tmp_path):
    prune = tmp_path / "p.yaml"
    prune.write_text("batch_size: 2\nmax_steps: 30\ndataset: {max_seq_len: 128}\n")
    cont = tmp_path / "c.yaml"
    cont.write_text("batch_size: 4\nmax_steps: 40\ngradient_accumulation_steps: 1\n"
                    "dataset: {max_seq_len: 128}\n")
    budget = token_budget(prune, cont, 1)
    assert budget["total_tokens"] == 30 * 2 * 128 + 40 * 4 * 128
    assert budget["baseline_steps"] == 55 and budget["baseline_tokens"] == 55 * 512
    assert token_budget(prune, cont, 2)["baseline_steps"] == 55  # both scale with the replicas
    assert token_budget(prune, cont, 1, ["max_steps=10"], [])["total_tokens"] == 10 * 256 + 40 * 512
    runs = {"ours": {"val_loss_after": {"a": 3.0, "b": 5.0}}}
    compared = compare({"a": 2.0, "b": 4.0}, runs, budget)
    assert compared["val_loss"]["ours"]["mean"] == 4.0
    assert compared["val_loss"]["source"]["mean"] == 3.0
    assert compared["tokens"]["ours"] == budget["total_tokens"]


def test_demo_configs_give_every_arm_exactly_the_same_tokens():
    # the baselines' step count is rounded up, so a demo whose pruning tokens are not a multiple
    # of a continued pre-training step would hand the baselines more tokens than ours
    budget = token_budget(DEFAULT_PRUNE, DEFAULT_CONTINUE, 1)
    assert budget["baseline_tokens"] == budget["total_tokens"] == 28_160
    assert budget["prune_tokens"] == 16 * 2 * 128


def test_pipeline_runs_three_arms_at_equal_tokens_and_resumes(tmp_path):
    importance_init = ("--set=prune:pruning.mask_init=importance", "--set=prune:seed=3",
                       "--set=continue:seed=3")
    first = run_pipeline(tmp_path, *importance_init)
    out = tmp_path / "out"
    summary = json.loads((out / "pipeline_summary.json").read_text())
    comparison = summary["comparison"]
    assert set(comparison["val_loss"]) == {"source", "from_scratch", "one_shot", "ours"}
    for arm in ("from_scratch", "one_shot", "ours"):
        losses = comparison["val_loss"][arm]
        assert set(losses) == {"code", "numbers", "prose", "mean"}
    budget = comparison["budget"]
    assert budget["total_tokens"] == 6 * 4 * 64 + 4 * 4 * 64   # tiny configs: batch 4 x 64
    assert comparison["tokens"]["one_shot"] == comparison["tokens"]["from_scratch"] == \
        budget["baseline_tokens"] >= budget["total_tokens"]
    one_shot = json.loads((out / "one_shot/prune/pruning_summary.json").read_text())
    assert one_shot["method"] == "importance"
    scratch = json.loads((out / "from_scratch/init_model/config.json").read_text())
    assert scratch["acadlm_init"]["kind"] == "random"
    assert scratch["acadlm_init"]["seed"] == 3  # the run's seed, not always 0
    ours = json.loads((out / "continued/summary.json").read_text())
    assert ours["steps"] == 4
    assert json.loads((out / "one_shot/continued/summary.json").read_text())["steps"] == \
        budget["baseline_steps"]
    # (the tiny source is itself random, so which arm wins here means nothing; the embedded
    # SmolLM2 demo's figures are in docs/pruning.md)
    assert all(0 < v["mean"] < 20 for v in comparison["val_loss"].values())
    assert "validation loss (nats/token)" in first.stdout
    assert "mean loss, ours - one_shot: " in first.stdout
    assert "ours: kept units the importance initialization did not keep: layer " in first.stdout
    assert "changed_from_importance_init" in summary["pruning"]
    exported = {p.name: p.read_bytes() for p in (out / "one_shot/prune/pruned_model").iterdir()}
    assert "one-shot importance pruning over 8 calibration sequences" in first.stderr
    second = run_pipeline(tmp_path, *importance_init)  # resumes: no stage trains again
    assert "resumed at step 4 of 4" in second.stdout + second.stderr
    # nor is the one-shot model ranked and sliced again: its export is kept, byte for byte
    assert "one-shot importance pruning over" not in second.stdout + second.stderr
    assert "one-shot pruning resumed" in second.stderr
    assert exported == {p.name: p.read_bytes()
                        for p in (out / "one_shot/prune/pruned_model").iterdir()}


# ---------------------------------------------------------------- inputs, refused up front
def refused(*argv: str) -> None:
    """``pipeline.py argv`` in this process must exit 2 before starting any stage."""
    assert run_until_first_stage(pipeline, argv).outcome == "exit 2"


@pytest.mark.parametrize("argv, words", [
    (["--prune-config", "nope.yaml"], "--prune-config nope.yaml: no such file"),
    (["--continue-config", "nope.yaml"], "--continue-config nope.yaml: no such file"),
    (["--set", "continue:batch_size=abc"], "continue:batch_size"),
    (["--set", "prune:max_steps=2.5"], "prune:max_steps"),
    (["--set", "continue:gradient_accumulation_steps=0"], "continue:gradient_accumulation_steps"),
    (["--set", "continue:dataset.max_seq_len=256"], "dataset.max_seq_len"),
    (["--set", "continue:validation_dataset.max_seq_len=256"], "validation_dataset.max_seq_len"),
    (["--set", "continue:validation.max_packs_per_domain=64"], "validation.max_packs_per_domain"),
    (["--set", "prune:validation_dataset.data_dir=/elsewhere"], "validation_dataset.data_dir"),
])
def test_bad_inputs_stop_before_any_stage_naming_the_flag_or_key(tmp_path, capsys, argv, words):
    refused("--output-dir", str(tmp_path / "out"), *argv)
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, key", [
    # 7 does not divide the prune stage's dynamic batch loading interval (3 here)
    ("--set=prune:eval_every_n_steps=7", "prune:dynamic_batch_loading.update_interval"),
    ("--set=continue:eval_every_n_steps=0", "continue:eval_every_n_steps"),
    ("--set=prune:pruning.calibration.num_sequences=0", "prune:pruning.calibration.num_sequences"),
    ("--set=continue:dynamic_batch_loading.eta=-1", "continue:dynamic_batch_loading.eta"),
    ("--set=continue:optimizer.lr_typo=1", "continue:optimizer.lr_typo"),
    ("--set=continue:validation.batch_sise=8", "continue:validation.batch_sise"),
    # a removed key the token budget needs, or one the config lacks (as tune run refuses it)
    ("--set=continue:~batch_size", "continue:batch_size"),
    ("--set=prune:~batch_size", "prune:batch_size"),
    ("--set=continue:~no_such_key", "--set continue:~no_such_key"),
    # an override torchtune cannot merge, a reference that resolves to nothing
    ("--set=prune:pruning=[1,2]", "--set prune:pruning=[1,2]"),
    ("--set=continue:optimizer.lr=${nope}", "continue:optimizer.lr"),
])
def test_a_setting_a_later_stage_refuses_stops_the_pipeline_before_the_first_stage(
        tmp_path, capsys, override, key):
    """Every run's config is checked as its recipe checks it before the first stage runs, so
    a bad value of any stage is refused at once (exit 2, `<stage>:<key>`), not after the
    stages before it have run."""
    refused(*tiny_pipeline_args(tmp_path, override))
    err = capsys.readouterr().err
    assert f"`{key}`" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_the_tiny_pipelines_runs_all_pass_the_up_front_checks(tmp_path):
    """The checks pass the runs the tiny pipeline makes, on the overrides each run gets."""
    first = run_until_first_stage(pipeline, tiny_pipeline_args(tmp_path))
    assert first.recipe == "acadlm_plugins/prune_recipe" and first.outcome == "prune (ours)"


def test_stages_that_would_compare_other_sequence_lengths_are_refused_naming_both(tmp_path):
    cont = tmp_path / "c.yaml"
    cont.write_text(DEFAULT_CONTINUE.read_text().replace("max_seq_len: 128", "max_seq_len: 256"))
    with pytest.raises(ConfigError) as err:
        pipeline.check_same_validation(DEFAULT_PRUNE, cont)
    assert err.value.key == "prune:dataset.max_seq_len / continue:dataset.max_seq_len"
    assert "is 128 in the prune config" in str(err.value) and "256 in the continue" in str(err.value)
    assert "--set continue:dataset.max_seq_len=128" in str(err.value)
    pipeline.check_same_validation(DEFAULT_PRUNE, cont, (), [
        "dataset.max_seq_len=128", "validation_dataset.max_seq_len=128"])
    pipeline.check_same_validation(DEFAULT_PRUNE, DEFAULT_CONTINUE)  # the demo's agree


# ------------------------------------------------------------------ where the configs write
def pipeline_folders(out: Path) -> list[Path]:
    return [path for stages in pipeline.arm_dirs(out).values() for path in stages.values()]


def test_standalone_demo_configs_write_outside_the_pipelines_folders():
    """Run on their own (the README's commands), the demo configs must not write where `make
    demo` later resumes with other overrides (the continue stage's reference losses)."""
    from omegaconf import OmegaConf

    default_out = pipeline.parse_args([]).output_dir
    prune = OmegaConf.load(DEFAULT_PRUNE)
    cont = OmegaConf.load(DEFAULT_CONTINUE)
    for written in (Path(prune.output_dir), Path(cont.output_dir)):
        assert written != default_out and default_out not in written.parents, written
        for folder in pipeline_folders(default_out):
            assert written != folder and folder not in written.parents, (written, folder)
    # the standalone continued pre-training reads what the standalone pruning writes
    pruned = Path(prune.output_dir) / "pruned_model"
    assert Path(cont.model.path) == Path(cont.checkpointer.checkpoint_dir) == pruned


FULL = REPO_ROOT / "configs" / "smollm2" / "135M_to_50M_prune_full.yaml"


def header_pipeline_command(config: Path) -> list[str]:
    """The `python recipes/sheared_llama/pipeline.py ...` command of a config's header comment
    (continuation lines joined), as argv after the script."""
    import shlex

    lines = [line[1:].strip() for line in config.read_text().splitlines()
             if line.startswith("#")]
    start = next(i for i, line in enumerate(lines)
                 if line.startswith("python recipes/sheared_llama/pipeline.py"))
    command = []
    for line in lines[start:]:
        command.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    words = shlex.split(" ".join(command))
    assert words[:2] == ["python", "recipes/sheared_llama/pipeline.py"]
    return words[2:]


def test_the_full_configs_documented_pipeline_command_is_complete_and_consistent():
    """The GPU config's header command: its own folder, 8 processes (its batch is per GPU), and
    a continue stage at the prune stage's sequence length, batch and validation packs."""
    from omegaconf import OmegaConf

    from acadlm_plugins.planning.checks import recipe_keys
    from acadlm_plugins.stages import stage_overrides

    argv = header_pipeline_command(FULL)
    args = pipeline.parse_args(argv)
    assert args.prune_config == Path("configs/smollm2/135M_to_50M_prune_full.yaml")
    assert args.nproc_per_node == 8
    assert args.output_dir != pipeline.parse_args([]).output_dir
    assert Path(OmegaConf.load(FULL).output_dir) == pipeline.arm_dirs(args.output_dir)["ours"]["prune"]
    extra = stage_overrides(args.extra, pipeline.STAGES, example="")
    prune_config, continue_config = REPO_ROOT / args.prune_config, args.continue_config
    pipeline.check_same_validation(prune_config, continue_config, extra["prune"], extra["continue"])
    # without the continue stage's sequence-length overrides: 4,096 against 128 tokens
    no_lengths = [o for o in extra["continue"] if "max_seq_len" not in o]
    assert len(no_lengths) < len(extra["continue"])
    with pytest.raises(ConfigError) as err:
        pipeline.check_same_validation(prune_config, continue_config, extra["prune"], no_lengths)
    assert "max_seq_len" in err.value.key and "4096" in str(err.value) and "128" in str(err.value)
    prune = pipeline.with_overrides(OmegaConf.load(prune_config), extra["prune"])
    cont = pipeline.with_overrides(OmegaConf.load(continue_config), extra["continue"])
    assert pipeline.tokens_per_step(cont, 8) == pipeline.tokens_per_step(prune, 8) == 32 * 4096
    for key in ("device", "dtype", "enable_activation_checkpointing",
                "dynamic_batch_loading.update_interval", "validation.batch_size"):
        assert OmegaConf.select(cont, key) == OmegaConf.select(prune, key), key
    budget = token_budget(prune_config, continue_config, 8, extra["prune"], extra["continue"])
    assert budget["prune_tokens"] == 3200 * 32 * 4096  # Sheared-LLaMA's 0.4B pruning tokens
    assert budget["baseline_tokens"] == budget["total_tokens"]
    # every override sets a key the continue config has, or one the recipe reads (no typo)
    known, written = recipe_keys("continued_pretrain")[0], OmegaConf.load(continue_config)
    for key in (o.split("=")[0] for o in extra["continue"]):
        assert key in known or OmegaConf.select(written, key) is not None, key


def test_the_full_configs_header_gives_the_share_its_target_keeps():
    """The header's parameter counts are the source's and the target's (about 30%, not a
    third), and the config keeps the reference's uniform mask init its docs describe."""
    from omegaconf import OmegaConf

    from acadlm_plugins.pruning.architecture import architecture_from_hf_config, resolve_target

    cfg = OmegaConf.load(FULL)
    source = architecture_from_hf_config(pipeline.source_dir(FULL))
    target = resolve_target(source, OmegaConf.to_container(cfg.pruning.target))
    kept, total = target.non_embedding_params(), source.non_embedding_params()
    header = " ".join(line.lstrip("# ") for line in FULL.read_text().splitlines()[:3])
    assert f"about {round(100 * kept / total)}% of its non-embedding parameters ({kept:,} of " \
        f"{total:,})" in header
    assert cfg.pruning.mask_init == "uniform"


def test_the_summary_spells_out_each_comparison_of_mean_loss():
    """ours - one_shot, one_shot - from_scratch and ours - source, with their signs; a
    comparison whose arm did not run (`--baselines none`) is left out."""
    losses = {"source": {"mean": 3.0}, "from_scratch": {"mean": 7.25},
              "one_shot": {"mean": 4.0}, "ours": {"mean": 4.125}}
    tail = " one run, benchmarks/pruning_recovery.py for seeds)"
    assert pipeline.mean_loss_differences(losses) == [
        f"mean loss, ours - one_shot: +0.1250 (ours higher;{tail}",
        f"mean loss, one_shot - from_scratch: -3.2500 (one_shot lower;{tail}",
        f"mean loss, ours - source: +1.1250 (ours higher;{tail}"]
    only_ours = {"source": losses["source"], "ours": losses["ours"]}
    assert [line.split(":")[0] for line in pipeline.mean_loss_differences(only_ours)] == [
        "mean loss, ours - source"]


def test_a_rerun_with_another_token_budget_is_refused_before_any_stage(tmp_path, capsys):
    """A rerun with `--set continue:batch_size=2` used to resume the finished runs with the new
    batch (ours at 4 of 4, the baselines at 10 of 16: 30% more tokens than ours) while the
    summary printed the new, equal budget."""
    args = tiny_pipeline_args(tmp_path)
    out = tmp_path / "out"
    budget = token_budget(Path(args[3]), Path(args[5]), 1,
                          [a.removeprefix("--set=prune:") for a in args if "prune:" in a],
                          [a.removeprefix("--set=continue:") for a in args if "continue:" in a])
    pipeline.record_budget(out, budget)
    pipeline.check_same_budget(out, budget)  # the same budget: resumes
    refused(*tiny_pipeline_args(tmp_path, "--set=continue:batch_size=2"))
    err = capsys.readouterr().err
    assert "`--output-dir`" in err and "another token budget" in err, err
    assert "continued_tokens: 1024 -> 512" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["token_budget.json"]


# ------------------------------------------------------------ overrides as `tune run` reads them
def test_a_removed_key_is_counted_in_the_token_budget_as_the_recipe_reads_it(tmp_path):
    """`--set continue:~gradient_accumulation_steps` is passed to `tune run`, which removes the
    key, and the recipe then accumulates its default of 1 step; the budget used to count the
    config file's 2, so ours trained half the tokens the summary reported, and the baselines'
    step count was computed for a batch twice the one they trained on."""
    from omegaconf import OmegaConf

    from acadlm_plugins.planning.loading import load_config
    from acadlm_plugins.training.run_checks import positive_int

    cont = tmp_path / "continue.yaml"
    tiny = (REPO_ROOT / "configs/tiny/continued_pretrain.yaml").read_text()
    cont.write_text(tiny.replace("batch_size: 4\nmax_steps:",
                                 "batch_size: 4\ngradient_accumulation_steps: 2\nmax_steps:"))
    assert OmegaConf.load(cont).gradient_accumulation_steps == 2
    removed = "~gradient_accumulation_steps"
    # what the continue stage's recipe reads: the key gone, so its default of 1
    assert positive_int(load_config(cont, [removed]), "gradient_accumulation_steps", 1) == 1
    run_until_first_stage(pipeline, tiny_pipeline_args(
        tmp_path, "--continue-config", str(cont), f"--set=continue:{removed}"))
    budget = json.loads((tmp_path / "out" / pipeline.BUDGET_FILE).read_text())
    step = 4 * 1 * 64  # batch 4, 1 accumulation step, 64 tokens
    assert budget["continued_tokens"] == 4 * step  # max_steps=4
    assert budget["prune_tokens"] == 6 * 4 * 64
    assert budget["baseline_steps"] == 10 and budget["baseline_tokens"] == budget["total_tokens"]
    # the same as without the key at all
    assert token_budget(Path(tiny_pipeline_args(tmp_path)[3]), cont, 1, [], [removed]) == \
        token_budget(Path(tiny_pipeline_args(tmp_path)[3]), cont, 1, [],
                     ["gradient_accumulation_steps=1"])


def test_a_removed_teacher_is_not_removed_again_for_the_from_scratch_arm(tmp_path):
    """`--set continue:~distillation` (no teacher for any arm): the from-scratch arm's run used
    to get `~distillation` a second time, as the pipeline read the config without the removal,
    and `tune run` (here: its up-front check) refused the key it could no longer find."""
    cont = tmp_path / "continue.yaml"
    cont.write_text((REPO_ROOT / "configs/tiny/continued_pretrain.yaml").read_text()
                    + "\ndistillation:\n  temperature: 1.0\n")
    first = run_until_first_stage(pipeline, tiny_pipeline_args(
        tmp_path, "--continue-config", str(cont), "--set=continue:~distillation"))
    assert first.recipe == "acadlm_plugins/prune_recipe"
    teacherless = pipeline.with_overrides(pipeline.OmegaConf.load(cont), ["~distillation"])
    assert "distillation" not in teacherless and pipeline.without_teacher(teacherless) == []


def test_a_reference_scale_given_with_set_is_refused_before_any_stage(tmp_path, capsys):
    """Every arm steers by the source's losses; `tune run` removes a `~key` from the config
    file only, so the pipeline's removal could not undo a `--set` value."""
    refused(*tiny_pipeline_args(
        tmp_path, "--set=continue:dynamic_batch_loading.reference_scale=0.9"))
    err = capsys.readouterr().err
    assert "`--set continue:dynamic_batch_loading.reference_scale`" in err, err


def test_the_from_scratch_arm_drops_set_distillation_keys(tmp_path):
    """A `--set continue:distillation.kd_ratio=0.3` for the distilled arms would bring a
    teacherless distillation block back into the from-scratch run after its removal."""
    cont = tmp_path / "continue.yaml"
    cont.write_text((REPO_ROOT / "configs/tiny/continued_pretrain.yaml").read_text()
                    + "\ndistillation:\n  temperature: 1.0\n")
    dirs = pipeline.arm_dirs(tmp_path / "out")
    extra = {"prune": [], "continue": ["distillation.kd_ratio=0.3", "max_steps=3"]}
    budget = {"baseline_steps": 4}
    yaml_cfg = pipeline.OmegaConf.load(cont)
    scratch = pipeline.run_overrides("from_scratch", "continue", dirs, extra, budget, yaml_cfg)
    ours = pipeline.run_overrides("ours", "continue", dirs, extra, budget, yaml_cfg)
    assert "distillation.kd_ratio=0.3" in ours and "~distillation" not in ours
    assert "distillation.kd_ratio=0.3" not in scratch and "~distillation" in scratch
    assert "max_steps=3" in scratch


@pytest.mark.parametrize("flag", ["--prune-config", "--continue-config"])
def test_a_malformed_config_is_named_by_its_flag(tmp_path, capsys, flag):
    """It was a YAML parser traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: :\n")
    refused("--output-dir", str(tmp_path / "out"), flag, str(bad))
    err = capsys.readouterr().err
    assert f"config `{flag}`:" in err and "not valid YAML (line 2)" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--prune-config", "--continue-config"])
def test_a_config_of_no_training_recipe_is_named_by_its_flag(tmp_path, capsys, flag):
    """A YAML file of other keys was reported as a stage comparison of None values."""
    other = tmp_path / "other.yaml"
    other.write_text("hi\n")  # OmegaConf reads it as {hi: None}
    refused("--output-dir", str(tmp_path / "out"), flag, str(other))
    err = capsys.readouterr().err
    assert f"config `{flag}`:" in err and "is not a config of the prune or continued" in err
    assert "it has no model, tokenizer" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()

