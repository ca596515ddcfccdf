"""The model-family layer against transformers, family by family.

Each family is a random-weight checkpoint of its real layout (few layers, small dims) written by
transformers itself: Llama 3.2 (GQA, tied embeddings, its real llama3 RoPE scaling), Llama 2
(multi-head, untied, plain RoPE), Mistral (head size not hidden / heads) and Qwen2 (q/k/v
biases, θ 1e6, half-split RoPE). Loaded through ``hf_model_spec`` it must give transformers'
logits; pruned (masks or one-shot), materialized and exported it must give, in transformers,
the logits of our materialized model. Unsupported configs are refused by name.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from family_checkpoints import (
    EXPECTED_MODEL_TYPE,
    FAMILY_CONFIGS,
    LLAMA32_SCALING,
    SHAPE,
    TOLERANCE,
    VOCAB,
    randomize,
    use_hub_rope_keys,
)
from family_checkpoints import tokens as _tokens
from family_checkpoints import transformers_logits as _transformers_logits
from family_checkpoints import write_family as _write_family
from transformers import AutoModelForCausalLM

from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.evaluation.generation import StopRule, generate_tokens
from acadlm_plugins.evaluation.lm_adapter import load_decoder
from acadlm_plugins.models import SUPPORTED_FAMILIES, decoder_from_hf_config, hf_model_spec
from acadlm_plugins.models.rope import format_theta, rope_settings_of
from acadlm_plugins.pruning.architecture import (
    architecture_from_hf_config,
    architecture_of,
    resolve_target,
)
from acadlm_plugins.pruning.export import export_pruned_model
from acadlm_plugins.pruning.importance import importance_scores, one_shot_prune
from acadlm_plugins.pruning.masks import MaskHooks, PruningMasks
from acadlm_plugins.pruning.materialize import kept_units, materialize

LENGTHS = (64, 1024)


@pytest.fixture(scope="module", params=list(FAMILY_CONFIGS))
def family(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    return name, _write_family(name, tmp_path_factory.mktemp(name.replace(".", "_")))


# ------------------------------------------------------------------ loading, per family
def test_loaded_model_gives_transformers_logits(family):
    name, folder = family
    spec = hf_model_spec(folder)
    assert spec.checkpointer_model_type == EXPECTED_MODEL_TYPE[name]
    ours = spec.load()
    for length in LENGTHS:
        tokens = _tokens(length)
        with torch.no_grad():
            diff = (ours(tokens) - _transformers_logits(folder, tokens)).abs().max().item()
        assert diff < TOLERANCE, (name, length, diff)
    arch = architecture_from_hf_config(folder)
    assert arch == architecture_of(ours)
    assert arch.attention_bias == (name == "qwen2")


def test_eval_adapter_loads_and_generates_like_transformers(family):
    """The lm-eval adapter reads each family through the same spec (not a Llama-only path):
    its greedy KV-cached generation (GQA decode, grouped prefill) equals transformers'."""
    name, folder = family
    model = load_decoder(folder, max_seq_len=None, device=torch.device("cpu"),
                         dtype=torch.float32)
    prompts = [_tokens(length)[0].tolist() for length in (9, 23)]
    ours = generate_tokens(model, prompts, [StopRule(cap=6), StopRule(cap=6)], pad_id=0,
                           decode=lambda ids: " ".join(map(str, ids)), prefill_chunk=8)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for prompt, new in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                     pad_token_id=0)
        assert new == out[0, len(prompt):].tolist(), name


def test_llama3_scaling_is_built_with_the_configs_values(family):
    name, folder = family
    rope = hf_model_spec(folder).build(max_seq_len=128).layers[0].attn.pos_embeddings
    settings = rope_settings_of(rope)
    if name == "llama3.2":
        assert (settings.factor, settings.low_freq_factor, settings.high_freq_factor,
                settings.original_max_position_embeddings) == (32.0, 1.0, 4.0, 8192)
    else:
        assert not settings.scaled
    assert settings.theta == FAMILY_CONFIGS[name]().rope_parameters["rope_theta"]


