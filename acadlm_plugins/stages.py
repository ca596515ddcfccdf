"""Chaining recipes into an end-to-end pipeline (``recipes/*/pipeline.py``).

Every stage of a pipeline is an ordinary command a user could type -- ``tune run <recipe>
--config <yaml> key=value ...`` or one of our console scripts -- run as a child process, so each
stage can be rerun, resumed or changed on its own and the pipeline adds no behaviour of its own.
A failed stage stops the pipeline with the stage's exit code (2 for a user error) and a line
naming the stage and saying how to continue. Bad input exits 2 before any stage starts: a
malformed ``--set``, a pipeline flag out of range or a missing config file, and any value a
stage's recipe would refuse, checked on every stage's config with its overrides (see
:func:`check_stage_config`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from acadlm_plugins.errors import AcadlmError, ConfigError


def console_script(name: str) -> str:
    """The path of an installed console script: on ``PATH``, else next to this Python."""
    return shutil.which(name) or str(Path(sys.executable).parent / name)


def stage_overrides(extra: Sequence[str], stages: Sequence[str], *,
                    example: str) -> dict[str, list[str]]:
    """``--set`` values ``["judge:a.b=1", ...]`` -> ``{"judge": ["a.b=1"], ...}`` over
    ``stages``; ``STAGE:~a.b`` removes a key, as on torchtune's command line. A malformed entry
    stops the pipeline before any stage runs."""
    found: dict[str, list[str]] = {stage: [] for stage in stages}
    for item in extra:
        stage, sep, override = item.partition(":")
        if not sep or stage not in found or ("=" not in override and not override.startswith("~")):
            print(f"error: --set {item!r}: expected STAGE:key=value with STAGE one of "
                  f"{', '.join(stages)}, e.g. --set {example}", file=sys.stderr, flush=True)
            sys.exit(2)
        found[stage].append(override)
    return found


def run_stage(command: Sequence[str], *, stage: str) -> None:
    """Run ``command``, echoing it first; if it fails, exit the pipeline with its exit code,
    naming ``stage`` (the name its ``--set`` uses)."""
    printable = " ".join(str(part) for part in command)
    print(f"\n$ {printable}", flush=True)
    result = subprocess.run([str(part) for part in command], check=False)
    if result.returncode:
        print(f"stage {stage} failed with exit code {result.returncode}; fix the error above "
              "and rerun: finished stages resume from their outputs.", file=sys.stderr,
              flush=True)
        sys.exit(result.returncode)


def tune_run(recipe: str, config: Path | str, overrides: Sequence[str] = (),
             nproc: int = 1, *, stage: str | None = None) -> None:
    """``tune run [--nproc_per_node N] <recipe> --config <config> <overrides>`` as the stage
    ``stage`` (the recipe's name when not given)."""
    command = [console_script("tune"), "run"]
    if nproc > 1:
        command += ["--nproc_per_node", str(nproc)]
    command += [recipe, "--config", str(config), *overrides]
    run_stage(command, stage=stage or recipe)


# ------------------------------------------------------------- checks before the first stage
# A pipeline refuses bad input before its first stage starts (a late stage may run hours after
# it): its own flags with :func:`check_config_files` and :func:`check_at_least` (argparse's
# exit 2, naming the flag), then every stage's config, with the overrides that stage will get,
# with :func:`check_stage_config` (a ConfigError naming ``<stage>:<key>``) inside
# :func:`refused_before_stages` (which prints it as one line and exits 2).


def check_config_files(parser: argparse.ArgumentParser, configs: Mapping[str, Path]) -> None:
    """``parser.error`` (exit 2) naming the first ``--<stage>-config`` flag whose path is not a
    file, rather than ``tune run``'s FileNotFoundError traceback when that stage starts."""
    for flag, path in configs.items():
        if not Path(path).is_file():
            parser.error(f"{flag} {path}: no such file (give the path of a YAML config)")


def check_at_least(parser: argparse.ArgumentParser,
                   values: Mapping[str, tuple[int, int]]) -> None:
    """``parser.error`` (exit 2) naming the first flag whose value is below its minimum:
    ``{"--nproc-per-node": (args.nproc_per_node, 1)}``."""
    for flag, (value, minimum) in values.items():
        if value < minimum:
            parser.error(f"{flag} {value}: must be at least {minimum}")


@contextmanager
def refused_before_stages(prog: str = "pipeline.py") -> Iterator[None]:
    """Print an :class:`~acadlm_plugins.errors.AcadlmError` raised inside the block as one
    line (``<prog>: error: config `<stage>:<key>`: ... Fix: ...``) and exit 2: the key and the
    fix, no traceback, nothing run."""
    try:
        yield
    except AcadlmError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def renamed(err: AcadlmError, key: str, note: str = "") -> ConfigError:
    """``err``'s problem and fix under another ``key`` (the pipeline's flag, or
    ``<stage>:<key>``), after ``note`` (which run it was)."""
    problem = str(err).removeprefix(f"config `{getattr(err, 'key', '')}`: ")
    return ConfigError(key, f"{note} {problem}" if note else problem)


def with_overrides(cfg: Any, overrides: Sequence[str], stage: str | None = None) -> Any:
    """``cfg`` with a stage's ``--set`` overrides merged as ``tune run`` merges them (torchtune's
    own merge: ``key=value``, ``~key`` removals, ``model=<builder>``, ``None``), so that what a
    pipeline reads from a stage's config is what the stage's recipe reads: after ``--set
    continue:~gradient_accumulation_steps`` the sheared pipeline's budget counts the recipe's
    default of 1, not the config file's value. An override ``tune run`` would refuse (removing
    a key the config does not have, a list where the config holds a mapping) is a ConfigError
    naming ``--set <stage>:<override>``."""
    from omegaconf import OmegaConf

    from acadlm_plugins.planning.loading import OverrideError, merge_overrides

    if not overrides:
        return cfg
    try:
        return merge_overrides(OmegaConf.to_container(cfg, resolve=False), list(overrides))
    except OverrideError as err:
        raise ConfigError(f"--set {stage}:{err.override}" if stage else err.override,
                          f"`{err.key}` {err.problem.rstrip('.')}, as `tune run` would "
                          "refuse it.", err.fix) from None


def check_stage_config(stage: str, config: Path | str, overrides: Sequence[str], *,
                       recipe: str, run: str | None = None,
                       source_config: dict[str, Any] | None = None,
                       flags: Mapping[str, str] | None = None, world_size: int = 1,
                       config_flag: str | None = None) -> Any:
    """Make, before any stage runs, the refusals the stage's ``recipe`` makes from its config
    alone, on ``config`` with the ``overrides`` that stage will get (the recipe's own checks, or
    acadlm-plan's for it: known and required keys, plugin blocks, step intervals, components,
    value types and ranges, the learning-rate schedule; see :data:`CONFIG_CHECKS`). No model is
    loaded and no data read, so a folder an earlier stage will write may be given as a path
    that does not exist yet. A refusal is re-raised as a ConfigError naming ``<stage>:<key>``,
    after ``(<run>)`` when given; a refused override names ``--set <stage>:<override>``, and a
    refused key the pipeline set from one of its flags (``flags``: ``{"max_steps":
    "--train-steps"}``, for the keys no ``--set`` of the stage changes) names that flag.
    ``source_config`` (``long_context``) is the config.json the stage's model will start from
    when that folder is written by an earlier stage; ``world_size`` the stage's processes (the
    seed's bound depends on it); ``config_flag`` the pipeline flag that gave ``config`` (by
    default ``--<stage>-config``), named when the file itself is refused. A ``${...}`` that
    resolves to nothing is refused naming its key, whether or not the checks read it. The
    plugins' warnings are left to the stage itself. Returns the merged config (the selection's :class:`SelectionConfig`)."""
    import logging

    from omegaconf.errors import OmegaConfBaseException

    if recipe not in CONFIG_CHECKS:
        raise ValueError(f"no up-front check for recipe {recipe!r}")
    note = f"({run})" if run else ""
    logging.disable(logging.WARNING)
    try:
        if recipe == "select":  # acadlm-qurating-select reads its overrides itself
            from acadlm_plugins.qurating.select import load_config as load_selection

            cfg = load_selection(str(config), list(overrides))
        else:
            from acadlm_plugins.planning.checks import check_unset_keys
            from acadlm_plugins.planning.loading import check_references_resolve, load_config

            base = load_config(config, [])  # a malformed file is named, not a YAML traceback
            cfg = with_overrides(base, overrides, stage)  # names a refused override
            check_references_resolve(cfg)
            try:
                check_unset_keys(cfg)
            except ConfigError as err:
                raise ConfigError(err.key, err.problem, f"pass `--set {stage}:{err.key}=...`."
                                  ) from err
        CONFIG_CHECKS[recipe](cfg, source_config)
        if recipe in SEEDED_RECIPES:  # every rank seeds with seed + rank
            from acadlm_plugins.training.config_checks import checked_seed

            checked_seed(cfg.get("seed", None), world_size)
    except ConfigError as err:
        if err.key.startswith("--set "):
            raise
        flag = (flags or {}).get(err.key)
        if err.key == "--config":  # the config file itself: the pipeline's flag that gave it
            flag = config_flag or f"--{stage}-config"
        raise renamed(err, flag or f"{stage}:{err.key}", note) from err
    except OmegaConfBaseException as err:  # an interpolation that cannot be resolved
        key = getattr(err, "full_key", None) or "?"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{stage}:{key}", f"{note + ' ' if note else ''}cannot be read "
                          f"({first}).", f"fix the value or the ${{...}} interpolation (`--set "
                          f"{stage}:{key}=...`).") from err
    finally:
        logging.disable(logging.NOTSET)
    return cfg


