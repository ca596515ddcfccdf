"""QuRating stage 1: a judge LM compares pairs of text excerpts on each criterion.

Run::

    tune run acadlm_plugins/judge_recipe --config configs/smollm2/qurating_judge.yaml
    tune run acadlm_plugins/judge_recipe --config configs/smollm2/qurating_judge.yaml \\
        judge.kind=openai judge.openai.url=http://localhost:8000/v1 judge.openai.model=my-model

Pairs are sampled from a local corpus (``pairs.data``: jsonl/parquet files or our
``<domain>/<split>.jsonl`` layout) or read from a jsonl of ready-made pairs (``pairs.file``),
judged by a local model (``judge.kind: local``) or an OpenAI-compatible server
(``judge.kind: openai``), and written to ``<output_dir>/judgments.jsonl`` with
``judgments.rejected.jsonl`` and ``judgments.summary.json`` beside it. Running the same command
again resumes an interrupted run; one with another judge model, dtype, prompting, prompt
template or ``judge.min_answer_mass`` is refused naming the key, since its labels would be mixed
with the file's (``labelled_by`` in the summary). See :mod:`acadlm_plugins.qurating.judging` for
the method.

An optional ``metric_logger`` block (any torchtune metric logger, e.g. ``DiskLogger``) gets the
throughput after every batch of pairs: ``prompts_per_second`` and ``pairs_per_second``, at the
step of the number of pairs done.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torchtune import config, utils

import acadlm_plugins.defaults  # noqa: F401  (registers the ${acadlm_home:} resolver)
from acadlm_plugins.defaults.paths import default_model_dir
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.evaluation.lm_adapter import AcadTokenizer
from acadlm_plugins.qurating.criteria import load_criteria
from acadlm_plugins.qurating.judges import Judge, LocalJudge, OpenAIJudge
from acadlm_plugins.qurating.judging import check_min_answer_mass, format_summary, judge_pairs
from acadlm_plugins.qurating.metrics import check_metric_logger, optional_metric_logger
from acadlm_plugins.qurating.pairs import (
    PAIRS_CONFIG_KEYS,
    Pair,
    pairs_from_config,
    sampling_settings,
)
from acadlm_plugins.training.config_checks import (
    check_output_dir,
    config_value,
    reject_unknown_keys,
    route_package_logs,
)
from acadlm_plugins.training.run_checks import output_dir_setting

log = utils.get_logger("INFO")

KNOWN_KEYS = {"output_dir", "criteria", "pairs", "judge", "batch_pairs", "progress",
              "metric_logger"}
PAIRS_KEYS = PAIRS_CONFIG_KEYS
JUDGE_KEYS = {"kind", "local", "openai", "min_answer_mass"}
LOCAL_KEYS = {"model_dir", "device", "dtype", "batch_size", "chat_template"}
OPENAI_KEYS = {"url", "model", "endpoint", "api_key_env", "timeout_s", "max_retries",
               "backoff_s", "max_backoff_s", "requests_per_second", "concurrency",
               "top_logprobs", "max_tokens"}
JUDGMENTS_FILE = "judgments.jsonl"
EXAMPLE_CONFIG = "configs/smollm2/qurating_judge.yaml"


def check_config(cfg: DictConfig) -> None:
    """Refuse unknown keys (with a suggestion), missing essentials and values of the wrong
    type before loading anything."""
    reject_unknown_keys(cfg, KNOWN_KEYS, recipe="judge")
    for key in ("output_dir", "pairs", "judge"):
        if cfg.get(key) is None:
            raise ConfigError(key, "is required by the judge recipe.", f"see {EXAMPLE_CONFIG}.")
    check_output_dir(output_dir_setting(cfg).expanduser())  # a file there, or above it
    reject_unknown_keys(cfg.pairs, PAIRS_KEYS, recipe="judge", prefix="pairs.")
    reject_unknown_keys(cfg.judge, JUDGE_KEYS, recipe="judge", prefix="judge.")
    reject_unknown_keys(cfg.judge.get("local") or {}, LOCAL_KEYS, recipe="judge",
                        prefix="judge.local.")
    reject_unknown_keys(cfg.judge.get("openai") or {}, OPENAI_KEYS, recipe="judge",
                        prefix="judge.openai.")
    kind = cfg.judge.get("kind", "local")
    if kind not in ("local", "openai"):
        raise ConfigError("judge.kind", f"{kind!r} is not `local` or `openai`.",
                          "use `local` (a model folder run here) or `openai` (an "
                          "OpenAI-compatible server such as vLLM).")
    if cfg.judge.get(kind) is None:
        raise ConfigError(f"judge.{kind}", f"is required when judge.kind is {kind!r}.",
                          f"see {EXAMPLE_CONFIG}.")
    has_data, has_file = cfg.pairs.get("data") is not None, cfg.pairs.get("file") is not None
    if has_data == has_file:
        raise ConfigError("pairs.data", "give exactly one of `pairs.data` (a corpus to sample "
                          "pairs from) and `pairs.file` (ready-made pairs).",
                          "set the other to null.")
    if has_data:
        sampling_settings(OmegaConf.to_container(cfg.pairs, resolve=True))
    config_value(cfg.get("batch_pairs", 4), "batch_pairs", int, minimum=1)
    config_value(cfg.get("progress", True), "progress", bool)
    min_answer_mass(cfg)
    check_metric_logger(cfg)


def min_answer_mass(cfg: DictConfig) -> float:
    """``judge.min_answer_mass`` (default 0: every A/B answer counts), checked."""
    return check_min_answer_mass(float(config_value(
        cfg.judge.get("min_answer_mass", 0.0), "judge.min_answer_mass", float)))


def build_judge(cfg: DictConfig) -> Judge:
    """The judge the config's ``judge`` block describes."""
    kind = cfg.judge.get("kind", "local")
    options = OmegaConf.to_container(cfg.judge[kind], resolve=True)
    assert isinstance(options, dict)
    if kind == "local":
        if not options.get("model_dir"):
            raise ConfigError("judge.local.model_dir", "is required.",
                              "e.g. ${acadlm_home:}/models/SmolLM2-135M-Instruct.")
        return LocalJudge(options.pop("model_dir"), **options)
    for key in ("url", "model"):
        if not options.get(key):
            raise ConfigError(f"judge.openai.{key}", "is required for an OpenAI-compatible "
                              "judge.", f"see {EXAMPLE_CONFIG}.")
    return OpenAIJudge(options.pop("url"), options.pop("model"), **options)


