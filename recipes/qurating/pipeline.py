"""QuRating end to end: judge -> rater -> annotate -> select -> train on uniform vs selected data.

    python recipes/qurating/pipeline.py                          # the embedded SmolLM2 demo
    python recipes/qurating/pipeline.py --num-pairs 64 --documents-per-file 200
    python recipes/qurating/pipeline.py --set judge:judge.kind=openai \\
        --set judge:judge.openai.model=Qwen/Qwen2.5-7B-Instruct --set judge:judge.openai.api_key_env=KEY

Each stage is an ordinary command with its own config (``tune run`` of a recipe, or
``acadlm-qurating-select``, run here as ``python -m acadlm_plugins.qurating.select``), so any stage can be rerun, resumed or changed on its own; this script
only points each stage at the previous one's output, sizes the demo and prints one summary:
the judge's labels, the rater's held-out accuracy per criterion, what the selection kept, and
the validation loss of the same model trained for the same number of tokens on the quality
selection and on a uniform selection of the same budget (tau = inf).

``--set STAGE:key=value`` passes one more override to one stage (STAGE is judge, rater,
annotate, select or train); it is applied after the pipeline's own, so it wins. Before the judge
runs, the flags and every stage's config (with the overrides that stage will get) are checked as
the stage checks them before it loads anything, so bad input stops the pipeline at once (exit 2),
naming the flag or ``<stage>:<key>``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from acadlm_plugins.qurating.select import summary_lines
from acadlm_plugins.stages import (
    check_at_least,
    check_config_files,
    check_stage_config,
    flag_keys,
    refused_before_stages,
    run_stage,
    stage_overrides,
    tune_run,
)
from acadlm_plugins.training.config_checks import check_output_dir

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "smollm2"
STAGES = ("judge", "rater", "annotate", "select", "train")
# The recipe each stage runs, as stages.check_stage_config names it.
STAGE_RECIPES = {"judge": "judge", "rater": "rater", "annotate": "annotate", "select": "select",
                 "train": "continued_pretrain"}
# The stage keys the pipeline sets from its flags: a refusal of one names the flag.
FLAG_KEYS = {"judge": {"pairs.num_pairs": "--num-pairs"},
             "rater": {"margin": "--margin", "max_steps": "--rater-steps",
                       "eval_every_n_steps": "--rater-steps",
                       "save_every_n_steps": "--rater-steps"},
             "annotate": {"max_documents_per_file": "--documents-per-file"},
             "select": {},
             "train": {"max_steps": "--train-steps", "save_every_n_steps": "--train-steps"}}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/qurating_demo"))
    for stage in STAGES:
        parser.add_argument(f"--{stage}-config", type=Path,
                            default=CONFIGS / f"qurating_{stage}.yaml")
    parser.add_argument("--num-pairs", type=int, default=12,
                        help="pairs the judge compares (each on every criterion, both orders)")
    parser.add_argument("--margin", type=float, default=0.0,
                        help="rater trains on pairs with |p - 0.5| >= margin, in [0, 0.5). "
                             "QuRating uses 0.25; the 135M demo judge's labels sit within "
                             "~0.01 of 0.5, so the demo uses 0")
    parser.add_argument("--rater-steps", type=int, default=12)
    parser.add_argument("--documents-per-file", type=int, default=16,
                        help="documents scored per corpus file (0: all of them)")
    parser.add_argument("--train-steps", type=int, default=24,
                        help="steps of each training run; both runs see the same tokens")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="processes for the rater, annotation and training stages")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        metavar="STAGE:KEY=VALUE", help="one more override for one stage")
    args = parser.parse_args(argv)
    check_config_files(parser, {f"--{stage}-config": getattr(args, f"{stage}_config")
                                for stage in STAGES})
    check_at_least(parser, {"--num-pairs": (args.num_pairs, 1),
                            "--rater-steps": (args.rater_steps, 1),
                            "--documents-per-file": (args.documents_per_file, 0),
                            "--train-steps": (args.train_steps, 1),
                            "--nproc-per-node": (args.nproc_per_node, 1)})
    return args


def stage_runs(args: argparse.Namespace, extra: dict[str, list[str]]
               ) -> list[tuple[str, str, list[str]]]:
    """``(stage, label, overrides)`` of every run, in the order the pipeline makes them: the
    pipeline's own overrides (where each stage reads the previous one's output, the demo's
    sizes), then the stage's ``--set`` ones, which win."""
    out = args.output_dir
    paths = {name: out / name for name in ("judgments", "rater", "annotate")}
    selected, uniform = out / "select" / "selected", out / "select" / "uniform"
    documents = args.documents_per_file or "null"
    runs = [
        ("judge", "judge", [f"output_dir={paths['judgments']}",
                            f"pairs.num_pairs={args.num_pairs}", *extra["judge"]]),
        ("rater", "rater", [f"output_dir={paths['rater']}",
                            f"judgments={paths['judgments'] / 'judgments.jsonl'}",
                            f"margin={args.margin}", f"max_steps={args.rater_steps}",
                            f"eval_every_n_steps={args.rater_steps}",
                            f"save_every_n_steps={args.rater_steps}", "validation_fraction=0.25",
                            *extra["rater"]]),
        ("annotate", "annotate", [f"output_dir={paths['annotate']}",
                                  f"rater_dir={paths['rater'] / 'rater'}",
                                  f"max_documents_per_file={documents}", *extra["annotate"]]),
        ("select", "select", [f"scores_dir={paths['annotate']}", f"output_dir={selected}",
                              f"uniform_output_dir={uniform}", *extra["select"]]),
    ]
    for name, selection in (("selected", selected), ("uniform", uniform)):
        runs.append(("train", f"train ({name})", [
            f"output_dir={out / f'train_{name}'}", f"dataset.selection_dir={selection}",
            f"max_steps={args.train_steps}", f"save_every_n_steps={args.train_steps}",
            *extra["train"]]))
    return runs