# ------------------------------------------------- prune -> materialize -> export, per family
def _target(source):
    return resolve_target(source, {
        "num_layers": 2, "num_kv_heads": source.num_kv_heads // 2,
        "num_heads": source.num_heads // 2, "embed_dim": 48, "intermediate_dim": 96})


def _check_export(name: str, source: Path, pruned: torch.nn.Module, export: Path) -> None:
    """The pruned model kept the source's RoPE, and transformers and our loader read the export
    as the materialized model computes."""
    assert rope_settings_of(pruned.layers[0].attn.pos_embeddings) == hf_model_spec(source).rope
    pruned.eval()
    ours = hf_model_spec(export).load()
    for length in LENGTHS:
        tokens = _tokens(length)
        with torch.no_grad():
            small = pruned(tokens)
            hf_diff = (small - _transformers_logits(export, tokens)).abs().max().item()
            tune_diff = (small - ours(tokens)).abs().max().item()
        assert hf_diff < TOLERANCE, (name, length, hf_diff)
        assert tune_diff < TOLERANCE, (name, length, tune_diff)
    config = json.loads((export / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    if "layer_types" in config:
        assert config["layer_types"] == ["full_attention"] * 2
    assert rope_settings_of(ours.layers[0].attn.pos_embeddings) == rope_settings_of(
        pruned.layers[0].attn.pos_embeddings)


def test_masked_pruning_materializes_and_exports_faithfully(family, tmp_path):
    name, folder = family
    model = hf_model_spec(folder).load()
    source = architecture_of(model)
    masks = PruningMasks(source, _target(source), seed=3)
    with torch.no_grad():  # uneven gates, so the kept units are not simply the first ones
        for gate in masks.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape,
                                             generator=torch.Generator().manual_seed(5)) * 1.5 + 2)
    tokens = _tokens(64)
    hooks = MaskHooks(model, masks)
    masks.use_final_gates()
    with torch.no_grad():
        masked = model(tokens)
    hooks.remove()
    pruned, target = materialize(model, masks)
    assert architecture_of(pruned) == target
    assert type(pruned.layers[0].attn.pos_embeddings) is type(model.layers[0].attn.pos_embeddings)
    with torch.no_grad():
        small, plain = pruned.eval()(tokens), model(tokens)
    assert (masked - small).abs().max() < TOLERANCE
    assert (plain - small).abs().max() > 1e-2  # the pruning really changed the function
    export = export_pruned_model(pruned, target, folder, tmp_path / "pruned",
                                 kept_layers=kept_units(masks).layers)
    _check_export(name, folder, pruned, export)


def test_one_shot_pruning_exports_faithfully(family, tmp_path):
    name, folder = family
    model = hf_model_spec(folder).load()
    batches = [{"tokens": torch.randint(0, VOCAB, (2, 48), generator=torch.Generator()
                                        .manual_seed(seed))} for seed in range(2)]
    scores = importance_scores(model, batches)
    pruned, target = one_shot_prune(model, scores, _target(architecture_of(model)))
    if name == "qwen2":
        assert pruned.layers[0].attn.q_proj.bias is not None
    export = export_pruned_model(pruned, target, folder, tmp_path / "pruned")
    _check_export(name, folder, pruned, export)


# ----------------------------------------------------------------------- refusals
def _config_dir(tmp_path: Path, name: str, **changes) -> Path:
    config = FAMILY_CONFIGS[name]().to_dict()
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not ...}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


OLD_STYLE = {"rope_parameters": ..., "rope_theta": 500_000.0}
REFUSALS = [
    ("gemma", "llama2", {"model_type": "gemma"}, "model_type"),
    ("qwen3", "qwen2", {"model_type": "qwen3", "head_dim": 16}, "model_type"),
    ("mixtral", "mistral", {"model_type": "mixtral", "num_local_experts": 8}, "model_type"),
    ("moe keys", "llama2", {"num_local_experts": 8}, "num_local_experts"),
    ("unknown model_type", "llama2", {"model_type": "falcon"}, "model_type"),
    ("no model_type", "llama2", {"model_type": ...}, "model_type"),
    ("yarn (rope_scaling)", "llama3.2", {**OLD_STYLE, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}},
     "rope_scaling.rope_type"),
    ("linear (old `type`)", "llama2", {**OLD_STYLE, "rope_scaling": {
        "type": "linear", "factor": 2.0}}, "rope_scaling.type"),
    ("dynamic (rope_parameters)", "llama2", {"rope_parameters": {
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters.rope_type"),
    ("llama3 scaling on qwen2", "qwen2", {"rope_parameters": {
        **LLAMA32_SCALING, "rope_theta": 1e6}}, "rope_parameters.rope_type"),
    ("llama3 block incomplete", "llama3.2", {"rope_parameters": {
        "rope_type": "llama3", "factor": 32.0, "rope_theta": 5e5}},
     "rope_parameters.low_freq_factor"),
    ("attention_bias", "llama2", {"attention_bias": True}, "attention_bias"),
    ("gelu", "mistral", {"hidden_act": "gelu"}, "hidden_act"),
    ("unknown layer type", "qwen2", {"layer_types": ["full_attention", "chunked_attention",
                                                    "full_attention"]}, "layer_types"),
]


@pytest.mark.parametrize("case, family_name, changes, field", REFUSALS,
                         ids=[case[0] for case in REFUSALS])
def test_unsupported_configs_are_refused_naming_the_field(tmp_path, case, family_name, changes,
                                                          field):
    folder = _config_dir(tmp_path, family_name, **changes)
    with pytest.raises(ConfigError) as refused:
        decoder_from_hf_config(str(folder), max_seq_len=64)
    assert refused.value.key == field
    assert SUPPORTED_FAMILIES in str(refused.value)


LLAMA3_BLOCK = {**LLAMA32_SCALING, "rope_theta": 5e5}
MALFORMED = [
    ("no intermediate_size", "llama2", {"intermediate_size": ...}, "intermediate_size"),
    ("hidden_size null", "qwen2", {"hidden_size": None}, "hidden_size"),
    ("vocab_size a string", "mistral", {"vocab_size": "256"}, "vocab_size"),
    ("kv heads do not divide heads", "llama3.2", {"num_key_value_heads": 3},
     "num_key_value_heads"),
    ("heads do not divide hidden", "llama2", {"num_attention_heads": 3,
                                              "num_key_value_heads": 3},
     "num_attention_heads"),
    ("head_dim zero", "mistral", {"head_dim": 0}, "head_dim"),
    ("rms_norm_eps null", "llama3.2", {"rms_norm_eps": None}, "rms_norm_eps"),
    ("rms_norm_eps a string", "qwen2", {"rms_norm_eps": "1e-6"}, "rms_norm_eps"),
    ("llama3 factor null", "llama3.2", {"rope_parameters": {**LLAMA3_BLOCK, "factor": None}},
     "rope_parameters.factor"),
    ("llama3 original length a float", "llama3.2", {"rope_parameters": {
        **LLAMA3_BLOCK, "original_max_position_embeddings": 8192.5}},
     "rope_parameters.original_max_position_embeddings"),
    # transformers reads the top-level key before the block's, and fails on null
    ("llama3 top-level original length null", "llama3.2",
     {"original_max_position_embeddings": None}, "original_max_position_embeddings"),
    ("rope_theta a string", "llama2", {"rope_parameters": {"rope_type": "default",
                                                           "rope_theta": "1e5x"}},
     "rope_parameters.rope_theta"),
    ("old-style rope_theta negative", "mistral", {**OLD_STYLE, "rope_theta": -1.0},
     "rope_theta"),
    ("tie_word_embeddings a string", "qwen2", {"tie_word_embeddings": "false"},
     "tie_word_embeddings"),
]


@pytest.mark.parametrize("case, family_name, changes, field", MALFORMED,
                         ids=[case[0] for case in MALFORMED])
def test_malformed_config_values_are_refused_naming_file_and_field(tmp_path, case, family_name,
                                                                   changes, field):
    folder = _config_dir(tmp_path, family_name, **changes)
    with pytest.raises(ConfigError) as refused:
        decoder_from_hf_config(str(folder), max_seq_len=64)
    assert refused.value.key == field
    assert str(folder / "config.json") in str(refused.value) and "Fix:" in str(refused.value)


@pytest.mark.parametrize("text", ['{"model_type": "llama", ', "[1, 2]", "\xff\xfe"])
def test_config_that_is_not_a_json_object_is_a_data_error_naming_the_file(tmp_path, text):
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError) as raised:
        hf_model_spec(tmp_path)
    assert str(tmp_path / "config.json") in str(raised.value) and "Fix:" in str(raised.value)


def _untied_qwen2(folder: Path) -> Path:
    from transformers import Qwen2Config

    model = AutoModelForCausalLM.from_config(Qwen2Config(
        **SHAPE, rope_theta=1e6, max_position_embeddings=32_768, tie_word_embeddings=False,
        use_sliding_window=False))
    randomize(model, seed=7)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family_name, key", [("llama2", "num_key_value_heads"),
                                              ("qwen2 untied", "tie_word_embeddings")])
