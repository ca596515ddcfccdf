"""Rotary position embeddings (RoPE) as a Hugging Face config states them and as torchtune
builds them, in both directions.

A config states θ (``rope_theta``) and, optionally, a frequency rescaling: older configs in a
``rope_scaling`` block, transformers >= 5 in ``rope_parameters`` (which also holds θ). We read
both the way transformers does (``rope_scaling`` first, θ inside the block before the top-level
``rope_theta``, but a top-level ``original_max_position_embeddings`` before the block's) into
one :class:`RopeSettings`, build the torchtune module of a family's layout from it, read it
back from a built module, and write it into a config again (every place transformers may read
a value from, so the file states one RoPE).

Two scalings exist in the families we support: none (``default``) and Llama 3.1's ``llama3``
(Meta's frequency-dependent scaling: wavelengths above ``original_max_position_embeddings /
low_freq_factor`` are divided by ``factor``, below ``original / high_freq_factor`` kept, a smooth
blend between), which is torchtune's ``Llama3ScaledRoPE``. Every other ``rope_type`` (linear,
dynamic, yarn, longrope, ...) has no torchtune 0.6.1 module and is refused by the family layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from torch import nn
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import RotaryPositionalEmbeddings

DEFAULT_THETA = 10_000.0
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# The key transformers also reads at the top level of config.json, before the RoPE block's.
TOP_LEVEL_ORIGINAL = "original_max_position_embeddings"
# torchtune's two ways of pairing a head's channels for rotation: (0, 1), (2, 3), ... in Meta's
# Llama code ("interleaved"; HF Llama/Mistral q/k weights are permuted into it on load), and
# (i, i + head_dim / 2) in HF's rotate_half ("half"; Qwen2, whose weights load unpermuted).
INTERLEAVED, HALF = "interleaved", "half"


@dataclass(frozen=True)
class RopeSettings:
    """θ and the scaling of a RoPE (the defaults of the scaling fields are Llama 3.1's)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @property
    def scaled(self) -> bool:
        """Whether any frequency is rescaled (``llama3`` with factor 1 changes none)."""
        return self.rope_type != "default" and self.factor != 1

    def computed(self) -> RopeSettings:
        """The settings that matter to the rotation: an unscaled RoPE is θ alone (a ``llama3``
        block with factor 1 rotates exactly as plain RoPE)."""
        return self if self.scaled else RopeSettings(theta=self.theta)

    def with_theta(self, theta: float) -> RopeSettings:
        """The same scaling around another θ (a long-context stage's new base)."""
        return replace(self, theta=float(theta))

    def describe(self) -> str:
        if not self.scaled:
            return f"θ {self.theta:g}, no scaling"
        return (f"θ {self.theta:g}, {self.rope_type} scaling (factor {self.factor:g}, "
                f"low_freq_factor {self.low_freq_factor:g}, high_freq_factor "
                f"{self.high_freq_factor:g}, original_max_position_embeddings "
                f"{self.original_max_position_embeddings})")


def rope_block(config: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The config's RoPE block and its key: ``rope_scaling`` if set, else ``rope_parameters``
    (transformers gives ``rope_scaling`` priority when both are present)."""
    for key in ("rope_scaling", "rope_parameters"):
        block = config.get(key)
        if isinstance(block, dict) and block:
            return block, key
    return {}, "rope_scaling"


def rope_type_field(config: Mapping[str, Any]) -> tuple[str, str]:
    """The config's ``rope_type`` and the dotted field that states it (for error messages)."""
    block, key = rope_block(config)
    if "rope_type" in block:
        return str(block["rope_type"]), f"{key}.rope_type"
    if "type" in block:
        return str(block["type"]), f"{key}.type"
    return "default", f"{key}.rope_type"


def config_theta(config: Mapping[str, Any]) -> float:
    """θ: inside the RoPE block if there, else the top-level ``rope_theta``, else 10000."""
    block, _ = rope_block(config)
    return float(block.get("rope_theta") or config.get("rope_theta") or DEFAULT_THETA)


def original_length_field(config: Mapping[str, Any]) -> tuple[Any, str]:
    """The pretraining length a ``llama3`` scaling is stated against, and the dotted field it
    comes from, picked as transformers picks it (``standardize_rope_params``): a top-level
    ``original_max_position_embeddings`` wins over the RoPE block's (transformers' exception
    for Phi-3-style configs, applied to every llama3/yarn/longrope config), the block's over
    ``max_position_embeddings``. The value is as the file has it (possibly null: unchecked)."""
    block, key = rope_block(config)
    if TOP_LEVEL_ORIGINAL in config:
        return config[TOP_LEVEL_ORIGINAL], TOP_LEVEL_ORIGINAL
    if TOP_LEVEL_ORIGINAL in block:
        return block[TOP_LEVEL_ORIGINAL], f"{key}.{TOP_LEVEL_ORIGINAL}"
    return config.get("max_position_embeddings"), "max_position_embeddings"


def rope_settings_from_config(config: Mapping[str, Any]) -> RopeSettings:
    """Read a config's RoPE. The caller has checked that its ``rope_type`` is one it supports
    (``default`` or ``llama3``); a ``llama3`` block lacking a value raises ``KeyError`` with
    the missing field, as transformers' own validation would. The original length is read
    from where transformers reads it (:func:`original_length_field`): reading the block's
    while transformers uses a conflicting top-level value would compute another model."""
    rope_type, _ = rope_type_field(config)
    theta = config_theta(config)
    if rope_type != "llama3":
        return RopeSettings(theta=theta)
    block, key = rope_block(config)
    original, original_field = original_length_field(config)
    missing = [f"{key}.{name}" for name in LLAMA3_KEYS[:3] if name not in block]
    if original is None and original_field != TOP_LEVEL_ORIGINAL:
        original_field = f"{key}.{TOP_LEVEL_ORIGINAL}"  # the block is where it belongs
    if missing or original is None:
        raise KeyError((missing or [original_field])[0])
    return RopeSettings(theta=theta, rope_type="llama3", factor=float(block["factor"]),
                        low_freq_factor=float(block["low_freq_factor"]),
                        high_freq_factor=float(block["high_freq_factor"]),
                        original_max_position_embeddings=int(original))


def rope_module(settings: RopeSettings, *, layout: str, head_dim: int,
                max_seq_len: int) -> nn.Module:
    """The torchtune RoPE module of ``settings`` for a family's channel ``layout``."""
    if layout == HALF:
        if settings.scaled:
            raise ValueError("torchtune 0.6.1's Qwen2 RoPE has no frequency scaling.")
        return Qwen2RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len,
                                               base=settings.theta)
    if settings.scaled:
        return Llama3ScaledRoPE(dim=head_dim, max_seq_len=max_seq_len, base=settings.theta,
                                scale_factor=settings.factor,
                                low_freq_factor=settings.low_freq_factor,
                                high_freq_factor=settings.high_freq_factor,
                                old_context_len=settings.original_max_position_embeddings)
    return RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=settings.theta)


