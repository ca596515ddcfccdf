"""Validation loss against training tokens for the three arms of the Sheared-LLaMA pipeline.

Runs (or reads, with ``--from-dir``) ``recipes/sheared_llama/pipeline.py`` on the embedded
SmolLM2-135M, then, from every run's own evaluation history (the last checkpoint's
``recipe_state.pt``), prints the mean validation loss over the corpus domains at each
evaluation against the training tokens seen so far, side by side for

* ``from_scratch``: the target shape from random weights;
* ``one_shot``: Minitron importance pruning, then continued pre-training with distillation;
* ``ours``: learned masks (the masked model at the target shape during pruning), then
  continued pre-training with distillation;

with the source model's loss as the line to reach, and writes ``pruning_recovery.png``. All
arms end on the same number of tokens. The token axis counts every process of the pipeline
(its ``--nproc-per-node``, recorded in ``pipeline_summary.json``).

One run's arms differ by a few hundredths of a nat, about as much as one arm differs between
two seeds, so ``--seeds`` runs the pipeline once per seed (other data order, gate noise and
from-scratch initialization: the pipeline draws the random init with the prune stage's seed)
and prints each arm's final loss per seed, its mean and standard deviation,
and the paired difference ours - one_shot with a 95% t interval: a difference whose interval
holds 0 is not one this budget can tell apart.

Run::

    .venv/bin/python benchmarks/pruning_recovery.py                       # runs the demo (~12 min)
    .venv/bin/python benchmarks/pruning_recovery.py --seeds 0 1 2         # three demos, statistics
    .venv/bin/python benchmarks/pruning_recovery.py --from-dir outputs/sheared_llama_demo  # after `make demo`
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes" / "sheared_llama"))

from pipeline import ARMS, arm_dirs, tokens_per_step


def evaluations(run_dir: Path) -> list[dict]:
    """The run's evaluations ({step, losses}) from its newest checkpoint."""
    latest = max(run_dir.glob("step_*/recipe_state.pt"))
    return torch.load(latest, weights_only=False)["history"]["evaluations"]


def curve(run_dir: Path, tokens_before: int, step_tokens: int) -> list[tuple[int, float]]:
    """(tokens seen, mean validation loss) at every evaluation of a run."""
    points = []
    for record in evaluations(run_dir):
        losses = record["losses"]
        points.append((tokens_before + record["step"] * step_tokens,
                       sum(losses.values()) / len(losses)))
    return points


def curves(out: Path) -> tuple[dict[str, list[tuple[int, float]]], float]:
    """Every arm's curve and the source's mean loss, from a finished pipeline folder."""
    from omegaconf import OmegaConf

    dirs = arm_dirs(out)
    prune_cfg = OmegaConf.load(dirs["ours"]["prune"] / "torchtune_config.yaml")
    cont_cfg = OmegaConf.load(dirs["ours"]["continued"] / "torchtune_config.yaml")
    world = world_size(out, prune_cfg)
    prune_step, cont_step = tokens_per_step(prune_cfg, world), tokens_per_step(cont_cfg, world)
    pruning = json.loads((dirs["ours"]["prune"] / "pruning_summary.json").read_text())
    source = pruning["val_loss"]["source"]
    prune_points = curve(dirs["ours"]["prune"], 0, prune_step)[1:]  # step 0 is the source
    prune_tokens = prune_points[-1][0] if prune_points else 0
    out_curves = {"ours": prune_points + curve(dirs["ours"]["continued"], prune_tokens, cont_step)}
    for arm in ("one_shot", "from_scratch"):
        if (dirs[arm]["continued"] / "summary.json").exists():
            out_curves[arm] = curve(dirs[arm]["continued"], 0, cont_step)
    return out_curves, sum(source.values()) / len(source)


