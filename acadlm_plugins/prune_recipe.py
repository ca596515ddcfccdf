"""Sheared-LLaMA targeted structured pruning, then materialization and export.

Run::

    tune run acadlm_plugins/prune_recipe --config configs/smollm2/135M_to_45M_prune.yaml
    tune run --nproc_per_node 2 acadlm_plugins/prune_recipe --config ...

Training is the continued pre-training loop (domain mixture, dynamic batch loading, plugins,
resumable checkpoints) with the built-in pruning plugin switched on by the config's
``pruning:`` block: it learns hard-concrete masks and Lagrange multipliers toward the target
architecture. Afterwards the masks keep exactly the target's units, the weights are sliced
into a genuinely smaller model, and it is exported as a Hugging Face checkpoint under
``<output_dir>/pruned_model`` that ``continued_pretrain_recipe`` (and transformers) load.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
from omegaconf import DictConfig
from torchtune import config, training, utils

from acadlm_plugins.continued_pretrain_recipe import ContinuedPretrainRecipe
from acadlm_plugins.pruning.architecture import architecture_of
from acadlm_plugins.pruning.export import export_pruned_model
from acadlm_plugins.pruning.masks import MaskHooks
from acadlm_plugins.pruning.materialize import materialize
from acadlm_plugins.training.components import instantiate_component

log = utils.get_logger("INFO")

PRUNED_MODEL_DIRNAME = "pruned_model"


class PruneRecipe:
    """Prune with the shared training loop, then materialize, verify and export (rank 0)."""

    def __init__(self, cfg: DictConfig) -> None:
        self._cfg = cfg
        self._trainer = ContinuedPretrainRecipe(cfg, recipe_name="prune")
        self._trainer.example_config = "configs/smollm2/135M_to_50M_prune.yaml"
        self._trainer.exports_final_model = False  # the pruned model is exported below

    def setup(self, cfg: DictConfig) -> None:
        self._trainer.setup(cfg)
        self._pruning = self._trainer.plugin_manager.get_plugin(
            "acadlm_plugins.plugins.pruning:PruningPlugin")

    def train(self) -> dict[str, Any]:
        return self._trainer.train()

    def materialize_and_export(self) -> dict[str, Any] | None:
        """Slice the final model, check it against the masked model, export it; a summary."""
        started = time.perf_counter()
        state = self._trainer.full_model_state()
        if not self._trainer.is_rank_zero:
            return None
        masks = self._pruning.masks
        with training.set_default_dtype(torch.float32):
            plain = instantiate_component(self._cfg, "model")
        plain.load_state_dict(state, strict=False)
        pruned, target = materialize(plain, masks)
        achieved = architecture_of(pruned)

        source_model = _load_source_model(self._cfg)
        losses_source = self._trainer.evaluate(source_model)
        del source_model
        hooks = MaskHooks(plain, masks)
        masks.use_final_gates()
        losses_masked = self._trainer.evaluate(plain)
        hooks.remove()
        losses_pruned = self._trainer.evaluate(pruned)

        dest = self._trainer.output_dir / PRUNED_MODEL_DIRNAME
        export_pruned_model(pruned, achieved, self._cfg.checkpointer.checkpoint_dir, dest,
                            provenance={"source": masks.source.to_dict(),
                                        "target": target.to_dict(),
                                        "recipe": "acadlm_plugins/prune_recipe"})
        summary = {
            "source": masks.source.to_dict(), "target": target.to_dict(),
            "achieved": achieved.to_dict(),
            "non_embedding_params": {"source": masks.source.non_embedding_params(),
                                     "target": target.non_embedding_params(),
                                     "achieved": _non_embedding_params(pruned)},
            "total_params": {"source": masks.source.total_params(), "target": target.total_params(),
                             "achieved": sum(p.numel() for p in pruned.parameters())},
            "val_loss": {"source": losses_source, "masked": losses_masked,
                         "pruned": losses_pruned},
            "max_abs_loss_diff_masked_vs_pruned": max(
                abs(losses_masked[d] - losses_pruned[d]) for d in losses_pruned),
            "pruned_model_dir": str(dest),
            "materialize_seconds": round(time.perf_counter() - started, 1),
        }
        for result in self._trainer.plugin_manager.hook.acadlm_model_exported(
                model_dir=str(dest), recipe="prune"):
            summary.update(result or {})
        (self._trainer.output_dir / "pruning_summary.json").write_text(
            json.dumps(summary, indent=2))
        print(format_pruning_summary(summary), flush=True)
        return summary

    def cleanup(self) -> None:
        self._trainer.cleanup()


def _load_source_model(cfg: DictConfig) -> torch.nn.Module:
    """The unpruned source model, freshly loaded from the configured checkpoint."""
    checkpointer = instantiate_component(cfg, "checkpointer")
    with training.set_default_dtype(torch.float32):
        model = instantiate_component(cfg, "model")
    model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY], strict=False)
    return model


def _non_embedding_params(model: torch.nn.Module) -> int:
    """Counted from the materialized tensors themselves (the embedding is excluded)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if not name.startswith(("tok_embeddings", "output")))


def format_pruning_summary(summary: dict[str, Any]) -> str:
    """Source / target / achieved shapes and parameter counts, and per-domain losses."""
    rows = ["", "=== pruning summary ===",
            f"{'':<10}{'layers':>7}{'heads':>7}{'kv':>4}{'hidden':>8}{'mlp':>7}{'non-emb params':>16}"]
    for name in ("source", "target", "achieved"):
        a = summary[name]
        params = summary["non_embedding_params"][name]
        rows.append(f"{name:<10}{a['num_layers']:>7}{a['num_heads']:>7}{a['num_kv_heads']:>4}"
                    f"{a['embed_dim']:>8}{a['intermediate_dim']:>7}{params / 1e6:>15.2f}M")
    losses = summary["val_loss"]
    rows.append(f"{'domain':<12}{'source':>10}{'masked':>10}{'pruned':>10}")
    for domain in losses["pruned"]:
        rows.append(f"{domain:<12}{losses['source'][domain]:>10.4f}"
                    f"{losses['masked'][domain]:>10.4f}{losses['pruned'][domain]:>10.4f}")
    rows.append(f"masked vs materialized loss: max |diff| = "
                f"{summary['max_abs_loss_diff_masked_vs_pruned']:.2e}")
    rows.append(f"pruned model: {summary['pruned_model_dir']}")
    return "\n".join(rows)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of ``tune run acadlm_plugins/prune_recipe --config ...``."""
    recipe = PruneRecipe(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.materialize_and_export()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
