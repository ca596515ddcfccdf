"""`tune run <recipe>` with a user error: one line naming the key and the fix, exit code 2,
no traceback (``ACADLM_TRACEBACK=1`` brings it back); other errors keep their traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_setup import REPO_ROOT

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.training.runtime import run_main

TUNE = Path(sys.executable).with_name("tune")


def tune_run(recipe: str, config: str, *overrides: str, traceback: bool = False
             ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT)]),
           "ACADLM_PLUGINS_DISABLE_AUTOLOAD": "1", "ACADLM_TRACEBACK": "1" if traceback else "0"}
    return subprocess.run([str(TUNE), "run", f"acadlm_plugins/{recipe}_recipe", "--config",
                           str(REPO_ROOT / "configs" / config), *overrides],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.mark.parametrize("recipe, config", [
    ("continued_pretrain", "tiny/continued_pretrain.yaml"),
    ("prune", "tiny/prune.yaml"),
    ("rater", "tiny/qurating_rater.yaml"),
    ("judge", "tiny/qurating_judge.yaml"),
    ("annotate", "tiny/qurating_annotate.yaml"),
    ("eval", "smollm2/eval_long_context.yaml"),
])
def test_an_unknown_key_is_one_line_and_exit_code_2(tmp_path: Path, recipe: str, config: str):
    done = tune_run(recipe, config, f"output_dir={tmp_path}", "bogus_key=1")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"error: config `bogus_key`: is not a key the {recipe} recipe reads." in done.stderr


@pytest.mark.parametrize("seed, problem", [("-1", "below its minimum 0"),
                                           ("abc", "not an integer"),
                                           ("1.5", "not a whole number"),
                                           (str(2**32), "above its maximum")])
def test_a_seed_torchtune_cannot_take_is_named_before_anything_loads(tmp_path: Path, seed: str,
                                                                     problem: str):
    """torchtune's set_seed raised a TypeError/ValueError traceback mid-setup."""
    done = tune_run("continued_pretrain", "tiny/continued_pretrain.yaml",
                    f"output_dir={tmp_path}", f"seed={seed}")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "error: config `seed`:" in done.stderr and problem in done.stderr


def test_checked_seed_and_the_plan_refuse_what_set_seed_refuses():
    from omegaconf import OmegaConf

    from acadlm_plugins.planning.loop_recipes import check_loop_settings
    from acadlm_plugins.training.config_checks import checked_seed

    assert [checked_seed(v) for v in (None, 0, "7", 2**32 - 1)] == [None, 0, 7, 2**32 - 1]
    assert checked_seed(2**32 - 8, world_size=8) == 2**32 - 8  # rank r seeds with seed + r
    with pytest.raises(ConfigError, match="above its maximum 4294967288 for 8 processes"):
        checked_seed(2**32 - 7, world_size=8)
    cfg = OmegaConf.load(REPO_ROOT / "configs" / "tiny" / "continued_pretrain.yaml")
    cfg.seed = -1
    with pytest.raises(ConfigError) as err:
        check_loop_settings(cfg, "continued_pretrain")
    assert err.value.key == "seed"


def test_an_unset_mandatory_value_is_named_and_the_traceback_comes_back_on_request(
        tmp_path: Path):
    """tiny/long_context.yaml leaves `checkpointer.checkpoint_dir: ???` for the user."""
    done = tune_run("long_context", "tiny/long_context.yaml", f"output_dir={tmp_path}")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert ("error: config `checkpointer.checkpoint_dir`: is `???` in the config" in done.stderr
            and "add `checkpointer.checkpoint_dir=<value>`" in done.stderr)
    shown = tune_run("long_context", "tiny/long_context.yaml", f"output_dir={tmp_path}",
                     traceback=True)
    assert shown.returncode != 0 and "Traceback" in shown.stderr


def test_run_main_returns_2_for_our_errors_and_keeps_other_errors(
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("ACADLM_TRACEBACK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    def refuses() -> None:
        raise ConfigError("max_steps", "is 0.", "set it to 1 or more.")

    def crashes() -> None:
        raise RuntimeError("a bug")

    assert run_main(refuses) == 2
    assert "error (rank 1): config `max_steps`: is 0. Fix: set it to 1 or more." in (
        capsys.readouterr().err)
    assert run_main(lambda: None) == 0
    with pytest.raises(RuntimeError, match="a bug"):
        run_main(crashes)
    monkeypatch.setenv("ACADLM_TRACEBACK", "1")
    with pytest.raises(ConfigError):
        run_main(refuses)


def test_an_error_of_ours_that_reports_a_bug_keeps_its_traceback(monkeypatch):
    """A materialized model that differs from the masked one is a slicing bug, not a user
    error: its traceback is what a bug report needs."""
    from acadlm_plugins.prune_recipe import MaterializationError

    monkeypatch.delenv("ACADLM_TRACEBACK", raising=False)

    def slicing_bug() -> None:
        raise MaterializationError("masked vs materialized loss differ by 0.4")

    with pytest.raises(MaterializationError):
        run_main(slicing_bug)
