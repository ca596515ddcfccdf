"""The long-context recipe on the tiny model: a stage stretches RoPE and writes θ into the
export, a second stage carries the optimizer state over, and impossible stages are refused
before training."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from recipe_runs import run_recipe_main, torch_threads
from recipe_runs import setup_error as recipe_setup_error
from tiny_setup import REPO_ROOT, write_tiny_checkpoint, write_tiny_corpus
from torchtune.utils._import_guard import _SUPPORTS_FLEX_ATTENTION as SUPPORTS_FLEX

from acadlm_plugins._compat import hf_checkpoint_files
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.long_context_recipe import (
    LongContextRecipe,
    read_stage,
    source_model_config,
    steps_for_budget,
)
from acadlm_plugins.training.checkpointing import RECIPE_STATE_FILENAME, latest_checkpoint

CONFIG = REPO_ROOT / "configs" / "tiny" / "long_context.yaml"
MODULE = "acadlm_plugins.long_context_recipe"


def write_long_documents(path: Path, count: int = 12, seed: int = 0) -> Path:
    """Documents of 150-400 characters (the byte tokenizer's tokens) over a small vocabulary."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "lambda"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for i in range(count):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(30, 70)))
            handle.write(json.dumps({"id": f"long-{i}", "text": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("long_context")
    corpus = write_tiny_corpus(root / "corpus")
    return {"model": write_tiny_checkpoint(root / "model"), "corpus": corpus,
            "long": write_long_documents(root / "long" / "docs.jsonl")}


def stage_args(data: dict[str, Path], output_dir: Path, *overrides: str) -> list[str]:
    return ["--config", str(CONFIG), f"output_dir={output_dir}",
            f"checkpointer.checkpoint_dir={data['model']}",
            f"dataset.sources.long.data_files={data['long']}",
            f"dataset.sources.short.data_files={data['corpus'] / 'prose' / 'train.jsonl'}",
            f"validation_dataset.data_dir={data['corpus']}", *overrides]


def stage_config(data: dict[str, Path], output_dir: Path, *overrides: str):
    args = stage_args(data, output_dir, *overrides)[2:]
    return OmegaConf.merge(OmegaConf.load(CONFIG), OmegaConf.from_dotlist(args))


@pytest.fixture(scope="module")
def stage1(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage1") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch, torch_threads():
        run_recipe_main(monkeypatch, MODULE, stage_args(tiny_data, out))
    return out


def test_a_stage_derives_its_steps_from_the_budget_and_exports_its_rope_base(stage1) -> None:
    summary = json.loads((stage1 / "summary.json").read_text())
    assert summary["steps"] == summary["max_steps"] == 1024 // (128 * 2)
    assert summary["stage"]["rope_base"] == 40000.0
    assert summary["stage"]["source_rope_base"] == 10000.0
    assert set(summary["val_loss_after"]) == {"prose", "numbers", "code"}
    packing = summary["packing"]
    assert set(packing["sources"]) == {"long", "short"}
    assert 0.9 < packing["efficiency"] <= 1.0  # tiny documents: the last pack of each is padded
    assert packing["sources"]["long"]["drawn"] == pytest.approx(0.6, abs=0.01)  # share / efficiency
    assert all(math.isfinite(v) for v in summary["val_loss_after"].values())
    model_dir = latest_checkpoint(stage1) / "model"
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["rope_theta"] == 40000.0
    assert saved["max_position_embeddings"] == 512  # the source's, already longer than 128


def test_the_exported_stage_reloads_with_its_rope_base_in_torchtune_and_transformers(stage1):
    from transformers import LlamaForCausalLM

    from acadlm_plugins.models.llama import llama_from_hf_config

    model_dir = latest_checkpoint(stage1) / "model"
    with torch_threads():
        ours = llama_from_hf_config(str(model_dir))
        assert ours.layers[0].attn.pos_embeddings.base == 40000.0
        from safetensors.torch import load_file
        from torchtune.models.convert_weights import hf_to_tune

        hf_state = {k: v for name in hf_checkpoint_files(model_dir)
                    for k, v in load_file(model_dir / name).items()}
        ours.load_state_dict(hf_to_tune(hf_state, num_heads=4, num_kv_heads=2, dim=64,
                                        head_dim=16), strict=False)
        theirs = LlamaForCausalLM.from_pretrained(model_dir).eval()
        tokens = torch.randint(3, 200, (1, 100))
        with torch.no_grad():
            want = theirs(tokens).logits
            got = ours(tokens)
    assert torch.allclose(got, want, atol=1e-4)


def test_the_next_stage_carries_the_optimizer_moments_and_restarts_the_schedule(
        stage1, tiny_data, tmp_path) -> None:
    previous = torch.load(latest_checkpoint(stage1) / RECIPE_STATE_FILENAME,
                          weights_only=False)["optimizer"]
    cfg = stage_config(tiny_data, tmp_path / "stage2",
                       f"checkpointer.checkpoint_dir={latest_checkpoint(stage1) / 'model'}",
                       "checkpointer.checkpoint_files=[model-00001-of-00001.safetensors]",
                       f"long_context.previous_stage={stage1}", "long_context.max_seq_len=256",
                       "long_context.rope_base=160000.0", "long_context.trained_length=null",
                       "long_context.token_budget=1024", "optimizer.lr=1.0e-3",
                       "validation.max_packs_per_domain=1")
    with torch_threads():
        recipe = LongContextRecipe(cfg)
        try:
            recipe.setup(cfg)
            optimizer = recipe._optimizer
            assert [g["lr"] for g in optimizer.param_groups] == [1.0e-3]
            state = optimizer.state_dict()["state"]
            assert set(state) == set(previous["state"]) and state
            for index, moments in previous["state"].items():
                assert torch.equal(state[index]["exp_avg"], moments["exp_avg"])
                assert torch.equal(state[index]["exp_avg_sq"], moments["exp_avg_sq"])
            assert recipe._step == 0 and recipe._max_steps == 2
            assert recipe._history["optimizer_state_from"].endswith("step_000004")
            summary = recipe.train()
        finally:
            recipe.cleanup()
    assert summary["stage"]["source_rope_base"] == 40000.0  # read from stage 1's export
    saved = json.loads((latest_checkpoint(tmp_path / "stage2") / "model" / "config.json")
                       .read_text())
    assert saved["rope_theta"] == 160000.0 and saved["max_position_embeddings"] == 512


def bad_stage(tiny_data, tmp_path, *overrides: str):
    cfg = stage_config(tiny_data, tmp_path / "bad", *overrides)
    return read_stage(cfg, source_model_config(cfg))


@pytest.mark.parametrize(("overrides", "field", "words"), [
    (["long_context.rope_base=0"], "long_context.rope_base", "positive"),
    (["long_context.rope_base=-5"], "long_context.rope_base", "positive"),
    (["long_context.rope_base=10000.0"], "long_context.rope_base", "longer than the 64"),
    (["long_context.rope_base=null"], "long_context.rope_base", "same RoPE base"),
    (["dataset.max_seq_len=64"], "dataset.max_seq_len", "long_context.max_seq_len=128"),
    (["+long_context.rope_scaling=2"], "long_context.rope_scaling", "not a known key"),
    (["long_context.token_budget=100"], "long_context.token_budget", "one sequence"),
    (["long_context.chunked_loss_tokens=-1"], "long_context.chunked_loss_tokens", ">= 0"),
    (["long_context.attention=flash"], "long_context.attention", "unknown mode"),
    (["long_context.document_masking=sometimes"], "long_context.document_masking", "true or false"),
    (["long_context.document_masking=false", "long_context.attention=documents"],
     "long_context.attention", "document_masking is false"),
    # values of the wrong type name their key instead of a bare ValueError/TypeError
    (["long_context.rope_base=high"], "long_context.rope_base", "not a number"),
    (["long_context.max_seq_len=8k"], "long_context.max_seq_len", "not an integer"),
    (["long_context.max_seq_len=null"], "long_context.max_seq_len", "is null"),
    (["long_context.max_seq_len=1"], "long_context.max_seq_len", "below its minimum"),
    (["long_context.token_budget=lots"], "long_context.token_budget", "not an integer"),
    (["long_context.trained_length=2k"], "long_context.trained_length", "not an integer"),
    (["long_context.trained_length=0"], "long_context.trained_length", "below its minimum"),
    (["long_context.chunked_loss_tokens=many"], "long_context.chunked_loss_tokens",
     "not an integer"),
    (["long_context.chunked_loss_tokens=1.5"], "long_context.chunked_loss_tokens",
     "not a whole number"),
])
def test_impossible_stages_are_refused_naming_the_field(tiny_data, tmp_path, overrides, field,
                                                        words) -> None:
    overrides = [o.lstrip("+") for o in overrides]
    with pytest.raises(ConfigError) as raised:
        bad_stage(tiny_data, tmp_path, *overrides)
    assert raised.value.key == field and words in str(raised.value)


def test_a_malformed_rope_value_in_the_checkpoints_config_names_file_and_key(tiny_data,
                                                                           tmp_path) -> None:
    """The stage reads θ from the checkpoint's config.json; a string there is named with its
    file and key (the family layer's check), not a bare ValueError."""
    import shutil

    cfg = stage_config(tiny_data, tmp_path / "run")
    folder = tmp_path / "model"
    shutil.copytree(Path(str(cfg.checkpointer.checkpoint_dir)).expanduser(), folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = "high"
    (folder / "config.json").write_text(json.dumps(config))
    cfg.checkpointer.checkpoint_dir = str(folder)
    with pytest.raises(ConfigError) as raised:
        read_stage(cfg, source_model_config(cfg))
    assert raised.value.key == "rope_theta" and str(folder / "config.json") in str(raised.value)


def test_a_stage_within_the_trained_length_may_keep_its_rope_base(tiny_data, tmp_path) -> None:
    stage = bad_stage(tiny_data, tmp_path, "long_context.rope_base=null",
                      "long_context.trained_length=null")
    assert stage.rope_base == 10000.0 and not stage.extends_context
    assert steps_for_budget(stage, batch_size=2, grad_accum=1, data_parallel=2) == 2


def test_weight_files_that_are_not_there_are_named_with_those_that_are(stage1, tiny_data,
                                                                      tmp_path) -> None:
    from acadlm_plugins.long_context_recipe import check_checkpoint_files

    cfg = stage_config(tiny_data, tmp_path / "run",
                       f"checkpointer.checkpoint_dir={latest_checkpoint(stage1) / 'model'}")
    with pytest.raises(ConfigError) as raised:
        check_checkpoint_files(cfg)
    assert raised.value.key == "checkpointer.checkpoint_files"
    assert "[model-00001-of-00001.safetensors]" in str(raised.value)


def setup_error(cfg) -> ConfigError:
    return recipe_setup_error(LongContextRecipe, cfg)


def test_a_missing_previous_stage_is_refused_before_training(tiny_data, tmp_path) -> None:
    cfg = stage_config(tiny_data, tmp_path / "run", f"long_context.previous_stage={tmp_path}/nope")
    assert setup_error(cfg).key == "long_context.previous_stage"


def test_per_document_and_masked_attention_train_the_same_stage(stage1, tiny_data,
                                                                 tmp_path) -> None:
    """stage1 ran with attention=auto, i.e. per-document attention on CPU; the explicit-mask
    path must give the same validation losses to float rounding."""
    with pytest.MonkeyPatch.context() as monkeypatch, torch_threads():
        out = run_recipe_main(monkeypatch, MODULE, stage_args(
            tiny_data, tmp_path / "masked", "long_context.attention=mask"))
    looped = json.loads((stage1 / "summary.json").read_text())
    masked = json.loads((out / "summary.json").read_text())
    assert looped["stage"]["attention"] == "auto" and masked["stage"]["attention"] == "mask"
    for when in ("val_loss_before", "val_loss_after"):
        for domain, value in masked[when].items():
            assert looped[when][domain] == pytest.approx(value, rel=1e-4), (when, domain)


def test_an_8bit_stage_takes_adamws_moments_and_exports_an_int4_copy_with_its_rope_base(
        stage1, tiny_data, tmp_path) -> None:
    """torchao in a stage: stage 1 trained with torch AdamW, stage 2 switches to AdamW8bit
    (its moments are quantized on load) and asks for an int4 copy of its final model."""
    from acadlm_plugins.evaluation.lm_adapter import load_decoder

    previous = torch.load(latest_checkpoint(stage1) / RECIPE_STATE_FILENAME,
                          weights_only=False)["optimizer"]["state"]
    cfg = stage_config(tiny_data, tmp_path / "stage2",
                       f"checkpointer.checkpoint_dir={latest_checkpoint(stage1) / 'model'}",
                       "checkpointer.checkpoint_files=[model-00001-of-00001.safetensors]",
                       f"long_context.previous_stage={stage1}", "long_context.max_seq_len=256",
                       "long_context.rope_base=160000.0", "long_context.trained_length=null",
                       "long_context.token_budget=512", "validation.max_packs_per_domain=1",
                       "optimizer._component_=torchao.optim.AdamW8bit",
                       "torchao.quantized_export=int4_weight_only")
    with torch_threads():
        recipe = LongContextRecipe(cfg)
        try:
            recipe.setup(cfg)
            state = recipe._optimizer.state_dict()["state"]
            kinds = {type(s["exp_avg"]).__name__ for s in state.values()}
            assert kinds == {"OptimState8bit", "Tensor"}, kinds
            for index, moments in previous.items():
                loaded = state[index]["exp_avg"]
                loaded = loaded.dequantize() if hasattr(loaded, "codes") else loaded
                scale = float(moments["exp_avg"].abs().max())
                torch.testing.assert_close(loaded, moments["exp_avg"], rtol=0, atol=0.02 * scale)
            summary = recipe.train()
        finally:
            recipe.cleanup()
    copy = Path(summary["quantized_model"]["path"])
    assert copy.name == "model-int4_weight_only"
    assert json.loads((copy / "config.json").read_text())["rope_theta"] == 160000.0
    model = load_decoder(copy, max_seq_len=None, device=torch.device("cpu"), dtype=torch.float32)
    assert model.layers[0].attn.pos_embeddings.base == 160000.0
    assert type(model.layers[0].attn.q_proj.weight).__name__ == "AffineQuantizedTensor"


def test_document_masking_is_on_unless_switched_off(tiny_data, tmp_path) -> None:
    assert bad_stage(tiny_data, tmp_path).document_masking is True
    stage = bad_stage(tiny_data, tmp_path, "long_context.document_masking=false")
    assert stage.document_masking is False and stage.attention == "auto"


@pytest.mark.parametrize(("overrides", "mask"), [
    ([], None),                                          # auto on CPU: per-document attention
    (["long_context.attention=documents"], None),
    (["long_context.document_masking=false"], None),     # one causal sequence per pack
    (["long_context.attention=mask"], (2, 128, 128)),    # torchtune's dense SDPA mask
])
def test_a_batch_carries_a_mask_only_where_the_model_reads_one(tiny_data, tmp_path, overrides,
                                                               mask) -> None:
    cfg = stage_config(tiny_data, tmp_path / "run", *overrides)
    with torch_threads():
        recipe = LongContextRecipe(cfg)
        try:
            recipe.setup(cfg)
            batch = recipe._next_batch()
            losses, counted = recipe._sequence_losses(recipe._model, batch)
        finally:
            recipe.cleanup()
    assert batch["tokens"].shape == (2, 128) and batch["seq_lens"].shape[0] == 2
    if overrides == ["long_context.document_masking=false"]:  # one sequence per pack
        assert batch["input_pos"].tolist() == [list(range(128))] * 2
    if mask is None:
        assert "mask" not in batch
    elif not SUPPORTS_FLEX:  # else torchtune's collate gives a BlockMask
        assert batch["mask"].dtype == torch.bool and tuple(batch["mask"].shape) == mask
    assert counted.sum() == int((batch["labels"][:, 1:] != -100).sum())
    assert torch.isfinite(losses).all()


def test_a_stage_without_document_masking_trains_across_documents(stage1, tiny_data,
                                                                  tmp_path) -> None:
    """The ablation arm trains end to end; the same packs score differently once attention
    crosses documents (validation follows the stage's attention)."""
    with pytest.MonkeyPatch.context() as monkeypatch, torch_threads():
        out = run_recipe_main(monkeypatch, MODULE, stage_args(
            tiny_data, tmp_path / "unmasked", "long_context.document_masking=false"))
    masked = json.loads((stage1 / "summary.json").read_text())
    unmasked = json.loads((out / "summary.json").read_text())
    assert unmasked["stage"]["document_masking"] is False
    assert unmasked["steps"] == masked["steps"]
    differ = [d for d, v in unmasked["val_loss_before"].items()
              if abs(v - masked["val_loss_before"][d]) > 1e-4]
    assert differ, "cross-document attention left every validation loss unchanged"


def test_validation_batches_carry_no_dense_mask_unless_the_model_reads_one(tiny_data,
                                                                           tmp_path) -> None:
    """A per-document stage (attention auto on CPU) never builds the document mask,
    neither for training nor for validation, and validates as the explicit-mask stage does,
    which builds it."""
    from acadlm_plugins.data import document_masks

    built: list[str] = []
    original = document_masks.document_causal_mask

    def counted(*args, **kwargs):
        built.append("mask")
        return original(*args, **kwargs)

    summaries = {}
    with pytest.MonkeyPatch.context() as monkeypatch, torch_threads():
        monkeypatch.setattr(document_masks, "document_causal_mask", counted)
        for attention in ("auto", "mask"):
            built.clear()
            out = run_recipe_main(monkeypatch, MODULE, stage_args(
                tiny_data, tmp_path / attention, f"long_context.attention={attention}",
                "long_context.token_budget=256"))
            summaries[attention] = (json.loads((out / "summary.json").read_text()), len(built))
    (documents, documents_built), (masked, masked_built) = summaries["auto"], summaries["mask"]
    assert documents_built == 0
    # one mask per training step and per validation batch (3 domains x 1 batch, twice)
    assert masked_built == masked["steps"] + 2 * 3
    for when in ("val_loss_before", "val_loss_after"):
        assert documents[when] == pytest.approx(masked[when], rel=1e-4), when


# ----------------------------------------------------- optimizer state between stages


def next_stage_config(tiny_data, stage_dir: Path, output_dir: Path, *overrides: str,
                      weights: Path | None = None):
    """A 256-token stage that continues ``stage_dir`` from ``weights`` (default: its newest
    checkpoint's model) with its optimizer state."""
    weights = weights or latest_checkpoint(stage_dir) / "model"
    return stage_config(tiny_data, output_dir, f"checkpointer.checkpoint_dir={weights}",
                        "checkpointer.checkpoint_files=[model-00001-of-00001.safetensors]",
                        f"long_context.previous_stage={stage_dir}",
                        "long_context.max_seq_len=256", "long_context.rope_base=160000.0",
                        "long_context.trained_length=null", "long_context.token_budget=512",
                        "validation.max_packs_per_domain=1", *overrides)


@pytest.fixture(scope="module")
def stage1_8bit(tiny_data, tmp_path_factory) -> Path:
    """The tiny stage trained with torchao's AdamW8bit (checkpoints at steps 2 and 4, whose
    single-process recipe states keep the 8-bit moments as they are)."""
    out = tmp_path_factory.mktemp("stage1_8bit") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch, torch_threads():
        run_recipe_main(monkeypatch, MODULE, stage_args(
            tiny_data, out, "optimizer._component_=torchao.optim.AdamW8bit"))
    return out


def test_an_adamw_stage_takes_an_8bit_stages_moments_dequantized(stage1_8bit, tiny_data,
                                                                  tmp_path) -> None:
    """The reverse of the AdamW -> AdamW8bit switch: torch AdamW cannot update 8-bit states
    (its first step failed with `OptimState8bit dispatch: ... aten.lerp_`)."""
    previous = torch.load(latest_checkpoint(stage1_8bit) / RECIPE_STATE_FILENAME,
                          weights_only=False)["optimizer"]["state"]
    assert "OptimState8bit" in {type(s["exp_avg"]).__name__ for s in previous.values()}
    cfg = next_stage_config(tiny_data, stage1_8bit, tmp_path / "stage2")
    with torch_threads():
        recipe = LongContextRecipe(cfg)
        try:
            recipe.setup(cfg)
            state = recipe._optimizer.state_dict()["state"]
            assert {type(s[k]) for s in state.values() for k in ("exp_avg", "exp_avg_sq")} == {
                torch.Tensor}
            for index, moments in previous.items():
                for key in ("exp_avg", "exp_avg_sq"):
                    saved = moments[key]
                    saved = saved.dequantize() if hasattr(saved, "codes") else saved
                    assert torch.equal(state[index][key], saved), (index, key)
            summary = recipe.train()
        finally:
            recipe.cleanup()
    assert summary["steps"] == 1
    assert all(math.isfinite(v) for v in summary["val_loss_after"].values())


def test_an_8bit_stage_resumed_with_adamw_dequantizes_its_moments(stage1_8bit, tiny_data,
                                                                  tmp_path) -> None:
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(stage1_8bit, out)
    shutil.rmtree(out / "step_000004")  # resume from step 2 of 4
    with pytest.MonkeyPatch.context() as monkeypatch, torch_threads():
        run_recipe_main(monkeypatch, MODULE, stage_args(tiny_data, out))  # torch AdamW
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    assert all(math.isfinite(v) for v in summary["val_loss_after"].values())
    state = torch.load(latest_checkpoint(out) / RECIPE_STATE_FILENAME,
                       weights_only=False)["optimizer"]["state"]
    assert {type(s["exp_avg"]) for s in state.values()} == {torch.Tensor}


def test_the_optimizer_state_comes_from_the_checkpoint_the_weights_come_from(
        stage1, tiny_data, tmp_path) -> None:
    """Weights from step 2 of the previous stage carry step 2's moments, not step 4's."""
    step2 = stage1 / "step_000002"
    previous = torch.load(step2 / RECIPE_STATE_FILENAME, weights_only=False)["optimizer"]
    cfg = next_stage_config(tiny_data, stage1, tmp_path / "stage2", weights=step2 / "model")
    with torch_threads():
        recipe = LongContextRecipe(cfg)
        try:
            recipe.setup(cfg)
            state = recipe._optimizer.state_dict()["state"]
            assert recipe._history["optimizer_state_from"] == str(step2)
            for index, moments in previous["state"].items():
                assert torch.equal(state[index]["exp_avg"], moments["exp_avg"])
                assert int(state[index]["step"]) == 2
        finally:
            recipe.cleanup()


def test_weights_from_elsewhere_do_not_take_a_previous_stages_moments(stage1, tiny_data,
                                                                       tmp_path) -> None:
    from acadlm_plugins.long_context_recipe import optimizer_source

    base = tiny_data["model"]  # the weights stage 1 started from, not any of its checkpoints
    cfg = next_stage_config(tiny_data, stage1, tmp_path / "stage2",
                            "checkpointer.checkpoint_files=[model.safetensors]", weights=base)
    error = setup_error(cfg)
    assert error.key == "long_context.previous_stage"
    assert str(latest_checkpoint(stage1) / "model") in str(error)
    for inside in (stage1, stage1 / "step_000004", stage1 / "logs"):
        with pytest.raises(ConfigError) as raised:
            optimizer_source(stage1, inside)
        assert raised.value.key == "checkpointer.checkpoint_dir"
    # the newest checkpoint's model under another path (a link) is that checkpoint
    link = tmp_path / "stage1_model"
    link.symlink_to(latest_checkpoint(stage1) / "model", target_is_directory=True)
    assert optimizer_source(stage1, link) == latest_checkpoint(stage1)
    assert optimizer_source(stage1, stage1 / "step_000002" / "model") == stage1 / "step_000002"


# ------------------------------------------------------------------ sequence parallelism


def test_sequence_parallelism_checks_the_validation_length_too(tiny_data, tmp_path) -> None:
    """Validation shards its sequences as training does, so its pack length must split into
    `degree` shards as well (it used to fail at the first validation batch, naming
    dataset.max_seq_len)."""
    from acadlm_plugins.long_context_recipe import (
        check_sequence_parallel_config,
        check_sequence_parallel_lengths,
    )
    from acadlm_plugins.models import decoder_from_hf_config

    cfg = stage_config(tiny_data, tmp_path / "run", "validation_dataset.max_seq_len=127")
    stage = read_stage(cfg, source_model_config(cfg))
    check_sequence_parallel_lengths(cfg, stage, 1)
    with pytest.raises(ConfigError) as raised:
        check_sequence_parallel_lengths(cfg, stage, 2)
    assert raised.value.key == "validation_dataset.max_seq_len"
    assert "126 or 128" in str(raised.value)
    check_sequence_parallel_lengths(stage_config(tiny_data, tmp_path / "run"), stage, 2)
    # when the config leaves it to the dataset's default, the built packs' length is checked
    with torch.device("meta"):
        model = decoder_from_hf_config(str(tiny_data["model"]))
    check_sequence_parallel_config(model, stage, 2, validation_length=128)
    with pytest.raises(ConfigError) as raised:
        check_sequence_parallel_config(model, stage, 2, validation_length=2047)
    assert raised.value.key == "validation_dataset.max_seq_len"
    bad = stage_config(tiny_data, tmp_path / "run", "validation_dataset.max_seq_len=long")
    with pytest.raises(ConfigError) as raised:
        check_sequence_parallel_lengths(bad, stage, 2)
    assert raised.value.key == "validation_dataset.max_seq_len"


# ------------------------------------------------------------------ the SmolLM2 stage configs


@pytest.mark.integration
@pytest.mark.parametrize("name", ["long_context_stage1.yaml", "long_context_stage2.yaml"])
def test_the_smollm2_stage_configs_build_the_checkpoints_architecture(name) -> None:
    """The stage configs build the model from the checkpoint's config.json (so any base model
    works); for SmolLM2 that is the model the SmolLM2 builder gave: the same class, the
    checkpoint's state-dict shapes and the same RoPE. Stage 2 starts from stage 1's export of
    the same architecture; the embedded model stands in for it."""
    from safetensors import safe_open
    from torchtune.models.convert_weights import hf_to_tune

    from acadlm_plugins.defaults import require_default_model
    from acadlm_plugins.models import smollm2_135m
    from acadlm_plugins.training.components import instantiate_component

    model_dir = require_default_model()
    cfg = OmegaConf.merge(OmegaConf.load(REPO_ROOT / "configs" / "smollm2" / name),
                          OmegaConf.from_dotlist([f"checkpointer.checkpoint_dir={model_dir}",
                                                  "checkpointer.checkpoint_files=[model.safetensors]"]))
    stage = read_stage(cfg, source_model_config(cfg))
    length = max(stage.max_seq_len, stage.source_max_positions)  # as the recipe builds it
    with torch.device("meta"):
        built = instantiate_component(cfg, "model", rope_base=stage.rope_base,
                                      max_seq_len=length)
        before = smollm2_135m(max_seq_len=length, rope_base=stage.rope_base)
        with safe_open(model_dir / "model.safetensors", framework="pt") as weights:
            checkpoint = {k: torch.empty(weights.get_slice(k).get_shape())
                          for k in weights.keys()}  # noqa: SIM118 (no __iter__)
        checkpoint = hf_to_tune(checkpoint, num_heads=9, num_kv_heads=3, dim=576, head_dim=64)
    shapes = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in before.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in checkpoint.items()}
    rope, old_rope = built.layers[0].attn.pos_embeddings, before.layers[0].attn.pos_embeddings
    for ours, theirs in zip(built.modules(), before.modules(), strict=True):
        # SmolLM2's config.json has an unscaled ("default") RoPE, which the family layer builds
        # as torchtune's plain RoPE; the SmolLM2 builder used llama3 scaling with factor 1.
        if ours is not rope:
            assert type(ours) is type(theirs)
    assert (rope.dim, rope.base, rope.max_seq_len) == (old_rope.dim, stage.rope_base, length)
    assert old_rope.base == stage.rope_base
    rope.rope_init()  # the tables, on the CPU, of both: the same rotation at every position
    old_rope.rope_init()
    assert torch.equal(rope.cache, old_rope.cache)


def test_an_unreadable_previous_stage_state_is_named_with_the_way_out(stage1, tiny_data,
                                                                     tmp_path) -> None:
    """A truncated recipe_state.pt of the previous stage (a full disk, say) is a ConfigError
    naming the file and the fixes, not torch's zip error."""
    import shutil

    copy = tmp_path / "stage1"
    shutil.copytree(stage1, copy)
    state = copy / "step_000004" / RECIPE_STATE_FILENAME
    state.write_bytes(state.read_bytes()[:1000])
    cfg = next_stage_config(tiny_data, copy, tmp_path / "stage2",
                            weights=copy / "step_000004" / "model")
    error = setup_error(cfg)
    assert error.key == "long_context.previous_stage"
    assert str(state) in str(error) and "previous_stage: null" in str(error)
