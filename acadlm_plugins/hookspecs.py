"""The extension points of an acadlm training run.

The training recipes that share the continued pre-training loop call these hooks at the same
moments: ``continued_pretrain_recipe``, ``prune_recipe`` and ``long_context_recipe``, so a
plugin written once works in all three. The other recipes (rater training, annotation, judging,
evaluation) build no plugin manager and call no hook; their configs refuse ``plugins:``.
Hooks are called with keyword arguments; an implementation may accept any subset of them.
Our own features (the non-finite loss guard, dynamic batch loading, pruning, torchao, knowledge
distillation) are plugins built on these same hooks, with no private back door into the
training loop.

A recipe calls the hooks in this order::

    acadlm_configure -> acadlm_prepare_model -> acadlm_model_built -> acadlm_data_ready
    -> acadlm_optimizer_param_groups -> [acadlm_load_state_dict on resume]
    -> [acadlm_evaluation_end with step=0: a fresh run validates before its first step]
    -> per step: acadlm_batch_ready -> acadlm_extra_loss -> acadlm_after_optimizer_step
       -> every eval interval: acadlm_evaluation_end
       -> every save interval: acadlm_state_dict -> acadlm_checkpoint_saved
    -> acadlm_model_exported (the final model folder) -> acadlm_run_end

Pruning hands over its materialized ``pruned_model`` instead, so there
``acadlm_model_exported`` comes after ``acadlm_run_end``.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT_NAME = "acadlm"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def acadlm_configure(cfg: Any, recipe: str) -> None:
    """Validate or extend the recipe config before anything is built.

    Called once, first, with the run's OmegaConf ``cfg`` (mutable) and the recipe's name
    (``"continued_pretrain"``, ``"prune"``, ...). Raise ``acadlm_plugins.errors.ConfigError``
    naming the config key and the fix to stop the run before any work is done.
    """


@hookspec
def acadlm_prepare_model(model: Any, cfg: Any, device: Any) -> None:
    """The model's weights are loaded and it is still whole: before FSDP2 shards it.

    Swap modules here when the swap must precede sharding, as float8 training's
    ``Float8Linear`` must (the built-in torchao plugin does this).
    """


@hookspec
def acadlm_model_built(model: Any, cfg: Any, device: Any) -> None:
    """The model has been built and its weights loaded, before the optimizer exists.

    A plugin may add modules or parameters (masks, heads) or wrap submodules in place here.
    """


@hookspec
def acadlm_data_ready(dataset: Any, sampler: Any, cfg: Any) -> None:
    """The training dataset and its sampler exist, before the first batch is drawn.

    Dynamic batch loading uses this to get hold of the domain sampler whose weights it updates.
    """


@hookspec
def acadlm_optimizer_param_groups(model: Any, cfg: Any) -> list[dict] | None:
    """Return extra optimizer parameter groups (a list of ``{"params": [...], ...}`` dicts).

    The groups are appended to the model's own group in the main optimizer. A plugin that
    needs a separate optimizer (for example gradient ascent on Lagrange multipliers) keeps
    it itself and steps it in ``acadlm_after_optimizer_step``.
    """


@hookspec
def acadlm_batch_ready(batch: dict, step: int) -> None:
    """A batch has been collated and moved to the device, before the forward pass.

    ``batch`` holds at least ``tokens`` and ``labels`` and, for domain mixtures, ``domain``
    (a tensor of domain indices). Modify it in place to change what the model sees.
    """


@hookspec
def acadlm_extra_loss(model: Any, batch: dict, logits: Any, loss: Any, step: int,
                      step_tokens: float, micro_batches: int) -> dict | None:
    """Return extra loss terms to add to the training loss, as ``{name: scalar tensor}``.

    Called once per micro-batch, after its forward pass. ``loss`` is that micro-batch's mean
    language-model loss over its own counted tokens (on this rank). Each term is divided by
    ``micro_batches`` (the step's ``gradient_accumulation_steps``) and added to the loss before
    backward, so a term that is a mean over its micro-batch, or a penalty returned alike for
    every micro-batch, enters the step as its average; the terms are logged as ``loss/<name>``.
    Return ``None`` to add nothing.

    The language-model loss that trains is token-weighted over the whole step: every counted
    token of every micro-batch on every rank weighs ``1 / step_tokens``. A term that must weigh
    tokens exactly as it does (distillation mixes with it) returns ``micro_batches *
    world_size * (its sum over this micro-batch's tokens) / step_tokens``; the world-size
    factor undoes FSDP's average of the gradients over ranks. Most plugins name neither
    ``step_tokens`` nor ``micro_batches``.
    """


@hookspec
def acadlm_after_optimizer_step(step: int, metrics: dict) -> dict | None:
    """The optimizer has stepped (``step`` counts completed steps, from 1).

    ``metrics`` holds what the recipe is about to log (loss, lr, tokens/s, ...). Return a dict
    of extra scalar metrics to log with them, or ``None``.
    """


@hookspec
def acadlm_evaluation_end(step: int, domain_losses: dict, metrics: dict) -> dict | None:
    """Validation finished: ``domain_losses`` maps each domain name to its mean token loss.

    Called with ``step=0`` before the first training step of a fresh run (not on resume), then
    every ``eval_every_n_steps`` and after the last step.

    Return a dict of extra scalar metrics to log, or ``None``. Dynamic batch loading updates
    the domain weights here.
    """


@hookspec
def acadlm_state_dict() -> dict | None:
    """Return ``{plugin_name: state}`` to store in the run's checkpoint, or ``None``.

    ``state`` must be picklable by ``torch.save``. It comes back through
    ``acadlm_load_state_dict`` when the run resumes, so a resumed run continues exactly.
    Also called once at the end of setup (right after ``acadlm_optimizer_param_groups``), so
    that two plugins returning the same key are refused before the first step.
    """


@hookspec
def acadlm_load_state_dict(states: dict) -> None:
    """Restore what ``acadlm_state_dict`` returned; ``states`` is the merged dict of all plugins.

    Each plugin reads its own key and ignores the rest.
    """


@hookspec
def acadlm_checkpoint_saved(path: str, step: int) -> None:
    """A checkpoint directory has been written completely (atomically) at ``path``."""


@hookspec
def acadlm_model_exported(model_dir: str, recipe: str) -> dict | None:
    """A recipe has written the model folder it hands to the user (rank 0 only).

    ``model_dir`` is a Hugging Face model folder: the last checkpoint's ``model/`` of continued
    pre-training and long-context stages, the materialized ``pruned_model`` of pruning. Return
    a dict to merge into the run's summary (the torchao plugin returns where it wrote a
    quantized copy), or ``None``.
    """


@hookspec
def acadlm_run_end(summary: dict) -> None:
    """Training finished; ``summary`` is what the recipe prints last. Plugins may add to it."""