def test_config_leaving_a_key_to_transformers_default_loads_like_transformers(
        tmp_path, family_name, key):
    """A Llama-1-style config.json has no num_key_value_heads (multi-head); a Qwen2 one may
    leave tie_word_embeddings out (untied). transformers defaults them; torchtune's checkpointer
    reads them without a default. ``spec.load`` fills them in and gives transformers' logits;
    a recipe's own checkpointer cannot, so the model_type check refuses, naming the key."""
    folder = (_untied_qwen2(tmp_path / "model") if family_name == "qwen2 untied"
              else _write_family(family_name, tmp_path / "model"))
    config = json.loads((folder / "config.json").read_text())
    del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    spec = hf_model_spec(folder)
    tokens = _tokens(64)
    with torch.no_grad():
        diff = (spec.load()(tokens) - _transformers_logits(folder, tokens)).abs().max().item()
    assert diff < TOLERANCE
    with pytest.raises(ConfigError) as refused:
        spec.check_checkpointer_model_type(spec.checkpointer_model_type)
    assert refused.value.key == key and "Fix: add" in str(refused.value)


def test_the_rater_loads_a_backbone_that_leaves_kv_heads_to_the_default(tmp_path):
    """The QuRating rater builds its own checkpointer over the backbone folder; a Llama-1-style
    config.json (no num_key_value_heads) loads there too, with the weights transformers has."""
    from transformers import AutoModelForCausalLM as HFModel

    from acadlm_plugins.qurating.rater import hf_checkpointer

    folder = _write_family("llama2", tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    del config["num_key_value_heads"]
    (folder / "config.json").write_text(json.dumps(config))
    state = hf_checkpointer(folder, tmp_path / "out").load_checkpoint()["model"]
    reference = HFModel.from_pretrained(folder).state_dict()
    assert torch.equal(state["tok_embeddings.weight"], reference["model.embed_tokens.weight"])
    assert state["layers.0.attn.v_proj.weight"].shape == reference[
        "model.layers.0.self_attn.v_proj.weight"].shape


@pytest.mark.parametrize("family_name, changes, field", [
    ("mistral", {"sliding_window": 4096}, "sliding_window"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 1,
               "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]},
     "use_sliding_window"),
])
def test_active_sliding_window_is_refused_unless_no_sequence_reaches_it(tmp_path, family_name,
                                                                        changes, field):
    folder = _config_dir(tmp_path, family_name, **changes)
    with pytest.raises(ConfigError) as refused:
        decoder_from_hf_config(str(folder), max_seq_len=8192)
    assert refused.value.key == field and "4096" in str(refused.value)
    assert decoder_from_hf_config(str(folder), max_seq_len=4096) is not None


@pytest.mark.parametrize("family_name, changes, field", [
    ("mistral", {"sliding_window": ...}, "sliding_window"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": ..., "max_window_layers": 1,
               "layer_types": ...}, "use_sliding_window"),
])
def test_a_missing_sliding_window_is_transformers_default_of_4096(tmp_path, family_name,
                                                                   changes, field):
    """MistralConfig and Qwen2Config default ``sliding_window`` to 4096: a config.json that
    leaves it out slides in transformers, so it must not load as full attention beyond it."""
    folder = _config_dir(tmp_path, family_name, **changes)
    with pytest.raises(ConfigError) as refused:
        decoder_from_hf_config(str(folder), max_seq_len=8192)
    assert refused.value.key == field and "4096" in str(refused.value)


