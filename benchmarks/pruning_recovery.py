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
arms end on the same number of tokens.

Run::

    .venv/bin/python benchmarks/pruning_recovery.py                       # runs the demo (~15 min)
    .venv/bin/python benchmarks/pruning_recovery.py --from-dir outputs/sheared_llama_demo
"""

from __future__ import annotations

import argparse
import json
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
    prune_step, cont_step = tokens_per_step(prune_cfg, 1), tokens_per_step(cont_cfg, 1)
    pruning = json.loads((dirs["ours"]["prune"] / "pruning_summary.json").read_text())
    source = pruning["val_loss"]["source"]
    prune_points = curve(dirs["ours"]["prune"], 0, prune_step)[1:]  # step 0 is the source
    prune_tokens = prune_points[-1][0] if prune_points else 0
    out_curves = {"ours": prune_points + curve(dirs["ours"]["continued"], prune_tokens, cont_step)}
    for arm in ("one_shot", "from_scratch"):
        if (dirs[arm]["continued"] / "summary.json").exists():
            out_curves[arm] = curve(dirs[arm]["continued"], 0, cont_step)
    return out_curves, sum(source.values()) / len(source)


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
    args = parser.parse_args()
    out = args.from_dir
    if out is None:
        out = args.output_dir
        subprocess.run([sys.executable, str(REPO / "recipes" / "sheared_llama" / "pipeline.py"),
                        "--output-dir", str(out)], check=True)
    arm_curves, source = curves(out)
    print(table(arm_curves, source))
    print(f"plot: {plot(arm_curves, source, out / 'pruning_recovery.png')}")


if __name__ == "__main__":
    main()
