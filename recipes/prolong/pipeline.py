"""ProLong end to end: evaluate -> stage 1 (8K) -> stage 2 (16K) -> SFT -> evaluate again.

    python recipes/prolong/pipeline.py                      # the embedded SmolLM2 demo, CPU
    python recipes/prolong/pipeline.py --stage1-steps 20 --stage2-steps 10 --sft-steps 10 \\
        --eval-samples 5 --set stage1:device=cuda --set stage1:dtype=bf16 ...

Each stage is an ordinary command with its own config, so it can be rerun, resumed or changed
on its own:

* evaluation: ``tune run acadlm_plugins/eval_recipe`` (RULER/HELMET-style tasks through our
  lm-eval adapter) on the starting model and on the final one, at the same lengths and prompts;
* ``tune run acadlm_plugins/long_context_recipe`` with configs/smollm2/long_context_stage1.yaml
  (8K, θ 1e6) and long_context_stage2.yaml (16K, θ 4e6, stage 1's optimizer state);
* ``tune run full_finetune_single_device`` (torchtune's own recipe) with
  configs/smollm2/long_context_sft.yaml on the shipped UltraChat-style examples.

The pipeline points each stage at the previous one's export and prints one summary: scores by
task and length before and after, per-stage validation loss, packing efficiency and wall times.
``--set STAGE:key=value`` (STAGE: eval, stage1, stage2, sft) adds an override to one stage.
Before the first stage runs, the flags and every stage's config (with the overrides that stage
will get) are checked as the stage's recipe checks them before it loads anything, so bad input
stops the pipeline at once (exit 2), naming the flag or ``<stage>:<key>``.

A rerun resumes the finished stages from their outputs. A stage whose output folder holds
checkpoints trained from another model than the one this run starts it from (stage 2 after
stage 1 was given more steps, say) stops the pipeline before it runs, naming the folders to
delete to retrain it (and later stages that would resume from its old output) from the new
model; nothing is deleted for you. With
``--skip-eval`` no scores are reported: ``eval_before/`` and ``eval_after/`` are then an earlier
run's, possibly of other models.

``--base-model DIR`` starts from another model folder: the stage configs build the model from
the checkpoint's config.json, and every training stage gets the folder's tokenizer
(``tokenizer.path``) and its family's ``checkpointer.model_type``. The configs' tokenizer
component reads ChatML tokenizers, SmolLM2's and Qwen2's (whose BOS is generation_config.json's
``bos_token_id``); a base model with another kind of tokenizer needs another component, given
with ``--set``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from acadlm_plugins._compat import hf_checkpoint_files
from acadlm_plugins.defaults import register_resolvers
from acadlm_plugins.errors import AcadlmError, ConfigError
from acadlm_plugins.evaluation.report import length_table
from acadlm_plugins.models import hf_model_spec
from acadlm_plugins.models.rope import format_theta
from acadlm_plugins.planning.loading import load_config
from acadlm_plugins.stages import (
    check_at_least,
    check_config_files,
    check_stage_config,
    flag_keys,
    refused_before_stages,
    renamed,
    stage_overrides,
    tune_run,
)
from acadlm_plugins.training.checkpointing import RECIPE_STATE_FILENAME, latest_checkpoint
from acadlm_plugins.training.config_checks import check_output_dir

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "smollm2"
STAGES = ("eval", "stage1", "stage2", "sft")
SOURCE_KEY = "checkpointer.checkpoint_dir"  # the model a training stage starts from
SFT_SAVED_CONFIG = "torchtune_config.yaml"  # what torchtune's metric logger saves of the config
DEFAULT_TASKS = ("acadlm_niah_single_2", "acadlm_niah_multikey_1", "acadlm_vt")


def eval_lengths(value: str) -> list[int]:
    """``--eval-lengths``: the evaluation's own reading of lengths ("4096,8192", "4k,8k"), as an
    argparse error (exit 2, one line, naming the flag and how to write it) rather than a
    traceback; "4,096" is refused, not read as 4 and 96."""
    from acadlm_plugins.evaluation.lengths import parse_lengths

    try:
        return parse_lengths(value)
    except ConfigError as err:  # its fix names lm-eval's --metadata, which this has not
        problem = str(err).removeprefix(f"config `{err.key}`: ").split(" Fix: ")[0]
        raise argparse.ArgumentTypeError(
            f"{value!r}: {problem} Give comma-separated token counts of 256 or more, e.g. "
            "--eval-lengths 4096,8192,16384 (or 4k,8k,16k).") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/prolong_demo"))
    parser.add_argument("--base-model", type=Path, default=None,
                        help="model folder to start from (default: the embedded SmolLM2); "
                        "its tokenizer and model type go to every training stage")
    parser.add_argument("--stage1-config", type=Path, default=CONFIGS / "long_context_stage1.yaml")
    parser.add_argument("--stage2-config", type=Path, default=CONFIGS / "long_context_stage2.yaml")
    parser.add_argument("--sft-config", type=Path, default=CONFIGS / "long_context_sft.yaml")
    parser.add_argument("--eval-config", type=Path, default=CONFIGS / "eval_long_context.yaml")
    parser.add_argument("--stage1-steps", type=int, default=2,
                        help="steps of stage 1 (the config's batch: one 8K sequence)")
    parser.add_argument("--stage2-steps", type=int, default=1,
                        help="steps of stage 2 (the config's batch: one 16K sequence)")
    parser.add_argument("--sft-steps", type=int, default=4)
    parser.add_argument("--eval-tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--eval-lengths", type=eval_lengths, default="4096,8192,16384",
                        help="comma-separated token counts (4096 or 4k), 256 or more")
    parser.add_argument("--eval-samples", type=int, default=1)
    parser.add_argument("--skip-eval", action="store_true", help="train only")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        metavar="STAGE:KEY=VALUE", help="one more override for one stage")
    args = parser.parse_args(argv)
    check_config_files(parser, {"--stage1-config": args.stage1_config,
                                "--stage2-config": args.stage2_config,
                                "--sft-config": args.sft_config,
                                **({} if args.skip_eval else {"--eval-config": args.eval_config})})
    check_at_least(parser, {"--stage1-steps": (args.stage1_steps, 1),
                            "--stage2-steps": (args.stage2_steps, 1),
                            "--sft-steps": (args.sft_steps, 1),
                            "--eval-samples": (args.eval_samples, 1)})
    if not eval_task_names(args.eval_tasks):
        parser.error(f"--eval-tasks {args.eval_tasks!r}: name at least one task, e.g. "
                     f"--eval-tasks {DEFAULT_TASKS[0]}")
    return args


def eval_task_names(value: str) -> list[str]:
    """``--eval-tasks`` ("a,b") as task names."""
    return [task.strip() for task in value.split(",") if task.strip()]


def final_model_dir(stage_dir: Path) -> Path:
    """The model folder of a finished long-context stage (from its summary.json)."""
    summary = json.loads((stage_dir / "summary.json").read_text())
    return Path(summary["checkpoint"]) / "model"


def checkpoint_overrides(model_dir: Path) -> list[str]:
    files = ",".join(hf_checkpoint_files(model_dir))
    return [f"checkpointer.checkpoint_dir={model_dir}", f"checkpointer.checkpoint_files=[{files}]"]


def base_model_checkpoint(base_model: Path | None) -> list[str]:
    """Stage 1's ``checkpointer`` overrides for ``--base-model`` (none without it), after
    checking that the folder is a model folder of a family we build, with weight files; an
    error names ``--base-model``, not the stage config's key it would reach."""
    if base_model is None:
        return []
    try:
        hf_model_spec(base_model)
        files = hf_checkpoint_files(base_model)
    except AcadlmError as err:
        raise renamed(err, "--base-model") from None
    if not files:
        raise ConfigError("--base-model", f"{base_model} holds no weight files (model*.safetensors "
                          "or pytorch_model*.bin).", "point it at a Hugging Face model folder "
                          "with its weights.")
    return checkpoint_overrides(base_model)


