"""The pipelines' stage runner (a failed stage's exit code and the stage's own name) and the
checks every pipeline makes before its first stage."""

from __future__ import annotations

import argparse
import sys

import pytest
from tiny_setup import REPO_ROOT

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.stages import (
    check_at_least,
    check_config_files,
    check_stage_config,
    flag_keys,
    refused_before_stages,
    renamed,
    run_stage,
    stage_overrides,
)


def test_a_failed_stage_stops_the_pipeline_with_its_exit_code_and_name(capsys):
    """A recipe's user error exits 2; the pipeline passes the 2 on (it used to exit 1) and
    names the stage by its `--set` name, so stage1 and stage2 of one recipe differ."""
    with pytest.raises(SystemExit) as stop:
        run_stage([sys.executable, "-c", "import sys; sys.exit(2)"], stage="stage2")
    assert stop.value.code == 2
    assert "stage stage2 failed with exit code 2" in capsys.readouterr().err
    run_stage([sys.executable, "-c", "pass"], stage="stage1")  # success: no exit


def test_a_malformed_set_exits_2_with_an_error_line(capsys):
    with pytest.raises(SystemExit) as stop:
        stage_overrides(["judge:x"], ["judge", "rater"], example="rater:margin=0.1")
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("error: --set 'judge:x': expected STAGE:key=value")
    assert stage_overrides(["judge:a.b=1", "rater:~c"], ["judge", "rater"], example="x") == {
        "judge": ["a.b=1"], "rater": ["~c"]}


# ------------------------------------------------------------- checks before the first stage
TINY = REPO_ROOT / "configs" / "tiny"
SMOLLM2 = REPO_ROOT / "configs" / "smollm2"


@pytest.mark.parametrize("recipe, config, overrides, key", [
    ("judge", TINY / "qurating_judge.yaml",
     ["pairs.data=/x", "judge.local.model_dir=/x", "batch_pairs=0"], "batch_pairs"),
    ("rater", TINY / "qurating_rater.yaml", ["backbone_dir=/x", "judgments=/x", "max_stepz=1"],
     "max_stepz"),
    ("rater", TINY / "qurating_rater.yaml", ["backbone_dir=/x", "judgments=/x"],
     "backbone_dir"),  # the backbone is no stage's output: it must exist up front
    ("annotate", TINY / "qurating_annotate.yaml",
     ["rater_dir=/x", "data_files=/x", "shard_size=0"], "shard_size"),
    ("select", SMOLLM2 / "qurating_select.yaml", ["budget_tokens=5"], "budget_tokens"),
    ("sft", TINY / "sft.yaml", ["checkpointer.checkpoint_dir=/x", "epochs=0"], "epochs"),
    ("continued_pretrain", TINY / "continued_pretrain.yaml", ["seed=abc"], "seed"),
    ("continued_pretrain", TINY / "continued_pretrain.yaml", ["max_steps=0"], "max_steps"),
    ("eval", SMOLLM2 / "eval_long_context.yaml", ["model.args.pretrained=/nonexistent"],
     "model.args.pretrained"),
])
def test_a_stage_config_is_checked_as_its_recipe_checks_it_naming_stage_and_key(
        recipe, config, overrides, key):
    """Every recipe a pipeline stage runs has an up-front check of its config that loads no
    model and reads no data (a folder a later stage reads need not exist yet)."""
    with pytest.raises(ConfigError) as refused:
        check_stage_config("mystage", config, overrides, recipe=recipe, run="the test run")
    assert refused.value.key == f"mystage:{key}"
    assert "(the test run)" in str(refused.value)


def test_a_stage_config_a_recipe_accepts_passes_and_is_returned():
    cfg = check_stage_config("sft", TINY / "sft.yaml", ["checkpointer.checkpoint_dir=/x"],
                             recipe="sft")
    assert cfg.checkpointer.checkpoint_dir == "/x"
    selection = check_stage_config("select", SMOLLM2 / "qurating_select.yaml", ["tau=inf"],
                                   recipe="select")
    assert selection.tau == "inf"


def test_an_override_tune_run_refuses_is_named_as_given():
    with pytest.raises(ConfigError) as refused:
        check_stage_config("sft", TINY / "sft.yaml", ["~no_such_key"], recipe="sft")
    assert refused.value.key == "--set sft:~no_such_key"


