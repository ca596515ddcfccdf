"""Sheared-LLaMA end to end, side by side with its baselines at equal tokens.

    python recipes/sheared_llama/pipeline.py                      # the embedded SmolLM2 demo
    python recipes/sheared_llama/pipeline.py --baselines none     # ours only
    python recipes/sheared_llama/pipeline.py --nproc-per-node 2   # same, on 2 processes
    python recipes/sheared_llama/pipeline.py --prune-config my_prune.yaml --continue-config my_cpt.yaml
    python recipes/sheared_llama/pipeline.py --set prune:max_steps=20 --set continue:batch_size=8

Three arms reach the same target shape and train on the same number of tokens (pruning tokens
+ continued pre-training tokens):

``ours``          learned hard-concrete masks with distillation from the source, started as
                  the prune config's ``pruning.mask_init`` says (importance in the demo config,
                  uniform, the reference's, in configs/smollm2/135M_to_50M_prune_full.yaml),
                  then continued pre-training with distillation;
``one_shot``      Minitron one-shot importance pruning (no mask training), then the same
                  continued pre-training for all of the tokens;
``from_scratch``  the target shape with random weights (drawn with the run's ``seed``, the
                  prune config's), trained on the same tokens (no teacher: the paper's "train
                  the small model yourself" baseline).

Every stage is an ordinary ``tune run`` of one of our recipes, so each can be run, resumed or
changed on its own; rerunning the pipeline resumes every stage from its outputs (a training
stage from its newest checkpoint; the one-shot prune stage keeps its export when its
``pruning_summary.json`` says the same config and source weights made it, and refuses a changed
config naming the key). Before the first stage runs, every run's config (with the overrides
that run gets) is checked as its recipe checks it before loading anything, so a bad value of a
late stage is refused up front, naming ``<stage>:<key>``.
``--set STAGE:key=value`` (STAGE: prune, continue) adds an override to every run of that recipe,
``--set STAGE:~key`` removes a key; the pipeline reads each stage's config with them merged as
``tune run`` merges them, so the token budget follows them (a removed
``gradient_accumulation_steps`` counts the recipe's default, 1). Both stages must
validate on the same packs at the same sequence length (``dataset.max_seq_len``,
``validation_dataset.max_seq_len``, ``validation_dataset.data_dir``,
``validation.max_packs_per_domain``): the source's losses, measured by the prune stage, are
compared with every arm's and steer dynamic batch loading, so a mismatch is refused before any
stage runs. The summary
(printed and in ``pipeline_summary.json`` under ``comparison``) has per-domain and mean
validation loss of the source and the three arms, the tokens each saw, and the greedy
completion of three fixed prompts by each model.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from acadlm_plugins import stages
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.planning.loading import load_config
from acadlm_plugins.stages import (
    check_at_least,
    check_config_files,
    refused_before_stages,
    renamed,
    stage_overrides,
    tune_run,
    with_overrides,
)
from acadlm_plugins.training.config_checks import check_output_dir, config_value

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PRUNE = REPO / "configs" / "smollm2" / "135M_to_85M_prune.yaml"
DEFAULT_CONTINUE = REPO / "configs" / "smollm2" / "85M_continued_pretrain.yaml"
DEFAULT_OUTPUT_DIR = Path("outputs/sheared_llama_demo")
ARMS = ("from_scratch", "one_shot", "ours")
PROMPTS = ("The capital of France is", "def fibonacci(n):\n", "In the beginning God created")
NEW_TOKENS = 16
STAGES = ("prune", "continue")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prune-config", type=Path, default=DEFAULT_PRUNE)
    parser.add_argument("--continue-config", type=Path, default=DEFAULT_CONTINUE)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--baselines", choices=("all", "none"), default="all",
                        help="run the one-shot and from-scratch arms at equal tokens (default)")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        metavar="STAGE:key=value", help="an override for every run of a stage")
    args = parser.parse_args(argv)
    check_config_files(parser, {"--prune-config": args.prune_config,
                                "--continue-config": args.continue_config})
    check_at_least(parser, {"--nproc-per-node": (args.nproc_per_node, 1)})
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    out, nproc = args.output_dir, args.nproc_per_node
    extra = stage_overrides(args.extra, STAGES, example="continue:max_steps=20")
    dirs = arm_dirs(out)
    configs = {"prune": args.prune_config, "continue": args.continue_config}
    with refused_before_stages():  # before any stage runs: the key and the fix, no traceback
        for flag, path in (("--prune-config", args.prune_config),
                           ("--continue-config", args.continue_config)):
            try:  # a malformed file is named by its flag, not a YAML traceback
                check_recipe_config(load_config(path), path, flag)
            except ConfigError as err:
                raise renamed(err, flag) from err
        check_output_dir(out, key="--output-dir")  # a file there, or above it
        check_same_validation(args.prune_config, args.continue_config,
                              extra["prune"], extra["continue"])
        budget = token_budget(args.prune_config, args.continue_config, nproc,
                              extra["prune"], extra["continue"])
        check_same_budget(out, budget)
        seed = run_seed(args.prune_config, extra["prune"])
        cont_yaml = OmegaConf.load(args.continue_config)  # what `~key` removals act on
        cont_cfg = with_overrides(cont_yaml, extra["continue"], "continue")
        check_stage_configs(configs, arm_runs(args.baselines), lambda arm, stage: run_overrides(
            arm, stage, dirs, extra, budget, cont_yaml,
            source_reference_overrides(cont_cfg, PLACEHOLDER_LOSSES, cont_yaml,
                                       extra["continue"])),
            world_size=args.nproc_per_node)
    record_budget(out, budget)

    # ours: learned masks, then continued pre-training
    tune_run("acadlm_plugins/prune_recipe", args.prune_config,
             run_overrides("ours", "prune", dirs, extra, budget, cont_yaml), nproc,
             stage="prune (ours)")
    pruning = read_json(dirs["ours"]["prune"] / "pruning_summary.json")
    source_losses = pruning["val_loss"]["source"]
    reference = source_reference_overrides(cont_cfg, source_losses, cont_yaml, extra["continue"])
    ours_model = dirs["ours"]["prune"] / "pruned_model"
    tune_run("acadlm_plugins/continued_pretrain_recipe", args.continue_config,
             run_overrides("ours", "continue", dirs, extra, budget, cont_yaml, reference), nproc,
             stage="continue (ours)")

    if args.baselines == "all":
        # one-shot importance pruning, then continued pre-training on all the tokens
        tune_run("acadlm_plugins/prune_recipe", args.prune_config,
                 run_overrides("one_shot", "prune", dirs, extra, budget, cont_yaml), nproc,
                 stage="prune (one_shot)")
        tune_run("acadlm_plugins/continued_pretrain_recipe", args.continue_config,
                 run_overrides("one_shot", "continue", dirs, extra, budget, cont_yaml,
                               reference), nproc, stage="continue (one_shot)")
        # the same shape from random weights, the same tokens, no teacher
        from acadlm_plugins.pruning.scratch import write_random_init_model

        init = dirs["from_scratch"]["init"]
        if not init.exists():
            write_random_init_model(ours_model, init, seed=seed)
        tune_run("acadlm_plugins/continued_pretrain_recipe", args.continue_config,
                 run_overrides("from_scratch", "continue", dirs, extra, budget, cont_yaml,
                               reference), nproc, stage="continue (from_scratch)")

    arms = [arm for arm in ARMS if (dirs[arm]["continued"] / "summary.json").exists()
            and (args.baselines == "all" or arm == "ours")]
    comparison = compare(source_losses, {a: read_json(dirs[a]["continued"] / "summary.json")
                                         for a in arms}, budget)
    comparison["completions"] = greedy_completions(
        {"source": source_dir(args.prune_config, extra["prune"]),
         **{a: final_model_dir(dirs[a]["continued"]) for a in arms}})
    report = {"pruning": pruning,
              "continued_pretraining": read_json(dirs["ours"]["continued"] / "summary.json"),
              "comparison": comparison,
              "wall_seconds": round(time.perf_counter() - started, 1)}
    (out / "pipeline_summary.json").write_text(json.dumps(report, indent=2))
    print(format_report(report, dirs), flush=True)


# ------------------------------------------------------------------------------ stages
def arm_dirs(out: Path) -> dict[str, dict[str, Path]]:
    """Where each arm's stages write (ours keeps the layout of earlier versions)."""
    return {"ours": {"prune": out / "prune", "continued": out / "continued"},
            "one_shot": {"prune": out / "one_shot" / "prune",
                         "continued": out / "one_shot" / "continued"},
            "from_scratch": {"init": out / "from_scratch" / "init_model",
                             "continued": out / "from_scratch" / "continued"}}


