"""Running a recipe inside the test process, as ``tune run`` would, on one torch thread: the
in-process counterpart of :func:`tiny_setup.run_tune_subprocess`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

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


def load_script(path: Path, name: str) -> ModuleType:
    """A script that is not part of a package (a pipeline, a benchmark), loaded afresh as the
    module ``name``: each caller gets its own copy to patch. The module is in ``sys.modules``
    only while it executes (dataclasses look their module up then)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


@dataclass(frozen=True)
class FirstStage:
    """How a pipeline's ``main`` ended with its stages replaced by a stop: ``outcome`` is the
    ``stage=`` name of the first stage it started (or that stage's recipe when it has no name),
    or ``exit <code>`` when it exited before any; ``recipe`` and ``overrides`` are what that
    ``tune_run`` was given (``None`` and ``()`` for a refusal or a plain command)."""

    outcome: str
    recipe: str | None = None
    overrides: tuple[str, ...] = ()


def run_until_first_stage(pipeline: ModuleType, argv: Sequence[str]) -> FirstStage:
    """``pipeline.main(argv)`` in this process up to the first stage it starts: the up-front
    checks run for real, the stage does not (``tune_run`` and ``run_stage`` are replaced for
    the call, then put back). A stage started after a non-zero exit fails the test."""
    started: list[FirstStage] = []

    def start_recipe(recipe, config, overrides=(), nproc=1, *, stage=None):
        started.append(FirstStage(stage or recipe, recipe, tuple(overrides)))
        raise SystemExit(0)

    def start_command(command, *, stage):
        started.append(FirstStage(stage))
        raise SystemExit(0)

    replaced = {name: getattr(pipeline, name) for name in ("tune_run", "run_stage")
                if hasattr(pipeline, name)}
    pipeline.tune_run = start_recipe
    if "run_stage" in replaced:
        pipeline.run_stage = start_command
    try:
        with pytest.raises(SystemExit) as stop:
            pipeline.main(list(argv))
    finally:
        for name, original in replaced.items():
            setattr(pipeline, name, original)
    if stop.value.code:
        assert not started, f"exit {stop.value.code} after starting {started[0].outcome}"
        return FirstStage(f"exit {stop.value.code}")
    assert started, "main returned without starting a stage"
    return started[0]