def test_flag_checks_and_refusals_exit_2_with_one_line(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="pipeline.py")
    check_at_least(parser, {"--steps": (1, 1), "--documents": (0, 0)})
    check_config_files(parser, {"--x-config": TINY / "sft.yaml"})
    for call, words in (
            (lambda: check_at_least(parser, {"--steps": (0, 1)}), "--steps 0: must be at least 1"),
            (lambda: check_config_files(parser, {"--x-config": tmp_path / "no.yaml"}),
             f"--x-config {tmp_path / 'no.yaml'}: no such file")):
        with pytest.raises(SystemExit) as stop:
            call()
        assert stop.value.code == 2 and words in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop, refused_before_stages():
        raise renamed(ConfigError("max_steps", "is 0.", "set it."), "--steps")
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("pipeline.py: error: config `--steps`: is 0. Fix: set "
                                       "it.\n")


def test_a_long_context_stage_is_read_against_the_model_it_will_start_from(tmp_path):
    """The ``long_context`` block is read as the recipe reads it, against the checkpoint's
    config.json, or (``source_config``) the one an earlier stage's export will have."""
    import json

    from tiny_setup import write_tiny_model_dir

    model = write_tiny_model_dir(tmp_path / "model")
    data = ["dataset.sources.long.data_files=/x", "dataset.sources.short.data_files=/x",
            "validation_dataset.data_dir=/x", "max_steps=2"]
    with pytest.raises(ConfigError) as refused:
        check_stage_config("stage1", TINY / "long_context.yaml",
                           [f"checkpointer.checkpoint_dir={model}", *data,
                            "long_context.attention=foo"], recipe="long_context")
    assert refused.value.key == "stage1:long_context.attention"
    # 1024 tokens at the source's own θ, beyond its 512 positions: refused; the folder the
    # stage starts from does not exist yet, so the check reads `source_config`
    later = [f"checkpointer.checkpoint_dir={tmp_path / 'not_yet'}", *data,
             "long_context.max_seq_len=1024", "long_context.rope_base=40000.0",
             "long_context.trained_length=null"]
    source = {**json.loads((model / "config.json").read_text()), "rope_theta": 40000.0}
    source.pop("rope_parameters", None)
    with pytest.raises(ConfigError) as refused:
        check_stage_config("stage2", TINY / "long_context.yaml", later, recipe="long_context",
                           source_config=source)
    assert refused.value.key == "stage2:long_context.rope_base"
    check_stage_config("stage2", TINY / "long_context.yaml", later, recipe="long_context")


def test_a_refused_key_the_pipeline_set_from_a_flag_names_the_flag():
    """`max_steps` set from `--train-steps` is refused naming the flag, unless the stage's own
    `--set` sets it (then `<stage>:max_steps` is what the user wrote)."""
    flags = flag_keys({"max_steps": "--train-steps", "tasks": "--eval-tasks"}, ["tasks=[x]"])
    assert flags == {"max_steps": "--train-steps"}
    assert flag_keys({"max_steps": "--train-steps"}, ["~max_steps"]) == {}
    with pytest.raises(ConfigError) as refused:
        check_stage_config("train", TINY / "continued_pretrain.yaml", ["max_steps=0"],
                           recipe="continued_pretrain", flags=flags)
    assert refused.value.key == "--train-steps"
    with pytest.raises(ConfigError) as refused:
        check_stage_config("train", TINY / "continued_pretrain.yaml", ["max_steps=0"],
                           recipe="continued_pretrain", flags={})
    assert refused.value.key == "train:max_steps"


@pytest.mark.parametrize("pipeline", ["sheared_llama", "prolong", "qurating"])
@pytest.mark.parametrize("where", ["file", "under_file"])
def test_every_pipeline_refuses_an_output_dir_that_is_or_sits_under_a_file(tmp_path, pipeline,
                                                                          where):
    """The QuRating pipeline's judge stage died with NotADirectoryError and the ProLong one
    named its evaluation stage's key; each now names `--output-dir` before any stage runs, and
    the file is left as it was."""
    import subprocess

    blocker = tmp_path / "blocker"
    blocker.write_text("keep me\n")
    target = blocker if where == "file" else blocker / "sub"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "recipes" / pipeline / "pipeline.py"),
                           "--output-dir", str(target)], capture_output=True, text=True,
                          timeout=300, check=False, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: config `--output-dir`:" in done.stderr and "Traceback" not in done.stderr
    assert blocker.read_text() == "keep me\n"