def flag_keys(keys: Mapping[str, str], stage_sets: Sequence[str]) -> dict[str, str]:
    """``keys`` (a stage's config key -> the pipeline flag that sets it) less those the stage's
    own ``--set`` overrides (``stage_sets``) set or remove: a refusal of one of those names the
    ``--set``, not the flag."""
    given = {o.partition("=")[0].removeprefix("~") for o in stage_sets}
    return {key: flag for key, flag in keys.items() if key not in given}


def _training_values(cfg: Any, *, device: bool = True) -> None:
    """What a training recipe reads before it loads anything and acadlm-plan leaves to the
    run (it is made on another machine): where the recipe refuses it (ours: ``device``), a
    device this machine does not have (the stages run here). The seed is checked by
    :func:`check_stage_config`, which knows the number of processes."""
    from acadlm_plugins.training.run_checks import check_device

    if device:
        check_device(cfg)


def _check_loop_recipe(recipe: str) -> Callable[[Any, dict[str, Any] | None], None]:
    """prune, continued_pretrain, long_context: acadlm-plan's ``check_loop_settings`` and the
    schedule over the run's steps; a long-context stage's ``long_context`` block is read as
    the recipe reads it, against the config.json its model starts from (``source_config``,
    else the checkpoint folder's when it exists)."""

    def check(cfg: Any, source_config: dict[str, Any] | None) -> None:
        from acadlm_plugins.planning.checks import check_schedule
        from acadlm_plugins.planning.loop_recipes import check_loop_settings

        long_context = recipe == "long_context"
        check_loop_settings(cfg, recipe, needs_max_steps=not long_context)
        _training_values(cfg)
        if long_context:
            from acadlm_plugins.long_context_recipe import read_stage, source_model_config

            folder = Path(str(cfg.checkpointer.checkpoint_dir)).expanduser()
            if source_config is None and (folder / "config.json").is_file():
                source_config = source_model_config(cfg)
            if source_config is not None:
                read_stage(cfg, source_config)
        if cfg.get("max_steps", None) is not None:
            check_schedule(cfg, int(cfg.max_steps))

    return check


