"""torchao in every recipe: low-bit optimizer states by ``optimizer._component_``, weight-only
quantized exports (our recipes' ``torchao.quantized_export``, stock recipes' checkpointer, the
CLI) evaluated through our adapter, and float8 refused where the hardware lacks it."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from omegaconf import OmegaConf
from recipe_runs import run_recipe_main, torch_threads
from recipe_runs import setup_error as recipe_setup_error
from tiny_setup import (
    REPO_ROOT,
    run_tune_subprocess,
    tiny_run_args,
    write_tiny_checkpoint,
    write_tiny_model_dir,
)

from acadlm_plugins.continued_pretrain_recipe import ContinuedPretrainRecipe
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.evaluation.lm_adapter import AcadLM, load_decoder
from acadlm_plugins.quantization import (
    QuantizedExportCheckpointer,
    read_quantization,
    write_quantized_copy,
)
from acadlm_plugins.quantization import main as quantize_cli
from acadlm_plugins.training.float8 import convert_to_float8
from acadlm_plugins.training.optimizers import check_optimizer, state_bytes

CPT = "acadlm_plugins.continued_pretrain_recipe"
STEPS = 4
LOW_BIT = "torchao.optim.AdamW8bit"


@pytest.fixture(autouse=True)
def quiet_isolated_runs(monkeypatch):
    monkeypatch.setenv("ACADLM_NO_PROGRESS", "1")
    monkeypatch.setenv("ACADLM_PLUGINS_DISABLE_AUTOLOAD", "1")


def train(root: Path, name: str, optimizer: str, *overrides: str) -> Path:
    out = root / name
    args = [a for a in tiny_run_args(root) if not a.startswith("output_dir=")]
    with pytest.MonkeyPatch.context() as monkeypatch, torch_threads():
        run_recipe_main(monkeypatch, CPT, [*args, f"output_dir={out}",
                                           f"optimizer._component_={optimizer}",
                                           f"max_steps={STEPS}", f"save_every_n_steps={STEPS}",
                                           *overrides])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The tiny continued pre-training run with torch AdamW and with torchao AdamW8bit (which
    also asks for an int8 copy of the final model), on the same data."""
    root = tmp_path_factory.mktemp("torchao_runs")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("ACADLM_NO_PROGRESS", "1")
        monkeypatch.setenv("ACADLM_PLUGINS_DISABLE_AUTOLOAD", "1")
        return {"adamw": train(root, "adamw", "torch.optim.AdamW"),
                "8bit": train(root, "8bit", LOW_BIT, "torchao.quantized_export=int8_weight_only")}


def saved_optimizer_state(out: Path) -> dict:
    state = torch.load(out / f"step_{STEPS:06d}" / "recipe_state.pt", weights_only=False)
    return state["optimizer"]["state"]


# ------------------------------------------------------------------------ low-bit optimizers


def test_one_line_switches_to_8bit_states_that_take_a_quarter_of_the_bytes(runs) -> None:
    low, full = saved_optimizer_state(runs["8bit"]), saved_optimizer_state(runs["adamw"])
    kinds = {type(s["exp_avg"]).__name__ for s in low.values()}
    assert kinds == {"OptimState8bit", "Tensor"}, kinds  # small tensors keep float32 moments
    assert {type(s["exp_avg"]).__name__ for s in full.values()} == {"Tensor"}
    for key, per_param in low.items():
        moment = per_param["exp_avg"]
        if type(moment).__name__ == "OptimState8bit":
            as_float32 = moment.numel() * 4
            ratio = state_bytes({key: {"m": moment}})["total"] / as_float32
            # one byte per value, one float32 scale per 256 values, a 256-entry float32 code map
            assert 0.25 < ratio <= 0.25 + 4 / 256 + 256 * 4 / as_float32, ratio
    low_total, full_total = state_bytes(low)["total"], state_bytes(full)["total"]
    assert state_bytes(full)["low_bit"] == 0
    assert low_total < 0.5 * full_total, (low_total, full_total)


