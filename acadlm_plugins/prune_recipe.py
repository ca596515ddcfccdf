"""Sheared-LLaMA targeted structured pruning, then materialization and export.

Run::

    tune run acadlm_plugins/prune_recipe --config configs/smollm2/135M_to_85M_prune.yaml
    tune run --nproc_per_node 2 acadlm_plugins/prune_recipe --config ...

Training is the continued pre-training loop (domain mixture, dynamic batch loading, plugins,
resumable checkpoints) with the built-in pruning plugin switched on by the config's
``pruning:`` block: it learns hard-concrete masks and Lagrange multipliers toward the target
architecture. Afterwards the masks keep exactly the target's units, the weights are sliced
into a genuinely smaller model, checked against the masked model (a mismatch stops the run
before anything is exported), and exported as a Hugging Face checkpoint under
``<output_dir>/pruned_model`` that ``continued_pretrain_recipe`` (and transformers) load.

``pruning.method: importance`` is the one-shot baseline (Minitron): no mask training; the
units with the largest activations on the calibration sequences are kept and the target is
materialized and exported directly. Its ``pruning_summary.json`` records what the export was
made from (the config values a resumed learned run must match, and the source's weight-file
fingerprint); a rerun on the same ``output_dir`` reuses that export instead of ranking and
slicing again, as a finished learned run resumes from its last checkpoint (its export hooks
still run, so a quantized copy asked for now is written), and refuses one made from another
config (or, under ``resume: false``, any) rather than overwrite it, before writing anything.
A run whose ``output_dir`` holds the other method's output (a one-shot export, a learned run's
checkpoints or export) is refused the same way, naming ``pruning.method``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torchtune import config, training, utils

from acadlm_plugins.continued_pretrain_recipe import ContinuedPretrainRecipe
from acadlm_plugins.errors import AcadlmError, ConfigError
from acadlm_plugins.models.families import unreadable_weights_refused
from acadlm_plugins.plugin_manager import add_plugin_results, collect_metrics
from acadlm_plugins.pruning.architecture import architecture_of
from acadlm_plugins.pruning.export import export_pruned_model
from acadlm_plugins.pruning.masks import MaskHooks
from acadlm_plugins.pruning.materialize import kept_units, materialize
from acadlm_plugins.training.checkpointing import (
    check_starting_weights,
    config_mismatch,
    config_values,
    latest_checkpoint,
    starting_weights_fingerprint,
    write_atomically,
)
from acadlm_plugins.training.components import instantiate_component
from acadlm_plugins.training.runtime import run_recipe

log = utils.get_logger("INFO")

RECIPE_NAME = "prune"
PRUNED_MODEL_DIRNAME = "pruned_model"
SUMMARY_FILENAME = "pruning_summary.json"
# In a one-shot run's pruning_summary.json: what its export was made from (see
# `one_shot_inputs`), compared on a rerun to reuse the export instead of pruning again.
ONE_SHOT_INPUTS_KEY = "one_shot_inputs"
# In pruning_summary.json, for masks started from importance: per mask type, the units kept
# at the end and how many of them the one-shot choice (step 0) did not keep.
CHOICE_KEY = "changed_from_importance_init"
# Largest |masked - materialized| validation loss (nats) that rounding can explain, by the
# dtype the two models are compared in; anything above is a slicing error.
MATERIALIZATION_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
COMPARISON_DTYPE = torch.float32


class MaterializationError(AcadlmError, RuntimeError):
    """The materialized model does not compute what the masked model computes."""

    user_error = False  # a slicing bug to report, with its traceback


class PruneRecipe:
    """Prune with the shared training loop, then materialize, verify and export (rank 0)."""

    def __init__(self, cfg: DictConfig) -> None:
        self._cfg = cfg
        self._trainer = ContinuedPretrainRecipe(cfg, recipe_name=RECIPE_NAME)
        self._trainer.example_config = "configs/smollm2/135M_to_85M_prune.yaml"
        self._trainer.exports_final_model = False  # the pruned model is exported below
        self._trainer.resume_must_match = (*self._trainer.resume_must_match, "pruning")
        self._trainer.before_resume = self._check_output_dir
        self._one_shot_inputs: dict[str, Any] | None = None
        self._reused_one_shot: dict[str, Any] | None = None

    def setup(self, cfg: DictConfig) -> None:
        self._trainer.setup(cfg)
        self._pruning = self._trainer.plugin_manager.get_plugin(
            "acadlm_plugins.plugins.pruning:PruningPlugin")

    def _check_output_dir(self, cfg: DictConfig, resume: object) -> object:
        """What ``output_dir`` already holds, checked after the config checks and before
        anything is written. An export or checkpoints of the other ``pruning.method`` are
        refused (:func:`check_same_method`): this run would overwrite them. One-shot runs write
        no checkpoint: what a learned run's resume checks against its checkpoint, a one-shot
        run checks against its summary (on the config as the run reads it). A reusable export
        is this run's resume point, so ``resume: true`` accepts it as a learned run accepts
        its last checkpoint."""
        pruning = self._trainer.plugin_manager.get_plugin(
            "acadlm_plugins.plugins.pruning:PruningPlugin")
        check_same_method(self._trainer.output_dir, pruning.method)
        if pruning.method != "importance":
            return resume
        self._one_shot_inputs = one_shot_inputs(cfg, self._trainer.resume_must_match,
                                                self._trainer.resume_defaults)
        self._reused_one_shot = reusable_one_shot(self._trainer.output_dir,
                                                  self._one_shot_inputs, resume,
                                                  self._trainer.resume_defaults)
        if self._reused_one_shot is not None and str(resume).lower() == "true":
            return "auto"  # the export, not a checkpoint, is what this run resumes from
        return resume

    @property
    def trains_masks(self) -> bool:
        return self._pruning.trains_masks

    def train(self) -> dict[str, Any]:
        return self._trainer.train()

    def materialize_and_export(self) -> dict[str, Any] | None:
        """Slice the final model, check it against the masked model, export it; a summary."""
        if self._pruning.method == "importance":
            if self._reused_one_shot is not None:
                return self._report_reused_one_shot(self._reused_one_shot)
            return self.one_shot_prune_and_export()
        started = time.perf_counter()
        state = self._trainer.full_model_state()
        if not self._trainer.is_rank_zero:
            return None
        # Slicing happens on the CPU, where the gathered state is: the masks (trained on the
        # run's device) come along first, so gates, indices and weights share one device.
        masks = self._pruning.masks.cpu()
        masks.invalidate()
        choice = self._pruning.changes_from_importance_init()
        with training.set_default_dtype(COMPARISON_DTYPE):
            plain = instantiate_component(self._cfg, "model")
        plain.load_state_dict(state, strict=False)
        pruned, target = materialize(plain, masks)
        kept_layers = kept_units(masks).layers

        losses_source = self._source_losses()
        losses_masked = self._evaluate(plain, masks=masks)
        del plain
        losses_pruned = self._evaluate(pruned)
        check_materialized(losses_masked, losses_pruned, COMPARISON_DTYPE)
        return self._export(pruned, target, started, {
            "source": losses_source, "masked": losses_masked, "pruned": losses_pruned},
            kept_layers=kept_layers, choice=choice)

    def one_shot_prune_and_export(self) -> dict[str, Any] | None:
        """Minitron one-shot pruning: rank units on the calibration packs, slice, export."""
        from acadlm_plugins.pruning.importance import keep_indices, one_shot_prune

        started = time.perf_counter()
        # Every rank scores the run's own (sharded) model on its device, summing in float64:
        # a large source is ranked where it already is, never gathered onto one CPU for this.
        scores = self._pruning.importance(self._pruning.calibration_corpus)
        state = self._trainer.full_model_state()
        if not self._trainer.is_rank_zero:
            return None
        # A summary left from an earlier export (of an older version: none with the same
        # inputs reaches here) must not vouch for the model folder this run rewrites.
        (self._trainer.output_dir / SUMMARY_FILENAME).unlink(missing_ok=True)
        with training.set_default_dtype(COMPARISON_DTYPE):
            source = instantiate_component(self._cfg, "model")
        source.load_state_dict(state, strict=False)
        pruned, target = one_shot_prune(source, scores, self._pruning.target)
        kept_layers = keep_indices(scores, architecture_of(source), target).layers
        losses = {"source": self._evaluate(source)}
        del source
        losses["pruned"] = self._evaluate(pruned)
        log.info("one-shot importance pruning over %d calibration sequences (%d tokens)",
                 scores.num_sequences, scores.num_tokens)
        return self._export(pruned, target, started, losses, kept_layers=kept_layers,
                            record={ONE_SHOT_INPUTS_KEY: self._one_shot_inputs})

    def _report_reused_one_shot(self, summary: dict[str, Any]) -> dict[str, Any] | None:
        """A rerun of a finished one-shot run: say so, hand the kept export to the export hooks
        again (a quantized copy the rerun asks for, a plugin's own export), as the learned path
        does on every rerun, and print the summary (rank 0). The export is handed over where it
        is now: an output folder moved with its inputs no longer holds it at the recorded path,
        so the summary then names the new one."""
        if not self._trainer.is_rank_zero:
            return None
        dest = self._trainer.output_dir / PRUNED_MODEL_DIRNAME
        log.info("one-shot pruning resumed: %s was exported from this config and source "
                 "(%s), so it is kept as it is and nothing is ranked or sliced again (a new "
                 "`output_dir` prunes afresh)", dest, self._trainer.output_dir / SUMMARY_FILENAME)
        updates = self._export_hook_results(dest)
        if Path(summary["pruned_model_dir"]).resolve() != dest.resolve():  # the folder moved
            updates["pruned_model_dir"] = str(dest)
        if updates:
            summary = {**summary, **updates}
            write_summary(self._trainer.output_dir / SUMMARY_FILENAME, summary)
        print(format_pruning_summary(summary), flush=True)
        return summary

    def _export_hook_results(self, model_dir: Path) -> dict[str, Any]:
        """What the ``acadlm_model_exported`` hooks add to the summary for ``model_dir``."""
        return collect_metrics(self._trainer.plugin_manager.hook.acadlm_model_exported(
            model_dir=str(model_dir), recipe=RECIPE_NAME))

    def _source_losses(self) -> dict[str, float]:
        """The source model's validation losses: the run's step-0 evaluation (the mask hooks are
        off until the first step), or, if that is not in the history, a fresh evaluation."""
        evaluations = self._trainer.history["evaluations"]
        if evaluations and evaluations[0]["step"] == 0:
            return dict(evaluations[0]["losses"])
        source_model = _load_source_model(self._cfg)
        try:
            return self._evaluate(source_model)
        finally:
            del source_model

    def _evaluate(self, model: torch.nn.Module, masks: Any = None) -> dict[str, float]:
        """Per-domain validation losses of ``model``, built and sliced on the CPU, computed on
        the run's device as training's evaluations are: the model (with ``masks`` hooked on
        it, final gates, when given) moves there for the evaluation and back to the CPU after,
        so one such model at a time occupies the device and export reads CPU weights."""
        device = self._trainer.device
        model.to(device)
        hooks = None
        if masks is not None:
            masks.to(device)
            hooks = MaskHooks(model, masks)
            masks.use_final_gates()  # computed on `device`, after the move
        try:
            return self._trainer.evaluate(model)
        finally:
            if hooks is not None:
                hooks.remove()
                masks.cpu()
                masks.invalidate()
            model.cpu()

    def _export(self, pruned: torch.nn.Module, target: Any, started: float,
                losses: dict[str, dict[str, float]], *, kept_layers: list[int],
                choice: dict[str, dict[str, int]] | None = None,
                record: dict[str, Any] | None = None) -> dict[str, Any]:
        source = self._pruning.source
        achieved = architecture_of(pruned)
        dest = self._trainer.output_dir / PRUNED_MODEL_DIRNAME
        method = self._pruning.method
        export_pruned_model(pruned, achieved, self._cfg.checkpointer.checkpoint_dir, dest,
                            provenance={"source": source.to_dict(), "target": target.to_dict(),
                                        "method": method,
                                        "recipe": "acadlm_plugins/prune_recipe"},
                            kept_layers=kept_layers)
        summary = {
            "method": method,
            "source": source.to_dict(), "target": target.to_dict(),
            "achieved": achieved.to_dict(),
            "non_embedding_params": {"source": source.non_embedding_params(),
                                     "target": target.non_embedding_params(),
                                     "achieved": _non_embedding_params(pruned)},
            "total_params": {"source": source.total_params(), "target": target.total_params(),
                             "achieved": sum(p.numel() for p in pruned.parameters())},
            "val_loss": losses,
            "pruned_model_dir": str(dest),
            "materialize_seconds": round(time.perf_counter() - started, 1),
        }
        if choice is not None:
            summary[CHOICE_KEY] = choice
        if "masked" in losses:
            summary["max_abs_loss_diff_masked_vs_pruned"] = max(
                abs(losses["masked"][d] - losses["pruned"][d]) for d in losses["pruned"])
        summary.update(record or {})
        add_plugin_results(summary, self._export_hook_results(dest), owner="the recipe's summary")
        write_summary(self._trainer.output_dir / SUMMARY_FILENAME, summary)
        print(format_pruning_summary(summary), flush=True)
        return summary

    def cleanup(self) -> None:
        self._trainer.cleanup()


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """``pruning_summary.json``, written atomically: a one-shot rerun reads it as its resume
    record."""
    write_atomically(path, lambda handle: handle.write(json.dumps(summary, indent=2).encode()))


def one_shot_inputs(cfg: DictConfig, must_match: tuple[str, ...],
                    defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a one-shot export is a function of, as JSON values: the config values a resumed
    learned run must match (model, data, tokenizer, seed, the ``pruning`` block with target and
    calibration, ...) and the fingerprint of the source's weight files, the two things a
    learned run's checkpoints record for its resume."""
    inputs = {"config": config_values(cfg, must_match, recipe=RECIPE_NAME, defaults=defaults),
              "starting_weights": starting_weights_fingerprint(cfg)}
    return json.loads(json.dumps(inputs))  # as a summary reads back (tuples become lists)


def exported_methods(output_dir: Path) -> set[str]:
    """The ``pruning.method`` of the pruned model ``output_dir`` holds, as its
    ``pruning_summary.json`` and its ``pruned_model/config.json`` (the export's provenance)
    record it: empty when there is neither; both are read, since either alone may be left (a
    model folder deleted, a summary unlinked by a one-shot run killed before its export). A
    summary or provenance without ``method`` was written by a learned run of an older
    version."""
    methods = set()
    summary = _read_summary(output_dir / SUMMARY_FILENAME)
    if summary is not None:
        methods.add(str(summary.get("method", "learned")))
    exported = _read_summary(output_dir / PRUNED_MODEL_DIRNAME / "config.json")  # a JSON dict
    provenance = (exported or {}).get("acadlm_pruning")
    if isinstance(provenance, dict):
        methods.add(str(provenance.get("method", "learned")))
    return methods


def check_same_method(output_dir: Path, method: str) -> None:
    """Refuse a run whose ``output_dir`` holds the output of the other ``pruning.method``,
    before anything is written: a learned run there would train and export over a one-shot
    export, a one-shot run would export over a learned run's model (with or without its
    checkpoints), without a word. The pipeline gives each arm's prune stage its own folder;
    a rerun of the same method (resumed, or a one-shot export reused or refused by
    :func:`reusable_one_shot`) passes."""
    checkpoint = latest_checkpoint(output_dir) if method == "importance" else None
    others = sorted(exported_methods(output_dir) - {method})
    if checkpoint is not None:  # only mask training writes checkpoints
        other, held = "learned", (f"the checkpoints of a learned pruning run ({checkpoint.name}, "
                                  "`pruning.method: learned`)")
    elif others:
        other = others[0]
        kind = "a one-shot" if other == "importance" else f"a {other}"
        held = (f"{kind} pruning run's export ({PRUNED_MODEL_DIRNAME}, {SUMMARY_FILENAME}, "
                f"`pruning.method: {other}`)")
    else:
        return
    raise ConfigError("pruning.method", f"is {method!r}, but `output_dir` {output_dir} already "
                      f"holds {held}, which this run would overwrite.",
                      f"choose a new `output_dir` for this run (or set `pruning.method: {other}` "
                      "to rerun the run that folder holds).")


def reusable_one_shot(output_dir: Path, inputs: dict[str, Any], resume: object,
                      defaults: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The summary of the one-shot export in ``output_dir`` if it was made from ``inputs``: a
    rerun keeps it rather than rank and slice again (in bf16 on a GPU a near-tie could flip and
    change the weights the one-shot arm's continued pre-training started from). None when
    there is nothing to reuse (no summary, one written by an older version, or its model
    folder gone): the run prunes. An export made from other inputs is refused as a learned
    run's resume on a changed config is, naming the first key that differs; under ``resume:
    false`` any export is refused rather than overwritten."""
    summary = _read_summary(output_dir / SUMMARY_FILENAME)
    if (summary is None or summary.get("method") != "importance"
            or ONE_SHOT_INPUTS_KEY not in summary
            or not (output_dir / PRUNED_MODEL_DIRNAME / "config.json").is_file()):
        return None
    if str(resume).lower() == "false":
        raise ConfigError("resume", f"`output_dir` {output_dir} already holds a one-shot pruned "
                          f"model ({PRUNED_MODEL_DIRNAME}, {SUMMARY_FILENAME}) and resume is "
                          "false, so it would be overwritten.", "set `resume: auto` to keep "
                          "it, or choose a new `output_dir`.")
    recorded = summary[ONE_SHOT_INPUTS_KEY]
    check_same_config(recorded.get("config", {}), inputs["config"], output_dir / SUMMARY_FILENAME,
                      defaults)
    check_starting_weights(recorded.get("starting_weights"), inputs["starting_weights"],
                           output_dir / PRUNED_MODEL_DIRNAME)
    return summary


def check_same_config(recorded: dict[str, Any], now: dict[str, Any], where: Path,
                      defaults: Mapping[str, Any] | None = None) -> None:
    """Refuse a one-shot rerun whose config values differ from those its export recorded in
    ``where``, by the comparison ``load_resume_state`` refuses a learned run's with
    (:func:`~acadlm_plugins.training.checkpointing.config_mismatch`): the error names the first
    dotted key that differs (``pruning.target.embed_dim``), and an output folder moved together
    with its inputs is still reused. Keys an older version did not record are not compared."""
    difference = config_mismatch(recorded, now, where.parent, defaults=defaults)
    if difference is not None:
        name, before, after = difference
        raise ConfigError(name, f"differs from the one-shot pruned model in {where.parent} "
                          f"(recorded in {where.name}): was {before}, is {after}.",
                          f"restore `{name}` as it was, or choose a new `output_dir`.")


def _read_summary(path: Path) -> dict[str, Any] | None:
    """A ``pruning_summary.json``, or None if there is none or it cannot be read (a run killed
    while writing it): then there is nothing to reuse."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _load_source_model(cfg: DictConfig) -> torch.nn.Module:
    """The unpruned source model, freshly loaded from the configured checkpoint."""
    checkpointer = instantiate_component(cfg, "checkpointer")
    with training.set_default_dtype(torch.float32):
        model = instantiate_component(cfg, "model")
    with unreadable_weights_refused(cfg.checkpointer.checkpoint_dir,
                                    cfg.checkpointer.get("checkpoint_files", None)):
        state = checkpointer.load_checkpoint()[training.MODEL_KEY]
    model.load_state_dict(state, strict=False)
    return model


def check_materialized(losses_masked: dict[str, float], losses_pruned: dict[str, float],
                       dtype: torch.dtype) -> None:
    """Stop the run if the materialized model's per-domain loss is further from the masked
    model's than ``dtype``'s rounding explains (nothing is exported then)."""
    tolerance = MATERIALIZATION_TOLERANCE[dtype]
    domain = max(losses_pruned, key=lambda d: abs(losses_masked[d] - losses_pruned[d]))
    diff = abs(losses_masked[domain] - losses_pruned[domain])
    if not diff <= tolerance:
        raise MaterializationError(
            f"the materialized model's validation loss on `{domain}` is "
            f"{losses_pruned[domain]:.4f}, the masked model's (final gates) "
            f"{losses_masked[domain]:.4f}: |diff| {diff:.3g} is above the {tolerance:g} that "
            f"{str(dtype).removeprefix('torch.')} rounding explains. The sliced weights do not "
            "reproduce the masked model, so the pruned model was not exported; the masks are "
            "in the last checkpoint. Please report this with the run's config.")


def _non_embedding_params(model: torch.nn.Module) -> int:
    """Counted from the materialized tensors themselves (the embedding is excluded)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if not name.startswith(("tok_embeddings", "output")))


def format_choice_changes(changes: dict[str, dict[str, int]]) -> str:
    """One line: per mask type, the kept units the one-shot (step-0) choice did not keep."""
    return "kept units the importance initialization did not keep: " + ", ".join(
        f"{name} {c['changed']} of {c['kept']}" for name, c in changes.items())


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
    columns = [c for c in ("source", "masked", "pruned") if c in losses]
    rows.append(f"{'domain':<12}" + "".join(f"{c:>10}" for c in columns))
    for domain in losses["pruned"]:
        rows.append(f"{domain:<12}" + "".join(f"{losses[c][domain]:>10.4f}" for c in columns))
    if "max_abs_loss_diff_masked_vs_pruned" in summary:
        rows.append(f"masked vs materialized loss: max |diff| = "
                    f"{summary['max_abs_loss_diff_masked_vs_pruned']:.2e}")
    if CHOICE_KEY in summary:
        rows.append(format_choice_changes(summary[CHOICE_KEY]))
    rows.append(f"method: {summary.get('method', 'learned')}")
    rows.append(f"pruned model: {summary['pruned_model_dir']}")
    return "\n".join(rows)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of ``tune run acadlm_plugins/prune_recipe --config ...``."""
    run_recipe(cfg, PruneRecipe, _train_masks, PruneRecipe.materialize_and_export)


def _train_masks(recipe: PruneRecipe) -> None:
    """Learned pruning trains its masks; one-shot pruning (``pruning.method: importance``) has
    nothing to train."""
    if recipe.trains_masks:
        recipe.train()


if __name__ == "__main__":
    from acadlm_plugins.training.runtime import run_main

    sys.exit(run_main(recipe_main))