def arm_runs(baselines: str) -> list[tuple[str, str]]:
    """The (arm, stage) runs of the pipeline, in the order it runs them."""
    ours = [("ours", "prune"), ("ours", "continue")]
    if baselines != "all":
        return ours
    return [*ours, ("one_shot", "prune"), ("one_shot", "continue"),
            ("from_scratch", "continue")]


def run_overrides(arm: str, stage: str, dirs: dict[str, dict[str, Path]],
                  extra: dict[str, list[str]], budget: dict[str, int], cont_yaml: Any,
                  reference: Sequence[str] = ()) -> list[str]:
    """The overrides of ``arm``'s run of ``stage``: the stage's ``--set`` ones, then where it
    writes, what it starts from and (continue) the baselines' equal-token ``max_steps``, the
    from-scratch arm's lack of a teacher (``cont_yaml``: the continue config file, on which
    ``tune run`` makes ``~key`` removals; the arm also drops the ``--set`` overrides of a
    ``distillation`` key, which would bring a teacherless block back) and the dynamic batch
    loading ``reference``."""
    if stage == "prune":
        method = ["pruning.method=importance"] if arm == "one_shot" else []
        return [*extra["prune"], f"output_dir={dirs[arm]['prune']}", *method]
    start = (dirs[arm]["init"] if arm == "from_scratch"
             else dirs[arm]["prune"] / "pruned_model")
    given = extra["continue"]
    if arm == "from_scratch":
        given = [o for o in given if not override_key(o).startswith(("distillation.",))
                 and override_key(o) != "distillation"]
    out = [*given, f"output_dir={dirs[arm]['continued']}", *model_overrides(start)]
    if arm != "ours":
        out.append(f"max_steps={budget['baseline_steps']}")
    if arm == "from_scratch":
        out += without_teacher(cont_yaml)
    return [*out, *reference]