def _check_sft(cfg: Any, _source: dict[str, Any] | None) -> None:
    """torchtune's stock SFT recipe checks no keys: acadlm-plan's checks of it that need no
    model folder (components, the family of a folder that exists, batch, accumulation, epochs,
    ``max_steps_per_epoch``, the schedule over those steps)."""
    from acadlm_plugins.planning.checks import check_components, check_schedule
    from acadlm_plugins.training.config_checks import config_value
    from acadlm_plugins.training.run_checks import check_model_family, positive_int

    check_components(cfg)
    check_model_family(cfg)
    positive_int(cfg, "batch_size")
    positive_int(cfg, "gradient_accumulation_steps", 1)
    epochs = positive_int(cfg, "epochs", 1)
    per_epoch = config_value(cfg.get("max_steps_per_epoch", None), "max_steps_per_epoch", int,
                             minimum=1, allow_none=True)
    _training_values(cfg, device=False)  # (the stock recipe runs on the CPU without CUDA)
    if per_epoch is not None:
        check_schedule(cfg, epochs * per_epoch)


def _check_rater(cfg: Any, _source: dict[str, Any] | None) -> None:
    """acadlm-plan's rater checks (keys, counts, step intervals, pooling, the backbone's
    family, components, optimizer, schedule) and the values the rater's setup reads before it
    opens the judgments."""
    from acadlm_plugins.planning.other_recipes import plan_rater
    from acadlm_plugins.planning.results import TrainingPlan
    from acadlm_plugins.qurating.rater import check_backbone_dir
    from acadlm_plugins.rater_recipe import (
        KNOWN_KEYS,
        REQUIRED_KEYS,
        export_setting,
        rating_settings,
    )
    from acadlm_plugins.training.config_checks import check_config_keys
    from acadlm_plugins.training.run_checks import clip_grad_norm

    # in the recipe's order: its keys, then its backbone folder (its own message)
    check_config_keys(cfg, known=KNOWN_KEYS, required=REQUIRED_KEYS, recipe="rater",
                      example="configs/smollm2/qurating_rater.yaml")
    check_backbone_dir(Path(str(cfg.backbone_dir)).expanduser())
    plan_rater(TrainingPlan(config="", recipe="rater", recipe_from="pipeline", world_size=1,
                            world_size_from="pipeline"), cfg)
    _training_values(cfg)
    clip_grad_norm(cfg)
    rating_settings(cfg)
    export_setting(cfg)


