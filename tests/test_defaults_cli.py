"""``acadlm-defaults``: the fix hints it prints name the folder the user pointed it at."""

from __future__ import annotations

import shlex

from acadlm_plugins.defaults.cli import main
from acadlm_plugins.defaults.paths import HOME_ENV_VAR


def test_verify_with_home_suggests_the_build_for_that_home(tmp_path, monkeypatch, capsys):
    """The hint used to be a bare `acadlm-defaults build`, which builds another folder."""
    monkeypatch.setenv(HOME_ENV_VAR, str(tmp_path / "elsewhere"))  # main() sets it; restored
    home = tmp_path / "my home"
    home.mkdir()
    assert main(["verify", "--home", str(home)]) == 1
    out = capsys.readouterr().out
    assert f"Fix: `acadlm-defaults build --home {shlex.quote(str(home.resolve()))}`" in out
    assert main(["info", "--home", str(home)]) == 0
    assert f"run `acadlm-defaults verify --home {shlex.quote(str(home.resolve()))}`" in \
        capsys.readouterr().out


def test_verify_without_home_suggests_the_plain_build(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(HOME_ENV_VAR, str(tmp_path))
    assert main(["verify"]) == 1
    assert "Fix: `acadlm-defaults build` rebuilds" in capsys.readouterr().out
