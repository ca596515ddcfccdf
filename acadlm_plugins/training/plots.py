"""PNG plots written into a run's output directory (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _two_panels(title: str):
    """A figure with two stacked panels sharing the step axis (Agg backend, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    top.set_title(title)
    bottom.set_xlabel("step")
    return fig, top, bottom


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_domain_history(history: Sequence[dict[str, Any]], domain_names: Sequence[str],
                        path: str | Path) -> Path:
    """Domain weights (top) and per-domain validation loss with its reference (bottom) by step."""
    steps = [h["step"] for h in history]
    fig, top, bottom = _two_panels("Dynamic batch loading")
    for i, name in enumerate(domain_names):
        color = f"C{i % 10}"
        top.plot(steps, [h["weights"][i] for h in history], marker="o", color=color, label=name)
        bottom.plot(steps, [h["losses"][i] for h in history], marker="o", color=color, label=name)
        bottom.axhline(history[-1]["reference"][i], color=color, linestyle="--", linewidth=0.8)
    top.set_ylabel("domain weight")
    top.legend(loc="best", fontsize="small")
    bottom.set_ylabel("validation loss (dashed: reference)")
    return _save(fig, path)


def plot_pruning_history(history: Sequence[dict[str, Any]], mask_types: Sequence[str],
                         path: str | Path) -> Path:
    """Expected remaining fraction vs its (ramped) target per mask type, and the multipliers."""
    steps = [h["step"] for h in history]
    fig, top, bottom = _two_panels("Targeted structured pruning")
    for i, name in enumerate(mask_types):
        color = f"C{i % 10}"
        top.plot(steps, [h[f"pruning/expected/{name}"] for h in history], color=color,
                 label=f"{name} expected")
        top.plot(steps, [h[f"pruning/target/{name}"] for h in history], color=color,
                 linestyle="--", linewidth=0.8)
        bottom.plot(steps, [h[f"pruning/lambda_1/{name}"] for h in history], color=color,
                    label=f"{name} λ1")
        bottom.plot(steps, [h[f"pruning/lambda_2/{name}"] for h in history], color=color,
                    linestyle=":", label=f"{name} λ2")
    top.set_ylabel("remaining fraction (dashed: target)")
    top.legend(loc="best", fontsize="small")
    bottom.set_ylabel("Lagrange multipliers")
    bottom.legend(loc="best", fontsize="x-small", ncol=2)
    return _save(fig, path)
