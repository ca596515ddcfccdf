"""The optional ``metric_logger`` of the judge and annotate recipes: both run for a long time
without a training loss, so what they log is throughput (prompts/s, tokens/s)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.training.components import check_component
from acadlm_plugins.training.run_checks import check_log_dir
from acadlm_plugins.training.runtime import rank_zero_metric_logger

METRIC_LOGGER_KEY = "metric_logger"


def check_metric_logger(cfg: DictConfig) -> None:
    """Check the optional ``metric_logger`` block (absent or null: nothing to check) without
    building it, so that a typo in it fails before a model is loaded."""
    node = cfg.get(METRIC_LOGGER_KEY, None)
    if node is None:
        return
    if not isinstance(node, DictConfig) or "_component_" not in node:
        raise ConfigError(f"{METRIC_LOGGER_KEY}._component_", "is missing.",
                          "e.g. `_component_: torchtune.training.metric_logging.DiskLogger` "
                          "with `log_dir: ${output_dir}/logs`, or remove the block.")
    check_component(node, METRIC_LOGGER_KEY)
    check_log_dir(cfg, METRIC_LOGGER_KEY)


def optional_metric_logger(cfg: DictConfig) -> Any | None:
    """The configured torchtune metric logger with the config logged to it (as the training
    recipes build theirs), or None when the config has no ``metric_logger`` block."""
    if cfg.get(METRIC_LOGGER_KEY, None) is None:
        return None
    return rank_zero_metric_logger(cfg, is_rank_zero=True)
