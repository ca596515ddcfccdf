"""Dynamic batch loading as a plugin: every run's data mix follows its per-domain losses.

Config block (all optional but ``enabled``)::

    dynamic_batch_loading:
      enabled: True
      update_interval: 50          # steps between weight updates (Sheared-LLaMA: 50)
      eta: 1.0                     # step size of the exponentiated update
      smoothing: 1e-4              # c: mixes in the uniform distribution
      reference_losses: initial    # or {domain: loss}; `initial` = the starting model's losses
      reference_scale: 1.0         # with `initial`: target = scale * initial loss
      update_at_start: false       # with given reference losses: also update from the step-0
                                   # evaluation, before the first step (Sheared-LLaMA's
                                   # continued pre-training, eval_first=true)
      excess: clamped              # max(loss - reference, 0), the paper's Algorithm 1; or
                                   # `signed`: loss - reference, LLM-Shearing's released code

With ``reference_losses: initial`` the reference is the model's own validation loss before the
first step, i.e. the source model: domains that it forgets during training are fed more. A
``reference_scale`` below 1 turns that into a goal ("every domain 10% lower"): the domains
furthest from their goal get more data, which is Sheared-LLaMA's use of reference losses.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist
from omegaconf import DictConfig

from acadlm_plugins.data.dynamic_batch_loading import (
    EXCESS_MODES,
    excess_losses,
    ordered,
    update_domain_weights,
)
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.hookspecs import hookimpl
from acadlm_plugins.training.config_checks import config_value, reject_unknown_keys
from acadlm_plugins.training.run_checks import positive_int

log = logging.getLogger(__name__)

CONFIG_KEY = "dynamic_batch_loading"
STATE_KEY = "dynamic_batch_loading"
# What an unset key of the block means, for the recipe's resume check (its keys are among those
# a resumed run must keep): an unset key and its default spelled out are the same run.
RESUME_DEFAULTS = {f"{CONFIG_KEY}.reference_losses": "initial",
                   f"{CONFIG_KEY}.reference_scale": 1.0}
PLOT_NAME = "domain_weights.png"
KNOWN_KEYS = {"enabled", "update_interval", "eta", "smoothing", "reference_losses",
              "reference_scale", "update_at_start", "excess"}


class DynamicBatchLoadingPlugin:
    """Updates a :class:`~acadlm_plugins.data.mixture.DomainBatchSampler`'s weights at evaluations."""

    config_keys = (CONFIG_KEY,)

    def __init__(self) -> None:
        self.enabled = False
        self.update_interval = 50
        self.eta = 1.0
        self.smoothing = 1e-4
        self.reference: dict[str, float] | None = None
        self.reference_mode = "initial"
        self.reference_scale = 1.0
        self.update_at_start = False
        self.excess = "clamped"
        self.sampler = None
        self.output_dir: Path | None = None
        self.history: list[dict[str, Any]] = []

    @hookimpl
    def acadlm_configure(self, cfg: Any, recipe: str) -> None:
        block = cfg.get(CONFIG_KEY, None)
        if block is None:
            return
        if not isinstance(block, Mapping | DictConfig):
            raise ConfigError(CONFIG_KEY, f"must be a mapping, got {block!r}.",
                              f"write `{CONFIG_KEY}: {{enabled: True, ...}}`, or remove it.")
        # Checked whether or not it is enabled: `enable: True` must not switch it off unseen.
        reject_unknown_keys(block, KNOWN_KEYS, recipe=recipe, prefix=f"{CONFIG_KEY}.")
        if not config_value(block.get("enabled", False), f"{CONFIG_KEY}.enabled", bool,
                            allow_none=True):
            return
        self.enabled = True
        self.update_interval = config_value(block.get("update_interval", 50),
                                            f"{CONFIG_KEY}.update_interval", int, minimum=1)
        self.eta = config_value(block.get("eta", 1.0), f"{CONFIG_KEY}.eta", float, minimum=0)
        self.smoothing = config_value(block.get("smoothing", 1e-4), f"{CONFIG_KEY}.smoothing",
                                      float)
        self.reference_scale = config_value(block.get("reference_scale", 1.0),
                                            f"{CONFIG_KEY}.reference_scale", float, above=0)
        if not 0 <= self.smoothing < 1:
            raise ConfigError(f"{CONFIG_KEY}.smoothing", "must be in [0, 1).")
        self.excess = _excess_mode(block.get("excess", "clamped"))
        reference = block.get("reference_losses", "initial")
        if isinstance(reference, str):
            if reference != "initial":
                raise ConfigError(f"{CONFIG_KEY}.reference_losses",
                                  f"unknown value {reference!r}.",
                                  "use `initial` or a mapping {domain: loss}.")
        else:
            if "reference_scale" in block:
                raise ConfigError(f"{CONFIG_KEY}.reference_scale",
                                  "only applies to `reference_losses: initial`.",
                                  "scale the given reference losses yourself, or drop the key.")
            self.reference_mode = "given"
            if not isinstance(reference, Mapping | DictConfig):
                raise ConfigError(f"{CONFIG_KEY}.reference_losses", f"is {reference!r}.",
                                  "use `initial` or a mapping {domain: loss}.")
            self.reference = {
                str(k): config_value(v, f"{CONFIG_KEY}.reference_losses.{k}", float, minimum=0)
                for k, v in reference.items()}
            for name, loss in self.reference.items():
                if not math.isfinite(loss):
                    raise ConfigError(f"{CONFIG_KEY}.reference_losses.{name}", f"is {loss}.",
                                      "give a finite loss in nats per token.")
        self.update_at_start = config_value(block.get("update_at_start", False),
                                            f"{CONFIG_KEY}.update_at_start", bool)
        if self.update_at_start and self.reference_mode == "initial":
            raise ConfigError(f"{CONFIG_KEY}.update_at_start",
                              "needs given `reference_losses`: with `initial`, the step-0 "
                              "losses are the references, so an update from them would only "
                              "mix in the smoothing.",
                              "give reference_losses as {domain: loss}, or drop update_at_start.")
        eval_every = cfg.get("eval_every_n_steps", None)
        if eval_every is None:
            cfg.eval_every_n_steps = self.update_interval
        elif self.update_interval % positive_int(cfg, "eval_every_n_steps"):
            raise ConfigError(f"{CONFIG_KEY}.update_interval",
                              f"{self.update_interval} is not a multiple of eval_every_n_steps "
                              f"({eval_every}); weights are updated from evaluation losses.",
                              "make update_interval a multiple of eval_every_n_steps.")
        self.output_dir = Path(cfg.get("output_dir", "."))

    @hookimpl
    def acadlm_data_ready(self, dataset: Any, sampler: Any, cfg: Any) -> None:
        if not self.enabled:
            return
        if not hasattr(sampler, "set_weights"):
            raise ConfigError(CONFIG_KEY, f"the recipe's sampler {type(sampler).__name__} cannot "
                              "change its weights.", "use a domain mixture dataset.")
        self.sampler = sampler
        if self.reference is not None:
            missing = [n for n in sampler.domain_names if n not in self.reference]
            if missing:
                raise ConfigError(f"{CONFIG_KEY}.reference_losses",
                                  f"no reference loss for domains {missing}.",
                                  f"give one for each of {sampler.domain_names}, or `initial`.")
            unknown = [n for n in self.reference if n not in sampler.domain_names]
            if unknown:
                # Not an error: a held-out validation domain's loss may be handed over with the
                # others (a misspelt name is refused above, as its domain then has none).
                log.warning("%s.reference_losses names %s, which the training data has no "
                            "domain for (its domains: %s); they are not used", CONFIG_KEY,
                            unknown, sampler.domain_names)
                self.reference = {n: v for n, v in self.reference.items() if n not in unknown}

    @hookimpl
    def acadlm_evaluation_end(self, step: int, domain_losses: Mapping[str, float],
                              metrics: dict) -> dict | None:
        if not self.enabled or self.sampler is None:
            return None
        names = self.sampler.domain_names
        if self.reference is None:
            self.reference = {n: self.reference_scale * float(domain_losses[n]) for n in names}
            log.info("dynamic batch loading: reference losses from the initial model: %s",
                     _fmt(self.reference))
        weights_before = self.sampler.weights.tolist()
        losses = ordered(domain_losses, names, field="domain_losses")
        reference = ordered(self.reference, names, field=f"{CONFIG_KEY}.reference_losses")
        updated = (step > 0 or self.update_at_start) and step % self.update_interval == 0
        if updated:
            self.sampler.set_weights(update_domain_weights(
                weights_before, losses, reference, eta=self.eta, smoothing=self.smoothing,
                excess=self.excess))
        weights = self.sampler.weights.tolist()
        excess = excess_losses(losses, reference, self.excess).tolist()
        self.history.append({"step": step, "weights": weights, "losses": losses,
                             "reference": reference, "updated": updated})
        out: dict[str, float] = {}
        for name, w, e in zip(names, weights, excess):
            out[f"domain_weight/{name}"] = w
            out[f"domain_excess_loss/{name}"] = e
        return out

    @hookimpl
    def acadlm_state_dict(self) -> dict | None:
        if not self.enabled:
            return None
        return {STATE_KEY: {"reference": self.reference, "history": self.history,
                            "excess": self.excess}}

    @hookimpl
    def acadlm_load_state_dict(self, states: dict) -> None:
        if not self.enabled or STATE_KEY not in states:
            return
        # a changed `reference_losses` / `reference_scale` is refused before this, by the
        # recipe's resume check (both are among the keys a resumed run must keep); `excess` is
        # checked here, as the value in force, not as written
        state = states[STATE_KEY]
        check_resumed_excess(state, self.excess)
        self.reference = state["reference"]
        self.history = list(state["history"])

    @hookimpl
    def acadlm_run_end(self, summary: dict) -> None:
        if not self.enabled or not self.history or self.sampler is None:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return  # one rank writes the plot
        from acadlm_plugins.training.plots import plot_domain_history

        path = (self.output_dir or Path(".")) / PLOT_NAME
        plot_domain_history(self.history, self.sampler.domain_names, path)
        summary["domain_weights"] = dict(zip(self.sampler.domain_names,
                                             self.sampler.weights.tolist()))
        summary["domain_weights_plot"] = str(path)