def rope_layout_of(module: nn.Module) -> str:
    """Which channel pairing a torchtune RoPE module rotates (see ``INTERLEAVED``/``HALF``)."""
    if isinstance(module, Qwen2RotaryPositionalEmbeddings):
        return HALF
    if isinstance(module, (RotaryPositionalEmbeddings, Llama3ScaledRoPE)):
        return INTERLEAVED
    raise ValueError(f"unknown RoPE module {type(module).__name__}: acadlm knows torchtune's "
                     "RotaryPositionalEmbeddings, Llama3ScaledRoPE and "
                     "Qwen2RotaryPositionalEmbeddings.")


def find_rope_module(model: nn.Module) -> nn.Module | None:
    """The first torchtune RoPE module inside ``model`` (torchtune's builders share one module
    across layers), or None for a model built from other modules."""
    rope_types = (RotaryPositionalEmbeddings, Llama3ScaledRoPE, Qwen2RotaryPositionalEmbeddings)
    return next((m for m in model.modules() if isinstance(m, rope_types)), None)


def rope_settings_of(module: nn.Module) -> RopeSettings:
    """The settings a built torchtune RoPE module computes with (a ``Llama3ScaledRoPE`` at
    factor 1, as torchtune's ``llama3_2(scale_factor=1)`` builds, is plain RoPE)."""
    rope_layout_of(module)  # refuses unknown modules
    theta = float(module.base)
    if isinstance(module, Llama3ScaledRoPE) and module.scale_factor != 1:
        return RopeSettings(theta=theta, rope_type="llama3", factor=float(module.scale_factor),
                            low_freq_factor=float(module.low_freq_factor),
                            high_freq_factor=float(module.high_freq_factor),
                            original_max_position_embeddings=int(module.old_context_len))
    return RopeSettings(theta=theta)


def write_rope_settings(config: dict[str, Any], settings: RopeSettings) -> None:
    """State ``settings`` in ``config`` in the config's own style: a ``rope_parameters`` block
    (transformers >= 5) stays one, otherwise ``rope_theta`` plus ``rope_scaling`` (null, or
    absent as before, when nothing is scaled). A top-level ``original_max_position_embeddings``
    that the config already has is set to the scaling's too: transformers reads it before the
    block's, so leaving it stale would make transformers compute another RoPE than the block
    (and the model) states."""
    scaling: dict[str, Any] = {}
    if settings.scaled:
        scaling = {"rope_type": settings.rope_type, "factor": settings.factor,
                   "low_freq_factor": settings.low_freq_factor,
                   "high_freq_factor": settings.high_freq_factor,
                   "original_max_position_embeddings": settings.original_max_position_embeddings}
        if TOP_LEVEL_ORIGINAL in config:
            config[TOP_LEVEL_ORIGINAL] = settings.original_max_position_embeddings
    if isinstance(config.get("rope_parameters"), dict) and not config.get("rope_scaling"):
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": settings.theta,
                                     **scaling}
        config.pop("rope_scaling", None)
        if "rope_theta" in config:
            config["rope_theta"] = settings.theta
        return
    config["rope_theta"] = settings.theta
    if scaling or "rope_scaling" in config:
        config["rope_scaling"] = scaling or None
    if isinstance(config.get("rope_parameters"), dict):  # both blocks: no stale θ left behind
        config["rope_parameters"]["rope_theta"] = settings.theta


def format_theta(theta: float) -> str:
    """A RoPE base as people write it: ``500,000`` and ``1,000,000``, not ``1e+06``."""
    value = float(theta)
    return f"{value:,.0f}" if value.is_integer() else f"{value:g}"
