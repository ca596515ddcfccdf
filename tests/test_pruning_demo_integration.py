"""The demo's prune config on the embedded SmolLM2: the masked model starts as a language model
(the old `droprate_init: 0.2` gave a training loss of 10-18 from the first step), dynamic batch
loading's references are the source's losses, and the materialized model is the masked one."""

from __future__ import annotations

import json
import re

import pytest
import torch
from recipe_runs import run_recipe_main, torch_threads
from tiny_setup import REPO_ROOT

DEMO_PRUNE = REPO_ROOT / "configs" / "smollm2" / "135M_to_85M_prune.yaml"


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("ACADLM_NO_PROGRESS", "1")
    monkeypatch.setenv("ACADLM_PLUGINS_DISABLE_AUTOLOAD", "1")


@pytest.mark.integration
def test_demo_prune_starts_near_the_source_and_references_the_source(tmp_path, monkeypatch):
    from acadlm_plugins.defaults import require_default_model

    require_default_model()
    with torch_threads(2):
        out = run_recipe_main(monkeypatch, "acadlm_plugins.prune_recipe", [
            "--config", str(DEMO_PRUNE), f"output_dir={tmp_path / 'run'}", "max_steps=2",
            "save_every_n_steps=2", "dynamic_batch_loading.update_interval=2",
            "pruning.calibration.num_sequences=16", "validation.max_packs_per_domain=2"])
    log = "\n".join(p.read_text() for p in (out / "logs").glob("*.txt"))
    first = re.search(r"Step 1 .*? loss:([0-9.]+)", log)
    summary = json.loads((out / "pruning_summary.json").read_text())
    source = summary["val_loss"]["source"]
    source_mean = sum(source.values()) / len(source)
    # the first step's masked training loss is that of a language model: the importance init
    # starts the masks at the one-shot cut (its validation loss is +2.0 over the source's; the
    # demo's first training loss +1.8), where droprate 0.2 gave +7 to +15
    assert float(first.group(1)) < source_mean + 2.5, (first.group(1), source_mean)
    state = torch.load(out / "step_000002" / "recipe_state.pt", weights_only=False)
    assert state["plugins"]["dynamic_batch_loading"]["reference"] == pytest.approx(source)
    assert summary["max_abs_loss_diff_masked_vs_pruned"] < 1e-3
