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


def _builder(size: int, eps: float = 1e-5, flag: bool = True, name: str | None = None,
             anything=None, items: list | None = None) -> None:
    """A component builder whose parameters carry plain scalar annotations (and two that do
    not), for the type check of ``_component_`` blocks."""


class _Built:
    """A component built from a class: its ``__init__`` parameters are the block's keys
    (get_type_hints of a class reads its attributes, so classes went unchecked at first)."""

    def __init__(self, chunks: int, fused: bool | None = None) -> None:
        self.chunks, self.fused = chunks, fused


@pytest.mark.parametrize(("builder", "values", "refused"), [
    (_builder, {"size": 4, "eps": 1, "flag": False, "name": None}, None),  # int for float; null
    (_builder, {"size": "4"}, "size"),                             # quoted: a string
    (_builder, {"size": 4.5}, "size"),
    (_builder, {"size": 4.0}, None),                               # YAML's 1.0e6 for an int
    (_builder, {"size": True}, "size"),                            # a bool is no int here
    (_builder, {"eps": "small"}, "eps"),
    (_builder, {"flag": "false"}, "flag"),                         # quoted false reads as true
    (_builder, {"name": 3}, "name"),
    (_builder, {"anything": "x", "items": [1, 2]}, None),          # unannotated / containers
    (_Built, {"chunks": 8, "fused": None}, None),
    (_Built, {"chunks": "eight"}, "chunks"),
    (_Built, {"chunks": 8, "fused": "no"}, "fused"),
])
def test_component_scalars_are_checked_against_the_builders_annotations(builder, values,
                                                                        refused):
    from omegaconf import OmegaConf

    from acadlm_plugins.training.components import check_scalar_argument_types

    node = OmegaConf.create({"_component_": f"{__name__}.{builder.__name__}", **values})
    if refused is None:
        check_scalar_argument_types(builder, node, key="block")
        return
    with pytest.raises(ConfigError) as err:
        check_scalar_argument_types(builder, node, key="block")
    assert err.value.key == f"block.{refused}" and "takes" in str(err.value)