FULL_ATTENTION_SILU = [
    ("qwen2 without max_window_layers (transformers: 28)", "qwen2",
     {"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": ...,
      "layer_types": ...}),
    ("llama with sliding layer_types (transformers' Llama has no window)", "llama2",
     {"sliding_window": 4096, "layer_types": ["sliding_attention"] * SHAPE["num_hidden_layers"]}),
    ("hidden_act swish (SiLU in transformers)", "mistral", {"hidden_act": "swish"}),
]


@pytest.mark.parametrize("case, family_name, changes", FULL_ATTENTION_SILU,
                         ids=[case[0] for case in FULL_ATTENTION_SILU])
def test_configs_transformers_runs_as_full_attention_silu_models_load(tmp_path, case,
                                                                       family_name, changes):
    """They load at any length, and compute transformers' logits: with the window shrunk to
    16 tokens, 64-token inputs would differ if either side let a layer slide, or if `swish`
    were not SiLU."""
    folder = _config_dir(tmp_path / "config", family_name, **changes)
    assert len(decoder_from_hf_config(str(folder), max_seq_len=8192).layers) == \
        SHAPE["num_hidden_layers"]
    folder = _write_family(family_name, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config.update({k: 16 if k == "sliding_window" else v for k, v in changes.items()})
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                    if v is not ...}))
    ours = hf_model_spec(folder).load()
    tokens = _tokens(64)
    with torch.no_grad():
        diff = (ours(tokens) - _transformers_logits(folder, tokens)).abs().max().item()
    assert diff < TOLERANCE, (case, diff)