def test_the_8bit_run_trains_like_adamw(runs) -> None:
    low = json.loads((runs["8bit"] / "summary.json").read_text())
    full = json.loads((runs["adamw"] / "summary.json").read_text())
    assert low["val_loss_before"] == full["val_loss_before"]
    for domain, value in full["val_loss_after"].items():
        assert value < full["val_loss_before"][domain] - 0.5  # both really trained
        # stated tolerance: within 1% of torch AdamW after the same steps on the same batches
        assert low["val_loss_after"][domain] == pytest.approx(value, rel=0.01), domain


def test_a_low_bit_run_resumes_from_its_checkpoint(runs, tmp_path) -> None:
    """Resuming restores the quantized moments: a run stopped after 2 steps and resumed to
    4 ends where the uninterrupted one did."""
    args = [a for a in tiny_run_args(runs["8bit"].parent) if not a.startswith("output_dir=")]
    out = tmp_path / "resumed"
    common = [*args, f"output_dir={out}", f"optimizer._component_={LOW_BIT}", "save_every_n_steps=2"]
    with pytest.MonkeyPatch.context() as monkeypatch, torch_threads():
        run_recipe_main(monkeypatch, CPT, [*common, "max_steps=2"])
        run_recipe_main(monkeypatch, CPT, [*common, f"max_steps={STEPS}"])
    resumed = json.loads((out / "summary.json").read_text())["val_loss_after"]
    whole = json.loads((runs["8bit"] / "summary.json").read_text())["val_loss_after"]
    for domain, value in whole.items():
        assert resumed[domain] == pytest.approx(value, abs=1e-5), domain