def check_stages(args: argparse.Namespace, runs: Sequence[tuple[str, str, list[str]]],
                 extra: dict[str, list[str]]) -> None:
    """Check every run's config with the overrides it will get before the judge runs
    (stages.check_stage_config: what its recipe, or acadlm-qurating-select, refuses from its
    config alone), so that a bad value of a later stage stops the pipeline at once, naming
    ``<stage>:<key>`` (or the pipeline's flag that set the key, unless the stage's ``--set``
    overrides in ``extra`` set it), not after the judge and the rater have run."""
    for stage, label, overrides in runs:
        check_stage_config(stage, getattr(args, f"{stage}_config"), overrides,
                           recipe=STAGE_RECIPES[stage],
                           run=None if label == stage else f"the {label} run",
                           flags=flag_keys(FLAG_KEYS[stage], extra[stage]),
                           world_size=args.nproc_per_node)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    extra = stage_overrides(args.extra, STAGES, example="rater:margin=0.1")
    out = args.output_dir
    started = time.perf_counter()
    runs = stage_runs(args, extra)
    with refused_before_stages():  # every stage's config, before the judge runs
        check_output_dir(out, key="--output-dir")  # a file there, or above it
        check_stages(args, runs, extra)

    for stage, label, overrides in runs:
        config = getattr(args, f"{stage}_config")
        if stage == "select":
            run_stage([sys.executable, "-m", "acadlm_plugins.qurating.select", "--config",
                       config, *overrides], stage=label)
        else:
            nproc = 1 if stage == "judge" else args.nproc_per_node
            tune_run(f"acadlm_plugins/{STAGE_RECIPES[stage]}_recipe", config, overrides, nproc,
                     stage=label)

    report = collect_report(out, time.perf_counter() - started)
    (out / "pipeline_summary.json").write_text(json.dumps(report, indent=2))
    print(format_report(report, out), flush=True)


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def collect_report(out: Path, wall_seconds: float) -> dict:
    """The summaries every stage wrote, in one mapping (also saved as pipeline_summary.json)."""
    return {
        "judgments": _read(out / "judgments" / "judgments.summary.json"),
        "rater": _read(out / "rater" / "summary.json"),
        "annotation": _read(out / "annotate" / "annotation.json"),
        "selection": {name: _read(out / "select" / name / "selection.json")
                      for name in ("selected", "uniform")},
        "selection_overlap": selection_overlap(out / "select" / "selected",
                                               out / "select" / "uniform"),
        "training": {name: _read(out / f"train_{name}" / "summary.json")
                     for name in ("selected", "uniform")},
        "wall_seconds": round(wall_seconds, 1),
    }


def selected_ids(selection_dir: Path) -> set[str]:
    """The ``id`` of every document in a selection folder (``<domain>/train.jsonl``)."""
    ids: set[str] = set()
    for path in sorted(selection_dir.glob("*/train.jsonl")):
        with open(path, encoding="utf-8") as handle:
            ids.update(str(json.loads(line).get("id")) for line in handle if line.strip())
    return ids


