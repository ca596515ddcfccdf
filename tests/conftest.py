"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys

import pytest


@pytest.fixture(autouse=True)
def clean_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test without the user's ACADLM_PLUGINS_* switches (allow-list, trace, ...),
    and with a command line of no options: the recipes' entry points check ``sys.argv`` as
    ``tune run`` passes it, and pytest's own options (``--durations=20``, ``-k ...``) are not
    a recipe's."""
    for name in list(os.environ):
        if name.startswith("ACADLM_PLUGINS_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


@pytest.fixture
def tmp_acadlm_home(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """Point ACADLM_HOME at an empty temporary directory and return it."""
    home = tmp_path / "acadlm_home"
    home.mkdir()
    monkeypatch.setenv("ACADLM_HOME", str(home))
    return home


@pytest.fixture
def relocated_acadlm_home(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """The built embedded default seen from another folder, as a user who sets ACADLM_HOME has it.

    The real default is located with the project's own path functions (the one source of truth),
    its ``models/`` and ``corpus/`` are symlinked into a fresh folder, ``ACADLM_HOME`` points
    there, and ``HOME`` points at an empty folder, so anything that still looks for the default
    under a literal home path finds nothing. Returns the new home.
    """
    from acadlm_plugins.defaults.paths import (
        default_corpus_dir,
        default_model_dir,
        require_default_corpus,
        require_default_model,
    )

    require_default_model()
    require_default_corpus()
    home = tmp_path / "elsewhere_home"
    (home / "models").mkdir(parents=True)
    real_model = default_model_dir()
    (home / "models" / real_model.name).symlink_to(real_model.resolve(), target_is_directory=True)
    (home / "corpus").symlink_to(default_corpus_dir().resolve(), target_is_directory=True)
    empty_user_home = tmp_path / "user_home"
    empty_user_home.mkdir()
    monkeypatch.setenv("ACADLM_HOME", str(home))
    monkeypatch.setenv("HOME", str(empty_user_home))
    assert default_model_dir() == home / "models" / real_model.name
    return home