def _save_weights(state: dict[str, torch.Tensor], folder: Path, weights: str) -> None:
    """``state`` as the folder's only weights file: ``model.safetensors`` or, as older
    checkpoints ship it, a pickled ``pytorch_model.bin``."""
    from safetensors.torch import save_file

    for old in (*folder.glob("*.safetensors"), *folder.glob("*.bin")):
        old.unlink()
    if weights == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
@pytest.mark.parametrize("family_name", ["llama3.2", "qwen2"])
def test_a_tied_config_with_a_different_trained_head_is_refused(tmp_path, family_name,
                                                                weights):
    """transformers does not tie an lm_head.weight that differs from the embedding (it uses
    the head as saved): dropping it to tie would compute another model. The same in a
    ``pytorch_model.bin`` as in safetensors, for Qwen2 (whose torchtune conversion drops the
    head) and Llama (whose loader drops ``output.weight``)."""
    from safetensors.torch import load_file

    folder = _write_family(family_name, tmp_path / "model", num_hidden_layers=2)
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    state = load_file(next(folder.glob("*.safetensors")))
    embedding = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = embedding.clone()  # an exporter that writes the tied head too
    _save_weights(state, folder, weights)
    spec = hf_model_spec(folder)
    with torch.no_grad():
        diff = (spec.load()(_tokens(32)) - _transformers_logits(folder, _tokens(32))).abs().max()
    assert diff.item() < TOLERANCE
    state["lm_head.weight"] = embedding + 0.5  # a trained head under a tied config
    _save_weights(state, folder, weights)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert torch.equal(reference.lm_head.weight, state["lm_head.weight"])  # used as saved
    with pytest.raises(ConfigError) as refused:
        hf_model_spec(folder).load()
    assert refused.value.key == "tie_word_embeddings" and "Fix:" in str(refused.value)
    # The recipes' check of the built model against the checkpoint refuses it too.
    from omegaconf import OmegaConf

    from acadlm_plugins.training.run_checks import check_model_rope

    model = decoder_from_hf_config(str(folder), max_seq_len=64)
    with pytest.raises(ConfigError, match="different lm_head.weight"):
        check_model_rope(OmegaConf.create({"checkpointer": {"checkpoint_dir": str(folder)}}),
                         model)