def selection_overlap(selected: Path, uniform: Path) -> dict[str, int]:
    """How many documents the quality and the uniform selection share.

    Both draw their Gumbel noise from the same (seed, id) hash, so they differ only where the
    scores move a document across the budget line: at high tau they overlap a lot, which makes
    their comparison a paired one.
    """
    chosen, baseline = selected_ids(selected), selected_ids(uniform)
    return {"selected": len(chosen), "uniform": len(baseline), "shared": len(chosen & baseline)}


def format_report(report: dict, out: Path) -> str:
    """The pipeline's summary for the terminal: one block per stage."""
    judged, rater = report["judgments"], report["rater"]
    lines = ["", "=" * 76, "QuRating pipeline summary", "=" * 76,
             (f"judge: {judged['judge']}: {judged['pairs_in_file']} pairs, "
             f"{judged['pairs_rejected']} rejected, position bias "
             f"{_show(judged['position_bias'])}"),
             "", (f"{'criterion':<22}{'mean |p-0.5|':>13}{'train pairs':>12}{'held out':>9}"
             f"{'acc before':>11}{'acc after':>10}")]
    per_criterion = rater["pairs"].get("per_criterion", {})
    for name in rater["criteria"]:
        counts = per_criterion.get(name, {})
        confidence = judged["per_criterion"].get(name, {}).get("mean_confidence")
        heldout = counts.get("heldout", 0)
        lines.append(f"{name:<22}{_show(confidence, '.3f'):>13}"
                     f"{counts.get('confident', 0) - heldout:>12}{heldout:>9}"
                     f"{_show(rater['heldout_accuracy_before'].get(name), '.3f'):>11}"
                     f"{_show(rater['heldout_accuracy_after'].get(name), '.3f'):>10}")
    lines += ["", annotation_line(report["annotation"]), ""]
    lines += summary_lines(report["selection"])
    overlap = report["selection_overlap"]
    lines.append(f"documents in both selections: {overlap['shared']:,} of {overlap['selected']:,} "
                 f"selected and {overlap['uniform']:,} uniform")
    selected, uniform = report["training"]["selected"], report["training"]["uniform"]
    before = selected["val_loss_before"]
    lines += ["", (f"validation loss after {selected['steps']} steps on each selection "
              "(the same tokens for both):"),
              f"{'domain':<14}{'base model':>11}{'uniform':>10}{'selected':>10}{'sel - uni':>11}"]
    after_sel, after_uni = selected["val_loss_after"], uniform["val_loss_after"]
    for domain in before:
        lines.append(f"{domain:<14}{before[domain]:>11.4f}{after_uni[domain]:>10.4f}"
                     f"{after_sel[domain]:>10.4f}{after_sel[domain] - after_uni[domain]:>+11.4f}")
    mean = {name: sum(values.values()) / len(values)
            for name, values in (("base", before), ("uniform", after_uni),
                                 ("selected", after_sel))}
    lines.append(f"{'mean':<14}{mean['base']:>11.4f}{mean['uniform']:>10.4f}"
                 f"{mean['selected']:>10.4f}{mean['selected'] - mean['uniform']:>+11.4f}")
    lines += ["", f"wall time: {report['wall_seconds']:.0f} s",
              (f"selection plots: {out / 'select' / 'selected' / 'selection.png'}, "
              f"{out / 'select' / 'uniform' / 'selection.png'}"),
              f"all summaries: {out / 'pipeline_summary.json'}"]
    return "\n".join(lines)


def annotation_line(annotation: dict) -> str:
    """The annotated corpus (all finished shards, whichever run scored them) and this run's
    throughput, or, when this run found every shard done, "already annotated" with the
    throughput of the run that scored them when annotation.json knows it."""
    corpus = annotation["corpus"]
    line = f"annotation: {corpus['documents']:,} documents, {corpus['tokens']:,} tokens"
    if annotation.get("shards_scored") and annotation.get("tokens_per_second") is not None:
        return (f"{line}; this run scored {annotation['documents_scored']:,} documents at "
                f"{annotation['tokens_per_second']:,.0f} tokens/s")
    last = annotation.get("last_scoring_run")
    if last and last.get("tokens_per_second") is not None:
        return (f"{line}, already annotated (an earlier run scored {last['documents']:,} "
                f"documents at {last['tokens_per_second']:,.0f} tokens/s)")
    return f"{line}, already annotated"


def _show(value: float | None, fmt: str = "+.3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, fmt)


if __name__ == "__main__":
    main()