def base_model_overrides(config: Path, base_model: Path | None,
                         flag: str = "--config") -> list[str]:
    """What a training stage takes from ``--base-model`` besides the weights it starts from: the
    family's checkpointer ``model_type`` and the tokenizer (``tokenizer.path``, where the stage
    config's tokenizer reads a path; the test configs' byte tokenizer reads none). Nothing
    without ``--base-model``: the configs are set up for the embedded SmolLM2."""
    if base_model is None:
        return []
    overrides = [f"checkpointer.model_type={hf_model_spec(base_model).checkpointer_model_type}"]
    try:
        loaded = load_config(config)  # a malformed file is named, not a YAML traceback
    except ConfigError as err:
        raise renamed(err, flag) from err
    tokenizer = loaded.get("tokenizer", None)
    if isinstance(tokenizer, DictConfig) and "path" in tokenizer:
        overrides.append(f"tokenizer.path={base_model}")
    long_context = loaded.get("long_context", None)
    if isinstance(long_context, DictConfig) and long_context.get("trained_length", None):
        # the config's trained_length is SmolLM2's (2K); another model's is its own
        # config.json's max_position_embeddings, the recipe's default
        overrides.append("long_context.trained_length=null")
    return overrides


def sft_final_model(sft_dir: Path, cfg: DictConfig | None) -> Path:
    """The folder torchtune's SFT recipe writes after its last epoch: ``epoch_<epochs - 1>``
    (``epoch_0`` only for one epoch)."""
    epochs = _selected(cfg, "epochs")
    return sft_dir / f"epoch_{int(epochs) - 1 if epochs else 0}"