def test_checkpointer_model_type_must_convert_the_family(family):
    name, folder = family
    spec = hf_model_spec(folder)
    spec.check_checkpointer_model_type(EXPECTED_MODEL_TYPE[name])
    wrong = "LLAMA3_2" if name == "qwen2" else "QWEN2"
    with pytest.raises(ConfigError, match=f"checkpointer.model_type: {spec.checkpointer_model_type}"):
        spec.check_checkpointer_model_type(wrong)


# ------------------------------------------------------- long-context θ on a scaled RoPE
def test_theta_is_written_as_people_write_it():
    assert format_theta(1e6) == "1,000,000" and format_theta(1.28e8) == "128,000,000"
    assert format_theta(10_000) == "10,000" and format_theta(2.5e-1) == "0.25"


def test_new_theta_keeps_llama3_scaling_in_ours_and_in_transformers(tmp_path):
    from acadlm_plugins.long_context_recipe import Stage, rope_change_note, write_stage_config

    source = _write_family("llama3.2", tmp_path / "source")
    spec = hf_model_spec(source)
    note = rope_change_note(dict(spec.config), 8e6)
    assert "500,000 -> 8,000,000" in note and "factor 32" in note and "kept" in note
    assert rope_change_note(dict(spec.config), 5e5) is None
    # what a stage does: build with the new θ, load the checkpoint's weights, save the config
    stretched = spec.build(max_seq_len=2048, rope_base=8e6)
    stretched.load_state_dict(spec.load().state_dict())
    rope = rope_settings_of(stretched.layers[0].attn.pos_embeddings)
    assert rope.theta == 8e6 and rope.factor == 32.0
    saved = tmp_path / "stage"
    shutil.copytree(source, saved)
    write_stage_config(saved, Stage(max_seq_len=2048, rope_base=8e6, trained_length=131_072,
                                    source_rope_base=5e5, source_max_positions=131_072,
                                    token_budget=None, previous_stage=None,
                                    chunked_loss_tokens=0))
    tokens = _tokens(1024)
    with torch.no_grad():
        ours = stretched.eval()(tokens)
    assert (ours - _transformers_logits(saved, tokens)).abs().max() < TOLERANCE
    assert (ours - _transformers_logits(source, tokens)).abs().max() > 1e-2  # θ mattered


