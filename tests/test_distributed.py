"""The continued pre-training recipe under ``tune run --nproc_per_node 2`` (gloo, CPU, FSDP2).

Two ranks with ``batch_size=B`` draw the same global batches as one process with
``batch_size=2B``, so validation losses, logged training losses, dynamic-batch-loading
weights and the saved weights must agree up to float reduction order; and a distributed run
that stops and resumes must land exactly where an uninterrupted one does.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tiny_setup import TINY_LR, assert_adam_runs_agree, run_tune_subprocess, tiny_run_args

pytestmark = pytest.mark.distributed

RANKS = 2
PER_RANK_BATCH = 2
STEPS = 6
RUN_TIMEOUT_S = 240
REL_TOL = 1e-4
TUNE = Path(sys.executable).with_name("tune")


def run_tune(tmp_path: Path, output_dir: Path, *overrides: str, nproc: int = 1) -> dict:
    """Run the recipe through the ``tune`` CLI in a subprocess; return its summary.json."""
    args = tiny_run_args(tmp_path, f"output_dir={output_dir}", *overrides)
    run_tune_subprocess("acadlm_plugins/continued_pretrain_recipe", args, cwd=tmp_path,
                        log_file=tmp_path / f"{output_dir.name}.log", nproc=nproc,
                        timeout=RUN_TIMEOUT_S)
    return json.loads((output_dir / "summary.json").read_text())



def logged_training_metrics(output_dir: Path) -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` of the training-step lines of the DiskLogger log."""
    rows: dict[int, dict[str, float]] = {}
    for log_file in (output_dir / "logs").glob("*.txt"):
        for line in log_file.read_text().splitlines():
            match = re.match(r"Step (\d+) \| (.*)", line)
            if match and "loss:" in match.group(2).split()[0]:
                rows[int(match.group(1))] = {k: float(v) for k, v in
                                             (kv.split(":", 1) for kv in match.group(2).split())}
    return rows


def saved_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    model_dir = output_dir / f"step_{STEPS:06d}" / "model"
    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_close_mapping(got: dict[str, float], want: dict[str, float], what: str) -> None:
    assert set(got) == set(want), what
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=REL_TOL), f"{what}[{key}]"


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def distributed_run(setup_dir) -> tuple[Path, dict]:
    """An uninterrupted 2-rank run, shared by the tests below."""
    output_dir = setup_dir / "two_ranks"
    summary = run_tune(setup_dir, output_dir, f"batch_size={PER_RANK_BATCH}",
                       f"max_steps={STEPS}", nproc=RANKS)
    return output_dir, summary


def test_two_ranks_match_one_process_with_the_same_global_batch(setup_dir, distributed_run):
    output_dir, two_ranks = distributed_run
    single_dir = setup_dir / "one_process"
    one = run_tune(setup_dir, single_dir, f"batch_size={PER_RANK_BATCH * RANKS}",
                   f"max_steps={STEPS}")

    assert two_ranks["steps"] == one["steps"] == STEPS
    assert_close_mapping(two_ranks["val_loss_before"], one["val_loss_before"], "val_loss_before")
    assert_close_mapping(two_ranks["val_loss_after"], one["val_loss_after"], "val_loss_after")
    assert_close_mapping(two_ranks["domain_weights"], one["domain_weights"], "domain_weights")
    assert max(one["domain_weights"].values()) - min(one["domain_weights"].values()) > 0.01

    # Every step trained on the same global batch: same tokens, same loss, same per-domain loss.
    dist_steps, single_steps = logged_training_metrics(output_dir), logged_training_metrics(single_dir)
    assert sorted(dist_steps) == sorted(single_steps) == list(range(1, STEPS + 1))
    for step, want in single_steps.items():
        got = dist_steps[step]
        assert got["tokens_seen"] == want["tokens_seen"], f"step {step}"
        losses = {k: v for k, v in want.items() if k == "loss" or k.startswith("train_loss/")}
        assert_close_mapping({k: v for k, v in got.items() if k in losses or
                              k.startswith("train_loss/")}, losses, f"step {step}")

    # Rank 0 gathered the sharded model into one full checkpoint, equal to the 1-process one.
    checkpoints = sorted(p.name for p in output_dir.iterdir() if p.name.startswith(("step_", ".")))
    assert checkpoints == ["step_000003", "step_000006"], "one complete checkpoint per save"
    assert_adam_runs_agree(saved_weights(output_dir), saved_weights(single_dir), lr=TINY_LR,
                           steps=STEPS, rtol=REL_TOL)


