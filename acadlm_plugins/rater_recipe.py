"""QuRating stage 2: train a rater on pairwise judgments and export it for the annotator.

Run::

    tune run acadlm_plugins/rater_recipe --config configs/smollm2/qurating_rater.yaml
    tune run --nproc_per_node 2 acadlm_plugins/rater_recipe --config ...

The backbone (a local Hugging Face model folder of any supported family, tokenizer included,
built through :func:`acadlm_plugins.models.hf_model_spec`) gets one scalar head per criterion
and is trained end to end with the Bradley-Terry loss on the pairs whose judgment is confident
(``|p - 0.5| >= margin``; see :mod:`acadlm_plugins.qurating.rater`). Held-out pairwise
accuracy (does the rater order a held-out pair as the judge did?) is logged per criterion at
every evaluation and at the end, with the number of held-out pairs that share a document with
a training pair (``heldout_pairs_sharing_a_training_document`` in ``summary.json``): with
``validation_split: pairs`` (the default) the split is by pair, so the accuracy is over unseen
pairs, not unseen documents, and is optimistic when that number is not 0; with
``validation_split: documents`` the training pairs that show a held-out document are left out
of training (``train_pairs_left_out_for_heldout_documents``), so that number is 0.
Checkpoints are atomic step folders (a rater folder plus the optimizer, data position and RNG
state), so a killed run resumes where it stopped; the last one (``export: last``, the default)
or the saved one with the best mean held-out accuracy (``export: best``, as ``TrainQuRater.sh``
keeps its best checkpoint; that folder is never pruned) is exported as ``<output_dir>/rater``,
the folder ``annotate_recipe`` reads. With ``WORLD_SIZE > 1`` the model
is sharded with FSDP2 and each rank takes its share of every batch.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config, training, utils

import acadlm_plugins.defaults  # noqa: F401  (registers the ${acadlm_home:} resolver)
from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.plugins.nonfinite_loss_guard import check_finite_on_every_rank
from acadlm_plugins.qurating.rater import (
    BACKBONE_DIRNAME,
    DEFAULT_MARGIN,
    HEADS_FILENAME,
    VALIDATION_SPLITS,
    PairwiseJudgments,
    RaterModel,
    RaterTokenizer,
    backbone_fingerprint,
    bradley_terry_loss,
    check_backbone_dir,
    check_pooling,
    check_validation_split,
    head_init_std,
    hf_checkpointer,
    judgments_fingerprint,
    load_backbone,
    pairwise_correct,
    read_judgments,
    save_rater,
    split_scores,
)
from acadlm_plugins.training import runtime
from acadlm_plugins.training.checkpointing import (
    PRECISION_DEFAULTS,
    STARTING_WEIGHTS_KEY,
    changed_files,
    check_starting_weights,
    config_values,
    find_resume_checkpoint,
    is_complete_checkpoint,
    latest_checkpoint,
    load_resume_state,
    plain_value,
    recipe_state,
    step_dirname,
    step_of,
    write_recipe_checkpoint,
)
from acadlm_plugins.training.components import instantiate_optional
from acadlm_plugins.training.config_checks import (
    check_config_keys,
    checked_seed,
    config_value,
)
from acadlm_plugins.training.optimizers import build_optimizer
from acadlm_plugins.training.run_checks import (
    check_log_dir,
    check_output_dir,
    check_output_outside,
    clean_interrupted_writes,
    clip_grad_norm,
    output_dir_setting,
    positive_int,
    step_interval,
)

log = utils.get_logger("INFO")

RECIPE_NAME = "rater"
RATER_DIRNAME = "rater"
KNOWN_KEYS = {
    "output_dir", "seed", "device", "dtype", "backbone_dir", "judgments", "criteria", "margin",
    "validation_fraction", "validation_split", "max_tokens", "pooling", "optimizer", "head_lr",
    "lr_scheduler", "batch_size", "eval_batch_size", "max_steps", "gradient_accumulation_steps",
    "clip_grad_norm", "log_every_n_steps", "eval_every_n_steps", "save_every_n_steps",
    "keep_last_n_checkpoints", "resume", "metric_logger", "model_dir", "mixed_precision",
    "export",
}
REQUIRED_KEYS = ("output_dir", "backbone_dir", "judgments", "optimizer", "batch_size",
                 "max_steps", "metric_logger")
# A resumed run must train the same model on the same data, in the same order: `seed` seeds
# PairSampler's per-epoch shuffle, so another seed would continue with another pair order.
# The judgments are compared by content, not by path (see check_same_judgments): a checkpoint
# records their fingerprint under JUDGMENTS_CONTENT_KEY beside these config values.
# `export: best` keeps the best checkpoint from pruning; a run that pruned by `last` may have
# deleted it, so the choice is fixed at the start too.
RESUME_MUST_MATCH = ("backbone_dir", "criteria", "margin", "validation_fraction",
                     "validation_split", "max_tokens", "pooling", "seed", "mixed_precision",
                     "export")
EXPORTS = ("last", "best")
# What an unset one of those keys means (an unset key and its default resume alike).
RESUME_DEFAULTS = {**PRECISION_DEFAULTS, "export": EXPORTS[0]}
JUDGMENTS_CONTENT_KEY = "judgments_content"
# The backbone is compared by content as well (see check_same_backbone): a checkpoint records
# the fingerprint of the weights under STARTING_WEIGHTS_KEY, as the other recipes do, and of
# the tokenizer files under BACKBONE_TOKENIZER_KEY.
BACKBONE_TOKENIZER_KEY = "backbone_tokenizer"


class PairSampler:
    """An endless stream of training-pair indices: a seeded permutation per epoch.

    Every rank draws the same stream and takes its own slice, so the position (epoch, cursor)
    is one small state that checkpoints and resumes exactly.
    """

    def __init__(self, indices: list[int], seed: int) -> None:
        self._indices = list(indices)
        self._seed = seed
        self.epoch = 0
        self.cursor = 0
        self._order: list[int] | None = None

    def _permutation(self) -> list[int]:
        if self._order is None:
            generator = torch.Generator().manual_seed(self._seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(self._indices), generator=generator).tolist()
            self._order = [self._indices[i] for i in order]
        return self._order

    def draw(self, count: int) -> list[int]:
        """The next ``count`` indices (crossing into the next epoch when needed)."""
        drawn: list[int] = []
        while len(drawn) < count:
            order = self._permutation()
            take = order[self.cursor:self.cursor + count - len(drawn)]
            drawn.extend(take)
            self.cursor += len(take)
            if self.cursor >= len(order):
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        return drawn

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor, self._order = int(state["epoch"]), int(state["cursor"]), None


class RaterRecipe:
    """Setup, train, evaluate, checkpoint, export (see the module docstring)."""

    def __init__(self, cfg: DictConfig) -> None:
        (self._distributed, self._device, self._dtype, self._world_size,
         self._rank) = runtime.init_process(cfg)
        # mixed_precision (QuRating's --bf16): fp32 weights and optimizer state, bf16 math
        self._dtype, self._compute_dtype = runtime.run_precision(cfg, self._dtype)
        self._is_rank_zero = self._rank == 0
        self._step = 0
        self._history: dict[str, Any] = {"evaluations": []}
        self._metric_logger = None  # set last in setup; cleanup works even if setup stopped

    # ----------------------------------------------------------------------------- setup
    def setup(self, cfg: DictConfig) -> None:
        check_config_keys(cfg, known=KNOWN_KEYS, required=REQUIRED_KEYS, recipe="rater",
                          example="configs/smollm2/qurating_rater.yaml")
        self._cfg = cfg
        self._output_dir = output_dir_setting(cfg).expanduser()
        self._seed = training.set_seed(checked_seed(cfg.get("seed", 0), self._world_size))
        self._max_steps = positive_int(cfg, "max_steps")
        self._batch_size = positive_int(cfg, "batch_size")
        self._eval_batch_size = positive_int(cfg, "eval_batch_size", 2 * self._batch_size)
        self._grad_accum = positive_int(cfg, "gradient_accumulation_steps", 1)
        self._clip_grad_norm = clip_grad_norm(cfg)
        self._log_every = step_interval(cfg, "log_every_n_steps", self._max_steps)
        self._eval_every = step_interval(cfg, "eval_every_n_steps", self._max_steps)
        self._save_every = step_interval(cfg, "save_every_n_steps", self._max_steps)
        self._keep_last = step_interval(cfg, "keep_last_n_checkpoints", self._max_steps)
        self._export = export_setting(cfg)
        self._max_tokens = positive_int(cfg, "max_tokens", 512)
        self._pooling = str(cfg.get("pooling", "last"))
        check_pooling(self._pooling)
        (self._margin, self._validation_fraction, self._validation_split, self._head_lr,
         self._criteria) = rating_settings(cfg)
        if "validation_split" not in cfg:
            # The checkpoint records the split used, so that a resume naming the default
            # (`pairs`) matches a run that left the key out, and `documents` does not.
            OmegaConf.update(cfg, "validation_split", self._validation_split, force_add=True)
        self._backbone_dir = Path(str(cfg.backbone_dir)).expanduser()
        check_output_dir(self._output_dir)
        check_log_dir(cfg)
        # Nothing is written to output_dir until the checks below have passed (the metric
        # logger comes last), so a refused run leaves an earlier run's folder as it was.
        resume_from = find_resume_checkpoint(self._output_dir, cfg.get("resume", "auto"))
        if resume_from is not None:
            self._resume_state = load_resume_state(resume_from, cfg, RESUME_MUST_MATCH,
                                                   recipe=RECIPE_NAME,
                                                   defaults=RESUME_DEFAULTS)
            log.info("resuming from %s", resume_from)
        check_backbone_dir(self._backbone_dir)
        check_output_outside(self._output_dir, self._backbone_dir, "backbone_dir")
        # The backbone a fresh run starts from, recorded in every checkpoint: a resumed run
        # whose backbone_dir now holds other weights or another tokenizer (re-exported at the
        # same path) would continue a rater trained from the old ones under the new ones.
        self._backbone_content = backbone_fingerprint(self._backbone_dir)
        if resume_from is not None:
            self._backbone_content = check_same_backbone(self._resume_state,
                                                         self._backbone_content, resume_from)
        self._tokenizer = RaterTokenizer(self._backbone_dir)
        judgments = cfg.judgments
        paths = list(judgments) if isinstance(judgments, (list, ListConfig)) else [judgments]
        criteria, pairs = read_judgments([str(p) for p in paths], criteria=self._criteria)
        self._judgments_content = judgments_fingerprint(criteria, pairs)
        if resume_from is not None:
            check_same_judgments(self._resume_state["config"], self._judgments_content,
                                 plain_value(judgments), resume_from)
        self._data = PairwiseJudgments.build(
            criteria, pairs, self._tokenizer, margin=self._margin,
            validation_fraction=self._validation_fraction, max_tokens=self._max_tokens,
            validation_split=self._validation_split)
        left_out = self._data.counts["train_pairs_left_out_for_heldout_documents"]
        if not self._data.train_indices:
            raise no_training_pairs(self._data.counts)
        if left_out and self._is_rank_zero:
            log.info("validation_split=documents: %d training pairs that show a held-out "
                     "document are left out of training", left_out)
        if not self._data.heldout_indices:
            log.warning("no pair is held out (validation_fraction=%s): held-out accuracy "
                        "cannot be measured", self._validation_fraction)
        if self._is_rank_zero:
            log.info("judgments: %s", json.dumps(self._data.counts))

        model_dir = (resume_from / RATER_DIRNAME / BACKBONE_DIRNAME if resume_from is not None
                     else self._backbone_dir)
        self._model = self._setup_model(model_dir, resume_from)
        # Rank 0 writes checkpoints in the backbone's own HF layout; it learns it once, here.
        self._checkpointer = (hf_checkpointer(self._backbone_dir, self._output_dir)
                              if self._is_rank_zero else None)
        self._optimizer = self._setup_optimizer(cfg)
        self._lr_scheduler = instantiate_optional(cfg, "lr_scheduler", self._optimizer,
                                                  num_training_steps=self._max_steps)
        self._sampler = PairSampler(self._data.train_indices, self._seed)
        if resume_from is not None:
            self._restore()
        if self._is_rank_zero:
            self._output_dir.mkdir(parents=True, exist_ok=True)
            clean_interrupted_writes(self._output_dir)
        self._metric_logger = runtime.rank_zero_metric_logger(cfg, self._is_rank_zero)

    def _setup_model(self, model_dir: Path, resume_from: Path | None) -> torch.nn.Module:
        backbone = load_backbone(model_dir, device=self._device, dtype=self._dtype,
                                 max_seq_len=self._max_tokens + 1)
        if self._tokenizer.vocab_size > backbone.tok_embeddings.num_embeddings:
            raise ConfigError("backbone_dir", f"its tokenizer has {self._tokenizer.vocab_size} "
                              f"tokens but the model only {backbone.tok_embeddings.num_embeddings}.",
                              "use a model folder whose tokenizer.json belongs to its weights.")
        # The head is drawn as QuRating's score layer is (normal, the backbone config's
        # initializer_range) from a generator seeded with the run's seed: torchtune seeds the
        # global RNG with seed + rank, which would give every rank another head. A resumed
        # run overwrites it with the checkpoint's.
        model = RaterModel(backbone, self._data.criteria, self._pooling,
                           init_std=head_init_std(self._backbone_dir),
                           generator=torch.Generator().manual_seed(self._seed))
        if resume_from is not None:
            heads = torch.load(resume_from / RATER_DIRNAME / HEADS_FILENAME, map_location="cpu",
                               weights_only=True)
            with torch.no_grad():
                model.heads.weight.copy_(heads["weight"].to(model.heads.weight.dtype))
        model.train().requires_grad_(True)
        runtime.place_model(model, distributed=self._distributed, device=self._device,
                            compute_dtype=self._compute_dtype)
        return model

    def _setup_optimizer(self, cfg: DictConfig) -> torch.optim.Optimizer:
        heads = list(self._model.heads.parameters())
        head_ids = {id(p) for p in heads}
        groups: list[dict[str, Any]] = [
            {"params": [p for p in self._model.parameters() if id(p) not in head_ids]},
            {"params": heads}]
        if self._head_lr is not None:
            groups[1]["lr"] = self._head_lr
        return build_optimizer(cfg, groups, device=self._device, distributed=self._distributed)

    def _restore(self) -> None:
        state = self._resume_state
        runtime.restore_training_state(
            state, model=self._model, optimizer=self._optimizer, lr_scheduler=self._lr_scheduler,
            sampler=self._sampler, distributed=self._distributed, device=self._device,
            finished=int(state["step"]) >= self._max_steps)
        self._step, self._history = int(state["step"]), state["history"]
        log.info("resumed at step %d of %d", self._step, self._max_steps)

    # ----------------------------------------------------------------------------- train
    def train(self) -> dict[str, Any]:
        """Train to ``max_steps`` (evaluating and saving on schedule), export, summarize."""
        started = time.perf_counter()
        if self._step == 0:
            self._evaluate()
        progress = runtime.progress_bar(total=self._max_steps, initial=self._step, desc="rater",
                                        is_rank_zero=self._is_rank_zero)
        self._model.train()
        while self._step < self._max_steps:
            metrics = self._train_step()
            self._step += 1
            if runtime.is_due(self._step, self._log_every, self._max_steps):
                self._log(metrics)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['train_acc']:.2f}")
            if runtime.is_due(self._step, self._eval_every, self._max_steps):
                self._evaluate()
            if runtime.is_due(self._step, self._save_every, self._max_steps):
                self.save_checkpoint()
        progress.close()
        return self._export_and_summarize(time.perf_counter() - started)

    def _train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        self._optimizer.zero_grad(set_to_none=True)
        per_micro = self._batch_size * self._world_size
        drawn = self._sampler.draw(per_micro * self._grad_accum)
        micro = [drawn[m * per_micro + self._rank * self._batch_size:
                       m * per_micro + (self._rank + 1) * self._batch_size]
                 for m in range(self._grad_accum)]
        batches = [self._data.collate(indices) for indices in micro]
        global_count = self._all_reduce(float(sum(int(b["mask"].sum()) for b in batches)))
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, tokens
        for batch in batches:
            batch = {k: v.to(self._device) for k, v in batch.items()}
            s_a, s_b = split_scores(self._model(batch["tokens"], batch["lengths"]))
            loss_sum = bradley_terry_loss(s_a, s_b, batch["targets"], batch["mask"],
                                          reduction="sum")
            self._check_finite(loss_sum)
            # Normalized by the global count of judged entries; FSDP averages gradients over
            # ranks, hence the world-size factor.
            (loss_sum / global_count * self._world_size).backward()
            correct = pairwise_correct(s_a.detach(), s_b.detach(), batch["targets"])
            totals += torch.tensor([float(loss_sum.detach()),
                                    float((correct * batch["mask"]).sum()),
                                    float(batch["lengths"].sum())], dtype=torch.float64)
        lr = float(self._optimizer.param_groups[0]["lr"])  # this step's, before the scheduler
        grad_norm = runtime.clip_and_step(self._model, self._optimizer, self._lr_scheduler,
                                          self._clip_grad_norm, step=self._step + 1)
        totals = self._all_reduce_tensor(totals)
        elapsed = time.perf_counter() - started
        metrics = {"loss": float(totals[0]) / global_count,
                   "train_acc": float(totals[1]) / global_count,
                   "lr": lr,
                   "pairs_per_second": per_micro * self._grad_accum / elapsed,
                   "tokens_per_second": float(totals[2]) / elapsed}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return metrics

    @torch.no_grad()
    def _evaluate(self) -> dict[str, Any] | None:
        """Held-out pairwise accuracy and loss per criterion (every rank scores a share)."""
        indices = self._data.heldout_indices
        if not indices:
            return None
        was_training = self._model.training
        self._model.eval()
        criteria = self._data.criteria
        # Rows: correct, counted, loss sum; one column per criterion.
        sums = torch.zeros(3, len(criteria), dtype=torch.float64)
        per_global = self._eval_batch_size * self._world_size
        # Every rank runs the same number of forward passes (FSDP gathers weights in each);
        # a rank whose share of the last batch is empty scores a stand-in with weight 0.
        for start in range(0, len(indices), per_global):
            block = indices[start:start + per_global]
            mine = block[self._rank * self._eval_batch_size:
                         (self._rank + 1) * self._eval_batch_size]
            weight = 1.0 if mine else 0.0
            batch = self._data.collate(mine or block[:1])
            batch = {k: v.to(self._device) for k, v in batch.items()}
            s_a, s_b = split_scores(self._model(batch["tokens"], batch["lengths"]))
            mask = batch["mask"].to(torch.float64) * weight
            correct = pairwise_correct(s_a, s_b, batch["targets"]).double()
            losses = bradley_terry_loss(s_a, s_b, batch["targets"], reduction="none").double()
            sums += torch.stack([(correct * mask).sum(0), mask.sum(0),
                                 (losses * mask).sum(0)]).cpu()
        sums = self._all_reduce_tensor(sums)
        self._model.train(was_training)
        accuracy = {name: float(sums[0, c] / sums[1, c]) for c, name in enumerate(criteria)
                    if sums[1, c] > 0}
        loss = {name: float(sums[2, c] / sums[1, c]) for c, name in enumerate(criteria)
                if sums[1, c] > 0}
        result = {"step": self._step, "accuracy": accuracy, "loss": loss,
                  "pairs": {name: int(sums[1, c]) for c, name in enumerate(criteria)}}
        self._history["evaluations"].append(result)
        metrics = {f"heldout_acc/{name}": value for name, value in accuracy.items()}
        metrics.update({f"heldout_loss/{name}": value for name, value in loss.items()})
        if accuracy:
            metrics["heldout_acc"] = sum(accuracy.values()) / len(accuracy)
            metrics["heldout_loss"] = float(sums[2].sum() / sums[1].sum())
        self._log(metrics)
        if self._is_rank_zero:
            log.info("step %d held-out pairwise accuracy: %s (%s)", self._step,
                     ", ".join(f"{k}={v:.3f}" for k, v in accuracy.items()),
                     document_overlap_note(self._data.counts))
        return result

    # ------------------------------------------------------------------------ checkpoint
    def save_checkpoint(self) -> Path | None:
        """Write ``step_<N>/{rater/, recipe_state.pt}`` atomically (rank 0 writes)."""
        model_state = runtime.full_model_state(self._model, distributed=self._distributed,
                                               is_rank_zero=self._is_rank_zero)
        optim_state = runtime.full_optimizer_state(self._model, self._optimizer,
                                                   distributed=self._distributed,
                                                   is_rank_zero=self._is_rank_zero)
        path = None
        if self._is_rank_zero:
            state = recipe_state(
                step=self._step, optimizer_state=optim_state, lr_scheduler=self._lr_scheduler,
                sampler=self._sampler, history=self._history,
                config={**config_values(self._cfg, RESUME_MUST_MATCH, recipe=RECIPE_NAME,
                                        defaults=RESUME_DEFAULTS),
                        JUDGMENTS_CONTENT_KEY: self._judgments_content},
                **{STARTING_WEIGHTS_KEY: self._backbone_content["weights"],
                   BACKBONE_TOKENIZER_KEY: self._backbone_content["tokenizer"]})

            def write_rater(folder: Path) -> None:
                save_rater(folder / RATER_DIRNAME, model_state, criteria=self._data.criteria,
                           pooling=self._pooling, max_tokens=self._max_tokens,
                           source_dir=self._backbone_dir, training_info=self._training_info(),
                           checkpointer=self._checkpointer)

            best = self._best_evaluation()
            keep = None if best is None else self._output_dir / step_dirname(best["step"])
            path = write_recipe_checkpoint(self._output_dir, self._step, state, write_rater,
                                           keep_last=self._keep_last, keep=keep)
            log.info("checkpoint written: %s", path)
        runtime.barrier(self._distributed)
        return path

    def _training_info(self) -> dict[str, Any]:
        evaluations = self._history["evaluations"]
        return {
            "step": self._step, "backbone_source": str(self._backbone_dir),
            "judgments": plain_value(self._cfg.judgments), "margin": self._margin,
            "validation_fraction": self._validation_fraction,
            "validation_split": self._validation_split,
            "pairs": self._data.counts,
            "heldout_accuracy": evaluations[-1]["accuracy"] if evaluations else {},
        }

    def _best_evaluation(self) -> dict[str, Any] | None:
        """With ``export: best``, the evaluation of a saved step (after training began) with the
        highest mean held-out accuracy, the earliest on a tie; else None."""
        if self._export != "best":
            return None
        return best_saved_evaluation(self._history["evaluations"], save_every=self._save_every,
                                     max_steps=self._max_steps)

    def _exported_checkpoint(self) -> Path:
        """The checkpoint whose rater is exported: the best one with ``export: best`` (if a
        run from before it was kept pruned it, the last one, said so), else the last one."""
        latest = latest_checkpoint(self._output_dir)
        best = self._best_evaluation()
        if best is None:
            return latest
        folder = self._output_dir / step_dirname(best["step"])
        if is_complete_checkpoint(folder):
            return folder
        log.warning("export: best: the checkpoint of step %d (the best held-out accuracy) is "
                    "gone; exporting the last one, %s, instead", best["step"], latest.name)
        return latest

    def _export_and_summarize(self, wall_seconds: float) -> dict[str, Any]:
        evaluations = self._history["evaluations"]
        export = self._output_dir / RATER_DIRNAME
        summary: dict[str, Any] = {
            "recipe": RECIPE_NAME, "steps": self._step, "wall_seconds": round(wall_seconds, 1),
            "criteria": self._data.criteria, "pairs": self._data.counts,
            "heldout_pairs_sharing_a_training_document":
                self._data.counts["heldout_pairs_sharing_a_training_document"],
            "train_pairs_left_out_for_heldout_documents":
                self._data.counts["train_pairs_left_out_for_heldout_documents"],
            "heldout_accuracy_before": evaluations[0]["accuracy"] if evaluations else {},
            "heldout_accuracy_after": evaluations[-1]["accuracy"] if evaluations else {},
            "heldout_loss_before": evaluations[0]["loss"] if evaluations else {},
            "heldout_loss_after": evaluations[-1]["loss"] if evaluations else {},
            "rater_dir": str(export),
        }
        exported = self._exported_checkpoint()
        step = step_of(exported)
        summary.update(export=self._export, exported_step=step, heldout_accuracy_exported=next(
            (e["accuracy"] for e in reversed(evaluations) if e["step"] == step), {}))
        if self._is_rank_zero:
            partial = self._output_dir / f".{RATER_DIRNAME}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(exported / RATER_DIRNAME, partial)
            if export.exists():
                shutil.rmtree(export)
            os.replace(partial, export)
            (self._output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            print(format_summary(summary), flush=True)
        runtime.barrier(self._distributed)
        return summary

    # --------------------------------------------------------------------------- helpers
    def _check_finite(self, loss_sum: torch.Tensor) -> None:
        """Stop before backward on a NaN/inf loss, on every rank at once (a rank that stopped
        alone would leave the others waiting in a collective)."""
        check_finite_on_every_rank([("loss", loss_sum)], step=self._step + 1)

    def _all_reduce(self, value: float) -> float:
        return runtime.all_reduce_float(value, distributed=self._distributed, device=self._device)

    def _all_reduce_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        return runtime.all_reduce_sum(tensor, distributed=self._distributed, device=self._device)

    def _log(self, metrics: dict[str, float]) -> None:
        if self._metric_logger is not None:
            self._metric_logger.log_dict(metrics, step=self._step)

    def cleanup(self) -> None:
        runtime.close_process(self._distributed, self._metric_logger)


def check_same_judgments(recorded: dict[str, Any], content: dict[str, Any], judgments: Any,
                         checkpoint: Path) -> None:
    """Refuse to resume on other judgments than the checkpoint trained on, naming `judgments`.

    The checkpoint's data position (epoch, cursor) indexes the pairs as read, so pairs added,
    removed, reordered or relabelled would silently continue on another pair set: the pairs'
    fingerprint (:func:`judgments_fingerprint`) must be the recorded one, whatever path names
    the file. A checkpoint written before fingerprints were recorded has only the configured
    path; it resumes when that path names the same file(s) (compared resolved)."""
    saved = recorded.get(JUDGMENTS_CONTENT_KEY)
    if saved is not None:
        if saved["sha256"] != content["sha256"]:
            raise ConfigError(
                "judgments", f"holds other pairs than the judgments the checkpoint being "
                f"resumed ({checkpoint}) was trained on: {saved['pairs']} pairs (sha256 "
                f"{saved['sha256'][:12]}) then, {content['pairs']} pairs (sha256 "
                f"{content['sha256'][:12]}) now; its saved data position would point into "
                "another set of pairs.", "restore the judgments file(s) the run was started "
                "with, or start a new `output_dir` to train a rater on these judgments.")
        return
    if "judgments" in recorded and _resolved(recorded["judgments"]) != _resolved(judgments):
        raise ConfigError("judgments", f"differs from the checkpoint being resumed "
                          f"({checkpoint}): was {recorded['judgments']}, is {judgments}.",
                          "restore `judgments` as it was, or start a new `output_dir`.")


def check_same_backbone(state: dict[str, Any], now: dict[str, Any], checkpoint: Path
                        ) -> dict[str, Any]:
    """Refuse to resume ``checkpoint`` when ``backbone_dir`` (the same path: the config
    comparison checked that) no longer holds the weights or the tokenizer files the checkpoint
    recorded (:func:`~acadlm_plugins.qurating.rater.backbone_fingerprint`), naming
    `backbone_dir` and what changed. Returns what the resumed run records in turn: the
    checkpoint's fingerprints, None for a checkpoint written before they were recorded, which
    resumes unchecked (as the other recipes resume one without ``starting_weights``)."""
    recorded_weights = state.get(STARTING_WEIGHTS_KEY)
    recorded_tokenizer = state.get(BACKBONE_TOKENIZER_KEY)
    check_starting_weights(recorded_weights, now["weights"], checkpoint, key="backbone_dir")
    changed = changed_files(recorded_tokenizer, now["tokenizer"])
    if changed:
        raise ConfigError(
            "backbone_dir", f"the tokenizer in {now['tokenizer']['folder']} changed since "
            f"the checkpoints in {checkpoint.parent} were written (tokenizer files that "
            f"differ: {', '.join(changed)}); resuming {checkpoint.name} would go on "
            "training a rater that learned the old tokenization on texts tokenized the "
            "new way, and export it with the new tokenizer.", "choose a new `output_dir` for "
            "a run with the new tokenizer, or restore the backbone folder's tokenizer files "
            "the checkpoints were trained with.")
    return {"weights": recorded_weights, "tokenizer": recorded_tokenizer}


def _resolved(judgments: Any) -> list[str]:
    """The judgments file(s) of a config value (one path or a list) as resolved paths."""
    paths = judgments if isinstance(judgments, (list, tuple)) else [judgments]
    return [str(Path(str(p)).expanduser().resolve()) for p in paths]


def rating_settings(cfg: DictConfig
                    ) -> tuple[float, float, str, float | None, list[str] | None]:
    """``margin``, ``validation_fraction``, ``validation_split``, ``head_lr`` and ``criteria``
    as setup reads them, refused naming the key; a pipeline makes the same check before its
    first stage (:mod:`acadlm_plugins.stages`)."""
    margin = config_value(cfg.get("margin", DEFAULT_MARGIN), "margin", float, minimum=0.0)
    if not margin < 0.5:  # |p - 0.5| is at most 0.5: no pair would be kept
        raise ConfigError("margin", f"{margin} is outside [0, 0.5).",
                          "QuRating trains on pairs with |p - 0.5| >= 0.25 (the default).")
    validation_fraction = config_value(cfg.get("validation_fraction", 0.1),
                                       "validation_fraction", float, minimum=0.0)
    if not validation_fraction < 1.0:
        raise ConfigError("validation_fraction", f"{validation_fraction} is outside [0, 1).",
                          "hold out a small share of pairs, e.g. 0.1.")
    validation_split = str(plain_value(cfg.get("validation_split", VALIDATION_SPLITS[0])))
    check_validation_split(validation_split)
    head_lr = config_value(cfg.get("head_lr", None), "head_lr", float, above=0.0,
                           allow_none=True)
    return (margin, validation_fraction, validation_split, head_lr,
            criteria_names(cfg.get("criteria", None)))


def export_setting(cfg: DictConfig) -> str:
    """``export``: ``last`` (the default) or ``best``, refused naming the key where ``best``
    could not choose: without held-out pairs, or with checkpoints at steps that are not
    evaluated (every saved step must have an evaluation to be compared by)."""
    value = str(plain_value(cfg.get("export", EXPORTS[0])))
    if value not in EXPORTS:
        raise ConfigError("export", f"is {value!r}, not one of {', '.join(EXPORTS)}.",
                          "`last` exports the last step's rater; `best` the saved one with the "
                          "best mean held-out accuracy (TrainQuRater.sh's "
                          "--load_best_model_at_end).")
    if value == "best":
        if not float(cfg.get("validation_fraction", 0.1)) > 0:
            raise ConfigError("export", "is `best` with `validation_fraction: 0`: there is no "
                              "held-out accuracy to choose by.", "hold out pairs (e.g. "
                              "`validation_fraction: 0.1`) or set `export: last`.")
        max_steps = positive_int(cfg, "max_steps")
        save_every = step_interval(cfg, "save_every_n_steps", max_steps)
        eval_every = step_interval(cfg, "eval_every_n_steps", max_steps)
        if save_every % eval_every and save_every < max_steps:
            raise ConfigError("export", f"is `best`, but a checkpoint is saved every "
                              f"{save_every} steps and the held-out accuracy measured every "
                              f"{eval_every}: some checkpoints could not be compared.",
                              "make `save_every_n_steps` a multiple of `eval_every_n_steps` "
                              "(TrainQuRater.sh: both 200).")
    return value


def best_saved_evaluation(evaluations: list[dict[str, Any]], *, save_every: int,
                          max_steps: int) -> dict[str, Any] | None:
    """The evaluation with the highest mean held-out accuracy among those of steps that have
    a checkpoint (after training began: the untrained rater is not a candidate, as in the
    Hugging Face Trainer), the earliest on a tie; None before there is one."""
    best, best_accuracy = None, -1.0
    for evaluation in evaluations:
        step, accuracy = evaluation["step"], evaluation["accuracy"]
        if step < 1 or not accuracy or not runtime.is_due(step, save_every, max_steps):
            continue
        mean = sum(accuracy.values()) / len(accuracy)
        if mean > best_accuracy:
            best, best_accuracy = evaluation, mean
    return best


def no_training_pairs(counts: dict[str, Any]) -> DataError:
    """The error for a split that leaves nothing to train on, naming what took the pairs:
    the held-out share, and with ``validation_split: documents`` the pairs left out."""
    kept, left_out = counts["pairs_kept"], counts["train_pairs_left_out_for_heldout_documents"]
    if not left_out:
        return DataError(f"all {kept} confident pairs fell into the held-out split. Fix: lower "
                         "`validation_fraction` or judge more pairs.")
    return DataError(f"no confident pair is left to train on: {counts['heldout_pairs']} of "
                     f"{kept} are held out and the other {left_out} show a held-out document "
                     "(`validation_split: documents`). Fix: lower `validation_fraction`, set "
                     "`validation_split: pairs`, or judge more pairs (of more documents).")


def criteria_names(value: Any) -> list[str] | None:
    """The ``criteria`` config value as a list of names (None: every criterion found in the
    judgments). One name given as a string (``criteria=educational_value``) is one criterion,
    as the judge's ``load_criteria`` reads it, not a list of its characters."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, ListConfig)):
        raise ConfigError("criteria", f"is {plain_value(value)!r}, not a list of criterion "
                          "names.", "e.g. `criteria: [educational_value]`, or null for every "
                          "criterion in the judgments.")
    names = [str(name) for name in value]
    if not names:
        raise ConfigError("criteria", "is an empty list.", "name at least one criterion, or "
                          "set `criteria: null` for every criterion in the judgments.")
    return names


