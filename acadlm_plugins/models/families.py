"""Model families: the one place that knows how a Hugging Face model folder maps to torchtune.

Every caller goes from an HF folder through :func:`hf_model_spec`, which reads ``config.json``,
refuses what acadlm cannot reproduce exactly (with a :class:`~acadlm_plugins.errors.ConfigError`
naming the config field and the supported families), and answers the rest:

* ``spec.build(max_seq_len, rope_base)``: the torchtune decoder (random weights), built from
  the torchtune modules of the family's builder (:mod:`acadlm_plugins.models.decoder`);
* ``spec.checkpointer_model_type``: the ``model_type`` torchtune's ``FullModelHFCheckpointer``
  must be given, since it picks the weight conversion (Llama/Mistral q/k are permuted into
  torchtune's interleaved RoPE layout, Qwen2's are not and carry biases);
* ``spec.hf_state_dict`` and ``spec.pruned_config``: the export converter and the config.json of
  a pruned shape of the same family (per-layer lists cut to the kept layers, RoPE as built).

Supported: ``llama`` (Llama 2, Llama 3/3.1/3.2 with ``llama3`` RoPE scaling, SmolLM2),
``mistral`` (full attention) and ``qwen2`` (Qwen2/2.5). See docs/models.md.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import pickle
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torchtune import training
from torchtune.models import convert_weights
from torchtune.models.llama3_1._component_builders import llama3_mlp
from torchtune.models.mistral._component_builders import mistral_mlp
from torchtune.models.qwen2._component_builders import qwen2_mlp
from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf
from torchtune.modules import FeedForward, TransformerDecoder

from acadlm_plugins._compat import complete_checkpointer_config, hf_checkpoint_files
from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.models.decoder import decoder
from acadlm_plugins.models.rope import (
    HALF,
    INTERLEAVED,
    LLAMA3_KEYS,
    TOP_LEVEL_ORIGINAL,
    RopeSettings,
    find_rope_module,
    original_length_field,
    rope_block,
    rope_layout_of,
    rope_module,
    rope_settings_from_config,
    rope_settings_of,
    rope_type_field,
    write_rope_settings,
)

if TYPE_CHECKING:  # pruning.architecture imports this module
    from acadlm_plugins.pruning.architecture import Architecture

# torchtune ModelTypes whose FullModelHFCheckpointer conversion is the plain Llama one (q/k
# permuted, no biases): interchangeable for Llama and Mistral checkpoints.
_LLAMA_CONVERSION = ("LLAMA3_2", "LLAMA3", "LLAMA2", "MISTRAL")
# Config lists with one entry per layer; a pruned config keeps the kept layers' entries.
PER_LAYER_KEYS = ("layer_types",)
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size",
             "num_experts_per_tok")


@dataclass(frozen=True)
class ModelFamily:
    """What distinguishes one supported architecture from another, in torchtune terms."""

    name: str                          # config.json `model_type`
    covers: str                        # the released models it covers
    torchtune_builder: str             # the torchtune builder whose layers it reproduces
    checkpointer_model_type: str       # FullModelHFCheckpointer(model_type=...)
    compatible_model_types: tuple[str, ...]
    attention_bias: bool               # q/k/v biases
    rope_layout: str                   # rope.INTERLEAVED or rope.HALF
    rope_types: tuple[str, ...]        # accepted `rope_scaling.rope_type` values
    mlp: Callable[..., FeedForward]
    tune_to_hf: Callable[..., dict[str, torch.Tensor]]


FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (
    ModelFamily("llama", "Llama 2, Llama 3/3.1/3.2 incl. llama3 RoPE scaling, SmolLM2",
                "torchtune.models.llama3_2.llama3_2", "LLAMA3_2", _LLAMA_CONVERSION,
                attention_bias=False, rope_layout=INTERLEAVED, rope_types=("default", "llama3"),
                mlp=llama3_mlp, tune_to_hf=convert_weights.tune_to_hf),
    ModelFamily("mistral", "Mistral 7B v0.2/v0.3 and Nemo-shaped models, full attention",
                "torchtune.models.mistral.mistral", "MISTRAL", _LLAMA_CONVERSION,
                attention_bias=False, rope_layout=INTERLEAVED, rope_types=("default",),
                mlp=mistral_mlp, tune_to_hf=convert_weights.tune_to_hf),
    ModelFamily("qwen2", "Qwen2, Qwen2.5 (q/k/v biases)", "torchtune.models.qwen2.qwen2",
                "QWEN2", ("QWEN2",), attention_bias=True, rope_layout=HALF,
                rope_types=("default",), mlp=qwen2_mlp, tune_to_hf=qwen2_tune_to_hf),
)}
SUPPORTED_FAMILIES = "; ".join(f"{f.name} ({f.covers})" for f in FAMILIES.values())

_MOE_REASON = ("mixture-of-experts layers: acadlm's masks, materialization and export know one "
               "dense MLP per layer")
_GEMMA_REASON = ("Gemma's scaled embeddings, (1 + w) RMSNorm and GELU MLP (Gemma 2/3 add logit "
                 "soft-capping and sliding-window layers) are not the decoder acadlm builds")
REFUSED_MODEL_TYPES = {
    "qwen3": "Qwen3 normalizes q and k per head (RMSNorm) before RoPE; torchtune 0.6.1 has no "
             "Qwen3 builder and its MultiHeadAttention applies q_norm/k_norm after RoPE, so no "
             "torchtune 0.6.1 model computes Qwen3",
    "qwen3_moe": _MOE_REASON, "qwen2_moe": _MOE_REASON, "mixtral": _MOE_REASON,
    "deepseek_v2": _MOE_REASON, "deepseek_v3": _MOE_REASON, "olmoe": _MOE_REASON,
    "gemma": _GEMMA_REASON, "gemma2": _GEMMA_REASON, "gemma3": _GEMMA_REASON,
    "gemma3_text": _GEMMA_REASON,
    "phi3": "Phi-3's fused qkv/gate-up projections and su/longrope RoPE are not supported",
}


@dataclass(frozen=True)
class HFModelSpec:
    """An HF model folder's config, checked against :data:`FAMILIES`."""

    config_file: Path
    config: Mapping[str, Any]
    family: ModelFamily
    rope: RopeSettings

    # ------------------------------------------------------------------ dimensions
    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.config.get("num_key_value_heads") or self.num_heads)

    @property
    def embed_dim(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def intermediate_dim(self) -> int:
        return int(self.config["intermediate_size"])

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.embed_dim // self.num_heads)

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def max_position_embeddings(self) -> int:
        return int(self.config.get("max_position_embeddings") or 8192)

    @property
    def sliding_window(self) -> tuple[str, int | None]:
        """The config field that turns a sliding window on, and the window in tokens (None:
        full attention), as transformers reads them (see ``check_sliding_window``)."""
        return _sliding_window(self.config, self.family)

    @property
    def checkpointer_model_type(self) -> str:
        """``model_type`` for torchtune's ``FullModelHFCheckpointer`` on this folder."""
        return self.family.checkpointer_model_type

    # ------------------------------------------------------------------- building
    def build(self, max_seq_len: int | None = None,
              rope_base: float | None = None) -> TransformerDecoder:
        """The torchtune decoder of this config (random weights). ``rope_base`` replaces θ and
        keeps any RoPE scaling (see docs/models.md); ``max_seq_len`` defaults to the config's
        ``max_position_embeddings``."""
        length = int(max_seq_len or self.max_position_embeddings)
        self.check_sliding_window(length)
        rope = self.rope if rope_base is None else self.rope.with_theta(rope_base)
        return decoder(
            vocab_size=self.vocab_size, num_layers=self.num_layers, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, embed_dim=self.embed_dim,
            intermediate_dim=self.intermediate_dim, head_dim=self.head_dim, max_seq_len=length,
            rope=rope_module(rope, layout=self.family.rope_layout, head_dim=self.head_dim,
                             max_seq_len=length),
            norm_eps=float(self.config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.family.attention_bias, mlp=self.family.mlp)

    def build_empty(self, *, max_seq_len: int | None, device: torch.device,
                    dtype: torch.dtype, rope_base: float | None = None) -> TransformerDecoder:
        """:meth:`build` with uninitialized weights on ``device``, for a caller that loads every
        weight next: built on the meta device (no random init), then given storage; the RoPE
        tables are buffers, not weights, so they are computed here."""
        with training.set_default_dtype(dtype), torch.device("meta"):
            model = self.build(max_seq_len=max_seq_len, rope_base=rope_base)
        model.to_empty(device=device)
        with training.set_default_dtype(dtype), device:
            for module in model.modules():
                if hasattr(module, "rope_init"):
                    module.rope_init()
        return model

    def load(self, *, max_seq_len: int | None = None, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> TransformerDecoder:
        """The decoder with the folder's weights, read by torchtune's ``FullModelHFCheckpointer``
        with this family's ``model_type`` (as our recipes load them), in eval mode."""
        folder = self.config_file.parent
        files = hf_checkpoint_files(folder)
        if not files:
            raise ConfigError("checkpointer.checkpoint_dir", f"no Hugging Face weights in "
                              f"{folder} (model*.safetensors, pytorch_model*.bin, or the files "
                              "a model.safetensors.index.json names; consolidated.* and "
                              "adapter_model.* are not read).",
                              "point it at a complete model folder.")
        if self.tie_word_embeddings:
            check_tied_head(folder, files)
        model = self.build_empty(max_seq_len=max_seq_len, device=torch.device(device),
                                 dtype=dtype)
        with tempfile.TemporaryDirectory(prefix="acadlm_load_") as scratch:
            checkpointer = training.FullModelHFCheckpointer(
                checkpoint_dir=str(folder), checkpoint_files=files,
                model_type=self.checkpointer_model_type, output_dir=scratch)
            complete_checkpointer_config(checkpointer, self.checkpointer_defaults())
            with unreadable_weights_refused(folder, files):
                state = checkpointer.load_checkpoint()[training.MODEL_KEY]
        if self.tie_word_embeddings:
            state.pop("output.weight", None)  # the tied head some exporters also write
        check_weights_fit(model, state, folder)
        model.load_state_dict(state)
        return model.eval()

    def checkpointer_defaults(self) -> dict[str, Any]:
        """The config.json values torchtune 0.6.1's ``FullModelHFCheckpointer`` reads without
        a default, as transformers defaults them: a Llama-1-style config has no
        ``num_key_value_heads`` (multi-head: as many as query heads), a Qwen2 one may leave
        ``tie_word_embeddings`` out (untied)."""
        return {"num_key_value_heads": self.num_kv_heads,
                "tie_word_embeddings": self.tie_word_embeddings}

    # --------------------------------------------------------------------- checks
    def check_checkpointer_model_type(self, model_type: str, *,
                                      field: str = "checkpointer.model_type") -> None:
        """Refuse a checkpointer ``model_type`` whose weight conversion is not this family's
        (LLAMA3_2 on Qwen2 fails on the biases; QWEN2 on Llama skips the q/k permutation), and
        a config.json that torchtune's checkpointer cannot read: it takes the
        :meth:`checkpointer_defaults` keys from the file without a default (``spec.load``
        fills them in; a recipe's own checkpointer cannot)."""
        if str(model_type).upper() not in self.family.compatible_model_types:
            raise ConfigError(field, f"{model_type!r} does not convert the weights of "
                              f"{self.config_file} (model_type {self.family.name}).",
                              f"set {field}: {self.checkpointer_model_type}.")
        reads = ["num_key_value_heads"] + (
            ["tie_word_embeddings"] if self.checkpointer_model_type == "QWEN2" else [])
        defaults = self.checkpointer_defaults()
        for key in reads:
            if self.config.get(key) is None:
                raise _refusal(self.config_file, key, "is not set, and torchtune's "
                               "FullModelHFCheckpointer reads it from config.json without a "
                               "default.", f"add `\"{key}\": {json.dumps(defaults[key])}` "
                               "(what transformers assumes when it is absent) to "
                               f"{self.config_file}.", families=False)

    def check_sliding_window(self, max_seq_len: int) -> None:
        """Refuse a sliding-window attention that a sequence of ``max_seq_len`` tokens would
        reach: torchtune's decoder attends over the whole causal prefix. A window at least
        as long as every sequence never binds, so such a config is computed exactly."""
        field, window = self.sliding_window
        if window is not None and window < max_seq_len:
            raise _refusal(self.config_file, field, f"asks for sliding-window attention over "
                           f"{window} tokens, shorter than the {max_seq_len} the model is built "
                           "for; acadlm's torchtune decoder attends over the whole prefix and "
                           "would compute another model.", f"build it with max_seq_len <= "
                           f"{window}, or set sliding_window: null if the model was trained "
                           "with full attention.")

    def check_built_rope(self, model: torch.nn.Module, *, rope_base: float | None = None,
                         field: str = "model") -> None:
        """Refuse a built ``model`` whose RoPE is not the one this config states (θ replaced by
        ``rope_base`` when given, as a long-context stage builds it).

        Another builder than the family's (Llama's interleaved RoPE on a Qwen2 folder), another
        θ, or a llama3 scaling dropped or changed computes another model from the same weights:
        the weights load without complaint, training starts from a damaged model, and the
        checkpoint is saved under a config.json that says otherwise. A model built from other
        modules than torchtune's RoPE is not checked.
        """
        module = find_rope_module(model)
        if module is None:
            return
        expected = self.rope if rope_base is None else self.rope.with_theta(rope_base)
        built, layout = rope_settings_of(module), rope_layout_of(module)
        if built.computed() == expected.computed() and layout == self.family.rope_layout:
            return
        raise ConfigError(field, f"builds RoPE with {built.describe()} ({layout} channel "
                          f"pairs), but {self.config_file} states {expected.describe()} "
                          f"({self.family.rope_layout} channel pairs, the {self.family.name} "
                          "family's): the weights would load into another model.",
                          f"build the model from the checkpoint's config.json: `_component_: "
                          f"acadlm_plugins.models.decoder_from_hf_config` with `path:` "
                          f"{self.config_file.parent}.")

    # --------------------------------------------------------------------- export
    def hf_state_dict(self, state: Mapping[str, torch.Tensor],
                      shape: Architecture) -> dict[str, torch.Tensor]:
        """A torchtune state dict of ``shape`` renamed (and for Llama/Mistral q/k permuted) to
        HF names by torchtune's converter for this family, as its checkpointer saves."""
        return self.family.tune_to_hf(dict(state), num_heads=shape.num_heads,
                                      num_kv_heads=shape.num_kv_heads, dim=shape.embed_dim,
                                      head_dim=shape.head_dim)

    def pruned_config(self, shape: Architecture, *, rope: RopeSettings,
                      kept_layers: Sequence[int] | None = None,
                      dtype: torch.dtype | None = None) -> dict[str, Any]:
        """This config.json for a model of ``shape`` with ``rope``: dimensions replaced, each
        per-layer list (``layer_types``) cut to ``kept_layers`` (source indices; when unknown,
        the list must be the same for every layer), the weights' ``dtype`` stated."""
        config = copy.deepcopy(dict(self.config))
        config.update({"num_hidden_layers": shape.num_layers,
                       "num_attention_heads": shape.num_heads,
                       "num_key_value_heads": shape.num_kv_heads, "hidden_size": shape.embed_dim,
                       "intermediate_size": shape.intermediate_dim, "head_dim": shape.head_dim,
                       "tie_word_embeddings": shape.tie_word_embeddings})
        for key in PER_LAYER_KEYS:
            if isinstance(config.get(key), list):
                config[key] = _kept_entries(config[key], kept_layers, shape.num_layers, key)
        write_rope_settings(config, rope)
        config.pop("quantization_config", None)
        if dtype is not None:
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = str(dtype).removeprefix("torch.")
        return config


def hf_model_spec(path: str | Path) -> HFModelSpec:
    """Read and check the ``config.json`` of an HF model folder (or the file itself).

    Raises :class:`ConfigError` naming the config field, before anything is built, for an
    unknown or unsupported ``model_type`` (Qwen3, Gemma, MoE, ...), mixture-of-experts keys,
    biases or activations the family does not have, a ``rope_type`` other than the family's,
    malformed per-layer lists, and a missing or malformed dimension, epsilon or RoPE value
    (:func:`_check_values`); a :class:`DataError` naming the file when it is not JSON.
    """
    path = Path(path).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError("checkpointer.checkpoint_dir", f"{file} does not exist.",
                          "point it at a Hugging Face model folder.")
    config = _read_config(file)
    family = _family_of(config, file)
    _check_values(config, file)
    try:
        rope = rope_settings_from_config(config)
    except KeyError as missing:
        field = missing.args[0]
        raise _refusal(file, field, "is missing from the llama3 RoPE scaling block.",
                       "give factor, low_freq_factor, high_freq_factor and "
                       "original_max_position_embeddings, as Llama 3.1/3.2 configs do.") from None
    return HFModelSpec(config_file=file, config=config, family=family, rope=rope)


def decoder_from_hf_config(path: str, max_seq_len: int | None = None,
                           rope_base: float | None = None,
                           project_in_loss: bool = False) -> TransformerDecoder:
    """The torchtune decoder an HF folder's ``config.json`` describes, for any supported family
    (random weights; the checkpointer loads them). Use it in a config as ``_component_:
    acadlm_plugins.models.decoder_from_hf_config`` with ``path:`` the model folder.
    ``project_in_loss`` leaves the vocabulary projection to
    ``acadlm_plugins.training.linear_cross_entropy.LinearCrossEntropyLoss`` (stock recipes
    without whole logits)."""
    model = hf_model_spec(path).build(max_seq_len=max_seq_len, rope_base=rope_base)
    return _with_projection_in_loss(model, project_in_loss)


def _with_projection_in_loss(model: TransformerDecoder, project_in_loss: bool) -> TransformerDecoder:
    """``model``, returning its hidden states for the loss to project when ``project_in_loss``."""
    if not isinstance(project_in_loss, bool):
        raise ConfigError("model.project_in_loss", f"{project_in_loss!r} is not true or false.")
    if not project_in_loss:
        return model
    from acadlm_plugins.training.linear_cross_entropy import project_in_loss as hidden_out

    return hidden_out(model)


def check_checkpointer_model_type(path: str | Path, model_type: str, *,
                                  field: str = "checkpointer.model_type") -> None:
    """Refuse a checkpointer ``model_type`` that would convert the folder's weights wrongly."""
    hf_model_spec(path).check_checkpointer_model_type(model_type, field=field)


# ---------------------------------------------------------------------------- refusals
def _refusal(file: Path, field: str, problem: str, fix: str = "", *,
             families: bool = True) -> ConfigError:
    """A ConfigError naming ``field`` of ``file``; ``families`` adds the supported families
    (for refusals of what a model is, not of a malformed value)."""
    if families:
        fix = f"{fix} Supported families (config.json `model_type`): {SUPPORTED_FAMILIES}."
    return ConfigError(field, f"{file}: {problem}", fix.lstrip())


def _read_config(file: Path) -> dict[str, Any]:
    """``file`` parsed as a JSON object, or a DataError naming the file, line and fix."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{file}: not valid JSON ({err.msg}, line {err.lineno} column "
                        f"{err.colno}); the file may be cut short. Fix: download or export "
                        "the model folder again, or repair the file.") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{file}: not UTF-8 text ({err.reason}). Fix: point at the model "
                        "folder's config.json.") from None
    if not isinstance(config, dict):
        raise DataError(f"{file}: holds a JSON {type(config).__name__}, not an object of "
                        "config fields. Fix: point at the model folder's config.json.")
    return config


# config.json fields the decoder is built from: required, and optional (null or absent takes
# the default transformers takes, which the spec's properties also take).
_REQUIRED_DIMENSIONS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads")
_OPTIONAL_DIMENSIONS = ("num_key_value_heads", "head_dim", "max_position_embeddings",
                        "sliding_window")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_positive_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _shown(value: Any) -> str:
    """A config value as config.json spells it (``null``, ``"1e5x"``)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _check_values(config: Mapping[str, Any], file: Path) -> None:
    """Refuse, naming the field, a config.json whose dimensions, norm epsilon or RoPE values
    are missing or not numbers the decoder can be built from (transformers would fail on them
    too, or later)."""
    def refuse(field: str, problem: str, fix: str) -> ConfigError:
        return _refusal(file, field, problem, fix, families=False)

    for key in _REQUIRED_DIMENSIONS:
        if key not in config or config[key] is None:
            raise refuse(key, "is missing (or null).", f"state the model's {key} as its "
                         "config.json on the Hub does (a positive integer).")
        if not _is_positive_int(config[key]):
            raise refuse(key, f"is {_shown(config[key])}, not a positive integer.",
                         f"set {key} to the model's value.")
    for key in _OPTIONAL_DIMENSIONS:
        if config.get(key) is not None and not _is_positive_int(config[key]):
            raise refuse(key, f"is {_shown(config[key])}, not a positive integer.",
                         f"set {key} to the model's value, or null for the default.")
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads")
    if kv_heads is not None and heads % kv_heads:
        raise refuse("num_key_value_heads", f"is {kv_heads}, which does not divide "
                     f"num_attention_heads ({heads}): grouped-query attention shares each "
                     "key/value head among the same number of query heads.",
                     "set it to the model's value (a divisor of num_attention_heads).")
    if config["hidden_size"] % heads:
        raise refuse("num_attention_heads", f"is {heads}, which does not divide hidden_size "
                     f"({config['hidden_size']}); torchtune's MultiHeadAttention requires it.",
                     "set num_attention_heads and hidden_size to the model's values.")
    if "rms_norm_eps" in config and not _is_positive_number(config["rms_norm_eps"]):
        raise refuse("rms_norm_eps", f"is {_shown(config['rms_norm_eps'])}, not a positive "
                     "number.", "set it to the epsilon the model was trained with (1e-5 for "
                     "Llama 2/3, Mistral and SmolLM2, 1e-6 for Qwen2), or leave the key out "
                     "for transformers' default 1e-6.")
    if "tie_word_embeddings" in config and not isinstance(config["tie_word_embeddings"], bool):
        raise refuse("tie_word_embeddings", f"is {_shown(config['tie_word_embeddings'])}, "
                     "not true or false.", "set it to true or false.")
    block, block_key = rope_block(config)
    thetas = {f"{block_key}.rope_theta": block.get("rope_theta"),
              "rope_theta": config.get("rope_theta")}
    for field, theta in thetas.items():
        if theta is not None and not _is_positive_number(theta):
            raise refuse(field, f"is {_shown(theta)}, not a positive number.",
                         "set it to the model's RoPE base θ (e.g. 10000, 500000, 1000000).")
    if rope_type_field(config)[0] == "llama3":
        for key in LLAMA3_KEYS:
            value = block.get(key)
            valid = (_is_positive_int(value) if key == "original_max_position_embeddings"
                     else _is_positive_number(value))
            if key in block and not valid:
                raise refuse(f"{block_key}.{key}", f"is {_shown(value)}, not a positive "
                             f"{'integer' if key.startswith('original') else 'number'}.",
                             "set it to the value the model was trained with, as Llama 3.1/3.2 "
                             "configs state it (factor 8 or 32, low_freq_factor 1, "
                             "high_freq_factor 4, original_max_position_embeddings 8192).")
        original, field = original_length_field(config)
        if field == TOP_LEVEL_ORIGINAL and not _is_positive_int(original):
            raise refuse(field, f"is {_shown(original)}, not a positive integer; transformers "
                         "reads this top-level value before the RoPE block's (and fails on "
                         "it).", "set it to the length the model was pretrained at (the "
                         "llama3 scaling's original_max_position_embeddings), or remove the "
                         f"key to use `{block_key}.original_max_position_embeddings`.")


def _family_of(config: Mapping[str, Any], file: Path) -> ModelFamily:
    model_type = config.get("model_type")
    if model_type in REFUSED_MODEL_TYPES:
        raise _refusal(file, "model_type", f"{model_type!r} is not supported: "
                       f"{REFUSED_MODEL_TYPES[model_type]}.")
    if model_type not in FAMILIES:
        raise _refusal(file, "model_type", f"{model_type!r} is not a model family acadlm "
                       "knows.", "convert the model to a supported family, or train it with "
                       "torchtune's own recipes.")
    family = FAMILIES[model_type]
    for key in _MOE_KEYS:
        if config.get(key):
            raise _refusal(file, key, f"is {config[key]!r}: {_MOE_REASON}.")
    if config.get("hidden_act", "silu") not in SILU_NAMES:
        raise _refusal(file, "hidden_act", f"is {config['hidden_act']!r}; the {family.name} "
                       "family's torchtune MLP is SwiGLU (silu).")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key) and not (key == "attention_bias" and family.attention_bias):
            raise _refusal(file, key, f"is true; torchtune's {family.name} modules have no "
                           "such biases.")
    rope_type, field = rope_type_field(config)
    if rope_type not in family.rope_types:
        raise _refusal(file, field, f"is {rope_type!r}; the {family.name} family's torchtune "
                       f"RoPE supports {list(family.rope_types)} (another scaling would "
                       "compute another model).", "use a checkpoint without that scaling.")
    block, key = rope_block(config)
    if any(isinstance(value, dict) for value in block.values()):
        raise _refusal(file, key, "holds per-layer-type RoPE settings, which acadlm does not "
                       "build.")
    rotary = block.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if not _is_positive_number(rotary) or float(rotary) != 1.0:
        raise _refusal(file, "partial_rotary_factor", f"is {rotary}; torchtune rotates whole "
                       "heads.")
    layer_types = config.get("layer_types")
    if layer_types is not None:
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown or len(layer_types) != config.get("num_hidden_layers"):
            raise _refusal(file, "layer_types", f"{layer_types} is not one full or sliding "
                           f"attention entry per layer ({config.get('num_hidden_layers')} "
                           "layers).")
    return family


@contextlib.contextmanager
def unreadable_weights_refused(folder: Path | str, files: Sequence[str] | None = None, *,
                               key: str = "checkpointer.checkpoint_dir") -> Iterator[None]:
    """Turn a weights file that cannot be read (a download cut short, a file of another
    format) into a ConfigError naming ``key``, the folder and its files, not a deserializer's
    traceback (torchtune's checkpointers wrap those in a ValueError "Unable to load
    checkpoint")."""
    from safetensors import SafetensorError

    unreadable = (SafetensorError, EOFError, pickle.UnpicklingError)
    try:
        yield
    except (*unreadable, ValueError, RuntimeError) as err:
        wrapped = isinstance(err, ValueError) and str(err).startswith(TORCHTUNE_UNREADABLE)
        if not (wrapped or isinstance(err, unreadable)):
            raise  # another error: not ours to rename
        cause = err.__cause__ if wrapped and err.__cause__ is not None else err
        named = f" {list(files)}" if files else ""
        raise ConfigError(key, f"{folder}: its weights{named} cannot be read "
                          f"({type(cause).__name__}: {cause}); a file is incomplete or not "
                          "what its name says.", "download or export the model again.") from err


#: How torchtune 0.6.1's ``safe_torch_load`` words a file it could not read.
TORCHTUNE_UNREADABLE = "Unable to load checkpoint from"


def shape_differences(model: torch.nn.Module, state: Mapping[str, torch.Tensor]
                      ) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """``(key, shape in state, shape in model)`` of every tensor both hold with other shapes."""
    own = model.state_dict()
    return [(key, tuple(value.shape), tuple(own[key].shape)) for key, value in state.items()
            if key in own and tuple(value.shape) != tuple(own[key].shape)]


def check_weights_fit(model: torch.nn.Module, state: Mapping[str, torch.Tensor],
                      folder: Path) -> None:
    """Refuse weights that do not fit the model its config.json builds, naming the first
    differences (tensor and both shapes; counts of missing and unexpected tensors) instead of
    torch's list of every mismatch."""
    own = model.state_dict()
    shapes = [f"{key}: {saved} in the weights, {built} in the model"
              for key, saved, built in shape_differences(model, state)]
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    if not (shapes or missing or unexpected):
        return
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensors of another shape ({'; '.join(shapes[:2])}"
                     f"{'; ...' if len(shapes) > 2 else ''})")
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{len(keys)} {what} ({', '.join(keys[:3])}"
                         f"{', ...' if len(keys) > 3 else ''})")
    raise ConfigError("checkpointer.checkpoint_dir", f"{folder}: the weights do not fit its "
                      f"config.json: {'; '.join(parts)}.",
                      "fix config.json to the weights' shape (hidden size, layers, heads, "
                      "intermediate size), or re-export the checkpoint.")


_TIED_KEYS = ("lm_head.weight", "model.embed_tokens.weight")


def _tied_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """The head and embedding tensors that weights file ``name`` holds (either, both or none):
    a safetensors file is opened for those two only; a ``.bin`` (a pickled state dict) is read
    as torchtune's checkpointer reads it (``torch.load`` memory-mapped, weights only, on the
    CPU), so only the pages of the two tensors are touched."""
    from safetensors import safe_open
    from torchtune.training.checkpointing._utils import safe_torch_load

    with unreadable_weights_refused(folder, [name]):
        if name.endswith(".safetensors"):
            with safe_open(str(folder / name), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()  # noqa: SIM118
                        if key in _TIED_KEYS}
        state = safe_torch_load(folder / name, weights_only=True, mmap=True)
    return {key: value for key, value in state.items() if key in _TIED_KEYS}


def check_tied_head(folder: Path, files: Sequence[str]) -> None:
    """Refuse a tied config.json whose weights hold an ``lm_head.weight`` that differs from the
    embedding: transformers does not tie such a head (it uses it as saved, with a warning),
    while we tie it and drop the saved head (torchtune's Qwen2 conversion drops it before we
    see the weights; on the Llama/Mistral path ``HFModelSpec.load`` drops ``output.weight``),
    so the model would load and compute another function. Reads every weights file the
    checkpointer reads: safetensors and ``pytorch_model*.bin`` alike."""
    found: dict[str, torch.Tensor] = {}
    for name in files:
        found.update(_tied_tensors(folder, name))
    if not all(key in found for key in _TIED_KEYS):
        return  # nothing to compare (the usual tied checkpoint has no lm_head.weight)
    head, embedding = found["lm_head.weight"], found["model.embed_tokens.weight"]
    if not torch.equal(head, embedding):
        raise ConfigError(
            "tie_word_embeddings", f"{folder}: config.json ties the output head to the "
            "embedding, but the weights hold a different lm_head.weight (an untied, trained "
            "head, which transformers uses as it is).", "set `tie_word_embeddings: false` in "
            "its config.json, or drop lm_head.weight from the weights if the tied embedding is "
            "meant.")


TRANSFORMERS_SLIDING_WINDOW = 4096  # MistralConfig's and Qwen2Config's default
TRANSFORMERS_MAX_WINDOW_LAYERS = 28  # Qwen2Config's default
SILU_NAMES = ("silu", "swish")  # transformers' ACT2FN maps both to SiLU


def _sliding_window(config: Mapping[str, Any], family: ModelFamily) -> tuple[str, int | None]:
    """The config field that turns a sliding window on, and the window (None: off), read as
    transformers reads it: Mistral slides whenever ``sliding_window`` is not null; Qwen2 only
    with ``use_sliding_window`` and only in layers ``layer_types`` (or ``max_window_layers``)
    marks; Llama never (its transformers model has no window, whatever ``layer_types`` says).
    A missing ``sliding_window`` is transformers' default of 4,096 tokens for both, and a
    missing ``max_window_layers`` its default of 28."""
    window = config.get("sliding_window", TRANSFORMERS_SLIDING_WINDOW)
    if family.name == "qwen2":
        if not config.get("use_sliding_window") or window is None:
            return "use_sliding_window", None
        layer_types = config.get("layer_types")
        max_window_layers = config.get("max_window_layers", TRANSFORMERS_MAX_WINDOW_LAYERS)
        sliding = ("sliding_attention" in layer_types if layer_types is not None else
                   int(max_window_layers) < int(config["num_hidden_layers"]))
        return "use_sliding_window", int(window) if sliding else None
    if family.name == "mistral":
        return "sliding_window", None if window is None else int(window)
    return "sliding_window", None


def _kept_entries(values: list[Any], kept_layers: Sequence[int] | None, num_layers: int,
                  key: str) -> list[Any]:
    if kept_layers is not None:
        if len(kept_layers) != num_layers:
            raise ValueError(f"{len(kept_layers)} kept layers for a {num_layers}-layer model.")
        return [values[index] for index in kept_layers]
    if len(set(map(str, values))) > 1:
        raise ValueError(f"config.json `{key}` differs between layers; pass the kept layers' "
                         "source indices (kept_layers) to cut it.")
    return values[:1] * num_layers
