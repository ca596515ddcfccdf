"""Continued pre-training of a torchtune model on a domain mixture with dynamic batch loading.

Run::

    tune run acadlm_plugins/continued_pretrain_recipe --config configs/smollm2/continued_pretrain_demo.yaml
    tune run --nproc_per_node 2 acadlm_plugins/continued_pretrain_recipe --config ...

The loop knows hooks, not features: dynamic batch loading, the non-finite loss guard and any
third-party plugin act through :mod:`acadlm_plugins.hookspecs`. A run resumes from the newest
complete checkpoint in ``output_dir`` (model, optimizer, scheduler, data position, domain
weights, RNG and plugin state), so an interrupted run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torchtune import config, training, utils

import acadlm_plugins.defaults  # noqa: F401  (registers the ${acadlm_home:} resolver)
from acadlm_plugins._compat import hf_checkpoint_files, save_hf_model_dir
from acadlm_plugins.data.mixture import (
    DomainBatchSampler,
    DomainMixtureDataset,
    collate_domain_packs,
)
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.models.families import shape_differences, unreadable_weights_refused
from acadlm_plugins.plugin_manager import (
    add_plugin_results,
    build_plugin_manager,
    check_plugin_state_keys,
    collect_metrics,
    list_plugins,
    plugin_states,
    restore_plugin_states,
)
from acadlm_plugins.plugins.dynamic_batch_loading import RESUME_DEFAULTS as DBL_RESUME_DEFAULTS
from acadlm_plugins.training import runtime
from acadlm_plugins.training.checkpointing import (
    MODEL_DIRNAME,
    PRECISION_DEFAULTS,
    STARTING_WEIGHTS_KEY,
    check_resume_step,
    check_starting_weights,
    config_values,
    find_resume_checkpoint,
    latest_checkpoint,
    load_resume_state,
    recipe_state,
    starting_weights_fingerprint,
    write_recipe_checkpoint,
)
from acadlm_plugins.training.components import (
    check_component_blocks,
    instantiate_component,
    instantiate_optional,
)
from acadlm_plugins.training.config_checks import (
    check_config_keys,
    checked_seed,
    config_value,
    reject_unknown_keys,
    route_package_logs,
)
from acadlm_plugins.training.optimizers import build_optimizer
from acadlm_plugins.training.run_checks import (
    check_checkpoint_source,
    check_log_dir,
    check_model_family,
    check_model_returns_logits,
    check_model_rope,
    check_output_dir,
    clean_interrupted_writes,
    clip_grad_norm,
    output_dir_setting,
    positive_int,
    step_interval,
)
from acadlm_plugins.training.validation import evaluate_domain_losses, shifted_token_losses

log = utils.get_logger("INFO")

RECIPE_NAME = "continued_pretrain"
KNOWN_KEYS = {
    "output_dir", "seed", "device", "dtype", "model", "tokenizer", "checkpointer", "dataset",
    "validation_dataset", "optimizer", "lr_scheduler", "batch_size", "max_steps",
    "gradient_accumulation_steps", "clip_grad_norm", "log_every_n_steps", "eval_every_n_steps",
    "save_every_n_steps", "keep_last_n_checkpoints", "validation", "metric_logger", "plugins",
    "resume", "enable_activation_checkpointing", "model_dir", "mixed_precision",
}
VALIDATION_KEYS = {"batch_size", "max_packs_per_domain"}  # the `validation:` block
REQUIRED_KEYS = ("output_dir", "model", "tokenizer", "checkpointer", "dataset",
                 "validation_dataset", "optimizer", "batch_size", "max_steps", "metric_logger")
# Blocks read by built-in plugins; third-party plugins declare theirs with `config_keys`.
# The run's identity, stored in every checkpoint with the recipe's name and compared on resume:
# resuming on another model, data or seed would silently mix two runs.
# The run's identity: a resumed run that changed one of these would silently mix two runs.
# Dynamic batch loading's reference losses steer every domain-weight update (its excess-loss
# form does too: the plugin checks it on resume as the form in force, an unset value being
# `clamped`, which a comparison of config text here could not).
RESUME_MUST_MATCH = ("model", "dataset", "tokenizer", "seed", "checkpointer.checkpoint_dir",
                     "checkpointer.checkpoint_files", "checkpointer.model_type",
                     "dynamic_batch_loading.reference_losses",
                     "dynamic_batch_loading.reference_scale", "mixed_precision")
# What an unset one of those keys means; an unset key and its default written out resume alike.
RESUME_DEFAULTS: dict[str, Any] = {**DBL_RESUME_DEFAULTS, **PRECISION_DEFAULTS}


class ContinuedPretrainRecipe:
    """Setup, train, checkpoint: one object per run (see the module docstring).

    Recipes built on this one (long-context training) change it through the class attributes
    below and the methods marked "for recipes built on this"."""

    known_keys: frozenset[str] = frozenset(KNOWN_KEYS)
    required_keys: tuple[str, ...] = REQUIRED_KEYS
    resume_must_match: tuple[str, ...] = RESUME_MUST_MATCH
    resume_defaults: Mapping[str, Any] = RESUME_DEFAULTS
    example_config = "configs/smollm2/continued_pretrain_demo.yaml"

    def __init__(self, cfg: DictConfig, recipe_name: str = RECIPE_NAME) -> None:
        self._recipe_name = recipe_name
        (self._distributed, self._device, self._dtype, self._world_size,
         self._rank) = runtime.init_process(cfg)
        # mixed_precision: fp32 weights and optimizer state, the math in `dtype` (bf16)
        self._dtype, self._compute_dtype = runtime.run_precision(cfg, self._dtype)
        self._is_rank_zero = self._rank == 0
        # Which slice of the data this rank reads: its rank among the data-parallel replicas
        # (recipes that split each sequence over several ranks change these).
        self._data_rank, self._data_world = self._rank, self._world_size
        self._output_dir = output_dir_setting(cfg)
        self._seed = training.set_seed(checked_seed(cfg.get("seed", 0), self._world_size))
        self._max_steps = positive_int(cfg, "max_steps")
        self._batch_size = positive_int(cfg, "batch_size")
        self._grad_accum = positive_int(cfg, "gradient_accumulation_steps", 1)
        self._activation_checkpointing = bool(config_value(
            cfg.get("enable_activation_checkpointing", False), "enable_activation_checkpointing",
            bool, allow_none=True))
        self._clip_grad_norm = clip_grad_norm(cfg)
        self._log_every = step_interval(cfg, "log_every_n_steps", self._max_steps)
        self._save_every = step_interval(cfg, "save_every_n_steps", self._max_steps)
        self._keep_last = step_interval(cfg, "keep_last_n_checkpoints", self._max_steps)
        self._step = 0
        self._history: dict[str, Any] = {"evaluations": []}
        self._wall_clock = lambda: float(self._history.get("wall_seconds", 0.0))
        self._validation_losses = None  # set by recipes built on this one
        # Whether the last checkpoint's model is what this run hands over (pruning hands over
        # the materialized model instead, and announces that itself).
        self.exports_final_model = True
        # Called with the config and its `resume` value once every check has passed and before
        # the resume checkpoint is looked up or anything is written; returns the `resume` value
        # to use. A recipe whose finished output is not a checkpoint (a one-shot prune) checks
        # that output here, so a refused rerun leaves the folder as it was.
        self.before_resume: Callable[[DictConfig, object], object] | None = None
        self._exported: dict[str, Any] = {}
        self._metric_logger = None  # set in setup; cleanup works even if setup stopped early

    # ----------------------------------------------------------------------------- setup
    def setup(self, cfg: DictConfig) -> None:
        # Logs are routed first: ACADLM_PLUGINS_TRACE's INFO lines for acadlm_configure (and any
        # plugin's own) would be dropped otherwise. The manager normalises `plugins:` (a bare
        # string is one entry).
        route_package_logs()
        self._pm = build_plugin_manager(cfg.get("plugins", None) or [])
        self._pm.hook.acadlm_configure(cfg=cfg, recipe=self._recipe_name)
        self._check_keys(cfg)
        self._eval_every = step_interval(cfg, "eval_every_n_steps", self._max_steps)
        self._val_batch_size, self._val_max_packs = validation_settings(
            cfg, default_batch_size=self._batch_size, recipe=self._recipe_name)
        self._cfg = cfg
        check_output_dir(self._output_dir)
        check_log_dir(cfg)
        check_checkpoint_source(cfg)
        check_model_family(cfg)
        if self._is_rank_zero:
            log.info("plugins: %s", ", ".join(list_plugins(self._pm)))
        # Nothing is written to output_dir until every check below has passed (the metric
        # logger comes last), so a refused run leaves an earlier run's folder as it was.
        check_component_blocks(cfg, self.resume_must_match)
        resume = cfg.get("resume", "auto")
        if self.before_resume is not None:
            resume = self.before_resume(cfg, resume)
        resume_from = find_resume_checkpoint(self._output_dir, resume)
        # The weights a fresh run starts from, recorded at step 0 in every checkpoint: a resumed
        # run whose checkpoint_dir now holds other weights (re-exported at the same path) would
        # continue a run trained from the old ones.
        self._starting_weights = starting_weights_fingerprint(cfg)
        if resume_from is not None:
            log.info("resuming from %s", resume_from)
            self._resume_state = load_resume_state(resume_from, cfg, self.resume_must_match,
                                                   recipe=self._recipe_name,
                                                   defaults=self.resume_defaults)
            check_resume_step(int(self._resume_state["step"]), self._max_steps, resume_from)
            recorded = self._resume_state.get(STARTING_WEIGHTS_KEY)
            check_starting_weights(recorded, self._starting_weights, resume_from)
            self._starting_weights = recorded  # None for a checkpoint of an older version
        self._tokenizer = instantiate_component(cfg, "tokenizer")
        self._checkpointer = instantiate_component(cfg, "checkpointer")
        # Built before any weight is read, so a model that would compute another function of
        # the checkpoint's weights (another RoPE) is refused in seconds.
        model = self._build_checked_model(cfg)
        # Loaded even on resume: the checkpointer learns the source's file layout from it and
        # writes our checkpoints in the same layout.
        with unreadable_weights_refused(cfg.checkpointer.checkpoint_dir,
                                        cfg.checkpointer.get("checkpoint_files", None)):
            model_state = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
        if resume_from is not None:
            model_state = self._load_resumed_weights(cfg, resume_from)
        self._model = self._setup_model(cfg, model, model_state)
        self._pm.hook.acadlm_model_built(model=self._model, cfg=cfg, device=self._device)
        self._check_sequence_length()

        self._train_data: DomainMixtureDataset = instantiate_component(cfg, "dataset", self._tokenizer)
        self._val_data: DomainMixtureDataset = instantiate_component(
            cfg, "validation_dataset", self._tokenizer)
        self._check_data()
        self._sampler = DomainBatchSampler.for_dataset(
            self._train_data, self._batch_size, seed=self._seed, rank=self._data_rank,
            world_size=self._data_world, gradient_accumulation_steps=self._grad_accum)
        self._pm.hook.acadlm_data_ready(dataset=self._train_data, sampler=self._sampler, cfg=cfg)

        self._optimizer = self._setup_optimizer(cfg)
        self._lr_scheduler = instantiate_optional(cfg, "lr_scheduler", self._optimizer,
                                                  num_training_steps=self._max_steps)
        if resume_from is not None:
            self._restore_recipe_state()
        if self._is_rank_zero:
            self._output_dir.mkdir(parents=True, exist_ok=True)
            clean_interrupted_writes(self._output_dir)
        self._metric_logger = runtime.rank_zero_metric_logger(cfg, self._is_rank_zero)

    def _load_resumed_weights(self, cfg: DictConfig, checkpoint: Path) -> dict:
        model_dir = checkpoint / MODEL_DIRNAME
        reader = training.FullModelHFCheckpointer(
            checkpoint_dir=str(model_dir), checkpoint_files=hf_checkpoint_files(model_dir),
            model_type=cfg.checkpointer.model_type, output_dir=str(self._output_dir))
        with unreadable_weights_refused(model_dir, key="output_dir"):
            return reader.load_checkpoint()[training.MODEL_KEY]

    def _build_checked_model(self, cfg: DictConfig) -> torch.nn.Module:
        """The model under the run's dtype and device, its RoPE checked against the checkpoint's
        config.json by the family layer (``check_model_rope``)."""
        with training.set_default_dtype(self._dtype), self._device:
            model = self._build_model(cfg)
        check_model_rope(cfg, model, rope_base=self._built_rope_base())
        check_model_returns_logits(model)
        return model

    def _setup_model(self, cfg: DictConfig, model: torch.nn.Module,
                     model_state: dict) -> torch.nn.Module:
        check_state_shapes(cfg, model, model_state)
        if self._activation_checkpointing:
            from torchtune.modules import TransformerSelfAttentionLayer

            training.set_activation_checkpointing(
                model, auto_wrap_policy={TransformerSelfAttentionLayer})
        missing, unexpected = model.load_state_dict(model_state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("output.")]:
            raise ConfigError("model", f"the checkpoint does not fit the model: missing {missing}, "
                              f"unexpected {unexpected}.",
                              "make `model` the architecture that `checkpointer` points at.")
        self._pm.hook.acadlm_prepare_model(model=model, cfg=cfg, device=self._device)
        runtime.place_model(model, distributed=self._distributed, device=self._device,
                            compute_dtype=self._compute_dtype)
        return model

    def _setup_optimizer(self, cfg: DictConfig) -> torch.optim.Optimizer:
        groups: list[dict] = [{"params": [p for p in self._model.parameters() if p.requires_grad]}]
        for extra in self._pm.hook.acadlm_optimizer_param_groups(model=self._model, cfg=cfg):
            groups.extend(extra or [])
        check_plugin_state_keys(self._pm)  # the last setup hook: refuse clashing keys before step 1
        return build_optimizer(cfg, groups, device=self._device, distributed=self._distributed)

    def _restore_recipe_state(self) -> None:
        state = self._resume_state
        runtime.restore_training_state(
            state, model=self._model, optimizer=self._optimizer, lr_scheduler=self._lr_scheduler,
            sampler=self._sampler, distributed=self._distributed, device=self._device,
            extra={"plugins": lambda plugins: restore_plugin_states(self._pm, plugins)},
            finished=int(state["step"]) >= self._max_steps)
        self._step, self._history = int(state["step"]), state["history"]
        log.info("resumed at step %d of %d", self._step, self._max_steps)

    # ----------------------------------------------------------------------------- train
    def train(self) -> dict[str, Any]:
        started = time.perf_counter()
        # wall time of the runs before this one (kept in the history), so the summary of a
        # resumed run, even one with no step left, reports the whole training's time
        earlier = float(self._history.get("wall_seconds", 0.0))
        self._wall_clock = lambda: earlier + time.perf_counter() - started
        if self._step == 0:
            self._evaluate()
        progress = runtime.progress_bar(total=self._max_steps, initial=self._step,
                                        desc=self._recipe_name.replace("_", " "),
                                        is_rank_zero=self._is_rank_zero)
        self._model.train()
        while self._step < self._max_steps:
            metrics = self._train_step()
            self._step += 1
            extra = self._pm.hook.acadlm_after_optimizer_step(step=self._step, metrics=metrics)
            add_plugin_results(metrics, extra, owner="the recipe's metrics")
            if runtime.is_due(self._step, self._log_every, self._max_steps):
                self._log(metrics)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}")
            if runtime.is_due(self._step, self._eval_every, self._max_steps):
                self._evaluate()
            if runtime.is_due(self._step, self._save_every, self._max_steps):
                self.save_checkpoint()
        progress.close()
        final = latest_checkpoint(self._output_dir)
        if self.exports_final_model and self._is_rank_zero and final is not None:
            self._exported = collect_metrics(self._pm.hook.acadlm_model_exported(
                model_dir=str(final / MODEL_DIRNAME), recipe=self._recipe_name))
        return self._summary(self._wall_clock())

    def _train_step(self) -> dict[str, float]:
        step_started = time.perf_counter()
        self._optimizer.zero_grad(set_to_none=True)
        micro_batches = [self._next_batch() for _ in range(self._grad_accum)]
        local_tokens = sum(self._counted_tokens(b) for b in micro_batches)
        global_tokens = self._all_reduce_sum(float(local_tokens))
        loss_total = 0.0
        extra_totals: dict[str, float] = {}
        domain_sums = torch.zeros(len(self._train_data.domain_names), dtype=torch.float64)
        domain_counts = torch.zeros_like(domain_sums)
        for batch in micro_batches:
            self._pm.hook.acadlm_batch_ready(batch=batch, step=self._step)
            seq_loss, seq_count, logits = self._token_losses(batch)
            # Normalized by the global token count; FSDP averages gradients over ranks, hence
            # the world_size factor. Plugin terms are per-micro-batch means, averaged over the
            # micro-batches; a term that weighs tokens as this loss does uses `step_tokens`.
            loss = seq_loss.sum() / global_tokens * self._world_size
            micro_mean = seq_loss.sum() / seq_count.sum().clamp(min=1)
            extras = collect_metrics(self._pm.hook.acadlm_extra_loss(
                model=self._model, batch=batch, logits=logits, loss=micro_mean, step=self._step,
                step_tokens=global_tokens, micro_batches=self._grad_accum))
            for name, term in extras.items():
                loss = loss + term / self._grad_accum
                extra_totals[name] = extra_totals.get(name, 0.0) + float(term.detach()) / self._grad_accum
            loss.backward()
            loss_total += float(seq_loss.sum().detach())
            domain_sums.index_add_(0, batch["domain"].cpu(), seq_loss.detach().double().cpu())
            domain_counts.index_add_(0, batch["domain"].cpu(), seq_count.double().cpu())
        # the rate this step trains at (the scheduler moves on in clip_and_step); the step as
        # the logs number it, from 1
        lr = float(self._optimizer.param_groups[0]["lr"])
        grad_norm = runtime.clip_and_step(self._model, self._optimizer, self._lr_scheduler,
                                          self._clip_grad_norm, step=self._step + 1)
        elapsed = time.perf_counter() - step_started
        # loss tokens since step 0: kept in the history, so a resumed run continues the count
        seen = int(self._history.get("tokens_seen", 0)) + int(global_tokens)
        self._history["tokens_seen"] = seen
        metrics = {"loss": self._all_reduce_sum(loss_total) / global_tokens,
                   "lr": lr,
                   "tokens_per_second": global_tokens / elapsed,
                   "step_tokens": int(global_tokens), "tokens_seen": seen,
                   "grad_norm": float(grad_norm)}
        # Each term as trained: FSDP averages its gradient over ranks, so its mean over ranks
        # (every rank has the same terms); one collective for all of them, not one per term.
        names = sorted(extra_totals)
        if names:
            reduced = runtime.all_reduce_sum(
                torch.tensor([extra_totals[name] for name in names], dtype=torch.float64),
                distributed=self._distributed, device=self._device)
            for name, value in zip(names, reduced.tolist(), strict=True):
                metrics[f"loss/{name}"] = value / self._world_size
        # per-domain losses over the global batch, not rank 0's slice
        domain_sums, domain_counts = runtime.all_reduce_sum(
            torch.stack([domain_sums, domain_counts]), distributed=self._distributed,
            device=self._device)
        for d, name in enumerate(self._train_data.domain_names):
            if domain_counts[d] > 0:
                metrics[f"train_loss/{name}"] = float(domain_sums[d] / domain_counts[d])
        return metrics

    def _next_batch(self) -> dict[str, torch.Tensor]:
        keys = self._sampler.next_batch()
        batch = collate_domain_packs([self._train_data[key] for key in keys])
        return {k: v.to(self._device) for k, v in batch.items()}

    def _evaluate(self) -> None:
        losses = evaluate_domain_losses(
            self._model, self._val_data.corpus, batch_size=self._val_batch_size,
            device=self._device, max_packs_per_domain=self._val_max_packs,
            rank=self._data_rank, world_size=self._data_world, all_reduce=self._distributed,
            token_losses=self._eval_token_losses(), block_mask=self._eval_needs_mask())
        metrics = {f"val_loss/{name}": value for name, value in losses.items()}
        metrics["val_loss"] = sum(losses.values()) / len(losses)
        extra = self._pm.hook.acadlm_evaluation_end(step=self._step, domain_losses=losses,
                                                   metrics=metrics)
        add_plugin_results(metrics, extra, owner="the recipe's metrics")
        self._history["evaluations"].append({"step": self._step, "losses": losses})
        self._log(metrics)
        if self._is_rank_zero:
            log.info("step %d validation loss: %s", self._step,
                     ", ".join(f"{k}={v:.3f}" for k, v in losses.items()))

    # ------------------------------------------------------------------------ checkpoint
    def save_checkpoint(self) -> Path | None:
        """Write model + recipe state for the current step atomically (rank 0 writes)."""
        model_state = self.full_model_state()
        optim_state = runtime.full_optimizer_state(self._model, self._optimizer,
                                                   distributed=self._distributed,
                                                   is_rank_zero=self._is_rank_zero)
        path = None
        if self._is_rank_zero:
            self._history["wall_seconds"] = round(self._wall_clock(), 1)
            state = recipe_state(
                step=self._step, optimizer_state=optim_state, lr_scheduler=self._lr_scheduler,
                sampler=self._sampler, plugins=plugin_states(self._pm), history=self._history,
                starting_weights=self._starting_weights,
                config=config_values(self._cfg, self.resume_must_match,
                                     recipe=self._recipe_name, defaults=self.resume_defaults))
            path = write_recipe_checkpoint(
                self._output_dir, self._step, state, lambda folder: self._write_model_dir(
                    model_state, folder / MODEL_DIRNAME),
                keep_last=self._keep_last)
            log.info("checkpoint written: %s", path)
            self._pm.hook.acadlm_checkpoint_saved(path=str(path), step=self._step)
        runtime.barrier(self._distributed)
        return path

    # ----------------------------------------------------------- for recipes built on this
    def _check_keys(self, cfg: DictConfig) -> None:
        """Unknown keys (beyond ``known_keys`` and the plugins' own) and missing required ones."""
        allowed = set(self.known_keys)
        for plugin in self._pm.get_plugins():
            allowed.update(getattr(plugin, "config_keys", ()))
        check_config_keys(cfg, known=allowed, required=self.required_keys,
                          recipe=self._recipe_name, example=self.example_config)

    def _build_model(self, cfg: DictConfig) -> torch.nn.Module:
        """The model, before weights are loaded (under the run's dtype and device)."""
        return instantiate_component(cfg, "model")

    def _built_rope_base(self) -> float | None:
        """The RoPE θ the model is built with when it is not the checkpoint's own (None)."""
        return None

    def _check_data(self) -> None:
        """Every training domain needs a validation split (dynamic batch loading compares them)."""
        missing = [d for d in self._train_data.domain_names if d not in self._val_data.domain_names]
        if missing:
            raise ConfigError("validation_dataset", f"has no validation data for domains {missing}.",
                              "give every training domain a validation split.")
        untrained = [d for d in self._val_data.domain_names
                     if d not in self._train_data.domain_names]
        if untrained and self._is_rank_zero:
            # A held-out domain may be deliberate; a train file that failed to download is not.
            log.warning("validation domains %s have no training split (no train.jsonl or "
                        "train.parquet under dataset.data_dir): they are validated and "
                        "reported, but never trained on, and dynamic batch loading does not "
                        "weigh them. If that is not meant, add their training files.", untrained)

    def _check_sequence_length(self) -> None:
        """A pack longer than the model's positions would fail at the first forward with
        torchtune's message, which names no config key."""
        model_max = getattr(self._model, "max_seq_len", None)
        for key in ("dataset", "validation_dataset"):
            length = config_value((self._cfg.get(key, None) or {}).get("max_seq_len", None),
                                  f"{key}.max_seq_len", int, minimum=1, allow_none=True)
            if model_max is not None and length is not None and length > model_max:
                raise ConfigError(f"{key}.max_seq_len", f"is {length}, above the model's "
                                  f"{model_max} positions.", f"set `{key}.max_seq_len` to "
                                  f"{model_max} or less, or build the model with a longer "
                                  "`max_seq_len` (the long-context recipe does this).")

    def _token_losses(self, batch: dict[str, torch.Tensor],
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Summed next-token loss and counted tokens per sequence, and the logits (None when a
        recipe never materializes them, e.g. a chunked loss)."""
        logits = self._model(batch["tokens"], mask=batch.get("mask"),
                             input_pos=batch.get("input_pos"))
        seq_loss, seq_count = shifted_token_losses(logits, batch["labels"])
        return seq_loss, seq_count, logits

    def _counted_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """The targets of ``batch`` that this rank's loss counts (the loss is normalized by
        their sum over all ranks)."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def _eval_needs_mask(self) -> bool:
        """Whether validation batches carry the document mask: the plain loop's model reads
        it (a recipe whose attention masks documents by itself does not)."""
        return True

    def _eval_token_losses(self) -> Callable[[torch.nn.Module, dict[str, Any]],
                                             tuple[torch.Tensor, torch.Tensor]] | None:
        """How validation computes per-sequence losses; None: full logits + cross-entropy."""
        return self._validation_losses

    def _write_model_dir(self, model_state: dict[str, torch.Tensor], folder: Path) -> None:
        """Save ``model_state`` as a Hugging Face model folder (the checkpoint's ``model/``)."""
        save_hf_model_dir(self._checkpointer, model_state, folder)

    @property
    def is_rank_zero(self) -> bool:
        return self._is_rank_zero

    @property
    def output_dir(self) -> Path:
        return self._output_dir

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def device(self) -> torch.device:
        """The run's device (``device:``): where training and validation run."""
        return self._device

    @property
    def plugin_manager(self):
        return self._pm

    @property
    def history(self) -> dict[str, Any]:
        """What the run recorded so far (``evaluations``: step and per-domain losses)."""
        return self._history

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The model's full (unsharded) CPU state dict on rank 0; every rank must call this."""
        return runtime.full_model_state(self._model, distributed=self._distributed,
                                        is_rank_zero=self._is_rank_zero)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Per-domain validation loss of ``model`` (an unsharded model on :attr:`device`, on
        this rank alone)."""
        return evaluate_domain_losses(
            model, self._val_data.corpus, batch_size=self._val_batch_size, device=self._device,
            max_packs_per_domain=self._val_max_packs)

    # --------------------------------------------------------------------------- helpers
    def _all_reduce_sum(self, value: float) -> float:
        return runtime.all_reduce_float(value, distributed=self._distributed, device=self._device)

    def _log(self, metrics: dict[str, float]) -> None:
        if self._metric_logger is not None:
            self._metric_logger.log_dict(metrics, step=self._step)

    def _summary(self, wall_seconds: float) -> dict[str, Any]:
        evaluations = self._history["evaluations"]
        summary: dict[str, Any] = {
            "recipe": self._recipe_name, "steps": self._step, "wall_seconds": round(wall_seconds, 1),
            "val_loss_before": evaluations[0]["losses"] if evaluations else {},
            "val_loss_after": evaluations[-1]["losses"] if evaluations else {},
            "checkpoint": str(latest_checkpoint(self._output_dir) or ""),
        }
        add_plugin_results(summary, self._exported, owner="the recipe's summary")
        self._pm.hook.acadlm_run_end(summary=summary)
        if self._is_rank_zero:
            (self._output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            print(format_summary(summary), flush=True)
        return summary

    def cleanup(self) -> None:
        runtime.close_process(self._distributed, self._metric_logger)


def check_state_shapes(cfg: DictConfig, model: torch.nn.Module, model_state: dict, *,
                       prefix: str = "") -> None:
    """Refuse a checkpoint whose tensors have other shapes than the built model's (another
    size of model), naming both keys, instead of torch's size-mismatch RuntimeError.
    ``prefix`` names a nested ``model``/``checkpointer`` pair (``"distillation.teacher."``)."""
    mismatched = shape_differences(model, model_state)
    if not mismatched:
        return
    examples = "; ".join(f"`{name}` is {list(saved)} in the checkpoint, {list(built)} in the model"
                         for name, saved, built in mismatched[:2])
    source = cfg.checkpointer.get("checkpoint_dir", None)
    raise ConfigError(
        f"{prefix}model", f"builds another size of model than the checkpoint in "
        f"`{prefix}checkpointer.checkpoint_dir` ({source}) holds: {len(mismatched)} tensors "
        f"differ in shape, e.g. {examples}.",
        f"set `{prefix}model._component_` to a builder of the checkpoint's architecture, e.g. "
        "`acadlm_plugins.models.decoder_from_hf_config` with `path:` the checkpoint folder "
        f"(it reads the folder's config.json), or point `{prefix}checkpointer.checkpoint_dir` "
        "at a checkpoint of the configured model.")


def validation_settings(cfg: DictConfig, *, default_batch_size: int,
                        recipe: str) -> tuple[int, int | None]:
    """The ``validation:`` block's batch size (default: the training ``batch_size``) and
    ``max_packs_per_domain`` (default: every pack), checked before anything loads: a misspelled
    key would otherwise be ignored and a zero fail after the model and data have loaded."""
    block = cfg.get("validation", None)
    if block is None:
        block = {}
    if not isinstance(block, (DictConfig, dict)):
        raise ConfigError("validation", f"must be a mapping, got {block!r}.",
                          f"give it keys among {sorted(VALIDATION_KEYS)}, or remove it.")
    reject_unknown_keys(block, VALIDATION_KEYS, recipe=recipe, prefix="validation.")
    batch_size = config_value(block.get("batch_size", None), "validation.batch_size", int,
                              minimum=1, allow_none=True) or default_batch_size
    max_packs = config_value(block.get("max_packs_per_domain", None),
                             "validation.max_packs_per_domain", int, minimum=1, allow_none=True)
    return batch_size, max_packs


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of per-domain loss before/after and the final domain weights."""
    before, after = summary.get("val_loss_before", {}), summary.get("val_loss_after", {})
    weights = summary.get("domain_weights", {})
    lines = ["", f"=== {summary.get('recipe', 'continued_pretrain').replace('_', ' ')} summary ===",
             f"{'domain':<12}{'val loss before':>16}{'after':>10}{'change':>10}{'weight':>10}"]
    for name in before:
        change = after.get(name, math.nan) - before[name]
        weight = f"{weights[name]:.3f}" if name in weights else "-"
        lines.append(f"{name:<12}{before[name]:>16.4f}{after.get(name, math.nan):>10.4f}"
                     f"{change:>+10.4f}{weight:>10}")
    lines.append(f"steps: {summary['steps']}   wall time: {summary['wall_seconds']} s")
    if "domain_weights_plot" in summary:
        lines.append(f"plot: {summary['domain_weights_plot']}")
    lines.append(f"checkpoint: {summary['checkpoint']}")
    return "\n".join(lines)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of ``tune run acadlm_plugins/continued_pretrain_recipe --config ...``."""
    runtime.run_recipe(cfg, ContinuedPretrainRecipe, ContinuedPretrainRecipe.train)


if __name__ == "__main__":
    from acadlm_plugins.training.runtime import run_main

    sys.exit(run_main(recipe_main))
