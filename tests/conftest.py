"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def clean_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test without the user's ACADLM_PLUGINS_* switches (allow-list, trace, ...)."""
    for name in list(os.environ):
        if name.startswith("ACADLM_PLUGINS_"):
            monkeypatch.delenv(name)


@pytest.fixture
def tmp_acadlm_home(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """Point ACADLM_HOME at an empty temporary directory and return it."""
    home = tmp_path / "acadlm_home"
    home.mkdir()
    monkeypatch.setenv("ACADLM_HOME", str(home))
    return home
