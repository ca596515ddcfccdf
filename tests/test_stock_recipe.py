"""Our domain mixture works as a `_component_` in torchtune's own (stock) recipes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tiny_setup import REPO_ROOT, write_tiny_checkpoint, write_tiny_corpus

STOCK_CONFIG = REPO_ROOT / "configs" / "tiny" / "stock_full_finetune.yaml"


def test_full_finetune_single_device_trains_on_the_domain_mixture(tmp_path):
    model_dir = write_tiny_checkpoint(tmp_path / "model")
    corpus = write_tiny_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT)]),
           "ACADLM_NO_PROGRESS": "1"}
    tune = Path(sys.executable).parent / "tune"
    result = subprocess.run(
        [str(tune), "run", "full_finetune_single_device", "--config", str(STOCK_CONFIG),
         f"output_dir={out}", f"checkpointer.checkpoint_dir={model_dir}",
         f"dataset.data_dir={corpus}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log_text = "\n".join(p.read_text() for p in (out / "logs").glob("*.txt"))
    losses = [float(x) for x in re.findall(r"loss:([0-9.]+)", log_text)]
    assert len(losses) == 5  # max_steps_per_epoch
    assert losses[-1] < losses[0]
    assert list(out.glob("epoch_0/*.safetensors"))