def document_overlap_note(counts: dict[str, Any]) -> str:
    """What the held-out accuracy is over, in words: how many held-out pairs share a document
    with a training pair (with ``validation_split: pairs`` the split is by pair id, not by
    document), and how many training pairs ``documents`` left out so that none does."""
    sharing = counts.get("heldout_pairs_sharing_a_training_document")
    heldout = counts.get("heldout_pairs", 0)
    if sharing is None:
        return (f"{heldout} held-out pairs; whether they share documents with training pairs "
                "is unknown (the judgments rows carry no doc_id_a/doc_id_b)")
    note = (f"{sharing} of {heldout} held-out pairs share a document with a training pair"
            + (": accuracy over unseen pairs, not unseen documents, so optimistic"
               if sharing else ""))
    missing = counts.get("pairs_without_document_ids", 0)
    if missing:
        note += f"; {missing} pairs name no document and are not counted"
    left_out = counts.get("train_pairs_left_out_for_heldout_documents", 0)
    if left_out:
        note += (f"; {left_out} training pairs showing a held-out document were left out of "
                 "training (validation_split: documents)")
    return note


def format_summary(summary: dict[str, Any]) -> str:
    """Held-out pairwise accuracy per criterion before and after training, as a table."""
    before, after = summary["heldout_accuracy_before"], summary["heldout_accuracy_after"]
    per_criterion = summary["pairs"].get("per_criterion", {})
    lines = ["", "=== rater summary ===",
             f"{'criterion':<22}{'held-out pairs':>15}{'acc before':>12}{'acc after':>11}"]
    for name in summary["criteria"]:
        pairs = per_criterion.get(name, {}).get("heldout", 0)
        first = f"{before[name]:.3f}" if name in before else "-"
        last = f"{after[name]:.3f}" if name in after else "-"
        lines.append(f"{name:<22}{pairs:>15}{first:>12}{last:>11}")
    counts = summary["pairs"]
    lines.append(f"pairs: {counts['pairs_read']} read, {counts['pairs_kept']} confident, "
                 f"{counts['train_pairs']} train / {counts['heldout_pairs']} held out")
    lines.append(f"held-out documents: {document_overlap_note(counts)}")
    lines.append(f"steps: {summary['steps']}   wall time: {summary['wall_seconds']} s")
    lines.append(f"rater: {summary['rater_dir']}")
    return "\n".join(lines)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of ``tune run acadlm_plugins/rater_recipe --config ...``."""
    runtime.run_recipe(cfg, RaterRecipe, RaterRecipe.train)


if __name__ == "__main__":
    from acadlm_plugins.training.runtime import run_main

    sys.exit(run_main(recipe_main))
