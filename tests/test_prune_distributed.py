"""The prune recipe under ``tune run --nproc_per_node 2`` (gloo, CPU, FSDP2).

Two ranks with ``batch_size=B`` see the same global batches as one process with
``batch_size=2B``. The gates' gradients are averaged over ranks and every rank draws the same
gate noise, so the learned masks and Lagrange multipliers must equal the one-process ones up
to float reduction order, be identical on both ranks, and the materialized model must have
exactly the target architecture.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_setup import REPO_ROOT, run_tune_subprocess, tiny_run_args

from acadlm_plugins import hookimpl

pytestmark = pytest.mark.distributed

PRUNE_CONFIG = REPO_ROOT / "configs" / "tiny" / "prune.yaml"
RANKS = 2
PER_RANK_BATCH = 2
STEPS = 8
RUN_TIMEOUT_S = 120
REL_TOL = 1e-4
TUNE = Path(sys.executable).with_name("tune")
PROBE = "test_prune_distributed:RankProbe"


class RankProbe:
    """Test plugin: every rank writes its own gates and pruning metrics to
    ``<output_dir>/rank<r>_pruning.pt``, so the ranks can be compared with each other."""

    def __init__(self) -> None:
        self.reports: dict[int, dict[str, float]] = {}

    @hookimpl
    def acadlm_configure(self, cfg, recipe: str) -> None:
        self.output_dir = Path(cfg.output_dir)

    @hookimpl
    def acadlm_model_built(self, model, cfg, device) -> None:
        self.model = model

    @hookimpl(hookwrapper=True)
    def acadlm_after_optimizer_step(self, step: int, metrics: dict):
        outcome = yield
        report = {k: v for result in outcome.get_result() if result for k, v in result.items()
                  if k.startswith("pruning/")}
        self.reports[step] = report

    @hookimpl
    def acadlm_run_end(self, summary: dict) -> None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        # The pruning plugin's MaskHooks hold the masks; find them through the model's hooks.
        masks = next(hook.__self__.masks
                     for hook in self.model.tok_embeddings._forward_hooks.values()
                     if hasattr(getattr(hook, "__self__", None), "masks"))
        torch.save({"masks": {k: v.detach().cpu().clone() for k, v in masks.state_dict().items()},
                    "reports": self.reports},
                   self.output_dir / f"rank{rank}_pruning.pt")


class OtherRankingOnRankOne:
    """Test plugin: rank 1 ranks the units the other way round (every importance score
    negated), as a rank whose calibration broke near-ties differently would, in the extreme.
    The run must still use rank 0's importance initialization on every rank."""

    @hookimpl
    def acadlm_configure(self, cfg, recipe: str) -> None:
        import dataclasses

        import torch.distributed as dist

        from acadlm_plugins.pruning import importance

        if not (dist.is_available() and dist.is_initialized() and dist.get_rank() == 1):
            return
        original = importance.importance_scores

        def reversed_ranking(*args, **kwargs):
            scores = original(*args, **kwargs)
            return dataclasses.replace(scores, **{
                name: -getattr(scores, name)
                for name in ("layer", "kv_head", "head", "hidden", "intermediate")})

        importance.importance_scores = reversed_ranking


def run_prune(tmp_path: Path, output_dir: Path, *overrides: str, nproc: int = 1) -> dict:
    """Run the prune recipe through the ``tune`` CLI in a subprocess; return its summary.json."""
    args = [a for a in tiny_run_args(tmp_path) if not a.startswith("validation_dataset.")]
    args[1] = str(PRUNE_CONFIG)
    args += [f"output_dir={output_dir}", f"max_steps={STEPS}", f"save_every_n_steps={STEPS}",
             f"plugins=[{PROBE}]", *overrides]
    run_tune_subprocess("acadlm_plugins/prune_recipe", args, cwd=tmp_path,
                        log_file=tmp_path / f"{output_dir.name}.log", nproc=nproc,
                        timeout=RUN_TIMEOUT_S)
    return json.loads((output_dir / "summary.json").read_text())



def pruning_state(output_dir: Path) -> dict:
    state = torch.load(output_dir / f"step_{STEPS:06d}" / "recipe_state.pt", weights_only=False)
    return state["plugins"]["pruning"]


def assert_close_mapping(got: dict[str, float], want: dict[str, float], what: str) -> None:
    assert set(got) == set(want), what
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=REL_TOL, abs=1e-6), f"{what}[{key}]"


def assert_close_tensors(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=REL_TOL, atol=1e-5,
                                   msg=lambda m, n=name: f"{what}[{n}]: {m}")