def test_a_top_level_original_length_wins_over_the_blocks_as_in_transformers(tmp_path):
    """transformers reads a top-level ``original_max_position_embeddings`` before the llama3
    block's (``standardize_rope_params``): so do we, and a stage's config.json (and an
    export's) states the length the model used in both places, so transformers reads it back
    to the RoPE the model computes."""
    from acadlm_plugins.long_context_recipe import Stage, write_stage_config
    from acadlm_plugins.models.rope import write_rope_settings

    source = use_hub_rope_keys(_write_family("llama3.2", tmp_path / "source",
                                             num_hidden_layers=2))
    tokens = _tokens(256)
    plain = _transformers_logits(source, tokens)
    config = json.loads((source / "config.json").read_text())
    assert config["rope_scaling"]["original_max_position_embeddings"] == 8192
    config["original_max_position_embeddings"] = 256  # conflicting with the block's 8192
    (source / "config.json").write_text(json.dumps(config, indent=2))
    reference = _transformers_logits(source, tokens)
    assert (reference - plain).abs().max() > 1e-2  # the top-level value matters to transformers
    spec = hf_model_spec(source)
    assert spec.rope.original_max_position_embeddings == 256
    with torch.no_grad():
        assert (spec.load()(tokens) - reference).abs().max() < TOLERANCE
    # a long-context stage at θ 8e6: what it builds, and the config.json it saves
    stretched = spec.build(max_seq_len=256, rope_base=8e6)
    stretched.load_state_dict(spec.load().state_dict())
    saved = tmp_path / "stage"
    shutil.copytree(source, saved)
    write_stage_config(saved, Stage(max_seq_len=256, rope_base=8e6, trained_length=131_072,
                                    source_rope_base=5e5, source_max_positions=131_072,
                                    token_budget=None, previous_stage=None,
                                    chunked_loss_tokens=0))
    written = json.loads((saved / "config.json").read_text())
    assert written["original_max_position_embeddings"] == 256
    assert written["rope_scaling"]["original_max_position_embeddings"] == 256
    hf = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    assert hf.config.rope_parameters["original_max_position_embeddings"] == 256
    assert hf_model_spec(saved).rope == spec.rope.with_theta(8e6)
    with torch.no_grad():
        assert (stretched.eval()(tokens) - hf(tokens).logits).abs().max() < TOLERANCE
    # a writer given another length (an export's built RoPE) leaves no stale top-level value
    write_rope_settings(written, replace(spec.rope, original_max_position_embeddings=8192))
    assert written["original_max_position_embeddings"] == 8192
    assert written["rope_scaling"]["original_max_position_embeddings"] == 8192


@pytest.mark.parametrize("family_name, file", [("llama3.2", "model.safetensors"),
                                               ("llama3.2", "pytorch_model.bin"),
                                               ("llama2", "model.safetensors"),
                                               ("llama2", "pytorch_model.bin")])
def test_a_truncated_weights_file_is_named_not_a_deserializer_traceback(tmp_path, family_name,
                                                                        file):
    """A download cut short: the tied-head check (tied models) and torchtune's checkpointer
    (the others; it wraps the error in a ValueError) both end in the folder and the fix."""
    folder = _write_family(family_name, tmp_path / "model")
    if file.endswith(".bin"):
        from safetensors.torch import load_file

        torch.save(load_file(folder / "model.safetensors"), folder / file)
        (folder / "model.safetensors").unlink()
    weights = folder / file
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    with pytest.raises(ConfigError) as err:
        hf_model_spec(folder).load()
    assert err.value.key == "checkpointer.checkpoint_dir"
    assert "cannot be read" in str(err.value) and "download or export" in str(err.value)


@pytest.mark.parametrize("change, words", [
    ({"intermediate_size": SHAPE["intermediate_size"] + 8}, "tensors of another shape"),
    ({"num_hidden_layers": SHAPE["num_hidden_layers"] + 1}, "missing"),
])
def test_weights_that_do_not_fit_config_json_name_the_first_differences(tmp_path, change,
                                                                        words):
    folder = _write_family("llama2", tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=words) as err:
        hf_model_spec(folder).load()
    assert err.value.key == "checkpointer.checkpoint_dir"
    assert len(str(err.value)) < 700  # the first differences, not torch's list of all