def test_a_low_bit_run_resumed_with_torch_adamw_converts_its_moments(runs, tmp_path) -> None:
    """Resuming an AdamW8bit run with torch AdamW hands AdamW plain float32 moments (it has no
    arithmetic for 8-bit states and would fail on its first step otherwise)."""
    args = [a for a in tiny_run_args(runs["8bit"].parent) if not a.startswith("output_dir=")]
    out = tmp_path / "switched"
    common = [*args, f"output_dir={out}", "save_every_n_steps=2"]
    with pytest.MonkeyPatch.context() as monkeypatch, torch_threads():
        run_recipe_main(monkeypatch, CPT, [*common, f"optimizer._component_={LOW_BIT}",
                                           "max_steps=2"])
        run_recipe_main(monkeypatch, CPT, [*common, "optimizer._component_=torch.optim.AdamW",
                                           f"max_steps={STEPS}"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert all(math.isfinite(v) for v in summary["val_loss_after"].values())
    state = saved_optimizer_state(out)
    assert {type(s["exp_avg"]) for s in state.values()} == {torch.Tensor}


def test_an_adamw_run_resumed_with_8bit_states_trains(runs, tmp_path) -> None:
    """The other direction: torch AdamW's checkpoint puts a float ``lr`` into the param groups,
    which torchao's optimizers refuse at their first step (``lr was changed to a non-Tensor
    object``); the resumed run gets a tensor lr back, quantized moments, and trains."""
    args = [a for a in tiny_run_args(runs["adamw"].parent) if not a.startswith("output_dir=")]
    out = tmp_path / "switched"
    common = [*args, f"output_dir={out}", "save_every_n_steps=2"]
    with pytest.MonkeyPatch.context() as monkeypatch, torch_threads():
        run_recipe_main(monkeypatch, CPT, [*common, "optimizer._component_=torch.optim.AdamW",
                                           "max_steps=2"])
        run_recipe_main(monkeypatch, CPT, [*common, f"optimizer._component_={LOW_BIT}",
                                           f"max_steps={STEPS}"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS
    whole = json.loads((runs["adamw"] / "summary.json").read_text())
    for domain, value in summary["val_loss_after"].items():
        assert value < whole["val_loss_before"][domain] - 0.5, domain  # it really trained
    resumed = saved_optimizer_state(out)
    assert {type(s["exp_avg"]).__name__ for s in resumed.values()} == {"OptimState8bit",
                                                                       "Tensor"}
    groups = torch.load(out / f"step_{STEPS:06d}" / "recipe_state.pt",
                        weights_only=False)["optimizer"]["param_groups"]
    assert all(isinstance(group["lr"], torch.Tensor) for group in groups)


@pytest.mark.distributed
def test_fsdp2_trains_with_8bit_states_and_resumes_them(runs, tmp_path) -> None:
    """Two ranks (gloo) with half the batch each train like one process; their checkpoint
    gathers the moments as float32, and a resumed run turns them back into 8-bit states and
    ends where the uninterrupted two-rank run did, up to re-quantization (a block's scale can
    move by one code step when its largest value is positive: measured 6e-5 relative)."""
    def two_ranks(name: str, steps: int) -> dict:
        args = [a for a in tiny_run_args(runs["8bit"].parent) if not a.startswith("output_dir=")]
        run_tune_subprocess(CPT.replace(".", "/"), [
            *args, f"output_dir={tmp_path / name}", f"optimizer._component_={LOW_BIT}",
            "batch_size=2", f"max_steps={steps}", "save_every_n_steps=2"],
            cwd=tmp_path, log_file=tmp_path / f"{name}.log", nproc=2, timeout=400)
        return json.loads((tmp_path / name / "summary.json").read_text())

    whole = two_ranks("whole", STEPS)
    one_process = json.loads((runs["8bit"] / "summary.json").read_text())
    for domain, value in one_process["val_loss_after"].items():
        # blocks of 256 fall differently on each rank's shard: close, not bit-equal
        assert whole["val_loss_after"][domain] == pytest.approx(value, rel=1e-3), domain
    two_ranks("resumed", 2)
    resumed = two_ranks("resumed", STEPS)
    assert "resumed optimizer moments converted to this optimizer's form" in (tmp_path / "resumed.log").read_text()
    for domain, value in whole["val_loss_after"].items():
        assert resumed["val_loss_after"][domain] == pytest.approx(value, rel=1e-3), domain


def test_pruning_gates_and_multipliers_keep_float32_adamw_and_its_export_is_quantized(
        tmp_path) -> None:
    args = [a for a in tiny_run_args(tmp_path) if not a.startswith("validation_dataset.")]
    args[1] = str(REPO_ROOT / "configs" / "tiny" / "prune.yaml")
    cfg = OmegaConf.merge(OmegaConf.load(args[1]), OmegaConf.from_dotlist(
        [*args[2:], f"optimizer._component_={LOW_BIT}", "max_steps=2",
         "torchao.quantized_export=int8_weight_only"]))
    from acadlm_plugins.prune_recipe import PruneRecipe

    recipe = PruneRecipe(cfg)
    try:
        with torch_threads():
            recipe.setup(cfg)
            recipe.train()
        trainer = recipe._trainer
        assert type(trainer._optimizer).__name__ == "AdamW8bit"
        assert any(type(s["exp_avg"]).__name__ == "OptimState8bit"
                   for s in trainer._optimizer.state.values())
        pruning = recipe._pruning
        for optimizer in (pruning.mask_optimizer, pruning.lambda_optimizer):
            assert type(optimizer) is torch.optim.AdamW
            moments = [s["exp_avg"] for s in optimizer.state.values()]
            assert moments and all(type(m) is torch.Tensor and m.dtype == torch.float32
                                   for m in moments)
        assert pruning.lambda_optimizer.param_groups[0]["maximize"] is True
        # the quantized copy is of the materialized model, not of the masked one
        summary = recipe.materialize_and_export()
        copy = Path(summary["quantized_model"]["path"])
        assert copy == tmp_path / "run" / "pruned_model-int8_weight_only"
        assert not list((tmp_path / "run").glob("step_*/model-int8_weight_only"))
        pruned = json.loads((tmp_path / "run" / "pruned_model" / "config.json").read_text())
        assert json.loads((copy / "config.json").read_text()) == pruned
    finally:
        recipe.cleanup()


def test_optimizers_that_cannot_work_here_are_refused_naming_the_field() -> None:
    cfg = OmegaConf.create({"optimizer": {"_component_": "torchao.optim.CPUOffloadOptimizer"}})
    big = [torch.nn.Parameter(torch.zeros(64, 64))]
    with pytest.raises(ConfigError, match="already are") as raised:
        check_optimizer(cfg, [{"params": big}], device=torch.device("cpu"), distributed=False)
    assert raised.value.key == "optimizer._component_"

    # On a GPU: gradients copied to the host during backward are never clipped, and with
    # offloaded gradients only the last micro-batch's would be applied.
    offload = {"_component_": "torchao.optim.CPUOffloadOptimizer"}
    cuda = torch.device("cuda")
    for settings, key in (({"clip_grad_norm": 1.0}, "clip_grad_norm"),
                          ({"gradient_accumulation_steps": 2, "optimizer": {
                              **offload, "offload_gradients": True}},
                           "optimizer.offload_gradients")):
        bad = OmegaConf.create({"optimizer": offload, "clip_grad_norm": None, **settings})
        with pytest.raises(ConfigError) as raised:
            check_optimizer(bad, [{"params": big}], device=cuda, distributed=False)
        assert raised.value.key == key
    fine = OmegaConf.create({"optimizer": {**offload, "offload_gradients": True},
                             "clip_grad_norm": None, "gradient_accumulation_steps": 1})
    check_optimizer(fine, [{"params": big}], device=cuda, distributed=False)

    cfg = OmegaConf.create({"optimizer": {"_component_": LOW_BIT}})
    small = [torch.nn.Parameter(torch.zeros(64)), torch.nn.Parameter(torch.zeros(10, 10))]
    with pytest.raises(ConfigError, match="saves nothing"):
        check_optimizer(cfg, [{"params": small}], device=torch.device("cpu"), distributed=False)
    ints = [torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.int32), requires_grad=False)]
    with pytest.raises(ConfigError, match="torch.int32"):
        check_optimizer(cfg, [{"params": big + ints}], device=torch.device("cpu"),
                        distributed=False)
    check_optimizer(cfg, [{"params": big}], device=torch.device("cpu"), distributed=False)


def setup_error(tmp_path: Path, *overrides: str) -> ConfigError:
    args = [a for a in tiny_run_args(tmp_path) if not a.startswith("--config")][1:]
    cfg = OmegaConf.merge(OmegaConf.load(REPO_ROOT / "configs" / "tiny" / "continued_pretrain.yaml"),
                          OmegaConf.from_dotlist([*args, *overrides]))
    return recipe_setup_error(ContinuedPretrainRecipe, cfg)


@pytest.mark.parametrize(("override", "field", "words"), [
    ("optimizer._component_=torchao.optim.CPUOffloadOptimizer", "optimizer._component_", "cpu"),
    ("optimizer.nonsense=1", "optimizer.nonsense", "lr"),
    ("optimizer._component_=torchao.optim.AdamW8bitt", "optimizer._component_", "cannot import"),
    ("torchao.quantized_export=int3_weight_only", "torchao.quantized_export", "int8_weight_only"),
    ("torchao.float8=tensorwise", "torchao.float8", "compute capability 8.9"),
    ("torchao.float8=fp4", "torchao.float8", "rowwise"),
    ("torchao.group_size=48", "torchao.group_size", "64"),
    ("torchao.quantize=int8_weight_only", "torchao.quantize", "quantized_export"),
    # a string for the block: its characters were reported as keys (`torchao.e`)
    ("torchao=tensorwise", "torchao", "torchao.float8=tensorwise"),
    # 0 == False in Python: it switched float8 off silently
    ("torchao.float8=0", "torchao.float8", "not a float8 recipe name"),
    ("torchao.float8=true", "torchao.float8", "not a float8 recipe name"),
])
def test_bad_torchao_settings_stop_the_run_before_training(tmp_path, override, field,
                                                          words) -> None:
    error = setup_error(tmp_path, override)
    assert error.key == field and words in str(error), str(error)
    assert not list((tmp_path / "run").glob("step_*"))


# ------------------------------------------------------------------------- quantized exports


@pytest.fixture
def torchao_log(caplog):
    """The torchao plugin's log records (our package logger does not propagate to root)."""
    logger = logging.getLogger("acadlm_plugins.plugins.torchao")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def test_an_int4_group_size_that_fits_no_layer_stops_the_run_before_training(tmp_path) -> None:
    """The tiny model's linear layers take 64 and 128 inputs: 256 fits none, which the export
    found only after training."""
    error = setup_error(tmp_path, "torchao.quantized_export=int4_weight_only",
                        "torchao.group_size=256")
    assert error.key == "torchao.group_size", str(error)
    assert "[64, 128]" in str(error) and "int8_weight_only" in str(error)
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("step_*"))


def test_pruning_checks_the_int4_group_size_against_the_target_shape(tmp_path) -> None:
    """The prune recipe exports the pruned model: the tiny target (hidden 48, 2 heads of 16,
    MLP 64) has input widths 32, 48 and 64, none a multiple of 128, although the source's MLP
    (128) is."""
    from acadlm_plugins.prune_recipe import PruneRecipe

    args = [a for a in tiny_run_args(tmp_path) if not a.startswith("validation_dataset.")]
    config = OmegaConf.merge(OmegaConf.load(REPO_ROOT / "configs" / "tiny" / "prune.yaml"),
                             OmegaConf.from_dotlist([*args[2:], "max_steps=2",
                                                     "torchao.quantized_export=int4_weight_only",
                                                     "torchao.group_size=128"]))
    error = recipe_setup_error(PruneRecipe, config)
    assert error.key == "torchao.group_size" and "pruned model" in str(error), str(error)
    assert "[32, 48, 64]" in str(error)


def test_an_int4_group_size_that_fits_some_layers_warns_and_the_summary_lists_them(
        tmp_path, torchao_log) -> None:
    """Group size 128 fits only the MLP down-projections (128 inputs): a warning before
    training says how many layers stay unquantized, and summary.json lists them."""
    out = train(tmp_path, "int4", "torch.optim.AdamW", "torchao.quantized_export=int4_weight_only",
                "torchao.group_size=128", "max_steps=1", "save_every_n_steps=1")
    warned = [r.getMessage() for r in torchao_log.records if r.levelno == logging.WARNING]
    assert any("will keep 12 of 14 linear layers" in m for m in warned), warned
    exported = json.loads((out / "summary.json").read_text())["quantized_model"]
    assert exported["quantized_linears"] == 2 and len(exported["skipped_linears"]) == 12
    assert "layers.0.attn.q_proj" in exported["skipped_linears"]
    assert exported["skipped_linears"] == read_quantization(
        Path(exported["path"]))["skipped_linears"]


def test_a_recipe_writes_an_int8_copy_of_its_final_model(runs) -> None:
    summary = json.loads((runs["8bit"] / "summary.json").read_text())
    copy = Path(summary["quantized_model"]["path"])
    assert copy == runs["8bit"] / f"step_{STEPS:06d}" / "model-int8_weight_only"
    assert read_quantization(copy)["scheme"] == "int8_weight_only"
    assert "quantized_model" not in json.loads((runs["adamw"] / "summary.json").read_text())
    model = load_decoder(copy, max_seq_len=None, device=torch.device("cpu"), dtype=torch.float32)
    assert type(model.layers[0].mlp.w1.weight).__name__ == "AffineQuantizedTensor"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("quant") / "model")