def world_size(out: Path, prune_cfg) -> int:
    """The number of processes the pipeline in ``out`` trained on (``--nproc-per-node``), from
    its ``pipeline_summary.json``: recorded there, or, in summaries written before it was, the
    pruning tokens over those of one process."""
    path = out / "pipeline_summary.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; --from-dir needs a finished pipeline folder (rerun "
                         "recipes/sheared_llama/pipeline.py into it: finished stages resume)")
    budget = json.loads(path.read_text())["comparison"]["budget"]
    if "nproc_per_node" in budget:
        return int(budget["nproc_per_node"])
    one_process = int(prune_cfg.max_steps) * tokens_per_step(prune_cfg, 1)
    return max(1, round(budget["prune_tokens"] / one_process))


def table(arm_curves: dict[str, list[tuple[int, float]]], source: float) -> str:
    arms = [a for a in ARMS if a in arm_curves]
    tokens = sorted({t for a in arms for t, _ in arm_curves[a]})
    lines = [f"{'tokens':>10}" + "".join(f"{a:>14}" for a in arms)]
    for t in tokens:
        row = f"{t:>10,}"
        for arm in arms:
            value = dict(arm_curves[arm]).get(t)
            row += f"{value:>14.4f}" if value is not None else f"{'':>14}"
        lines.append(row)
    finals = {a: arm_curves[a][-1] for a in arms}
    lines.append("")
    lines.append(f"source model mean validation loss: {source:.4f}")
    for arm in arms:
        t, loss = finals[arm]
        lines.append(f"{arm:<13} final {loss:.4f} at {t:,} tokens  (source {loss - source:+.4f})")
    if {"ours", "one_shot", "from_scratch"} <= set(finals):
        lines.append(f"ratios of the final loss gap to the source: one_shot / from_scratch = "
                     f"{(finals['one_shot'][1] - source) / (finals['from_scratch'][1] - source):.3f}, "
                     f"ours / one_shot = "
                     f"{(finals['ours'][1] - source) / (finals['one_shot'][1] - source):.3f}")
    return "\n".join(lines)


# two-sided 95% critical values of Student's t for 1..30 degrees of freedom, then for 40, 60
# and 120 (beyond 30 the next lower tabulated degrees of freedom is used: a wider interval)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
       2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
       2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
T95_LARGE = ((120, 1.980), (60, 2.000), (40, 2.021), (30, 2.042))


def t95(degrees_of_freedom: int) -> float:
    """The two-sided 95% critical value of Student's t."""
    if degrees_of_freedom < 1:
        raise ValueError("a t interval needs at least two paired runs")
    if degrees_of_freedom <= len(T95):
        return T95[degrees_of_freedom - 1]
    return next(value for dof, value in T95_LARGE if degrees_of_freedom >= dof)


