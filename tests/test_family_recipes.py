"""Every supported family through the training recipes, checked against transformers.

A random-weight checkpoint of each family's real layout (tests/family_checkpoints.py: Llama 2
multi-head, Llama 3.2 with its llama3 RoPE scaling stated as on the Hub, Mistral with its own
head size, Qwen2 with q/k/v biases) goes through continued pre-training and a long-context
stage with a new RoPE θ, built from its config.json by the family layer (Qwen2's stage reads
its own ChatML tokenizer, which names no BOS in tokenizer_config.json, through the ProLong stage
configs' tokenizer component). Each saved checkpoint
must load in transformers with the logits of the model the recipe trained, and say so in its
config.json (θ, RoPE scaling, per-layer lists). A model that would rotate positions otherwise
than the checkpoint's config.json states is refused before training.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from family_checkpoints import (
    EXPECTED_MODEL_TYPE,
    FAMILY_CONFIGS,
    LLAMA32_SCALING,
    TOLERANCE,
    tokens,
    transformers_logits,
    use_hub_rope_keys,
    write_family,
    write_family_tokenizer,
)
from omegaconf import OmegaConf
from recipe_runs import setup_error, torch_threads
from test_long_context_recipe import write_long_documents
from tiny_setup import REPO_ROOT, TINY_CONFIG, write_tiny_corpus

from acadlm_plugins.continued_pretrain_recipe import ContinuedPretrainRecipe
from acadlm_plugins.long_context_recipe import LongContextRecipe
from acadlm_plugins.models import hf_model_spec
from acadlm_plugins.training.checkpointing import latest_checkpoint

LONG_CONTEXT_CONFIG = REPO_ROOT / "configs" / "tiny" / "long_context.yaml"
# The ProLong stage configs' tokenizer block (`smollm2_tokenizer`; recipes/prolong/pipeline.py
# --base-model points its path at the base model's folder).
STAGE_TOKENIZER = OmegaConf.load(
    REPO_ROOT / "configs" / "smollm2" / "long_context_stage1.yaml").tokenizer
VOCAB = 320  # the byte tokenizer's 259 ids fit
QWEN2_VOCAB = 512  # and the tiny Qwen2-style ChatML tokenizer's ids (tiny_setup.TINY_VOCAB)
NEW_THETA = 4e6  # differs from every family's own θ
FAMILY_MODEL = {"_component_": "acadlm_plugins.models.decoder_from_hf_config"}


@pytest.fixture(autouse=True)
def quiet_isolated_runs(monkeypatch):
    monkeypatch.setenv("ACADLM_NO_PROGRESS", "1")
    monkeypatch.setenv("ACADLM_PLUGINS_DISABLE_AUTOLOAD", "1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family_data")
    return {"corpus": write_tiny_corpus(root / "corpus", docs_per_domain=6),
            "long": write_long_documents(root / "long" / "docs.jsonl")}


@pytest.fixture(scope="module", params=list(FAMILY_CONFIGS))
def family(request, tmp_path_factory) -> tuple[str, Path]:
    """(family name, a 2-layer random checkpoint of it); Llama 3.2's RoPE in Hub style, Qwen2
    with its ChatML tokenizer (no BOS in tokenizer_config.json, as Qwen2.5's)."""
    name = request.param
    folder = write_family(name, tmp_path_factory.mktemp(name.replace(".", "_")) / "model",
                          vocab_size=QWEN2_VOCAB if name == "qwen2" else VOCAB,
                          num_hidden_layers=2)
    if name == "llama3.2":
        use_hub_rope_keys(folder)
    if name == "qwen2":
        write_family_tokenizer(name, folder)
    return name, folder


def family_config(base: Path, name: str, folder: Path, *overrides: str):
    """``base`` as a user bringing this family sets it: the model built from the folder's
    config.json by the family layer, and the checkpointer's model_type for its weights."""
    cfg = OmegaConf.merge(OmegaConf.load(base), OmegaConf.from_dotlist(
        [f"checkpointer.checkpoint_dir={folder}",
         f"checkpointer.model_type={EXPECTED_MODEL_TYPE[name]}", *overrides]))
    cfg.model = OmegaConf.create({**FAMILY_MODEL, "path": str(folder)})
    return cfg


def train(recipe_class, cfg):
    """Set up and train ``recipe_class`` on ``cfg`` in this process; the recipe, for its model."""
    with torch_threads():
        recipe = recipe_class(cfg)
        try:
            recipe.setup(cfg)
            recipe.train()
        finally:
            recipe.cleanup()
    return recipe


def assert_same_logits(ours: torch.nn.Module, folder: Path, source: Path, length: int) -> None:
    """transformers on ``folder`` and our loader of it compute ``ours``; training moved it
    away from ``source``."""
    ids = tokens(length, VOCAB)
    with torch.no_grad(), torch_threads():
        logits = ours.eval()(ids)
        theirs = transformers_logits(folder, ids)
        reloaded = hf_model_spec(folder).load()(ids)
        before = transformers_logits(source, ids)
    assert (logits - theirs).abs().max() < TOLERANCE
    assert (logits - reloaded).abs().max() < TOLERANCE
    assert (logits - before).abs().max() > 1e-2, "training left the model unchanged"


def test_continued_pretraining_saves_what_transformers_computes_as_ours(family, corpus,
                                                                        tmp_path):
    name, source = family
    cfg = family_config(TINY_CONFIG, name, source, f"output_dir={tmp_path / 'run'}",
                        f"dataset.data_dir={corpus['corpus']}",
                        f"validation_dataset.data_dir={corpus['corpus']}", "max_steps=2",
                        "save_every_n_steps=2")
    recipe = train(ContinuedPretrainRecipe, cfg)
    saved = latest_checkpoint(tmp_path / "run") / "model"
    assert_same_logits(recipe.model, saved, source, length=96)
    config, original = (json.loads((f / "config.json").read_text()) for f in (saved, source))
    for key in ("model_type", "rope_theta", "rope_scaling", "rope_parameters", "layer_types",
                "tie_word_embeddings"):
        assert config.get(key) == original.get(key), key
    if name == "qwen2":
        assert recipe.model.layers[0].attn.q_proj.bias is not None


def test_a_long_context_stage_saves_its_theta_and_keeps_the_scaling(family, corpus, tmp_path):
    """The stage builds the family with θ 4e6 (a scaled RoPE keeps its scaling around it) and
    its checkpoint says so; explicit-mask attention keeps the trained model a plain torchtune
    decoder to compare (per-document attention trains the same weights, as
    test_long_context_recipe checks). Qwen2's stage tokenizes with its own tokenizer through the
    ProLong stage configs' component, as `pipeline.py --base-model` sets it."""
    name, source = family
    cfg = family_config(
        LONG_CONTEXT_CONFIG, name, source, f"output_dir={tmp_path / 'run'}",
        f"dataset.sources.long.data_files={corpus['long']}",
        f"dataset.sources.short.data_files={corpus['corpus'] / 'prose' / 'train.jsonl'}",
        f"validation_dataset.data_dir={corpus['corpus']}", f"long_context.rope_base={NEW_THETA}",
        "long_context.token_budget=512", "long_context.attention=mask",
        "validation.max_packs_per_domain=1")
    if name == "qwen2":
        cfg.tokenizer = OmegaConf.merge(STAGE_TOKENIZER, {"path": str(source)})
    recipe = train(LongContextRecipe, cfg)
    if name == "qwen2":  # generation_config.json's BOS (tokenizer_config.json names none)
        assert (recipe._tokenizer.bos_id, recipe._tokenizer.eos_id) == (0, 2)
    saved = latest_checkpoint(tmp_path / "run") / "model"
    config = json.loads((saved / "config.json").read_text())
    assert config["rope_theta"] == NEW_THETA
    assert hf_model_spec(saved).rope == hf_model_spec(source).rope.with_theta(NEW_THETA)
    note = recipe.history["stage"]["rope_note"]
    if name == "llama3.2":
        assert config["rope_scaling"] == LLAMA32_SCALING  # kept as the Hub states it
        assert "rope_parameters" not in config
        assert "factor 32" in note and "kept" in note
    else:
        assert note is None and not config.get("rope_scaling")
    assert_same_logits(recipe.model, saved, source, length=128)


@pytest.mark.parametrize(("name", "builder", "words"), [
    ("llama3.2", {"_component_": "acadlm_plugins.models.smollm2.tiny_llama",
                  "vocab_size": VOCAB, "tie_word_embeddings": True},
     "θ 10000, no scaling .* θ 500000, llama3 scaling"),
    ("qwen2", {"_component_": "acadlm_plugins.models.llama.llama_decoder", "vocab_size": VOCAB,
               "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 64,
               "intermediate_dim": 128, "head_dim": 16, "rope_base": 1e6},
     r"interleaved channel pairs.*\(half channel pairs"),
])
def test_a_model_that_rotates_otherwise_than_the_checkpoint_is_refused(
        tmp_path_factory, corpus, tmp_path, name, builder, words):
    """A Llama builder for a Llama-3.2 folder drops its RoPE scaling; one for a Qwen2 folder
    pairs the channels otherwise: both would load the weights and train another model."""
    source = write_family(name, tmp_path_factory.mktemp("refused") / "model", vocab_size=VOCAB,
                          num_hidden_layers=2)
    cfg = family_config(TINY_CONFIG, name, source, f"output_dir={tmp_path / 'run'}",
                        f"dataset.data_dir={corpus['corpus']}",
                        f"validation_dataset.data_dir={corpus['corpus']}")
    cfg.model = OmegaConf.create(builder)
    error = setup_error(ContinuedPretrainRecipe, cfg)
    assert error.key == "model"
    assert re.search(words, str(error)), str(error)
    assert "decoder_from_hf_config" in str(error)
    run = tmp_path / "run"  # torchtune's checkpointer may have created it, empty
    assert not run.exists() or not any(run.iterdir())