PAIRS = [("The quick brown fox", " jumps over the lazy dog"), ("1 2 3 4", " 5 6 7"),
         ("Hello", " world, this is a test.")]


def _loglikelihoods(folder: Path) -> list[float]:
    lm = AcadLM(pretrained=str(folder), batch_size=2)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
                for i, pair in enumerate(PAIRS)]
    return [logprob for logprob, _ in lm.loglikelihood(requests, disable_tqdm=True)]


@pytest.mark.parametrize(("scheme", "max_bytes", "tolerance"), [
    ("int8_weight_only", 0.6, 0.01), ("int4_weight_only", 0.35, 0.05)])
def test_quantized_copies_are_smaller_and_score_close_through_the_adapter(
        model_dir, scheme, max_bytes, tolerance) -> None:
    copy = write_quantized_copy(model_dir, scheme)
    meta = read_quantization(copy)
    assert meta["quantized_linears"] == 14 and meta["skipped_linears"] == []
    assert meta["weight_bytes"] < max_bytes * meta["source_weight_bytes"]
    assert (copy / "tokenizer.json").is_file() and not list(copy.glob("*.safetensors"))
    want, got = _loglikelihoods(model_dir), _loglikelihoods(copy)
    # measured: 0.15% (int8) and 1.9% (int4) at most on these pairs
    assert got == pytest.approx(want, rel=tolerance)
    assert got != want  # really the quantized weights