def check_resumed_excess(state: Mapping[str, Any], excess: str) -> None:
    """Refuse to resume a checkpoint's plugin ``state`` under another excess-loss form.

    The form steers every domain-weight update, so a resumed run must keep it; what is compared
    is the form in force, not the config text: an unset ``excess`` and an explicit ``clamped``
    are the same run, and a state saved before the option existed (no ``excess`` in it) was
    clamped, the only form then. A difference is a :class:`ConfigError` naming
    ``dynamic_batch_loading.excess``, raised while the recipe restores the checkpoint, before
    any step or write."""
    saved = state.get("excess")
    if saved is None:
        saved, why = "clamped", (" (it records no excess form: a version without the option "
                                 "wrote it, and clamped, its only form)")
    else:
        why = ""
    if saved != excess:
        raise ConfigError(f"{CONFIG_KEY}.excess", f"differs from the checkpoint being resumed: "
                          f"was {saved!r}{why}, is {excess!r}; the domain weights would be "
                          "updated by one form before the resume and another after it.",
                          f"restore `{CONFIG_KEY}.excess: {saved}`, or start a new "
                          "`output_dir`.")


def _excess_mode(value: Any) -> str:
    """``dynamic_batch_loading.excess``, checked: one of :data:`EXCESS_MODES`."""
    if value is None:
        return "clamped"
    if not isinstance(value, str) or value not in EXCESS_MODES:
        raise ConfigError(f"{CONFIG_KEY}.excess", f"unknown value {value!r}.",
                          f"use one of {', '.join(EXCESS_MODES)} (`clamped`: max(loss - "
                          "reference, 0), the paper's; `signed`: loss - reference, the "
                          "released code's).")
    return value


def _fmt(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in values.items())
