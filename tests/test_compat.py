"""The torchtune internals we call, reached through acadlm_plugins._compat only, with an error
that names the helper and the torchtune version when one is missing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torchtune.config._utils as torchtune_config_utils
from omegaconf import OmegaConf

from acadlm_plugins import _compat
from acadlm_plugins._compat import (
    TORCHTUNE_VERSION,
    ComponentPathError,
    TorchtuneInternalMissing,
    component_from_path,
    merge_yaml_and_cli_args,
)

PACKAGE = Path(_compat.__file__).parent
# An import from torchtune's private config modules, or a call of their helpers.
PRIVATE_USE = re.compile(r"torchtune\.config\._(utils|errors)\b|"
                         r"\b(_merge_yaml_and_cli_args|_get_component_from_path)\(")


def test_private_torchtune_helpers_are_named_in_compat_only():
    users = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                   if path.name != "_compat.py"
                   and PRIVATE_USE.search(path.read_text()))
    assert users == []


def test_a_missing_helper_names_itself_the_version_and_the_fix(monkeypatch, tmp_path):
    from acadlm_plugins.planning.loading import load_config

    config = tmp_path / "c.yaml"
    config.write_text("a: 1\n")
    monkeypatch.delattr(torchtune_config_utils, "_merge_yaml_and_cli_args")
    with pytest.raises(TorchtuneInternalMissing) as missing:
        load_config(config, ["a=2"])
    message = str(missing.value)
    assert "torchtune.config._utils._merge_yaml_and_cli_args" in message
    assert f"torchtune {TORCHTUNE_VERSION}" in message
    assert f"pip install torchtune=={TORCHTUNE_VERSION}" in message
    assert isinstance(missing.value, ImportError)


def test_overrides_merge_as_tune_run_merges_them():
    values = {"a": 1, "b": {"_component_": "pkg.x", "c": 3}, "d": "${a}"}
    merged = merge_yaml_and_cli_args(values, ["b=pkg.y", "b.c=4", "~a", "e=5"])
    assert OmegaConf.to_container(merged) == {"b": {"_component_": "pkg.y", "c": 4},
                                              "d": "${a}", "e": 5}


def test_a_component_path_resolves_or_says_why_not():
    assert component_from_path("acadlm_plugins.models.decoder_from_hf_config").__name__ == (
        "decoder_from_hf_config")
    with pytest.raises(ComponentPathError) as bad:
        component_from_path("acadlm_plugins.no_such_module.builder")
    assert bad.value.component == "acadlm_plugins.no_such_module.builder"
    assert "No module named 'acadlm_plugins.no_such_module'" in bad.value.reason