def stage_config(config: Path, overrides: Sequence[str]) -> DictConfig | None:
    """The stage's config with the pipeline's ``key=value`` overrides applied (``~key`` removals
    left out), as far as OmegaConf can merge it; None if it cannot (the stage itself then
    reports the problem)."""
    register_resolvers()  # `${acadlm_home:}` in the stage configs
    try:
        cfg = OmegaConf.load(config)
        dotlist = [o for o in overrides if not o.startswith("~")]
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    except Exception:  # noqa: BLE001 - any unreadable config is left to the stage's own checks
        return None


def _selected(cfg: DictConfig | None, key: str) -> object:
    if cfg is None:
        return None
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation: not checked here
        return None


def recorded_source(stage_dir: Path) -> tuple[Path, str] | None:
    """The newest checkpoint of a long-context stage's output folder and the starting model
    (``checkpointer.checkpoint_dir``) its run recorded in ``recipe_state.pt``; None without
    one. The file is memory-mapped: its optimizer state is not read."""
    latest = latest_checkpoint(stage_dir) if stage_dir.is_dir() else None
    if latest is None:
        return None
    try:
        state = torch.load(latest / RECIPE_STATE_FILENAME, map_location="cpu", mmap=True,
                           weights_only=False)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is the stage's to report
        return None
    source = (state.get("config") or {}).get(SOURCE_KEY)
    return None if source is None else (latest, str(source))


def sft_resumes(cfg: DictConfig | None) -> bool:
    """Whether torchtune's SFT recipe would continue the checkpoint in its ``output_dir``
    (``resume_from_checkpoint``, or the checkpointer's ``should_load_recipe_state``)."""
    return any(bool(_selected(cfg, key)) for key in (
        "resume_from_checkpoint", "checkpointer.should_load_recipe_state",
        "checkpointer.resume_from_checkpoint"))


def check_stage_source(name: str, stage_dir: Path, starts_from: object, *,
                       upstream: str, recorded: tuple[Path, str] | None,
                       later: Sequence[Path] = ()) -> None:
    """Stop before stage ``name`` when its output folder holds a checkpoint trained from another
    starting model than ``starts_from``, the model this run starts it from: resuming it would
    continue a run of the old model (and the stage refuses to, naming a model folder that may
    no longer exist). The message names the folders to delete: the stage's and those of
    ``later`` stages that would resume from what it made before. Nothing is deleted here."""
    if recorded is None or starts_from is None or str(starts_from) == recorded[1]:
        return
    checkpoint, was = recorded
    folders = [stage_dir, *later]
    delete = (f"the folder {stage_dir}" if not later else
              "the folders " + ", ".join(map(str, folders[:-1])) + f" and {folders[-1]}")
    because = ("" if not later else f" ({', '.join(map(str, later))}: later stages trained "
               f"from {name}'s old output, which would otherwise resume)")
    # Keeping the old run is a way out only while the model it was trained from still exists
    # (an upstream stage keeps its last checkpoints only).
    keep = (f"; to keep it, rerun with the settings that produced {was}"
            if Path(was).exists() else f" ({was} no longer exists, so it cannot be kept)")
    sys.exit(
        f"stage {name}: {stage_dir} holds a checkpoint ({checkpoint.name}) trained from {was}, "
        f"but this run starts {name} from {starts_from} ({upstream}). Resuming it would "
        f"continue a run of the old model. To retrain {name} from the new model, delete "
        f"{delete} and rerun{because}{keep}.")