def override_key(override: str) -> str:
    """The key a ``--set`` override sets or removes (``a.b=1``, ``~a.b`` -> ``a.b``)."""
    return override.partition("=")[0].removeprefix("~")


def model_overrides(model_dir: Path) -> list[str]:
    return [f"model.path={model_dir}", f"checkpointer.checkpoint_dir={model_dir}"]


def source_reference_overrides(cfg: Any, source_losses: dict[str, float], yaml_cfg: Any = None,
                               given: Sequence[str] = ()) -> list[str]:
    """Dynamic batch loading of every arm steers by the source model's losses (Sheared-LLaMA's
    reference), whatever the continued pre-training config (``cfg``, with the ``--set``
    overrides ``given``) says on its own. A ``reference_scale`` of the config file
    (``yaml_cfg``, on which ``tune run`` makes ``~key`` removals) is removed; one given with
    ``--set`` is refused, as it applies only to the losses of the starting model."""
    block = cfg.get("dynamic_batch_loading", None)
    if not block or not block.get("enabled", False):
        return []
    if any(override_key(o) == "dynamic_batch_loading.reference_scale" for o in given):
        raise ConfigError("--set continue:dynamic_batch_loading.reference_scale",
                          "the pipeline gives every arm the source model's losses as dynamic "
                          "batch loading references; reference_scale applies only to "
                          "`reference_losses: initial`.", "drop that --set.")
    out = [f"dynamic_batch_loading.reference_losses={flow_mapping(source_losses)}"]
    yaml_block = (yaml_cfg if yaml_cfg is not None else cfg).get("dynamic_batch_loading", None)
    if yaml_block and "reference_scale" in yaml_block:
        out.append("~dynamic_batch_loading.reference_scale")
    return out


def without_teacher(cfg: Any) -> list[str]:
    """The from-scratch arm trains on its own: no distillation block."""
    return ["~distillation"] if cfg.get("distillation", None) else []


def flow_mapping(values: dict[str, float]) -> str:
    """``{a: 1.0, b: 2.0}`` for a command-line override."""
    return "{" + ", ".join(f"{k}: {v:.6f}" for k, v in values.items()) + "}"


def tokens_per_step(cfg: Any, nproc: int, stage: str | None = None) -> int:
    """Training tokens one optimizer step consumes (packed sequences: every position); a value
    that is not a positive integer is refused naming its key (``<stage>:key`` when given)."""
    accumulation = budget_value(cfg, "gradient_accumulation_steps", stage, default=1)
    batch = budget_value(cfg, "batch_size", stage)
    length = budget_value(cfg, "dataset.max_seq_len", stage)
    return batch * accumulation * length * nproc