def excerpt_tokenizer(cfg: DictConfig, judge: Judge) -> AcadTokenizer:
    """The tokenizer excerpts are measured with: ``pairs.tokenizer``, else the local judge's,
    else (a remote judge) the embedded SmolLM2 tokenizer."""
    given = cfg.pairs.get("tokenizer")
    if given is None and isinstance(judge, LocalJudge):
        return judge.tokenizer
    folder = Path(str(given)).expanduser() if given is not None else default_model_dir()
    if folder.is_file():
        folder = folder.parent
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError("pairs.tokenizer", f"no tokenizer.json in {folder}.",
                          "give a local folder with the judge model's tokenizer.json (excerpts "
                          "are cut to `pairs.max_tokens` of its tokens).")
    if given is None:
        log.info("Excerpts are measured in tokens of %s (set `pairs.tokenizer` to the served "
                 "model's tokenizer folder to use its tokens).", folder)
    return AcadTokenizer(folder)


def build_pairs(cfg: DictConfig, tokenizer: AcadTokenizer) -> list[Pair]:
    """Pairs from ``pairs.file``, or sampled from the corpus at ``pairs.data``."""
    return pairs_from_config(OmegaConf.to_container(cfg.pairs, resolve=True), tokenizer)


def run_judging(cfg: DictConfig) -> dict[str, Any]:
    """Check the config, build criteria, judge and pairs, judge, print and return the summary."""
    check_config(cfg)
    criteria_cfg = cfg.get("criteria")
    criteria = load_criteria(OmegaConf.to_container(criteria_cfg, resolve=True)
                             if OmegaConf.is_config(criteria_cfg) else criteria_cfg)
    judge = build_judge(cfg)
    pairs = build_pairs(cfg, excerpt_tokenizer(cfg, judge))
    output = Path(str(cfg.output_dir)).expanduser() / JUDGMENTS_FILE
    metric_logger = optional_metric_logger(cfg)
    try:
        summary = judge_pairs(
            pairs, criteria, judge, output,
            batch_pairs=config_value(cfg.get("batch_pairs", 4), "batch_pairs", int, minimum=1),
            progress=config_value(cfg.get("progress", True), "progress", bool),
            min_answer_mass=min_answer_mass(cfg),
            on_batch=None if metric_logger is None else (
                lambda metrics, step: metric_logger.log_dict(metrics, step=step)))
    finally:
        if metric_logger is not None:
            metric_logger.close()
    print(format_summary(summary), flush=True)
    return summary


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of ``tune run acadlm_plugins/judge_recipe --config ...``."""
    route_package_logs()
    run_judging(cfg)


if __name__ == "__main__":
    from acadlm_plugins.training.runtime import run_main

    sys.exit(run_main(recipe_main))
