"""Ulysses sequence parallelism inside the long-context recipe, as users launch it:
``tune run --nproc_per_node 2`` with ``sequence_parallel.degree=2`` (gloo, CPU, FSDP2).

Both ranks read the same batch and each trains on half of every sequence, so the run must
match one process on the same batches: validation losses, the logged loss of every step and
the saved weights, up to float reduction order. Per-document attention (the CPU default) and
the explicit SDPA mask both go through the exchange.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_distributed import logged_training_metrics
from test_long_context_recipe import CONFIG, stage_args, write_long_documents
from tiny_setup import run_tune_subprocess, write_tiny_checkpoint, write_tiny_corpus

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.long_context_recipe import (
    check_sequence_parallel_config,
    read_stage,
    sequence_parallel_degree,
    source_model_config,
)
from acadlm_plugins.models.llama import llama_from_hf_config

RECIPE = "acadlm_plugins/long_context_recipe"
STEPS = 4
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sp_data")
    return {"model": write_tiny_checkpoint(root / "model"),
            "corpus": write_tiny_corpus(root / "corpus"),
            "long": write_long_documents(root / "long" / "docs.jsonl"), "root": root}


def run_stage(data: dict[str, Path], name: str, *overrides: str, nproc: int = 1) -> Path:
    out = data["root"] / name
    args = stage_args(data, out, f"max_steps={STEPS}", *overrides)
    run_tune_subprocess(RECIPE, args, cwd=data["root"], log_file=data["root"] / f"{name}.log",
                        nproc=nproc)
    return out


def saved_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = out / f"step_{STEPS:06d}" / "model"
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def one_process(data) -> Path:
    return run_stage(data, "one_process")


@pytest.mark.distributed
@pytest.mark.parametrize("attention", ["auto", "mask"])
def test_two_sequence_parallel_ranks_train_as_one_process(data, one_process, attention) -> None:
    sp = run_stage(data, f"sp_{attention}", "sequence_parallel.degree=2",
                   f"long_context.attention={attention}", nproc=2)
    log = (data["root"] / f"sp_{attention}.log").read_text()
    assert "sequence-parallel degree 2" in log

    want = json.loads((one_process / "summary.json").read_text())
    got = json.loads((sp / "summary.json").read_text())
    assert got["steps"] == want["steps"] == STEPS
    for when in ("val_loss_before", "val_loss_after"):
        assert set(got[when]) == set(want[when])
        for domain, value in want[when].items():
            assert got[when][domain] == pytest.approx(value, rel=REL_TOL), (when, domain)
    assert want["val_loss_after"] != want["val_loss_before"], "the stage must have trained"

    # Same batches, same tokens counted once, same loss at every step.
    got_steps, want_steps = logged_training_metrics(sp), logged_training_metrics(one_process)
    assert sorted(got_steps) == sorted(want_steps) == list(range(1, STEPS + 1))
    for step, row in want_steps.items():
        assert got_steps[step]["tokens_seen"] == row["tokens_seen"], step
        assert got_steps[step]["loss"] == pytest.approx(row["loss"], rel=REL_TOL), step

    got_w, want_w = saved_weights(sp), saved_weights(one_process)
    assert set(got_w) == set(want_w)
    for name, tensor in want_w.items():
        torch.testing.assert_close(got_w[name], tensor, rtol=REL_TOL, atol=1e-5, msg=name)


def test_a_degree_needs_that_many_processes(data) -> None:
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG), OmegaConf.from_dotlist(
        stage_args(data, data["root"] / "x", "sequence_parallel.degree=2")[2:]))
    with pytest.raises(ConfigError) as raised:
        sequence_parallel_degree(cfg, distributed=False, world_size=1)
    assert raised.value.key == "sequence_parallel.degree"
    assert "--nproc_per_node 2" in str(raised.value)
    with pytest.raises(ConfigError, match="does not divide the 3 processes"):
        sequence_parallel_degree(cfg, distributed=True, world_size=3)
    assert sequence_parallel_degree(cfg, distributed=True, world_size=4) == 2


@pytest.mark.parametrize(("override", "field"), [
    ("sequence_parallel.shards=2", "sequence_parallel.shards"),
    ("sequence_parallel.degree=0", "sequence_parallel.degree"),
    ("sequence_parallel.degree=1.5", "sequence_parallel.degree"),
])
def test_a_malformed_sequence_parallel_block_is_named(data, override, field) -> None:
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG), OmegaConf.from_dotlist([override]))
    with pytest.raises(ConfigError) as raised:
        sequence_parallel_degree(cfg, distributed=True, world_size=2)
    assert raised.value.key == field


@pytest.mark.parametrize(("degree", "length", "field", "words"), [
    (3, 128, "sequence_parallel.degree", "num_heads=4"),   # 4 query heads, 3 ways
    (4, 128, "sequence_parallel.degree", "num_kv_heads=2"),  # 2 key-value heads, 4 ways
    (2, 129, "long_context.max_seq_len", "multiple of sequence_parallel.degree=2"),
])
def test_the_degree_must_split_heads_and_length(data, degree, length, field, words) -> None:
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG), OmegaConf.from_dotlist(
        stage_args(data, data["root"] / "x", f"long_context.max_seq_len={length}")[2:]))
    stage = read_stage(cfg, source_model_config(cfg))
    with torch.device("meta"):
        model = llama_from_hf_config(str(data["model"]))
    with pytest.raises(ConfigError) as raised:
        check_sequence_parallel_config(model, stage, degree, validation_length=length)
    assert raised.value.key == field and words in str(raised.value)