def test_distributed_resume_matches_an_uninterrupted_distributed_run(setup_dir, distributed_run):
    uninterrupted_dir, uninterrupted = distributed_run
    resumed_dir = setup_dir / "two_ranks_resumed"
    run_tune(setup_dir, resumed_dir, f"batch_size={PER_RANK_BATCH}", "max_steps=4", nproc=RANKS)
    assert (resumed_dir / "step_000004" / "recipe_state.pt").is_file()
    resumed = run_tune(setup_dir, resumed_dir, f"batch_size={PER_RANK_BATCH}",
                       f"max_steps={STEPS}", nproc=RANKS)
    assert "resumed at step 4 of 6" in (setup_dir / f"{resumed_dir.name}.log").read_text()

    # Same ranks, same reduction order: the resumed run is bit-for-bit the uninterrupted one.
    for key in ("val_loss_before", "val_loss_after", "domain_weights"):
        assert resumed[key] == uninterrupted[key], key
    got, want = saved_weights(resumed_dir), saved_weights(uninterrupted_dir)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    state = torch.load(resumed_dir / f"step_{STEPS:06d}" / "recipe_state.pt", weights_only=False)
    want_state = torch.load(uninterrupted_dir / f"step_{STEPS:06d}" / "recipe_state.pt",
                            weights_only=False)
    assert state["sampler"]["batches_drawn"] == want_state["sampler"]["batches_drawn"] == STEPS
    assert state["sampler"]["cursor"] == want_state["sampler"]["cursor"]


def test_resume_on_one_process_needs_the_same_global_batch(setup_dir, distributed_run):
    """The 2-rank run's step-3 checkpoint, resumed by one process: with the same batch_size
    (half the global batch) it is refused naming batch_size; with batch_size doubled it trains
    the uninterrupted 2-rank run's steps 4-6 on the same batches."""
    uninterrupted_dir, uninterrupted = distributed_run
    resumed_dir = setup_dir / "two_ranks_then_one"
    resumed_dir.mkdir()
    shutil.copytree(uninterrupted_dir / "step_000003", resumed_dir / "step_000003")
    (resumed_dir / "LATEST").write_text("step_000003")

    with pytest.raises(AssertionError, match="failed"):  # run_tune_subprocess: nonzero exit
        run_tune(setup_dir, resumed_dir, f"batch_size={PER_RANK_BATCH}", f"max_steps={STEPS}")
    refused = (setup_dir / f"{resumed_dir.name}.log").read_text()
    assert "config `batch_size`" in refused and "global batch of 4" in refused, refused[-2000:]
    assert "--nproc_per_node" in refused
    assert not (resumed_dir / f"step_{STEPS:06d}").exists()

    resumed = run_tune(setup_dir, resumed_dir, f"batch_size={PER_RANK_BATCH * RANKS}",
                       f"max_steps={STEPS}")
    assert "resumed at step 3 of 6" in (setup_dir / f"{resumed_dir.name}.log").read_text()
    want, got = logged_training_metrics(uninterrupted_dir), logged_training_metrics(resumed_dir)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step]["step_tokens"] == want[step]["step_tokens"], f"step {step}"
        assert got[step]["tokens_seen"] == want[step]["tokens_seen"], f"step {step}"
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=REL_TOL), f"step {step}"
    assert_close_mapping(resumed["domain_weights"], uninterrupted["domain_weights"],
                         "domain_weights")
    state = torch.load(resumed_dir / f"step_{STEPS:06d}" / "recipe_state.pt", weights_only=False)
    want_state = torch.load(uninterrupted_dir / f"step_{STEPS:06d}" / "recipe_state.pt",
                            weights_only=False)
    assert state["sampler"]["cursor"] == want_state["sampler"]["cursor"]
    assert state["sampler"]["samples_per_domain"] == want_state["sampler"]["samples_per_domain"]