def seed_statistics(finals: dict[int, dict[str, float]]) -> dict[str, object]:
    """Per arm the mean and standard deviation of the final loss over seeds, and the paired
    difference ours - one_shot (mean, standard deviation, 95% t interval) where both ran."""
    arms = [a for a in ARMS if all(a in f for f in finals.values())]
    out: dict[str, object] = {"seeds": sorted(finals), "arms": {}}
    for arm in arms:
        values = [finals[s][arm] for s in sorted(finals)]
        out["arms"][arm] = {"mean": statistics.fmean(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    if {"ours", "one_shot"} <= set(arms):
        diffs = [finals[s]["ours"] - finals[s]["one_shot"] for s in sorted(finals)]
        mean = statistics.fmean(diffs)
        paired: dict[str, object] = {"values": diffs, "mean": mean}
        if len(diffs) > 1:
            spread = statistics.stdev(diffs)
            half = t95(len(diffs) - 1) * spread / len(diffs) ** 0.5
            paired.update(std=spread, ci95=(mean - half, mean + half))
        out["ours_minus_one_shot"] = paired
    return out


def seed_table(finals: dict[int, dict[str, float]], source: float) -> str:
    stats = seed_statistics(finals)
    arms = list(stats["arms"])
    lines = [f"{'seed':>6}" + "".join(f"{a:>14}" for a in arms)]
    for seed in stats["seeds"]:
        lines.append(f"{seed:>6}" + "".join(f"{finals[seed][a]:>14.4f}" for a in arms))
    lines.append(f"{'mean':>6}" + "".join(f"{stats['arms'][a]['mean']:>14.4f}" for a in arms))
    lines.append(f"{'std':>6}" + "".join(f"{stats['arms'][a]['std']:>14.4f}" for a in arms))
    lines.append(f"source model mean validation loss: {source:.4f}")
    paired = stats.get("ours_minus_one_shot")
    if paired:
        text = ", ".join(f"{d:+.4f}" for d in paired["values"])
        line = f"ours - one_shot per seed: {text}; mean {paired['mean']:+.4f}"
        if "ci95" in paired:
            low, high = paired["ci95"]
            verdict = ("ours better" if high < 0 else "one_shot better" if low > 0
                       else "not distinguishable at this budget")
            line += f", 95% t interval [{low:+.4f}, {high:+.4f}] ({verdict})"
        lines.append(line)
    return "\n".join(lines)


def plot(arm_curves: dict[str, list[tuple[int, float]]], source: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in ARMS:
        if arm in arm_curves:
            tokens, losses = zip(*arm_curves[arm])
            ax.plot(tokens, losses, marker="o", markersize=3, label=arm)
    ax.axhline(source, color="black", linestyle="--", linewidth=1, label="source")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("mean validation loss (nats/token)")
    ax.set_title("Sheared-LLaMA recovery at equal tokens (SmolLM2-135M demo)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-dir", type=Path, default=None,
                        help="a finished pipeline output folder; without it the demo is run")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/pruning_recovery"))
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run the pipeline once per seed (in <output-dir>/seed_<n>) and print "
                             "per-arm statistics and the paired ours - one_shot difference")
    parser.add_argument("--prune-config", type=Path, default=None,
                        help="the pipeline's --prune-config (default: the demo's)")
    parser.add_argument("--continue-config", type=Path, default=None,
                        help="the pipeline's --continue-config (default: the demo's)")
    args = parser.parse_args()
    configs = [*(["--prune-config", str(args.prune_config)] if args.prune_config else []),
               *(["--continue-config", str(args.continue_config)] if args.continue_config else [])]
    if args.seeds:
        if args.from_dir is not None:
            parser.error("--seeds runs the pipelines; it cannot be combined with --from-dir "
                         "(point --output-dir at a folder of seed_<n> runs to resume them)")
        finals: dict[int, dict[str, float]] = {}
        for seed in args.seeds:
            out = args.output_dir / f"seed_{seed}"
            run_pipeline(out, seed, configs)
            arm_curves, source = curves(out)
            print(f"--- seed {seed}\n{table(arm_curves, source)}", flush=True)
            plot(arm_curves, source, out / "pruning_recovery.png")
            finals[seed] = {arm: points[-1][1] for arm, points in arm_curves.items()}
        print(f"--- {len(args.seeds)} seeds\n{seed_table(finals, source)}")
        return
    out = args.from_dir
    if out is None:
        out = args.output_dir
        run_pipeline(out, None, configs)
    arm_curves, source = curves(out)
    print(table(arm_curves, source))
    print(f"plot: {plot(arm_curves, source, out / 'pruning_recovery.png')}")


def run_pipeline(out: Path, seed: int | None, configs: list[str]) -> None:
    """The pipeline into ``out`` (it resumes whatever is there) on the demo configs or the
    ``--prune-config``/``--continue-config`` flags in ``configs``, with one seed for every run
    of both stages when ``seed`` is given."""
    seeds = [] if seed is None else ["--set", f"prune:seed={seed}", "--set", f"continue:seed={seed}"]
    subprocess.run([sys.executable, str(REPO / "recipes" / "sheared_llama" / "pipeline.py"),
                    "--output-dir", str(out), *configs, *seeds], check=True)


if __name__ == "__main__":
    main()