# The recipe each stage runs, as stages.check_stage_config names it.
STAGE_RECIPES = {"eval": "eval", "stage1": "long_context", "stage2": "long_context",
                 "sft": "sft"}
# The stage keys the pipeline sets from its flags: a refusal of one names the flag.
FLAG_KEYS = {"eval": {"tasks": "--eval-tasks", "lengths": "--eval-lengths",
                      "num_samples": "--eval-samples"},
             "stage1": {"max_steps": "--stage1-steps"}, "stage2": {"max_steps": "--stage2-steps"},
             "sft": {"max_steps_per_epoch": "--sft-steps"}}


def planned_export(stage_dir: Path, steps: int) -> Path:
    """Where a long-context stage of ``steps`` steps exports its model (``step_<N>/model``):
    the next stage's model folder in the checks made before the first stage runs, when that
    stage has not run yet (the stages themselves read it from the stage's summary.json)."""
    return stage_dir / f"step_{steps:06d}" / "model"


def check_stages(configs: dict[str, Path], overrides: dict[str, list[str]],
                 extra: dict[str, list[str]]) -> None:
    """Check every stage's config (``configs``, in the order they run) with the overrides it
    will get before the first stage runs (stages.check_stage_config: what its recipe refuses
    from its config alone), so that a bad value of stage 2 or SFT stops the pipeline at once,
    naming ``<stage>:<key>`` (or the pipeline's flag that set the key, unless the stage's
    ``--set`` overrides in ``extra`` set it), not after the evaluation and stage 1 have run. Stage 2's
    ``long_context`` block is read against the config.json stage 1's export will have (its
    source's, with stage 1's θ and length)."""
    source = None
    # a stage 2 the user points at another model with --set reads that model's config.json
    own_model = {o.partition("=")[0].removeprefix("~") for o in extra.get("stage2", [])} & {
        "checkpointer.checkpoint_dir", "model_dir"}
    for stage, config in configs.items():
        cfg = check_stage_config(
            stage, config, overrides[stage], recipe=STAGE_RECIPES[stage],
            source_config=source if stage == "stage2" and not own_model else None,
            flags=flag_keys(FLAG_KEYS[stage], extra[stage]))
        if stage == "stage1":
            source = exported_model_config(cfg)


