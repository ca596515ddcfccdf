"""Sheared-LLaMA targeted structured pruning as a plugin of the training loop.

Config block::

    pruning:
      method: learned                    # learned: Sheared-LLaMA masks; importance: Minitron
                                         # one-shot (no mask training, see prune_recipe)
      target: {num_layers: 20, num_heads: 6, num_kv_heads: 2, embed_dim: 384,
               intermediate_dim: 1024}   # any subset; unnamed dims stay as in the source
      lagrangian_warmup_steps: 20        # target ramps linearly from the first expected shape
      mask_lr: 0.3                       # AdamW on the gates' log_alpha
      lambda_lr: 0.05                    # AdamW, maximizing, on the Lagrange multipliers
      droprate_init: 0.01                # gates start open: log_alpha ~ ln(0.99/0.01) = 4.6
      mask_init: uniform                 # or `importance`: log_alpha ordered by Minitron scores
      mask_init_spread: 2.0              # importance init: log_alpha of the least important unit
                                         # is this much below the most important dropped one's
      mask_init_gap: 0.0                 # importance init: the dropped units start this much
                                         # below the kept ones (0: all open; ~7: mostly closed)
      calibration: {num_sequences: 64, batch_size: 8}   # sequences the importance is measured on
                                         # (every_token: true also counts each segment's first
                                         # token, as Minitron counts every token)
      mask_betas: [0.9, 0.999]           # Adam betas of the gates' and multipliers' optimizers
      mask_lr_schedule: constant         # or `model`: mask_lr and lambda_lr follow the model's
                                         # learning-rate schedule (warm-up, decay), as they do
                                         # in LLM-Shearing, where they share its optimizer
      eval_shape: target                 # evaluations during pruning keep the target's units;
                                         # `current`: the units the gates expect to keep now
                                         # (LLM-Shearing's eval_target_model: false)

The mask hooks are installed switched off and come on with the first training batch, so the
recipe's step-0 evaluation measures the source model itself: dynamic batch loading's
``reference_losses: initial`` are then the source's losses, as in Sheared-LLaMA.

The gates and the multipliers keep their own full-precision optimizers (they are tiny, and the
multipliers' sign matters); the recipe's optimizer sees only the model. On several ranks the
gates' gradients are averaged and every rank draws the same gate noise, so gates and
multipliers stay identical everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.hookspecs import hookimpl
from acadlm_plugins.pruning.architecture import (
    PRUNABLE_DIMS,
    Architecture,
    architecture_of,
    resolve_target,
)
from acadlm_plugins.pruning.lagrangian import LagrangeMultipliers
from acadlm_plugins.pruning.masks import EVAL_SHAPES, MaskHooks, PruningMasks, choice_changes
from acadlm_plugins.training.config_checks import config_value, reject_unknown_keys

log = logging.getLogger(__name__)

CONFIG_KEY = "pruning"
STATE_KEY = "pruning"
KNOWN_KEYS = {"method", "target", "lagrangian_warmup_steps", "mask_lr", "lambda_lr",
              "droprate_init", "mask_init", "mask_init_spread", "mask_init_gap", "calibration",
              "mask_betas", "mask_lr_schedule", "eval_shape"}
METHODS = ("learned", "importance")
# Read only while masks train (method `learned`); one-shot importance pruning ignores them.
MASK_TRAINING_KEYS = ("lagrangian_warmup_steps", "mask_lr", "lambda_lr", "droprate_init",
                      "mask_init", "mask_init_spread", "mask_init_gap", "mask_betas",
                      "mask_lr_schedule", "eval_shape")
MASK_INITS = ("uniform", "importance")
MASK_LR_SCHEDULES = ("constant", "model")
CALIBRATION_KEYS = {"num_sequences", "batch_size", "every_token"}
# The block's keys that hold a mapping, with an example for the error that refuses another value.
MAPPING_KEYS = {"target": "{num_layers: 20, embed_dim: 384}",
                "calibration": "{num_sequences: 64, batch_size: 8}"}
#: Where the hidden gate acts on the RMSNorms, recorded in the plugin's checkpoint state
#: (``hidden_gate``): ``every_norm``, each layer's ``sa_norm`` and ``mlp_norm`` as well as the
#: final norm multiply their output by it (:meth:`MaskHooks._masked_rms_norm`, since
#: 2026-12-06). Versions before that gated the final norm's output only and recorded nothing,
#: so the same saved gates computed another function: a state with hidden gates and another or
#: no record is refused (:func:`check_hidden_gate_placement`).
HIDDEN_GATE_FIELD = "hidden_gate"
HIDDEN_GATE_PLACEMENT = "every_norm"


def pruning_method(cfg: Any) -> str | None:
    """The ``pruning.method`` a config asks for (``learned`` when unset), or None without a
    ``pruning:`` mapping: read in one place for this plugin and for those that depend on it
    (distillation loads no teacher for a one-shot run, which trains nothing)."""
    block = cfg.get(CONFIG_KEY, None)
    return str(block.get("method", "learned")) if isinstance(block, Mapping) else None


class PruningPlugin:
    """Learns hard-concrete masks toward ``pruning.target`` while the model trains."""

    config_keys = (CONFIG_KEY,)

    def __init__(self) -> None:
        self.enabled = False
        self.masks: PruningMasks | None = None
        self.hooks: MaskHooks | None = None
        self.multipliers: LagrangeMultipliers | None = None
        self.history: list[dict[str, float]] = []
        self._report: dict[str, float] = {}
        # The units the importance-initialized masks keep at step 0: the one-shot choice.
        self.initial_choice: dict[str, torch.Tensor] | None = None
        # Set when a resumed run skips the importance calibration (the checkpoint has the masks).
        self._calibration_deferred = False

    @hookimpl
    def acadlm_configure(self, cfg: Any, recipe: str) -> None:
        block = cfg.get(CONFIG_KEY, None)
        if block is not None and not isinstance(block, Mapping):
            # (`pruning=5` would otherwise reach the key checks as a TypeError)
            raise ConfigError(CONFIG_KEY, f"must be a mapping, got {block!r}.",
                              "write `pruning: {target: {...}, ...}` (see configs/smollm2/), "
                              "or remove it.")
        if not block:
            if recipe == "prune":
                raise ConfigError(CONFIG_KEY, "is required by the prune recipe.",
                                  "add `pruning: {target: {...}}` (see configs/smollm2/).")
            return
        if recipe != "prune":
            # Another recipe would train the masks and hand over the unpruned model.
            raise ConfigError(CONFIG_KEY, f"only the prune recipe reads this block; the {recipe} "
                              "recipe would train the masks and never materialize or export "
                              "the pruned model.",
                              "run `tune run acadlm_plugins/prune_recipe --config ...` to "
                              "prune, or remove the `pruning:` block.")
        reject_unknown_keys(block, KNOWN_KEYS, recipe=recipe, prefix=f"{CONFIG_KEY}.")
        for key, example in MAPPING_KEYS.items():
            mapping_block(block, key, example)
        if not block.get("target"):
            raise ConfigError(f"{CONFIG_KEY}.target", "is missing.",
                              "name the target dims, e.g. {num_layers: 20, embed_dim: 384}.")
        self.method = choice(block, "method", METHODS)
        self.mask_init = choice(block, "mask_init", MASK_INITS)
        self.mask_init_spread = number(block, "mask_init_spread", float, 2.0, above=0)
        for key in ("mask_init_spread", "mask_init_gap"):
            if key in block and self.mask_init != "importance":
                raise ConfigError(f"{CONFIG_KEY}.{key}", f"shapes the importance "
                                  f"initialization, but mask_init is {self.mask_init!r}, which "
                                  "would ignore it.", f"set {CONFIG_KEY}.mask_init: importance, "
                                  f"or remove {CONFIG_KEY}.{key}.")
        self.mask_init_gap = number(block, "mask_init_gap", float, 0.0, minimum=0)
        calibration = dict(block.get("calibration", None) or {})  # a mapping or null (above)
        reject_unknown_keys(calibration, CALIBRATION_KEYS, recipe=recipe,
                            prefix=f"{CONFIG_KEY}.calibration.")
        self.calibration_sequences = number(calibration, "num_sequences", int, 64, minimum=1,
                                            prefix=f"{CONFIG_KEY}.calibration.")
        self.calibration_batch_size = number(calibration, "batch_size", int, 8, minimum=1,
                                             prefix=f"{CONFIG_KEY}.calibration.")
        self.calibration_every_token = config_value(
            calibration.get("every_token", False), f"{CONFIG_KEY}.calibration.every_token", bool)
        self.target_spec = checked_target(block.target)
        self.warmup = number(block, "lagrangian_warmup_steps", int, 0, minimum=0)
        self.mask_lr = number(block, "mask_lr", float, 0.3, above=0)
        self.lambda_lr = number(block, "lambda_lr", float, 0.05, above=0)
        self.droprate_init = number(block, "droprate_init", float, 0.01, above=0)
        if not self.droprate_init < 1:
            raise ConfigError(f"{CONFIG_KEY}.droprate_init", f"must be in (0, 1), got "
                              f"{self.droprate_init}.", "use e.g. 0.01 (gates start open).")
        self.mask_betas = checked_betas(block.get("mask_betas", [0.9, 0.999]))
        self.mask_lr_schedule = choice(block, "mask_lr_schedule", MASK_LR_SCHEDULES)
        self.eval_shape = choice(block, "eval_shape", EVAL_SHAPES)
        self.base_lr = None
        if self.mask_lr_schedule == "model":
            optimizer = cfg.get("optimizer", None)
            lr = optimizer.get("lr", None) if isinstance(optimizer, Mapping) else None
            if lr is None:
                raise ConfigError(f"{CONFIG_KEY}.mask_lr_schedule",
                                  "is `model`, which scales the mask and multiplier learning "
                                  "rates by the model's rate over its peak `optimizer.lr`, but "
                                  "the config gives no `optimizer.lr`.",
                                  "set optimizer.lr, or use mask_lr_schedule: constant.")
            self.base_lr = config_value(lr, "optimizer.lr", float, above=0)
        self.seed = config_value(cfg.get("seed", 0), "seed", int, allow_none=True) or 0
        self.enabled = True
        ignored = sorted(key for key in MASK_TRAINING_KEYS if key in block)
        if self.method == "importance" and ignored:
            # A warning, not an error: a pipeline may hand both methods one shared block.
            log.warning("pruning.method: importance trains no masks, so %s %s ignored",
                        ", ".join(f"{CONFIG_KEY}.{key}" for key in ignored),
                        "is" if len(ignored) == 1 else "are")
        if self.method == "learned":
            self._check_warmup_fits(cfg.get("max_steps", None))
        self.output_dir = Path(cfg.get("output_dir", "."))

    def _check_warmup_fits(self, max_steps: Any) -> None:
        """Warn when the target ramp is longer than the run: the masks would never be pulled to
        the target, and materialization would cut units their training never chose."""
        try:
            steps = config_value(max_steps, "max_steps", int, minimum=1, allow_none=True)
        except ConfigError:
            return  # the recipe refuses max_steps itself, naming it
        if steps is None or self.warmup <= steps:
            return
        # A warning, not a refusal: short test and smoke runs of a config (max_steps=2) are
        # legitimate, and would all need the warm-up overridden too.
        log.warning("%s.lagrangian_warmup_steps is %d, more than max_steps %d: the target ramps "
                    "to its final value over %d steps, so this run ends with the masks never "
                    "pulled to the target, and materialization cuts units their training did "
                    "not choose. Fix: set %s.lagrangian_warmup_steps to at most max_steps "
                    "(Sheared-LLaMA ramps over the first ~20%% of the pruning steps: %d here).",
                    CONFIG_KEY, self.warmup, steps, self.warmup, CONFIG_KEY, max(1, steps // 5))

    @hookimpl
    def acadlm_model_built(self, model: Any, cfg: Any, device: Any) -> None:
        if not self.enabled:
            return
        self.source = architecture_of(model)
        self.target = resolve_target(self.source, self.target_spec, field=f"{CONFIG_KEY}.target")
        if self.target == self.source:
            raise ConfigError(f"{CONFIG_KEY}.target", "equals the source architecture: there is "
                              "nothing to prune.", "make at least one dimension smaller.")
        self.model, self.device = model, device
        log.info("pruning %s", self.source.describe())
        log.info("     to %s", self.target.describe())
        if self.method == "importance":
            return  # one-shot: the recipe ranks and slices; no masks are trained
        self.masks = PruningMasks(self.source, self.target, droprate_init=self.droprate_init,
                                  seed=self.seed, eval_shape=self.eval_shape).to(device)
        self.hooks = MaskHooks(model, self.masks, active=False)
        self.multipliers = LagrangeMultipliers(self.masks.mask_types).to(device)
        self.mask_optimizer = torch.optim.AdamW(self.masks.parameters(), lr=self.mask_lr,
                                                betas=self.mask_betas, weight_decay=0.0)
        self.lambda_optimizer = torch.optim.AdamW(self.multipliers.parameters(),
                                                  lr=self.lambda_lr, betas=self.mask_betas,
                                                  weight_decay=0.0, maximize=True)

    @property
    def trains_masks(self) -> bool:
        return self.enabled and self.method == "learned"

    @hookimpl
    def acadlm_data_ready(self, dataset: Any, sampler: Any, cfg: Any) -> None:
        if not self.enabled:
            return
        self.calibration_corpus = dataset.corpus
        if self.trains_masks and self.mask_init == "importance":
            if resumes_from_checkpoint(cfg):
                # The recipe restores the masks and the step-0 choice from the checkpoint
                # (acadlm_load_state_dict), which would overwrite a calibration run here.
                self._calibration_deferred = True
                log.info("resuming from a checkpoint: the masks come from it, so the importance "
                         "calibration is skipped")
                return
            self._initialize_from_importance(dataset.corpus)

    def _initialize_from_importance(self, corpus: Any) -> None:
        """Set every gate's log_alpha from Minitron importance scores on ``corpus``."""
        scores = self.importance(corpus)
        with torch.no_grad():
            for name, values in initial_log_alphas(
                    scores, self.masks, spread=self.mask_init_spread,
                    gap=self.mask_init_gap).items():
                self.masks.gates[name].log_alpha.copy_(values)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                # Every rank ranks the same calibration packs, but a near-tie broken
                # differently on one rank would give it other gates for the whole run.
                for gate in self.masks.gates.values():
                    dist.broadcast(gate.log_alpha.data, src=0)
        self.masks.invalidate()
        self.initial_choice = self.masks.kept_sets()
        log.info("mask log_alpha initialized from importance scores over %d sequences",
                 scores.num_sequences)
        self._report_units_below_floor()

    def _report_units_below_floor(self) -> None:
        """Say when the importance init starts dropped units below the log_alpha floor: the
        clamp after the first step raises them all to it, so mask_init_spread no longer orders
        them (the Lagrangian then reopens them in no particular order)."""
        from acadlm_plugins.pruning.hard_concrete import LOG_ALPHA_MIN

        below = sum(int((gate.log_alpha < LOG_ALPHA_MIN).sum())
                    for gate in self.masks.gates.values())
        if below:
            total = sum(gate.log_alpha.numel() for gate in self.masks.gates.values())
            log.info("%d of %d gates start below the log_alpha floor %.2f (mask_init_gap %g, "
                     "mask_init_spread %g); the clamp after the first step raises them to it, "
                     "so their importance order is lost: lower the gap to keep it",
                     below, total, LOG_ALPHA_MIN, self.mask_init_gap, self.mask_init_spread)

    def importance(self, corpus: Any, model: Any = None, device: Any = None) -> Any:
        """Minitron importance scores on the calibration packs, of ``model`` (default: the
        run's model as it is now), with a progress bar over the calibration batches."""
        from acadlm_plugins.pruning.calibration import calibration_batches
        from acadlm_plugins.pruning.importance import importance_scores
        from acadlm_plugins.training.runtime import progress_bar

        device = self.device if device is None else device
        batches = calibration_batches(corpus, self.calibration_sequences,
                                      self.calibration_batch_size, device)
        total = -(-self.calibration_sequences // self.calibration_batch_size)
        rank_zero = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        with progress_bar(total=total, initial=0, desc="importance (calibration)",
                          is_rank_zero=rank_zero) as bar:
            def counted():
                for batch in batches:
                    yield batch
                    bar.update(1)
            return importance_scores(self.model if model is None else model, counted(),
                                     every_token=self.calibration_every_token)

    @hookimpl
    def acadlm_batch_ready(self, batch: dict, step: int) -> None:
        if self.trains_masks:
            self.hooks.active = True
            self.masks.resample()

    @hookimpl
    def acadlm_extra_loss(self, step: int) -> dict | None:
        if not self.trains_masks:
            return None
        term, self._report = self.multipliers.loss(self.masks.expected_shape(), step, self.warmup)
        return {"lagrangian": term}

    @hookimpl
    def acadlm_after_optimizer_step(self, step: int, metrics: dict) -> dict | None:
        if not self.trains_masks:
            return None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for param in self.masks.parameters():
                if param.grad is not None:
                    dist.all_reduce(param.grad, op=dist.ReduceOp.AVG)
        if self.base_lr is not None:  # mask_lr_schedule: model, at the rate this step trained at
            factor = float(metrics["lr"]) / self.base_lr
            for optimizer, peak in ((self.mask_optimizer, self.mask_lr),
                                    (self.lambda_optimizer, self.lambda_lr)):
                for group in optimizer.param_groups:
                    group["lr"] = peak * factor
        self.mask_optimizer.step()
        self.lambda_optimizer.step()
        self.mask_optimizer.zero_grad(set_to_none=True)
        self.lambda_optimizer.zero_grad(set_to_none=True)
        self.masks.clamp_()
        self.masks.invalidate()
        with torch.no_grad():
            expected_params = float(self.masks.expected_non_embedding_params())
        report = {**self._report, "pruning/expected_non_embedding_params": expected_params}
        self.history.append({"step": step, **report})
        return report

    @hookimpl
    def acadlm_state_dict(self) -> dict | None:
        if not self.trains_masks:
            return None
        return {STATE_KEY: {
            "target": self.target.to_dict(), "masks": self.masks.state_dict(),
            HIDDEN_GATE_FIELD: HIDDEN_GATE_PLACEMENT,
            "sampler": self.masks._sampler.get_state(),
            "multipliers": self.multipliers.state_dict(),
            "mask_optimizer": self.mask_optimizer.state_dict(),
            "lambda_optimizer": self.lambda_optimizer.state_dict(), "history": self.history,
            "initial_choice": self.initial_choice}}

    @hookimpl
    def acadlm_load_state_dict(self, states: dict) -> None:
        if not self.trains_masks:
            return
        if STATE_KEY not in states:
            if self._calibration_deferred:
                # A checkpoint without mask state (none of ours): initialize as a fresh run would.
                log.warning("the checkpoint holds no pruning state: the masks are initialized "
                            "from importance scores of the resumed weights")
                self._initialize_from_importance(self.calibration_corpus)
            return
        state = states[STATE_KEY]
        saved = Architecture(**state["target"])
        if saved != self.target:
            raise ConfigError(f"{CONFIG_KEY}.target", f"differs from the checkpoint being resumed "
                              f"({saved.describe()}).", "restore the target, or start a new "
                              "`output_dir`.")
        check_hidden_gate_placement(state, self.output_dir)
        self.masks.load_state_dict(state["masks"])
        self.masks._sampler.set_state(state["sampler"])
        self.multipliers.load_state_dict(state["multipliers"])
        self.mask_optimizer.load_state_dict(state["mask_optimizer"])
        self.lambda_optimizer.load_state_dict(state["lambda_optimizer"])
        self.history = list(state["history"])
        self.initial_choice = state.get("initial_choice")
        self.masks.invalidate()
        self.hooks.active = bool(self.history)  # past the first step: the masks are on

    def changes_from_importance_init(self) -> dict[str, dict[str, int]] | None:
        """Per mask type, the units the final gates keep and how many of them the importance
        initialization did not keep; ``None`` unless the masks started from importance."""
        if not self.trains_masks or self.initial_choice is None:
            return None
        return choice_changes(self.initial_choice, self.masks.kept_sets())

    @hookimpl
    def acadlm_run_end(self, summary: dict) -> None:
        if not self.trains_masks or not self.history:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return  # one rank writes the plot
        from acadlm_plugins.training.plots import plot_pruning_history

        path = plot_pruning_history(self.history, self.masks.mask_types,
                                    self.output_dir / "pruning.png")
        summary["pruning_plot"] = str(path)


def check_hidden_gate_placement(state: Mapping[str, Any], output_dir: Path) -> None:
    """Refuse a saved pruning state whose hidden gates were trained with another placement.

    The hidden gate's placement decides what the saved gates compute: a version before
    2026-12-06 multiplied only the final norm's output by it, this one every RMSNorm's (and
    materialization folds it into ``sa_norm``/``mlp_norm``), so resuming such a state, or
    rerunning its finished run (which materializes again), would go on with, and export, a
    model other than the one its masks were trained in, without a word. A state with hidden
    gates (``pruning.target.embed_dim`` pruned) must therefore record this version's placement
    (:data:`HIDDEN_GATE_FIELD`); one without hidden gates computes the same function under
    either placement and loads whatever it records."""
    masks = state.get("masks") or {}
    if not any(str(key).startswith("gates.hidden.") for key in masks):
        return
    recorded = state.get(HIDDEN_GATE_FIELD)
    if recorded == HIDDEN_GATE_PLACEMENT:
        return
    if recorded is None:
        cause = (f"records no `{HIDDEN_GATE_FIELD}`: it was made by a version before "
                 "2026-12-06, whose hidden gate scaled only the final norm's output, not each "
                 "layer's sa_norm and mlp_norm as it does now (LLM-Shearing's placement)")
    else:
        cause = (f"records hidden-gate placement {recorded!r}, and this version's is "
                 f"{HIDDEN_GATE_PLACEMENT!r}")
    raise ConfigError(
        "output_dir", f"the pruning checkpoint in {output_dir} has hidden-dimension masks "
        f"(pruning.target.embed_dim) and {cause}. This version computes another function of "
        "the same gates, so it would continue, materialize and export a model other than the "
        "one the masks were trained in.",
        "prune again into a new `output_dir`, or finish this run (and materialize it) with "
        "the version that started it.")


def resumes_from_checkpoint(cfg: Any) -> bool:
    """Whether the recipe resumes this run from a checkpoint: the same decision, from the same
    ``output_dir`` and ``resume`` mode, that the recipe made in its setup before data_ready."""
    from acadlm_plugins.training.checkpointing import find_resume_checkpoint

    output_dir = cfg.get("output_dir", None)
    if output_dir is None:
        return False
    return find_resume_checkpoint(Path(output_dir), cfg.get("resume", "auto")) is not None


def number(block: Any, key: str, kind: type, default: Any, *, prefix: str = f"{CONFIG_KEY}.",
           minimum: float | None = None, above: float | None = None) -> Any:
    """``block[key]`` (or ``default``) as ``kind``, refused with a :class:`ConfigError` naming
    ``<prefix><key>`` when it is not one (``abc``; an int key given 2.7) or out of range."""
    return config_value(block.get(key, default), f"{prefix}{key}", kind, minimum=minimum,
                        above=above)


def choice(block: Any, key: str, allowed: tuple[str, ...]) -> str:
    """``block[key]`` (default: the first of ``allowed``), refused naming ``pruning.<key>``
    when it is not one of ``allowed``."""
    value = str(block.get(key, allowed[0]))
    if value not in allowed:
        raise ConfigError(f"{CONFIG_KEY}.{key}", f"unknown value {value!r}.",
                          f"use one of {list(allowed)}.")
    return value


def mapping_block(block: Any, key: str, example: str) -> None:
    """Refuse ``pruning.<key>`` set to anything but a mapping or null (``pruning.calibration=5``,
    a list, a string), naming it, before its keys are read: ``dict(5)`` or iterating an int
    would stop the run with a bare ``TypeError``."""
    value = block.get(key, None)
    if value is not None and not isinstance(value, Mapping):
        raise ConfigError(f"{CONFIG_KEY}.{key}", f"must be a mapping, got {value!r}.",
                          f"write `{CONFIG_KEY}.{key}: {example}`.")


def checked_betas(betas: Any) -> tuple[float, float]:
    """``pruning.mask_betas`` as Adam's two betas, each in [0, 1)."""
    if isinstance(betas, str) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise ConfigError(f"{CONFIG_KEY}.mask_betas", f"must be two numbers, got {betas!r}.",
                          "use e.g. [0.9, 0.95] (LLM-Shearing's) or [0.9, 0.999].")
    values = tuple(config_value(beta, f"{CONFIG_KEY}.mask_betas[{i}]", float, minimum=0)
                   for i, beta in enumerate(betas))
    if not all(beta < 1 for beta in values):
        raise ConfigError(f"{CONFIG_KEY}.mask_betas", f"must each be below 1, got {list(values)}.",
                          "use e.g. [0.9, 0.95].")
    return values


def checked_target(target: Any) -> dict[str, Any]:
    """``pruning.target`` with its dimensions as integers of at least 1, checked before the
    model loads (``resolve_target`` then checks them against the source)."""
    if not hasattr(target, "items"):
        raise ConfigError(f"{CONFIG_KEY}.target", f"must be a mapping of dimensions, got "
                          f"{target!r}.", "name the target dims, e.g. {num_layers: 20, "
                          "embed_dim: 384}.")
    return {key: (config_value(value, f"{CONFIG_KEY}.target.{key}", int, minimum=1)
                  if key in PRUNABLE_DIMS else value) for key, value in target.items()}


def initial_log_alphas(scores: Any, masks: PruningMasks, *, spread: float,
                       gap: float = 0.0) -> dict[str, torch.Tensor]:
    """log_alpha per gate from importance scores: within every row the target's number of most
    important units start where uniform gates start, the rest below them in importance order
    (from ``gap`` lower, down ``spread`` further), so the masks begin at the one-shot choice
    and the Lagrangian closes the least important units first."""
    from acadlm_plugins.pruning.hard_concrete import initial_log_alpha
    from acadlm_plugins.pruning.importance import log_alpha_from_scores

    src = masks.source
    keep = masks.target_row_counts()
    high = initial_log_alpha(masks.droprate_init)
    out: dict[str, torch.Tensor] = {}
    for name, gate in masks.gates.items():
        values = getattr(scores, name).float()
        if name == "head":
            values = values.reshape(-1, src.heads_per_kv)
        alpha = log_alpha_from_scores(values, keep[name], high=high, low=high - spread,
                                      gap=gap)
        out[name] = alpha.reshape(gate.log_alpha.shape).to(gate.log_alpha.device)
    return out
