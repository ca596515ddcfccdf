"""The ``tune run`` command line is read before a recipe starts: a config file or override
torchtune cannot read, or a ``${...}`` that resolves to nothing, is one error naming the
argument and the fix (exit code 2), not a traceback from inside torchtune or OmegaConf, and not
a failure after the model has loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_recipe_errors import tune_run
from tiny_setup import REPO_ROOT

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.planning.loading import load_config, merge_overrides
from acadlm_plugins.training.command_line import check_command_line

CONFIG = REPO_ROOT / "configs" / "tiny" / "prune.yaml"
SHIPPED = sorted((REPO_ROOT / "configs").rglob("*.yaml")) + sorted(
    (REPO_ROOT / "recipes").rglob("*.yaml"))


def refusal(*argv: str) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        check_command_line(["--config", str(CONFIG), *argv])
    return err.value


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_shipped_config_passes_the_check(config: Path):
    check_command_line(["--config", str(config)])


@pytest.mark.parametrize("override, key, problem, fix", [
    ("pruning=[1,2]", "pruning", "is a mapping in the config", "`~pruning pruning=[1,2]`"),
    ("dynamic_batch_loading=[1]", "dynamic_batch_loading", "is a mapping in the config",
     "`dynamic_batch_loading.<name>=...`"),
    ("~prunning", "prunning", "is not in the config", "did you mean `~pruning`?"),
    ("~pruning.nope", "pruning.nope", "is not in the config", "target"),
    ("~model._component_", "model", "holds a `_component_`",
     "set `model=<dotted.path>`"),
    ("~checkpointer", "checkpointer", "holds a `_component_`", "edit a copy of the YAML"),
    ("checkpointer.checkpoint_files.0=b.safetensors", "checkpointer.checkpoint_files.0",
     "inside `checkpointer.checkpoint_files`, a list", "`checkpointer.checkpoint_files=[...]`"),
    ("checkpointer.checkpoint_files={a: 1}", "checkpointer.checkpoint_files", "is a list",
     "`checkpointer.checkpoint_files=[...]`"),
    ("foo=${oc.env:ACADLM_TEST_UNSET_VARIABLE}", "foo", "cannot be resolved",
     "`${oc.env:NAME,default}`"),
    ("output_dir=a=b", "output_dir=a=b", "more than one `=`", "YAML file"),
    ("max_steps", "max_steps", "is not a `key=value` override", "`key=value`"),
    ("seed=[1,", "seed", "is not valid YAML", "quote it"),
    ("optimizer.lr=${nope}", "optimizer.lr", "`${nope}`, which cannot be resolved",
     "`optimizer.lr=<value>`"),
    ("output_dir=${nothing_here:}", "output_dir", "cannot be resolved", "`output_dir=<value>`"),
    ("--max_steps", "--max_steps", "not an option a recipe takes", "before the recipe"),
])
def test_an_override_torchtune_cannot_apply_names_itself_and_the_fix(
        override: str, key: str, problem: str, fix: str):
    err = refusal("output_dir=/tmp/unused", override)
    assert err.key == key and problem in err.problem and fix in err.fix, str(err)


def test_a_nested_component_block_is_mended_by_its_entries_or_its_builder():
    """torchtune rewrites `block=path` to `block._component_=path` for top-level blocks only;
    a nested one (the teacher's model) given a list is refused, and the fix is not `~block`,
    which torchtune refuses for a component."""
    with pytest.raises(ConfigError) as err:
        check_command_line(["--config", str(REPO_ROOT / "configs/smollm2/135M_to_85M_prune.yaml"),
                            "distillation.teacher.model=[1]"])
    assert err.value.key == "distillation.teacher.model"
    assert "is a component block" in err.value.problem and "~" not in err.value.fix


def test_the_first_bad_override_is_named_with_the_earlier_ones_applied():
    """`~pruning` then `pruning=[1,2]` is what the error advises, and is accepted; the bad
    one among good ones is the one named."""
    check_command_line(["--config", str(CONFIG), "~pruning", "pruning=[1,2]"])
    err = refusal("seed=3", "~pruning.target", "pruning.target=5",
                  "dynamic_batch_loading=[1]")
    assert err.key == "dynamic_batch_loading"


@pytest.mark.parametrize("text, problem", [
    ("a: [1,\n", "is not valid YAML (line 2)"),
    ("- 1\n- 2\n", "is a list"),
])
def test_a_config_file_that_is_no_yaml_mapping_is_named(tmp_path: Path, text: str,
                                                        problem: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="^config `--config`: ") as err:
        check_command_line(["--config", str(path)])
    assert problem in err.value.problem


def test_a_missing_config_file_or_folder_is_named(tmp_path: Path):
    for path, problem in ((tmp_path / "nope.yaml", "does not exist"), (tmp_path, "is a folder")):
        with pytest.raises(ConfigError) as err:
            check_command_line([f"--config={path}"])
        assert err.value.key == "--config" and problem in err.value.problem


def test_a_reference_to_an_unset_value_is_left_to_the_recipe():
    """`${output_dir}/x` with `output_dir: ???` is the recipe's to name (as `output_dir`)."""
    check_command_line(["--config", str(CONFIG), "output_dir=???",
                        "metric_logger.log_dir=${output_dir}/logs"])


def test_without_a_config_argument_torchtune_s_parser_answers():
    check_command_line([])
    check_command_line(["--help"])
    check_command_line(["seed=1", "--config"])  # no path: argparse's "expected one argument"


def test_merging_a_removal_leaves_the_given_values_as_they_were():
    """torchtune's merge deletes a `~a.b` removal from the nested dict it is given; the
    diagnosis merges again from the same values, so they must not be edited in place."""
    values = OmegaConf.to_container(OmegaConf.load(CONFIG), resolve=False)
    cfg = merge_overrides(values, ["~pruning.target", "pruning.target={num_layers: 1}"])
    assert dict(cfg.pruning.target) == {"num_layers": 1}
    assert values["pruning"]["target"]["num_layers"] == 1 and "num_heads" in values[
        "pruning"]["target"]


def test_an_empty_config_file_is_accepted_as_torchtune_accepts_it(tmp_path: Path):
    path = tmp_path / "empty.yaml"
    path.write_text("# only a comment\n")
    check_command_line(["--config", str(path), "seed=1"])
    assert load_config(path, ["seed=1"]).seed == 1


def test_a_reference_inside_a_list_is_mended_by_giving_the_whole_list(tmp_path: Path):
    path = tmp_path / "listed.yaml"
    path.write_text('files: ["${nope}", "x"]\n')
    with pytest.raises(ConfigError) as err:
        check_command_line(["--config", str(path)])
    assert err.value.key == "files.0" and "`files=[...]`" in err.value.fix


def test_tune_run_refuses_a_bad_override_in_one_line_before_anything_loads(tmp_path: Path):
    done = tune_run("prune", "tiny/prune.yaml", f"output_dir={tmp_path}", "pruning=[1,2]")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "error: config `pruning`: is a mapping in the config" in done.stderr
    assert not any(tmp_path.iterdir())
    missing = tune_run("prune", "tiny/nope.yaml", f"output_dir={tmp_path}")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr[-3000:]
    assert "nope.yaml does not exist" in missing.stderr