def budget_value(cfg: Any, key: str, stage: str | None, default: int | None = None) -> int:
    """``cfg``'s integer ``key`` (dotted), at least 1, or a ConfigError naming it. ``default``
    is the recipe's for a key that is null or unset (removed by ``--set <stage>:~key``); a key
    without one (the dataset's ``max_seq_len`` defaults in its builder, which the pipeline
    does not read) must be set."""
    name = f"{stage}:{key}" if stage else key
    value = OmegaConf.select(cfg, key, default=default)
    if value is None and default is not None:
        value = default  # an explicit null: the recipe reads the default too
    if value is None:
        raise ConfigError(name, "is unset or null, but every arm's token budget counts it.",
                          f"set `{name}` to a positive integer (`--set {name}=N`) rather "
                          "than remove it.")
    return config_value(value, name, int, minimum=1)


def check_recipe_config(cfg: Any, path: Path, flag: str) -> None:
    """Refuse a config file that is not a training recipe's config (a file of other YAML, a
    QuRating or evaluation config) naming ``flag`` and the keys it lacks, rather than the first
    comparison of the two stages reporting one of them as None."""
    from acadlm_plugins.continued_pretrain_recipe import REQUIRED_KEYS

    missing = [key for key in REQUIRED_KEYS if key != "output_dir" and key not in cfg]
    if missing:
        raise ConfigError(flag, f"{path} is not a config of the prune or continued "
                          f"pre-training recipe: it has no {', '.join(missing)}.",
                          f"give one such as {DEFAULT_PRUNE.relative_to(REPO)} "
                          f"(`--prune-config`) or {DEFAULT_CONTINUE.relative_to(REPO)} "
                          "(`--continue-config`).")


def token_budget(prune_config: Path, continue_config: Path, nproc: int,
                 prune_overrides: list[str] = (), continue_overrides: list[str] = (),
                 ) -> dict[str, int]:
    """Tokens of ours (pruning + continued pre-training) and the steps that give a baseline the
    same number with the continued pre-training config's batch."""
    prune = with_overrides(OmegaConf.load(prune_config), prune_overrides, "prune")
    cont = with_overrides(OmegaConf.load(continue_config), continue_overrides, "continue")
    cont_step = tokens_per_step(cont, nproc, "continue")
    prune_tokens = budget_value(prune, "max_steps", "prune") * tokens_per_step(prune, nproc,
                                                                               "prune")
    cont_tokens = budget_value(cont, "max_steps", "continue") * cont_step
    steps = math.ceil((prune_tokens + cont_tokens) / cont_step)
    return {"prune_tokens": prune_tokens, "continued_tokens": cont_tokens,
            "total_tokens": prune_tokens + cont_tokens, "baseline_steps": steps,
            "baseline_tokens": steps * cont_step, "nproc_per_node": nproc}


BUDGET_FILE = "token_budget.json"


def check_same_budget(out: Path, budget: dict[str, int]) -> None:
    """Refuse a rerun whose token budget differs from the one recorded in ``out`` by the first
    run (:func:`record_budget`): its stages would resume runs made with another batch or step count (the recipes
    resume them), so the arms would no longer have seen the tokens the summary reports."""
    path = out / BUDGET_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in {*before, *budget} if before.get(k) != budget.get(k))
        if changed:
            raise ConfigError(
                "--output-dir", f"{out} holds runs made with another token budget ("
                + ", ".join(f"{k}: {before.get(k)} -> {budget.get(k)}" for k in changed)
                + "); resuming them would give the arms unequal tokens while the summary "
                "reports the new budget.", "rerun with the same --set overrides and "
                "--nproc-per-node, or choose a new --output-dir.")


def record_budget(out: Path, budget: dict[str, int]) -> None:
    """Write the budget :func:`check_same_budget` compares reruns with (once every check of
    the run has passed, so that a refused run records nothing)."""
    path = out / BUDGET_FILE
    if path.is_file():
        return
    from acadlm_plugins.training.checkpointing import write_atomically

    out.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda handle: handle.write(
        (json.dumps(budget, indent=2) + "\n").encode()))


# What the source's losses (measured by the prune stage) and every arm's continued pre-training
# must share: they are compared domain by domain, and steer dynamic batch loading.
SAME_IN_BOTH_STAGES = ("dataset.max_seq_len", "validation_dataset.max_seq_len",
                       "validation_dataset.data_dir", "validation.max_packs_per_domain")


