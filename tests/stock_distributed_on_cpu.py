"""torchtune 0.6.1's stock ``full_finetune_distributed`` recipe, runnable on CPU ranks (gloo) for
tests: ``tune run --nproc_per_node 2 tests/stock_distributed_on_cpu.py --config ...``.

The stock recipe logs device memory on rank 0 after loading the model and empties the device's
cache before training, unconditionally, and torchtune's helpers for both refuse a CPU device
(``torch.cpu`` has no ``empty_cache``); those two housekeeping calls are all this changes."""

from __future__ import annotations

import gc
import runpy
from pathlib import Path

import torchtune
from torchtune import training


def _no_memory_stats_on_cpu(device, reset_stats: bool = True) -> dict[str, float]:
    return {}


if __name__ == "__main__":
    training.get_memory_stats = _no_memory_stats_on_cpu
    training.log_memory_stats = lambda *args, **kwargs: None
    training.cleanup_before_training = gc.collect
    # torchtune's recipes folder is not importable; run the file as `tune run` would.
    recipe = Path(torchtune.__file__).parents[1] / "recipes" / "full_finetune_distributed.py"
    runpy.run_path(str(recipe), run_name="__main__")
