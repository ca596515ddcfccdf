"""How the training recipe and the planner hand the config's ``plugins:`` to the plugin manager,
and that ``ACADLM_PLUGINS_TRACE=1`` shows every hook of a run, ``acadlm_configure`` included."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from recipe_runs import run_recipe_main, torch_threads
from tiny_setup import tiny_run_args

from acadlm_plugins.plugin_manager import TRACE_ENV, list_plugins

CONTINUED = "acadlm_plugins.continued_pretrain_recipe"
EXAMPLE_PLUGIN_DIR = Path(__file__).parent / "example_plugin"
Z_LOSS = "acadlm_example_plugin:ZLossPlugin"


@pytest.fixture(autouse=True)
def quiet_isolated_runs(monkeypatch):
    monkeypatch.setenv("ACADLM_NO_PROGRESS", "1")
    monkeypatch.setenv("ACADLM_PLUGINS_DISABLE_AUTOLOAD", "1")
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN_DIR))


@pytest.fixture
def unrouted_package_logs() -> Iterator[logging.Logger]:
    """The ``acadlm_plugins`` logger as a fresh process has it (no handler, no level), so the
    recipe's own ``route_package_logs`` decides what reaches stderr; restored afterwards."""
    logger = logging.getLogger("acadlm_plugins")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)  # setLevel also clears the loggers' level caches
    logger.propagate = True
    try:
        yield logger
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


def test_trace_shows_every_hook_in_order_configure_first(tmp_path, monkeypatch, capsys,
                                                         unrouted_package_logs):
    monkeypatch.setenv(TRACE_ENV, "1")
    with torch_threads():
        run_recipe_main(monkeypatch, CONTINUED,
                        tiny_run_args(tmp_path, "max_steps=1", "save_every_n_steps=1"))
    calls = re.findall(r"plugin_manager: +(acadlm_\w+) \[hook\]", capsys.readouterr().err)
    assert calls[:6] == ["acadlm_configure", "acadlm_prepare_model", "acadlm_model_built",
                         "acadlm_data_ready", "acadlm_optimizer_param_groups",
                         "acadlm_evaluation_end"]  # step 0, before the first step
    assert calls[-4:] == ["acadlm_state_dict", "acadlm_checkpoint_saved",
                          "acadlm_model_exported", "acadlm_run_end"]


def test_recipe_takes_a_bare_string_plugins_entry_as_one_plugin(tmp_path, monkeypatch):
    """`plugins: pkg.mod:Plugin` without list brackets: one plugin, not one per letter."""
    args = tiny_run_args(tmp_path, "max_steps=1", "save_every_n_steps=1", f"plugins={Z_LOSS}")
    with torch_threads():
        out = run_recipe_main(monkeypatch, CONTINUED, args)
    log = "".join(path.read_text() for path in (out / "logs").glob("*.txt"))
    assert "loss/z_loss:" in log


def test_planner_takes_a_bare_string_plugins_entry_as_one_plugin():
    from acadlm_plugins.planning.checks import configure_plugins

    pm = configure_plugins(OmegaConf.create({"plugins": Z_LOSS}), "continued_pretrain")
    assert Z_LOSS in list_plugins(pm)