def check_same_validation(prune_config: Path, continue_config: Path,
                          prune_overrides: Sequence[str] = (),
                          continue_overrides: Sequence[str] = ()) -> None:
    """Refuse configs whose stages would measure the source and the arms differently: the
    comparison and the dynamic batch loading reference would then mix sequence lengths or
    validation sets."""
    import acadlm_plugins.defaults  # noqa: F401  (registers the ${acadlm_home:} resolver)

    prune = with_overrides(OmegaConf.load(prune_config), prune_overrides, "prune")
    cont = with_overrides(OmegaConf.load(continue_config), continue_overrides, "continue")
    for key in SAME_IN_BOTH_STAGES:
        ours, theirs = _setting(prune, key), _setting(cont, key)
        if str(ours) != str(theirs):
            same = f"{key}={ours}" if ours is not None else f"~{key}"
            raise ConfigError(
                f"prune:{key} / continue:{key}",
                f"is {ours} in the prune config ({prune_config}) but {theirs} in the continue "
                f"config ({continue_config}): the source's validation losses, measured by the "
                "prune stage, are compared with every arm's and are dynamic batch loading's "
                "reference, so both stages must validate on the same packs (and train on the "
                "same sequence length).",
                f"add `--set continue:{same}` (or make the prune config match).")


def _setting(cfg: Any, key: str) -> Any:
    """``cfg``'s dotted ``key`` with interpolations resolved where they can be, else as written."""
    try:
        return OmegaConf.select(cfg, key)
    except OmegaConfBaseException:  # an interpolation this process cannot resolve: the text
        value: Any = OmegaConf.to_container(cfg, resolve=False)
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value


# Stands in for the source's losses (measured by the prune stage) when the continue stages'
# configs are checked up front: the check needs only the keys they are passed in.
PLACEHOLDER_LOSSES = {"source": 1.0}
# The recipe each stage runs, as acadlm-plan names it.
PLAN_RECIPES = {"prune": "prune", "continue": "continued_pretrain"}


def check_stage_configs(configs: dict[str, Path], runs: Sequence[tuple[str, str]],
                        overrides: Any, *, world_size: int = 1) -> None:
    """Make, before any stage runs, the refusals every run's recipe makes from its config
    alone (acadlm-plan's ``check_loop_settings``: plugin blocks, known keys, step intervals,
    validation block, components; and the learning-rate schedule over its steps), on the
    config and overrides (``overrides(arm, stage)``) that run will get. A bad ``--set
    prune:eval_every_n_steps=7`` then stops the pipeline at once, naming ``prune:<key>``, not
    when its stage starts after hours of earlier ones."""
    for arm, stage in runs:
        check_stage_config(stage, configs[stage], overrides(arm, stage), arm=arm,
                           world_size=world_size)


def check_stage_config(stage: str, config: Path, overrides: Sequence[str], *, arm: str,
                       world_size: int = 1) -> None:
    """One run's config checks (stages.check_stage_config, as every pipeline makes them); a
    refusal is a ConfigError naming ``<stage>:<key>`` and the arm whose run it is."""
    stages.check_stage_config(stage, config, overrides, recipe=PLAN_RECIPES[stage],
                              run=f"the {arm} arm's {stage} run", world_size=world_size)


def run_seed(prune_config: Path, overrides: Sequence[str] = ()) -> int:
    """The run's seed (the prune config's, after ``--set prune:seed=...``): also the seed of
    the from-scratch arm's random initialization."""
    cfg = with_overrides(OmegaConf.load(prune_config), list(overrides), "prune")
    return config_value(cfg.get("seed", 0), "prune:seed", int, allow_none=True) or 0


def source_dir(prune_config: Path, overrides: list[str] = ()) -> Path:
    """The source model folder the prune config reads (``${acadlm_home:}`` resolved)."""
    import acadlm_plugins.defaults  # noqa: F401  (registers the ${acadlm_home:} resolver)

    cfg = with_overrides(OmegaConf.load(prune_config), list(overrides), "prune")
    return Path(str(cfg.checkpointer.checkpoint_dir))


def final_model_dir(run_dir: Path) -> Path:
    return Path(read_json(run_dir / "summary.json")["checkpoint"]) / "model"


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------- compare
def compare(source: dict[str, float], runs: dict[str, dict[str, Any]],
            budget: dict[str, int]) -> dict[str, Any]:
    """Per-domain and mean validation loss of the source and each arm, and their tokens."""
    losses = {"source": {**source, "mean": mean(source)}}
    tokens = {"source": None}
    for arm, summary in runs.items():
        after = summary["val_loss_after"]
        losses[arm] = {**after, "mean": mean(after)}
        tokens[arm] = budget["total_tokens"] if arm == "ours" else budget["baseline_tokens"]
    return {"val_loss": losses, "tokens": tokens, "budget": budget}


def mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


# The comparisons the summary spells out: (the arm, the arm it is compared with).
COMPARED = (("ours", "one_shot"), ("one_shot", "from_scratch"), ("ours", "source"))


def mean_loss_differences(losses: dict[str, dict[str, float]]) -> list[str]:
    """One line per comparison in :data:`COMPARED` that this run has: the difference of mean
    validation loss (negative: the first is better), for a single run; across seeds, see
    benchmarks/pruning_recovery.py, which gives the paired interval."""
    lines = []
    for first, second in COMPARED:
        if first in losses and second in losses:
            difference = losses[first]["mean"] - losses[second]["mean"]
            verdict = "lower" if difference < 0 else "higher"
            lines.append(f"mean loss, {first} - {second}: {difference:+.4f} ({first} "
                         f"{verdict}; one run, benchmarks/pruning_recovery.py for seeds)")
    return lines


def greedy_completions(models: dict[str, Path]) -> dict[str, list[str]]:
    """The greedy continuation of :data:`PROMPTS` by each model folder, with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = next(iter(models.values()))
    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        print(f"greedy completions skipped: no tokenizer.json in {tokenizer_dir}", flush=True)
        return {}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out: dict[str, list[str]] = {}
    for name, folder in models.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        texts = []
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                           pad_token_id=tokenizer.eos_token_id)
            texts.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
        out[name] = texts
        del model
    return out


def format_report(report: dict, dirs: dict[str, dict[str, Path]]) -> str:
    from acadlm_plugins.prune_recipe import CHOICE_KEY, format_choice_changes

    pruning, comparison = report["pruning"], report["comparison"]
    lines = ["", "=" * 78, "Sheared-LLaMA pipeline summary", "=" * 78,
             (f"{'':<10}{'layers':>7}{'heads':>7}{'kv':>4}{'hidden':>8}{'mlp':>7}"
             f"{'non-emb params':>16}{'total params':>14}")]
    for name in ("source", "target", "achieved"):
        a = pruning[name]
        non_emb = pruning["non_embedding_params"][name]
        total = pruning["total_params"].get(name)
        total_text = f"{total / 1e6:>13.1f}M" if total else f"{'':>14}"
        lines.append(f"{name:<10}{a['num_layers']:>7}{a['num_heads']:>7}{a['num_kv_heads']:>4}"
                     f"{a['embed_dim']:>8}{a['intermediate_dim']:>7}{non_emb / 1e6:>15.1f}M"
                     f"{total_text}")
    ratio = pruning["non_embedding_params"]["achieved"] / pruning["non_embedding_params"]["source"]
    lines.append(f"non-embedding parameters kept: {ratio:.1%}")
    losses = comparison["val_loss"]
    columns = [c for c in ("source", *ARMS) if c in losses]
    lines += ["", "validation loss (nats/token) after the same number of training tokens",
              f"{'domain':<12}" + "".join(f"{c:>14}" for c in columns)]
    for domain in losses["source"]:
        lines.append(f"{domain:<12}" + "".join(f"{losses[c][domain]:>14.4f}" for c in columns))
    tokens = comparison["tokens"]
    lines.append(f"{'tokens':<12}" + "".join(
        f"{'-' if tokens[c] is None else f'{tokens[c]:,}':>14}" for c in columns))
    lines += mean_loss_differences(losses)
    lines.append(f"pruned right after pruning (ours, before continued pre-training): mean "
                 f"{mean(pruning['val_loss']['pruned']):.4f}")
    if CHOICE_KEY in pruning:
        lines.append(f"ours: {format_choice_changes(pruning[CHOICE_KEY])}")
    if comparison["completions"]:
        lines += ["", f"greedy completions ({NEW_TOKENS} tokens)"]
    for index, prompt in enumerate(PROMPTS if comparison["completions"] else ()):
        lines.append(f"  prompt: {prompt!r}")
        for name, texts in comparison["completions"].items():
            lines.append(f"    {name:<13}{texts[index]!r}")
    lines += ["", f"wall time: {report['wall_seconds']:.0f} s",
              (f"plots: {dirs['ours']['prune'] / 'pruning.png'}, "
               f"{dirs['ours']['prune'] / 'domain_weights.png'}"),
              f"pruned model (Hugging Face format): {dirs['ours']['prune'] / 'pruned_model'}",
              f"after continued pre-training: {report['continued_pretraining']['checkpoint']}/model"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