def test_quantizing_twice_or_an_unknown_scheme_is_refused(model_dir, tmp_path) -> None:
    copy = write_quantized_copy(model_dir, "int8_weight_only", dest=tmp_path / "q")
    with pytest.raises(ConfigError, match="already a quantized copy"):
        write_quantized_copy(copy, "int8_weight_only")
    with pytest.raises(ConfigError) as raised:
        QuantizedExportCheckpointer(checkpoint_dir=str(model_dir),
                                    checkpoint_files=["model.safetensors"], model_type="LLAMA3_2",
                                    output_dir=str(tmp_path), quantized_export="int2")
    assert raised.value.key == "checkpointer.quantized_export"


def test_the_cli_writes_a_copy(model_dir, tmp_path, capsys) -> None:
    quantize_cli([str(model_dir), "--scheme", "int4_weight_only", "--group-size", "64",
                  "--output", str(tmp_path / "int4")])
    assert "14 linear layers quantized" in capsys.readouterr().out
    assert read_quantization(tmp_path / "int4")["group_size"] == 64


def test_stock_recipe_trains_with_8bit_states_and_exports_an_int8_copy(tmp_path) -> None:
    model = write_tiny_model_dir(tmp_path / "model", weight_std=None)
    out = tmp_path / "out"
    run_tune_subprocess(
        "full_finetune_single_device",
        ["--config", str(REPO_ROOT / "configs" / "tiny" / "sft.yaml"), f"output_dir={out}",
         f"checkpointer.checkpoint_dir={model}", f"optimizer._component_={LOW_BIT}",
         "checkpointer._component_=acadlm_plugins.quantization.QuantizedExportCheckpointer",
         "checkpointer.quantized_export=int8_weight_only"],
        cwd=tmp_path, log_file=tmp_path / "run.log", timeout=400)
    copy = out / "epoch_0-int8_weight_only"
    assert read_quantization(copy)["source"] == str((out / "epoch_0").resolve())
    lm = AcadLM(pretrained=str(copy))
    assert type(lm.model.layers[0].attn.q_proj.weight).__name__ == "AffineQuantizedTensor"


# ----------------------------------------------------------------------------------- float8


def test_float8_swaps_every_eligible_linear_layer(tmp_path) -> None:
    """Only the module swap: running a float8 matmul needs an sm89+ GPU (unchecked here)."""
    from torchao.float8.float8_linear import Float8Linear

    from acadlm_plugins.models.llama import llama_from_hf_config

    model = llama_from_hf_config(str(write_tiny_checkpoint(tmp_path / "m")))
    assert convert_to_float8(model, "tensorwise") == 14
    assert isinstance(model.layers[1].attn.k_proj, Float8Linear)
