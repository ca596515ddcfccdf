"""The seed statistics of benchmarks/pruning_recovery.py: means, spreads and the paired
ours - one_shot interval that decides whether a difference is one the budget can resolve."""

from __future__ import annotations

import math

import pytest
from recipe_runs import load_script
from tiny_setup import REPO_ROOT


def _benchmark():
    return load_script(REPO_ROOT / "benchmarks" / "pruning_recovery.py", "pruning_recovery")


FINALS = {0: {"from_scratch": 7.37, "one_shot": 4.06, "ours": 4.09},
          1: {"from_scratch": 7.48, "one_shot": 4.10, "ours": 4.18},
          2: {"from_scratch": 7.40, "one_shot": 4.08, "ours": 4.05}}


def test_seed_statistics_match_a_hand_computation():
    stats = _benchmark().seed_statistics(FINALS)
    assert stats["seeds"] == [0, 1, 2]
    assert stats["arms"]["one_shot"]["mean"] == pytest.approx(4.08)
    assert stats["arms"]["one_shot"]["std"] == pytest.approx(0.02)
    diffs = [0.03, 0.08, -0.03]
    paired = stats["ours_minus_one_shot"]
    assert paired["values"] == pytest.approx(diffs)
    mean = sum(diffs) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = 4.303 * std / math.sqrt(3)
    assert paired["mean"] == pytest.approx(mean)
    assert paired["ci95"] == pytest.approx((mean - half, mean + half))


def test_seed_table_names_the_verdict():
    bench = _benchmark()
    assert "not distinguishable" in bench.seed_table(FINALS, 3.19)
    better = {s: {"one_shot": 4.10, "ours": 4.05 + 0.001 * s} for s in range(3)}
    assert "(ours better)" in bench.seed_table(better, 3.19)
    worse = {s: {"one_shot": 4.00, "ours": 4.05 + 0.001 * s} for s in range(3)}
    assert "(one_shot better)" in bench.seed_table(worse, 3.19)


def test_one_seed_has_no_interval_and_t_needs_two_runs():
    bench = _benchmark()
    paired = bench.seed_statistics({0: FINALS[0]})["ours_minus_one_shot"]
    assert "ci95" not in paired and paired["mean"] == pytest.approx(0.03)
    assert bench.t95(1) == pytest.approx(12.706)
    assert bench.t95(11) == pytest.approx(2.201) and bench.t95(30) == pytest.approx(2.042)
    assert bench.t95(45) == pytest.approx(2.021)  # never narrower than the exact 2.014
    assert bench.t95(10_000) == pytest.approx(1.980)
    with pytest.raises(ValueError, match="two paired runs"):
        bench.t95(0)


def _finished_pipeline(out, *, nproc, record_nproc=True):
    """A pipeline folder as the pipeline leaves it, with ``nproc`` processes: configs, summaries
    and each run's evaluation history (losses of 3.0 at every evaluation)."""
    import json

    import torch

    bench = _benchmark()
    dirs = bench.arm_dirs(out)
    prune_step, cont_step = 2 * 128 * nproc, 4 * 128 * nproc
    budget = {"prune_tokens": 16 * prune_step, "continued_tokens": 47 * cont_step}
    if record_nproc:
        budget["nproc_per_node"] = nproc
    for arm, stage, batch, steps in (("ours", "prune", 2, 16), ("ours", "continued", 4, 47),
                                     ("one_shot", "continued", 4, 55),
                                     ("from_scratch", "continued", 4, 55)):
        run = dirs[arm][stage]
        (run / f"step_{steps:06d}").mkdir(parents=True)
        (run / "torchtune_config.yaml").write_text(
            f"batch_size: {batch}\nmax_steps: {steps}\ndataset: {{max_seq_len: 128}}\n")
        history = {"evaluations": [{"step": s, "losses": {"a": 3.0}} for s in (0, steps)]}
        torch.save({"history": history}, run / f"step_{steps:06d}" / "recipe_state.pt")
        (run / "summary.json").write_text("{}")
    (dirs["ours"]["prune"] / "pruning_summary.json").write_text(
        json.dumps({"val_loss": {"source": {"a": 2.0}}}))
    (out / "pipeline_summary.json").write_text(json.dumps({"comparison": {"budget": budget}}))


@pytest.mark.parametrize("record_nproc", [True, False])
def test_the_token_axis_counts_every_process_of_the_pipeline(tmp_path, record_nproc):
    """`--from-dir` on a `--nproc-per-node 2` pipeline: twice the tokens per step (summaries
    written before the pipeline recorded its process count: derived from the pruning tokens)."""
    _finished_pipeline(tmp_path, nproc=2, record_nproc=record_nproc)
    arm_curves, source = _benchmark().curves(tmp_path)
    assert source == 2.0
    assert arm_curves["ours"][0][0] == 16 * 2 * 128 * 2        # end of pruning
    assert arm_curves["ours"][-1][0] == 28_160 * 2              # pruning + continued
    assert arm_curves["one_shot"][-1][0] == arm_curves["from_scratch"][-1][0] == 55 * 512 * 2


def test_the_configs_given_reach_every_seeds_pipeline(tmp_path, monkeypatch):
    """`--prune-config`/`--continue-config` go to each seed's pipeline with that seed."""
    import subprocess
    import sys

    bench = _benchmark()
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda argv, check: calls.append(argv))
    monkeypatch.setattr(bench, "curves", lambda out: ({"ours": [(1, 4.0)],
                                                      "one_shot": [(1, 4.1)]}, 3.0))
    monkeypatch.setattr(bench, "plot", lambda *a: tmp_path / "p.png")
    monkeypatch.setattr(sys, "argv", ["pruning_recovery.py", "--seeds", "3", "--output-dir",
                                      str(tmp_path), "--prune-config", "p.yaml",
                                      "--continue-config", "c.yaml"])
    bench.main()
    (argv,) = calls
    assert argv[argv.index("--prune-config") + 1] == "p.yaml"
    assert argv[argv.index("--continue-config") + 1] == "c.yaml"
    assert argv[argv.index("--output-dir") + 1] == str(tmp_path / "seed_3")
    assert "prune:seed=3" in argv and "continue:seed=3" in argv
