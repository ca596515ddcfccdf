"""A typed config value is read once, by one helper, and a wrong one names its key."""

import pytest

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.training.config_checks import config_value


def test_strings_from_command_line_overrides_are_converted():
    assert config_value("3e-4", "lr", float) == 3e-4
    assert config_value("12", "seed", int) == 12
    assert config_value(4.0, "steps", int) == 4
    assert config_value("False", "top_k", bool) is False
    assert config_value(None, "tau", float, allow_none=True) is None


@pytest.mark.parametrize("value, key, kind", [
    ("abc", "seed", int), ("maybe", "top_k", bool), (1.5, "max_steps", int),
    (True, "max_steps", int), (None, "lr", float), ("nan", "tau", float), ([1], "lr", float)])
def test_a_wrong_value_names_its_key(value, key, kind):
    with pytest.raises(ConfigError, match=f"config `{key}`"):
        config_value(value, key, kind)


def test_bounds_are_checked():
    assert config_value(0.0, "clip_grad_norm", float, minimum=0) == 0.0
    with pytest.raises(ConfigError, match="below its minimum"):
        config_value(-1.0, "clip_grad_norm", float, minimum=0)
    with pytest.raises(ConfigError, match="above 0"):
        config_value(0, "tau", float, above=0)
