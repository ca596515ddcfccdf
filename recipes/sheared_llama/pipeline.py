"""Sheared-LLaMA end to end: prune -> materialize/export -> continued pre-training -> evaluate.

    python recipes/sheared_llama/pipeline.py                      # the embedded SmolLM2 demo
    python recipes/sheared_llama/pipeline.py --nproc-per-node 2   # same, on 2 processes
    python recipes/sheared_llama/pipeline.py --prune-config my_prune.yaml --continue-config my_cpt.yaml

Each stage is an ordinary ``tune run`` of one of our recipes, so every stage can also be run,
resumed or changed on its own; this script only chains them and prints one summary: source vs
target vs achieved shape and parameters, and per-domain validation loss of the source, the
pruned model before continued pre-training and after it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from acadlm_plugins.stages import tune_run

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PRUNE = REPO / "configs" / "smollm2" / "135M_to_50M_prune.yaml"
DEFAULT_CONTINUE = REPO / "configs" / "smollm2" / "50M_continued_pretrain.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prune-config", type=Path, default=DEFAULT_PRUNE)
    parser.add_argument("--continue-config", type=Path, default=DEFAULT_CONTINUE)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/sheared_llama_demo"))
    parser.add_argument("--nproc-per-node", type=int, default=1)
    args = parser.parse_args()

    started = time.perf_counter()
    prune_dir = args.output_dir / "prune"
    continue_dir = args.output_dir / "continued"
    pruned_model = prune_dir / "pruned_model"
    tune_run("acadlm_plugins/prune_recipe", args.prune_config,
             [f"output_dir={prune_dir}"], args.nproc_per_node)
    tune_run("acadlm_plugins/continued_pretrain_recipe", args.continue_config,
             [f"output_dir={continue_dir}", f"model.path={pruned_model}",
              f"checkpointer.checkpoint_dir={pruned_model}"], args.nproc_per_node)

    pruning = json.loads((prune_dir / "pruning_summary.json").read_text())
    continued = json.loads((continue_dir / "summary.json").read_text())
    report = {"pruning": pruning, "continued_pretraining": continued,
              "wall_seconds": round(time.perf_counter() - started, 1)}
    (args.output_dir / "pipeline_summary.json").write_text(json.dumps(report, indent=2))
    print(format_report(report, prune_dir, continue_dir), flush=True)


def format_report(report: dict, prune_dir: Path, continue_dir: Path) -> str:
    pruning, continued = report["pruning"], report["continued_pretraining"]
    lines = ["", "=" * 72, "Sheared-LLaMA pipeline summary", "=" * 72,
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
    lines.append("")
    lines.append(f"{'validation loss':<16}{'source':>10}{'pruned':>10}{'after CPT':>11}")
    source, pruned = pruning["val_loss"]["source"], pruning["val_loss"]["pruned"]
    after = continued["val_loss_after"]
    for domain in source:
        lines.append(f"{domain:<16}{source[domain]:>10.4f}{pruned[domain]:>10.4f}"
                     f"{after.get(domain, float('nan')):>11.4f}")
    lines += ["", f"wall time: {report['wall_seconds']:.0f} s",
              (f"plots: {prune_dir / 'pruning.png'}, {prune_dir / 'domain_weights.png'}, "
              f"{continue_dir / 'domain_weights.png'}"),
              f"pruned model (Hugging Face format): {prune_dir / 'pruned_model'}",
              f"after continued pre-training: {continued['checkpoint']}/model"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