def _check_judge(cfg: Any, _source: dict[str, Any] | None) -> None:
    from acadlm_plugins.judge_recipe import check_config

    check_config(cfg)


def _check_annotate(cfg: Any, _source: dict[str, Any] | None) -> None:
    """The annotate recipe's checks before it loads the rater (which an earlier stage writes)."""
    from acadlm_plugins.annotate_recipe import checked_settings

    checked_settings(cfg)


def _check_selection(config: Any, _source: dict[str, Any] | None) -> None:
    """acadlm-qurating-select's checks that need no score shard (budget, domains, criteria
    weights, tau, noise key, batch size)."""
    from acadlm_plugins.qurating.selection import (
        check_budget_settings,
        check_domain_settings,
        check_sampling,
    )

    check_budget_settings(config)
    check_domain_settings(config)
    criteria = config.criteria
    check_sampling(config, [str(c) for c in criteria] if isinstance(criteria, Mapping)
                   else [])


def _check_eval(cfg: Any, _source: dict[str, Any] | None) -> None:
    from acadlm_plugins.eval_recipe import check_config

    check_config(cfg)


# The recipes that seed torchtune's RNGs with the config's ``seed`` (+ rank).
SEEDED_RECIPES = frozenset({"prune", "continued_pretrain", "long_context", "sft", "rater"})

# The up-front check of each recipe a pipeline stage runs (acadlm-plan's names, plus the
# recipes it does not plan: the judge, the annotation and the evaluation).
CONFIG_CHECKS: dict[str, Callable[[Any, dict[str, Any] | None], None]] = {
    "prune": _check_loop_recipe("prune"),
    "continued_pretrain": _check_loop_recipe("continued_pretrain"),
    "long_context": _check_loop_recipe("long_context"),
    "sft": _check_sft,
    "rater": _check_rater,
    "judge": _check_judge,
    "annotate": _check_annotate,
    "select": _check_selection,
    "eval": _check_eval,
}
