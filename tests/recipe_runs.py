"""Running a recipe inside the test process, as ``tune run`` would, on one torch thread: the
in-process counterpart of :func:`tiny_setup.run_tune_subprocess`."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch


def run_recipe_main(monkeypatch: pytest.MonkeyPatch, module: str, args: list[str]) -> Path:
    """Run ``<module>.recipe_main`` in this process as ``tune run <recipe> <args>`` would and
    return the run's ``output_dir`` (from ``args``); fails the test if the recipe exits
    non-zero. An error the recipe raises propagates, for ``pytest.raises``."""
    recipe_main = importlib.import_module(module).recipe_main
    monkeypatch.setattr(sys, "argv", [module.rsplit(".", 1)[-1], *args])
    with pytest.raises(SystemExit) as exited:  # torchtune's config.parse ends with sys.exit
        recipe_main()
    assert not exited.value.code
    return Path(next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")))


@contextmanager
def torch_threads(count: int = 1) -> Iterator[None]:
    """Run the block on ``count`` torch threads, then restore the previous number: with tiny
    matrices one thread is the fastest, and deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def setup_error(recipe_class, cfg):
    """The ConfigError that ``recipe_class(cfg).setup(cfg)`` raises (the test fails if there is
    none); the recipe is cleaned up either way."""
    from acadlm_plugins.errors import ConfigError

    recipe = recipe_class(cfg)
    try:
        with pytest.raises(ConfigError) as raised, torch_threads():
            recipe.setup(cfg)
    finally:
        recipe.cleanup()
    return raised.value