def exported_model_config(cfg: DictConfig) -> dict | None:
    """The config.json a long-context stage's export will have (the recipe's own
    write_stage_config on a copy of its source's); None when the source folder has none (the
    stage refuses it when it starts)."""
    import shutil
    import tempfile

    from acadlm_plugins.long_context_recipe import (
        read_stage,
        source_model_config,
        write_stage_config,
    )

    folder = Path(str(cfg.checkpointer.checkpoint_dir)).expanduser()
    if not (folder / "config.json").is_file():
        return None
    with tempfile.TemporaryDirectory(prefix="prolong_check_") as scratch:
        shutil.copy(folder / "config.json", scratch)
        try:
            write_stage_config(Path(scratch), read_stage(cfg, source_model_config(cfg)))
        except ConfigError as err:  # (read_stage has passed on this config already)
            raise renamed(err, f"stage1:{err.key}") from None
        return json.loads((Path(scratch) / "config.json").read_text())


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    extra = stage_overrides(args.extra, STAGES, example="stage1:lr_scheduler.warmup_ratio=0")
    out = args.output_dir
    started = time.perf_counter()
    timings: dict[str, float] = {}
    lengths = args.eval_lengths
    tasks = eval_task_names(args.eval_tasks)

    def timed(name: str, run) -> None:
        begin = time.perf_counter()
        run()
        timings[name] = round(time.perf_counter() - begin, 1)

    def eval_overrides(name: str, model_dir: Path | None) -> list[str]:
        overrides = [f"output_dir={out / name}", f"tasks=[{','.join(tasks)}]",
                     f"lengths=[{','.join(map(str, lengths))}]", f"num_samples={args.eval_samples}",
                     f"model.args.max_length={max(lengths) + 64}",
                     # a rerun answers from this cache (kept per model fingerprint) instead of
                     # generating every prompt again
                     f"use_cache={out / name / 'answer_cache'}"]
        if model_dir is not None:
            overrides.append(f"model.args.pretrained={model_dir}")
        return [*overrides, *extra["eval"]]

    def evaluate(name: str, model_dir: Path | None) -> None:
        timed(name, lambda: tune_run("acadlm_plugins/eval_recipe", args.eval_config,
                                     eval_overrides(name, model_dir), stage=name))

    def stage1_overrides() -> list[str]:
        return [f"output_dir={out / 'stage1'}", *base, *from_base["stage1"],
                f"max_steps={args.stage1_steps}", *extra["stage1"]]

    def stage2_overrides(stage1_model: Path) -> list[str]:
        return [f"output_dir={out / 'stage2'}", *checkpoint_overrides(stage1_model),
                *from_base["stage2"], f"long_context.previous_stage={out / 'stage1'}",
                f"max_steps={args.stage2_steps}", *extra["stage2"]]

    def sft_run_overrides(stage2_model: Path) -> list[str]:
        return [*sft_overrides, *checkpoint_overrides(stage2_model), *extra["sft"]]

    configs = {"eval": args.eval_config, "stage1": args.stage1_config,
               "stage2": args.stage2_config, "sft": args.sft_config}
    with refused_before_stages():  # every flag and stage config, before the first stage
        check_output_dir(out, key="--output-dir")  # a file there, or above it
        base = base_model_checkpoint(args.base_model)
        from_base = {name: base_model_overrides(configs[name], args.base_model,
                                                f"--{name}-config")
                     for name in ("stage1", "stage2", "sft")}
        sft_overrides = [f"output_dir={out / 'sft'}", *from_base["sft"],
                         f"max_steps_per_epoch={args.sft_steps}"]
        check_stages({name: config for name, config in configs.items()
                      if name != "eval" or not args.skip_eval},
                     {"eval": eval_overrides("eval_before", args.base_model),
                      "stage1": stage1_overrides(),
                      "stage2": stage2_overrides(planned_export(out / "stage1",
                                                                args.stage1_steps)),
                      "sft": sft_run_overrides(planned_export(out / "stage2",
                                                              args.stage2_steps))}, extra)
    sft_resumed = sft_resumes(stage_config(args.sft_config, [*sft_overrides, *extra["sft"]]))

    def long_context_stage(name: str, config: Path, overrides: list[str],
                           upstream: str) -> None:
        stage_dir = out / name
        # the later stages that would resume from what this one made before
        later = [out / "stage2"] if name == "stage1" and recorded_source(out / "stage2") else []
        if sft_resumed and recorded_sft_source(out / "sft"):
            later.append(out / "sft")
        check_stage_source(name, stage_dir, _selected(stage_config(config, overrides),
                                                      SOURCE_KEY),
                           upstream=upstream, recorded=recorded_source(stage_dir), later=later)
        timed(name, lambda: tune_run("acadlm_plugins/long_context_recipe", config, overrides,
                                     stage=name))

    if not args.skip_eval:
        evaluate("eval_before", args.base_model)
    long_context_stage("stage1", args.stage1_config, stage1_overrides(),
                       upstream="the base model")
    stage1_model = final_model_dir(out / "stage1")
    long_context_stage("stage2", args.stage2_config, stage2_overrides(stage1_model),
                       upstream="stage 1's newest export")
    stage2_model = final_model_dir(out / "stage2")
    sft_run = sft_run_overrides(stage2_model)
    if sft_resumed:  # otherwise torchtune's SFT starts afresh from stage 2's export
        check_stage_source("sft", out / "sft",
                           _selected(stage_config(args.sft_config, sft_run), SOURCE_KEY),
                           upstream="stage 2's newest export",
                           recorded=recorded_sft_source(out / "sft"))
    timed("sft", lambda: tune_run("full_finetune_single_device", args.sft_config, sft_run,
                                  stage="sft"))
    final_model = sft_final_model(out / "sft", stage_config(args.sft_config, sft_run))
    if not args.skip_eval:
        evaluate("eval_after", final_model)

    report = collect_report(out, timings, time.perf_counter() - started, final_model,
                            evaluated=not args.skip_eval)
    (out / "pipeline_summary.json").write_text(json.dumps(report, indent=2))
    print(format_report(report), flush=True)