def test_two_ranks_learn_the_masks_of_one_process_with_the_same_global_batch(tmp_path):
    """With importance-initialized masks, and rank 1 ranking the units differently: rank 0's
    initialization is broadcast, so both ranks train the one-process masks."""
    two_dir, one_dir = tmp_path / "two_ranks", tmp_path / "one_process"
    importance_init = ("pruning.mask_init=importance", "pruning.mask_init_gap=1.0",
                       "pruning.calibration.num_sequences=8", "pruning.calibration.batch_size=4")
    two = run_prune(tmp_path, two_dir, f"batch_size={PER_RANK_BATCH}", *importance_init,
                    f"plugins=[{PROBE},test_prune_distributed:OtherRankingOnRankOne]",
                    nproc=RANKS)
    one = run_prune(tmp_path, one_dir, f"batch_size={PER_RANK_BATCH * RANKS}", *importance_init)

    # Both ranks hold the very same gates and saw the very same pruning metrics every step.
    rank0, rank1 = (torch.load(two_dir / f"rank{r}_pruning.pt") for r in range(RANKS))
    assert sorted(rank0["reports"]) == list(range(1, STEPS + 1))
    assert rank0["reports"] == rank1["reports"]
    for name, value in rank0["masks"].items():
        torch.testing.assert_close(rank1["masks"][name], value, rtol=0, atol=0, msg=name)
    assert any(k.startswith("pruning/lambda_1/") and v != 0
               for k, v in rank0["reports"][STEPS].items()), "multipliers never moved"

    # ... and they are the one-process gates and multipliers.
    got, want = pruning_state(two_dir), pruning_state(one_dir)
    assert_close_tensors(got["masks"], want["masks"], "masks")
    assert_close_tensors(got["multipliers"], want["multipliers"], "multipliers")
    assert_close_tensors(rank0["masks"], got["masks"], "rank-0 masks vs saved masks")
    assert len(got["history"]) == len(want["history"]) == STEPS
    single = torch.load(one_dir / "rank0_pruning.pt")
    for step in range(1, STEPS + 1):
        assert_close_mapping(rank0["reports"][step], single["reports"][step],
                             f"pruning metrics at step {step}")

    assert two["steps"] == one["steps"] == STEPS
    assert_close_mapping(two["val_loss_before"], one["val_loss_before"], "val_loss_before")
    assert_close_mapping(two["val_loss_after"], one["val_loss_after"], "val_loss_after")

    # Rank 0 materialized exactly the target, and it computes what the masked model computes.
    two_summary = json.loads((two_dir / "pruning_summary.json").read_text())
    one_summary = json.loads((one_dir / "pruning_summary.json").read_text())
    assert two_summary["achieved"] == two_summary["target"] == one_summary["achieved"]
    assert two_summary["max_abs_loss_diff_masked_vs_pruned"] < 1e-4
    for kind in ("source", "masked", "pruned"):
        assert_close_mapping(two_summary["val_loss"][kind], one_summary["val_loss"][kind],
                             f"pruned val_loss[{kind}]")
    assert (two_dir / "pruned_model" / "config.json").is_file()


def test_two_ranks_one_shot_prune_like_one_process(tmp_path):
    """One-shot importance pruning ranks the sharded model on every rank (no fp32 copy gathered
    onto one CPU): two ranks export the same pruned weights as one process."""
    from safetensors.torch import load_file

    outputs = {}
    for nproc in (RANKS, 1):
        out = tmp_path / f"one_shot_{nproc}"
        args = [a for a in tiny_run_args(tmp_path) if not a.startswith("validation_dataset.")]
        args[1] = str(PRUNE_CONFIG)
        args += [f"output_dir={out}", "pruning.method=importance",
                 "pruning.calibration.num_sequences=8", "pruning.calibration.batch_size=4"]
        run_tune_subprocess("acadlm_plugins/prune_recipe", args, cwd=tmp_path,
                            log_file=tmp_path / f"one_shot_{nproc}.log", nproc=nproc,
                            timeout=RUN_TIMEOUT_S)
        outputs[nproc] = out
    two, one = (load_file(outputs[n] / "pruned_model" / "model.safetensors") for n in (RANKS, 1))
    assert set(two) == set(one) and two
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=0, atol=0, msg=name)
    summaries = [json.loads((outputs[n] / "pruning_summary.json").read_text()) for n in (RANKS, 1)]
    assert summaries[0]["achieved"] == summaries[0]["target"] == summaries[1]["achieved"]
