"""``benchmarks/low_bit_optimizers.py`` reports a child process that died instead of waiting
for its result forever."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "low_bit_optimizers.py"


def test_a_child_that_dies_is_reported_not_waited_for(tmp_path) -> None:
    """A mistyped optimizer path kills the child; the parent hung in ``queue.get()``."""
    from acadlm_plugins.defaults.paths import require_default_corpus

    require_default_corpus()  # the windows come from the embedded corpus (`make test` builds it)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            [sys.executable, str(SCRIPT), "--optimizers", "torchao.optim.AdamW8bitt",
             "--steps", "2", "--seq-len", "16", "--held-out", "1", "--threads", "1"],
            check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the benchmark still waits for a child that died")
    assert done.returncode != 0
    assert "cannot import 'torchao.optim.AdamW8bitt'" in done.stderr  # the child's own error
    assert "torchao.optim.AdamW8bitt run exited with code 1 without a result" in done.stderr


def test_the_benchmark_uses_our_component_lookup_not_torchtunes_private_one() -> None:
    source = SCRIPT.read_text()
    assert "_get_component_from_path" not in source
    assert "from acadlm_plugins._compat import component_from_path" in source