def recorded_sft_source(sft_dir: Path) -> tuple[Path, str] | None:
    """The starting model an earlier SFT run in ``sft_dir`` recorded in the config torchtune
    saved there (``torchtune_config.yaml``); None without one."""
    saved = sft_dir / SFT_SAVED_CONFIG
    if not saved.is_file():
        return None
    source = _selected(stage_config(saved, []), SOURCE_KEY)
    return None if source is None else (saved, str(source))


def _scores(eval_dir: Path) -> dict[str, dict[str, float]]:
    path = eval_dir / "results.json"
    if not path.is_file():
        return {}
    table = length_table(json.loads(path.read_text()))
    if table is None:
        return {}
    return {task: {str(k): v for k, v in table.scores[task].items()} for task in table.tasks}


SKIPPED_EVAL = ("not evaluated (--skip-eval): eval_before/ and eval_after/, if there, are an "
                "earlier run's, possibly of other models, and are not reported")


def collect_report(out: Path, timings: dict[str, float], wall_seconds: float,
                   final_model: Path, *, evaluated: bool) -> dict:
    """Every stage's summary in one mapping (also saved as pipeline_summary.json). Scores only
    when this run evaluated (``evaluated``): the eval folders are otherwise an earlier run's."""
    stages = {name: json.loads((out / name / "summary.json").read_text())
              for name in ("stage1", "stage2")}
    report = {"scores_before": _scores(out / "eval_before") if evaluated else {},
              "scores_after": _scores(out / "eval_after") if evaluated else {},
              "stages": stages, "timings_s": timings, "final_model": str(final_model),
              "wall_seconds": round(wall_seconds, 1)}
    if not evaluated:
        report["scores_skipped"] = SKIPPED_EVAL
    return report


def format_report(report: dict) -> str:
    """The pipeline's summary for the terminal."""
    lines = ["", "=" * 76, "ProLong pipeline summary", "=" * 76]
    for name, summary in report["stages"].items():
        stage = summary["stage"]
        lines.append(f"{name}: {stage['max_seq_len']} tokens, RoPE θ "
                     f"{format_theta(stage['source_rope_base'])} -> "
                     f"{format_theta(stage['rope_base'])}, {summary['steps']} steps, "
                     f"{summary['wall_seconds']} s")
        if "packing" in summary:
            lines.append(f"  packing efficiency {summary['packing']['efficiency']:.2%} "
                         f"({summary['packing']['tokens_out']:,} tokens)")
        before, after = summary["val_loss_before"], summary["val_loss_after"]
        lines.append("  short-data validation loss: " + ", ".join(
            f"{d} {before[d]:.3f} -> {after[d]:.3f}" for d in before))
    before, after = report["scores_before"], report["scores_after"]
    if before or after:
        lengths = sorted({int(k) for rows in (before, after) for row in rows.values()
                          for k in row})
        lines += ["", "scores (0-100), before -> after:",
                  f"{'task':<26}" + "".join(f"{n:>16}" for n in lengths)]
        for task in sorted(set(before) | set(after)):
            cells = []
            for n in lengths:
                old = before.get(task, {}).get(str(n))
                new = after.get(task, {}).get(str(n))
                cells.append(f"{_cell(old)} -> {_cell(new)}")
            lines.append(f"{task:<26}" + "".join(f"{c:>16}" for c in cells))
    if "scores_skipped" in report:
        lines += ["", f"scores: {report['scores_skipped']}"]
    lines += ["", "wall time per stage (s): " + ", ".join(
        f"{k} {v:.0f}" for k, v in report["timings_s"].items()),
        f"total: {report['wall_seconds']:.0f} s", f"final model: {report['final_model']}"]
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


if __name__ == "__main__":
    main()
