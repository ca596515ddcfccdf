"""Knowledge distillation from a frozen teacher as a plugin of the training loop.

Config block (``teacher`` is required; absent or null: no distillation)::

    distillation:
      teacher:
        model: {_component_: acadlm_plugins.models.smollm2.smollm2_135m}   # teacher's builder
        checkpointer:                        # loads the teacher's weights (never writes)
          _component_: torchtune.training.FullModelHFCheckpointer
          checkpoint_dir: ...
          checkpoint_files: [model.safetensors]
          model_type: LLAMA3_2
      kd_ratio: 0.5          # loss = (1 - kd_ratio) * LM loss + kd_ratio * KD loss
      temperature: 1.0       # KD = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
      vocab_chunk_size: 8192 # vocabulary words per float32 block of the KL computation

``kd_ratio`` has the name and meaning of torchtune's ``knowledge_distillation`` recipes. The
recipe adds every plugin term to its LM loss, so the term returned is ``kd_ratio * (KD - LM)``:
LM + term is the mixture above. KD is the forward KL of Hinton et al. 2015 (see
``training/distillation_loss.py``) over the positions the LM loss counts (position t against
label t + 1, ``-100`` skipped). Both KD and the LM part it cancels are weighted per token over
the whole optimizer step, exactly as the recipe weighs its LM loss: each micro-batch's token
sums are divided by the step's counted tokens over all micro-batches and ranks (the hook's
``step_tokens``), so micro-batches with unequal token counts, gradient accumulation and N
ranks all train the same mixture as one process with the step's whole batch. The metric
``distillation/kl`` is the step's KD per counted token (one all-reduce of two numbers per
micro-batch gathers it over ranks).

The teacher is built under the run's ``dtype`` on the run's device, loaded strictly (only a
tied ``output.`` may be absent), frozen and kept in eval mode; on several ranks it is sharded
with FSDP2 exactly like the student. Its logits are never materialized: its final hidden state
is projected one vocabulary chunk at a time. Under FSDP2 the output projection weight is
gathered whole for each micro-batch (the ``vocab x dim`` block FSDP itself gathers for the
forward) and released after that micro-batch's backward.

Nothing the teacher does changes between steps, so resuming is exact without extra state; the
checkpoint stores a fingerprint of the teacher's weights and the loss's ``kd_ratio`` and
``temperature``. A resumed run whose teacher differs stops with a ConfigError naming
``distillation.teacher``, one with another ``kd_ratio`` or ``temperature`` one naming that key
(a checkpoint that predates their recording resumes with a warning that they could not be
checked); so does resuming a distilled run without the block, or a plain run with one (naming
``distillation``). ``vocab_chunk_size`` may change on resume: it does not change the loss.

Only recipes whose loop hands the logits to ``acadlm_extra_loss`` can distil
(``continued_pretrain``, ``prune``). A one-shot prune run (``pruning.method: importance``)
trains nothing: its block is checked, as a pipeline hands both prune arms one config, but the
teacher is not loaded.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torchtune import training

from acadlm_plugins.continued_pretrain_recipe import check_state_shapes
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.hookspecs import hookimpl
from acadlm_plugins.plugins.pruning import pruning_method
from acadlm_plugins.training.chunked_loss import shifted_targets
from acadlm_plugins.training.components import instantiate_component
from acadlm_plugins.training.config_checks import config_value, reject_unknown_keys
from acadlm_plugins.training.distillation_loss import (
    DEFAULT_VOCAB_CHUNK_SIZE,
    forward_kl_chunked,
    output_projection_weight,
    teacher_final_hidden,
)
from acadlm_plugins.training.run_checks import (
    check_checkpoint_source,
    check_model_family,
    check_model_returns_logits,
    check_model_rope,
)

log = logging.getLogger(__name__)

CONFIG_KEY = "distillation"
TEACHER_KEY = f"{CONFIG_KEY}.teacher"
STATE_KEY = "distillation"
KNOWN_KEYS = {"teacher", "kd_ratio", "temperature", "vocab_chunk_size"}
TEACHER_KEYS = {"model", "checkpointer"}
# Recipes whose training loop passes the student's full logits to `acadlm_extra_loss`.
RECIPES_WITH_LOGITS = ("continued_pretrain", "prune")
FINGERPRINT_SAMPLES = 4096  # elements per tensor that the teacher's fingerprint hashes
# The settings that define the loss, recorded in the checkpoint: a resumed run must keep them.
# `vocab_chunk_size` only sets how the KL is blocked (the same value up to float rounding), so
# a resumed run may change it, e.g. to fit another micro-batch size.
LOSS_SETTINGS = ("kd_ratio", "temperature")


class DistillationPlugin:
    """Adds ``kd_ratio * (KD - LM)`` to the loss, KD against a frozen teacher (module docstring)."""

    config_keys = (CONFIG_KEY,)

    def __init__(self) -> None:
        self.enabled = False
        self.kd_ratio = 0.5
        self.temperature = 1.0
        self.vocab_chunk_size = DEFAULT_VOCAB_CHUNK_SIZE
        self.teacher: nn.Module | None = None
        self.fingerprint: dict[str, str] = {}
        self._world_size = 1
        # this step's KD summed over its counted positions, and their number (all ranks)
        self._kl_totals: torch.Tensor | None = None
        self._last_kl: float | None = None

    # ------------------------------------------------------------------------------ config
    @hookimpl
    def acadlm_configure(self, cfg: Any, recipe: str) -> None:
        block = cfg.get(CONFIG_KEY, None)
        if block is None:
            return
        if not isinstance(block, DictConfig):
            raise ConfigError(CONFIG_KEY, f"must be a mapping, got {block!r}.",
                              "give `teacher:`, `kd_ratio:` ... under it, or remove it.")
        if recipe not in RECIPES_WITH_LOGITS:
            raise ConfigError(CONFIG_KEY, f"the {recipe} recipe does not hand the student's "
                              "logits to plugins, which distillation needs.",
                              f"remove the block, or distil with one of {list(RECIPES_WITH_LOGITS)}.")
        reject_unknown_keys(block, KNOWN_KEYS, recipe=recipe, prefix=f"{CONFIG_KEY}.")
        check_teacher_block(block.get("teacher", None))
        self.kd_ratio = _number(block, "kd_ratio", 0.5)
        if not 0 <= self.kd_ratio <= 1:
            raise ConfigError(f"{CONFIG_KEY}.kd_ratio", f"must be in [0, 1], got {self.kd_ratio}.",
                              "0 trains on the LM loss alone, 1 on the KD loss alone.")
        self.temperature = _number(block, "temperature", 1.0)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            # T = inf makes every z / T zero and the KD term T^2 * 0 a NaN loss at step 0.
            raise ConfigError(f"{CONFIG_KEY}.temperature",
                              f"must be a finite number > 0, got {self.temperature}.",
                              "use 1.0 for the teacher's own distribution, >1 to soften it.")
        chunk = _number(block, "vocab_chunk_size", DEFAULT_VOCAB_CHUNK_SIZE)
        if not chunk.is_integer() or chunk < 1:
            raise ConfigError(f"{CONFIG_KEY}.vocab_chunk_size",
                              f"must be a whole number >= 1, got {chunk}.",
                              f"use e.g. {DEFAULT_VOCAB_CHUNK_SIZE}.")
        self.vocab_chunk_size = int(chunk)
        if recipe == "prune" and pruning_method(cfg) == "importance":
            log.info("distillation: teacher not loaded: `pruning.method: importance` trains "
                     "nothing, so it would go unused")
            return
        self.output_dir = Path(cfg.get("output_dir", "."))
        self.enabled = True

    # ------------------------------------------------------------------------------ teacher
    @hookimpl
    def acadlm_model_built(self, model: Any, cfg: Any, device: Any) -> None:
        if not self.enabled:
            return
        dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=device)
        self.teacher, self.fingerprint = load_teacher(
            cfg[CONFIG_KEY].teacher, dtype=dtype, device=device, output_dir=self.output_dir)
        teacher_vocab, student_vocab = vocab_size_of(self.teacher), vocab_size_of(model)
        if teacher_vocab != student_vocab:
            raise ConfigError(f"{TEACHER_KEY}.model", f"has a vocabulary of {teacher_vocab} "
                              f"words, the student {student_vocab}; the KL compares the two "
                              "distributions word by word.",
                              "distil from a teacher that shares the student's tokenizer.")
        if dist.is_available() and dist.is_initialized():
            self._world_size = dist.get_world_size()
        if self._world_size > 1:
            from acadlm_plugins.training.runtime import shard_decoder_layers

            shard_decoder_layers(self.teacher)
        log.info("distillation: teacher %s (%s), kd_ratio %g, temperature %g",
                 self.fingerprint["checkpoint_dir"], str(dtype).removeprefix("torch."),
                 self.kd_ratio, self.temperature)

    def teacher_outputs(self, batch: dict[str, torch.Tensor],
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's final hidden state and output weight for ``batch`` (its full logits and
        None for a head that is not a plain projection)."""
        assert self.teacher is not None
        kwargs = {"mask": batch.get("mask"), "input_pos": batch.get("input_pos")}
        with torch.no_grad():
            weight = output_projection_weight(self.teacher)
            if weight is None:
                logits = self.teacher(batch["tokens"], **kwargs)
                return (torch.cat(logits, dim=1) if isinstance(logits, list) else logits), None
            hidden = teacher_final_hidden(self.teacher, batch["tokens"], **kwargs)
            if self._world_size > 1:
                weight = _whole(weight)
        return hidden, weight

    # ------------------------------------------------------------------------------ loss
    @hookimpl
    def acadlm_extra_loss(self, batch: dict, logits: Any, loss: Any, step: int,
                          step_tokens: float, micro_batches: int) -> dict | None:
        if not self.enabled:
            return None
        if logits is None:
            raise ConfigError(CONFIG_KEY, "this recipe computed its loss without handing the "
                              "logits to plugins, so there is nothing to distil into.",
                              f"remove the block, or use one of {list(RECIPES_WITH_LOGITS)}.")
        if isinstance(logits, (list, tuple)):  # torchtune's chunked output, along the sequence
            logits = torch.cat(list(logits), dim=1)
        teacher, weight = self.teacher_outputs(batch)
        kl_sum, count = forward_kl_chunked(
            logits, teacher, shifted_targets(batch["labels"]), teacher_weight=weight,
            temperature=self.temperature, vocab_chunk_size=self.vocab_chunk_size)
        totals = torch.stack([kl_sum.detach().double(), count.double()])
        if self._world_size > 1:
            dist.all_reduce(totals)
        self._kl_totals = totals if self._kl_totals is None else self._kl_totals + totals
        # Token sums over the step's counted tokens (hook docstring): the recipe divides the
        # term by micro_batches, FSDP averages gradients over ranks, and the recipe's LM loss
        # weighs each token 1 / step_tokens; `loss * count` is this micro-batch's LM sum.
        scale = self._world_size * micro_batches / max(float(step_tokens), 1.0)
        return {"distillation": self.kd_ratio * (kl_sum - loss * count) * scale}

    @hookimpl
    def acadlm_after_optimizer_step(self, step: int, metrics: dict) -> dict | None:
        if not self.enabled or self._kl_totals is None:
            return None
        kl_sum, count = self._kl_totals.tolist()
        self._last_kl = kl_sum / max(count, 1.0)
        self._kl_totals = None
        return {"distillation/kl": self._last_kl}

    # ------------------------------------------------------------------------------ state
    @hookimpl
    def acadlm_state_dict(self) -> dict | None:
        if not self.enabled:
            return None
        return {STATE_KEY: {"teacher": dict(self.fingerprint), **self.loss_settings()}}

    def loss_settings(self) -> dict[str, float]:
        """The settings that define the distillation loss (:data:`LOSS_SETTINGS`), as the
        checkpoint records them."""
        return {"kd_ratio": self.kd_ratio, "temperature": self.temperature}

    @hookimpl
    def acadlm_load_state_dict(self, states: dict) -> None:
        check_resumed_with_same_mode(states.get(STATE_KEY), enabled=self.enabled)
        if not self.enabled:
            return
        saved = states[STATE_KEY]["teacher"]
        if saved["weights"] != self.fingerprint["weights"]:
            raise ConfigError(TEACHER_KEY, "differs from the teacher of the checkpoint being "
                              f"resumed (which was loaded from {saved['checkpoint_dir']}).",
                              "point the teacher at the same weights, or start a new "
                              "`output_dir`.")
        check_resumed_with_same_loss(states[STATE_KEY], self.loss_settings(),
                                     output_dir=self.output_dir)

    @hookimpl
    def acadlm_run_end(self, summary: dict) -> None:
        if not self.enabled:
            return
        summary["distillation"] = {"teacher": self.fingerprint["checkpoint_dir"],
                                   "kd_ratio": self.kd_ratio, "temperature": self.temperature,
                                   "last_kl": self._last_kl}


def check_resumed_with_same_mode(saved: dict | None, *, enabled: bool) -> None:
    """A resumed run distils exactly when the run it resumes did: dropping the block (or adding
    one to a plain run's checkpoint) would silently switch the loss mid-run. ``saved`` is the
    checkpoint's distillation state (None: the run had no teacher)."""
    if saved is not None and not enabled:
        raise ConfigError(CONFIG_KEY, "is absent, but the checkpoint being resumed was trained "
                          "with distillation (teacher loaded from "
                          f"{saved['teacher']['checkpoint_dir']}); resuming without it would "
                          "switch the loss mid-run.",
                          "restore the `distillation:` block the run started with, or start a "
                          "new `output_dir` to train without a teacher.")
    if saved is None and enabled:
        raise ConfigError(CONFIG_KEY, "is set, but the checkpoint being resumed was trained "
                          "without distillation; adding a teacher would switch the loss mid-run.",
                          "remove the `distillation:` block to resume the run as it was, or "
                          "start a new `output_dir` to distil from step 0.")


def check_resumed_with_same_loss(saved: dict, now: dict[str, float], *,
                                 output_dir: Path) -> None:
    """A resumed distilled run trains the loss it started with: ``saved`` (the checkpoint's
    distillation state) must hold the :data:`LOSS_SETTINGS` of ``now``. Another ``kd_ratio`` or
    ``temperature`` would switch the loss mid-run (``kd_ratio: 0`` is the LM loss alone) while
    ``summary.json`` reported the new value for the whole run; a finished run would train
    nothing and report it all the same. A checkpoint written before they were recorded resumes,
    with one warning that they could not be checked."""
    missing = [key for key in LOSS_SETTINGS if key not in saved]
    if missing:
        log.warning("distillation: the checkpoint being resumed (in %s) was written by an older "
                    "version that did not record %s, so they could not be checked; the run "
                    "continues with %s, as if it had started with them.", output_dir,
                    " and ".join(f"`{CONFIG_KEY}.{key}`" for key in missing),
                    ", ".join(f"{key} {now[key]}" for key in missing))
    changed = [key for key in LOSS_SETTINGS if key in saved and float(saved[key]) != now[key]]
    if not changed:
        return
    was = {key: float(saved[key]) for key in changed}
    key = changed[0]
    also = "".join(f"; `{CONFIG_KEY}.{other}` differs too: was {was[other]}, is {now[other]}"
                   for other in changed[1:])
    raise ConfigError(f"{CONFIG_KEY}.{key}", f"differs from the checkpoint being resumed (in "
                      f"{output_dir}): was {was[key]}, is {now[key]}{also}. Resuming would "
                      "switch the loss mid-run, and summary.json would report the new value "
                      "for steps trained with the old one.",
                      "restore " + " and ".join(f"`{CONFIG_KEY}.{k}: {was[k]}`" for k in changed)
                      + " (as the run started), or start a new `output_dir` to train with "
                      + " and ".join(f"{k} {now[k]}" for k in changed) + " from step 0.")


def check_teacher_block(teacher: Any) -> None:
    """``distillation.teacher`` must hold a ``model`` and a ``checkpointer`` block, nothing else."""
    if not teacher:
        raise ConfigError(TEACHER_KEY, "is missing.",
                          "add `teacher: {model: {_component_: <builder>}, checkpointer: "
                          "{_component_: torchtune.training.FullModelHFCheckpointer, "
                          "checkpoint_dir: ..., checkpoint_files: [...], model_type: ...}}`.")
    if not isinstance(teacher, DictConfig):
        raise ConfigError(TEACHER_KEY, f"must be a mapping, got {teacher!r}.",
                          "give it `model:` and `checkpointer:` blocks.")
    reject_unknown_keys(teacher, TEACHER_KEYS, recipe="", prefix=f"{TEACHER_KEY}.",
                        problem=f"is not a key of `{TEACHER_KEY}`, which holds only "
                        "`model` and `checkpointer`.")
    for key in sorted(TEACHER_KEYS):
        node = teacher.get(key, None)
        if not isinstance(node, DictConfig) or "_component_" not in node:
            raise ConfigError(f"{TEACHER_KEY}.{key}", "is missing or has no `_component_`.",
                              f"give the teacher's {key} as a `_component_` block, as the "
                              f"top-level `{key}:` is given for the student.")


def load_teacher(teacher_cfg: DictConfig, *, dtype: torch.dtype, device: torch.device,
                 output_dir: Path) -> tuple[nn.Module, dict[str, str]]:
    """Build the teacher under ``dtype`` on ``device``, load its checkpoint, freeze it; return it
    with its fingerprint.

    The global RNG is left as it was, so adding a teacher does not change the student's run.
    The checkpointer only reads; without an ``output_dir`` of its own it gets the run's, which
    the recipe has created already.
    """
    check_model_family(teacher_cfg, prefix=f"{TEACHER_KEY}.")
    with _teacher_keys():  # a missing folder or weight file, named before anything is built
        check_checkpoint_source(teacher_cfg)
    with _rng_untouched(device), training.set_default_dtype(dtype), device:
        teacher = _instantiate(teacher_cfg, "model")
    # A teacher built otherwise than its checkpoint's config.json (another RoPE) would load
    # its weights and teach another model's distribution.
    check_model_rope(teacher_cfg, teacher, prefix=f"{TEACHER_KEY}.")
    check_model_returns_logits(teacher, prefix=f"{TEACHER_KEY}.")
    overrides = {} if "output_dir" in teacher_cfg.checkpointer else {"output_dir": str(output_dir)}
    try:
        checkpointer = _instantiate(teacher_cfg, "checkpointer", **overrides)
        state = checkpointer.load_checkpoint()[training.MODEL_KEY]
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{TEACHER_KEY}.checkpointer", f"cannot load the teacher's weights: "
                          f"{type(exc).__name__}: {str(exc).rstrip('.')}.",
                          "check its checkpoint_dir, checkpoint_files and model_type.") from exc
    # The student's check, under the teacher's keys: another size of model than the checkpoint
    # is named instead of torch's size-mismatch RuntimeError from load_state_dict.
    check_state_shapes(teacher_cfg, teacher, state, prefix=f"{TEACHER_KEY}.")
    missing, unexpected = teacher.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("output.")]:
        raise ConfigError(f"{TEACHER_KEY}.model", f"the teacher's checkpoint does not fit it: "
                          f"missing {missing}, unexpected {unexpected}.",
                          "make it the architecture that distillation.teacher.checkpointer "
                          "points at.")
    teacher.requires_grad_(False)
    teacher.eval()
    fingerprint = {"weights": weights_fingerprint(state),
                   "checkpoint_dir": str(teacher_cfg.checkpointer.get("checkpoint_dir", ""))}
    return teacher, fingerprint


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A hash of a state dict's names, shapes, dtypes and up to ``FINGERPRINT_SAMPLES`` evenly
    spaced elements of every tensor: exact and cheap, and unchanged when the files move."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        flat = tensor.reshape(-1)
        sample = flat[::max(1, flat.numel() // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES]
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def vocab_size_of(model: nn.Module) -> int:
    """How many words a torchtune decoder's logits cover (its output projection's rows)."""
    output = getattr(model, "output", None)
    if isinstance(output, nn.Linear):
        return int(output.out_features)
    return int(model.tok_embeddings.num_embeddings)


def _instantiate(teacher_cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """:func:`instantiate_component` for a block of ``distillation.teacher``, naming the full
    key in its errors."""
    with _teacher_keys():
        return instantiate_component(teacher_cfg, key, **kwargs)


@contextmanager
def _teacher_keys() -> Iterator[None]:
    """Re-raise a ConfigError of a check run on the ``distillation.teacher`` block itself under
    the key the user wrote (``checkpointer.checkpoint_dir`` becomes
    ``distillation.teacher.checkpointer.checkpoint_dir``), its problem and fix kept."""
    try:
        yield
    except ConfigError as err:
        problem = str(err).split("`: ", 1)[-1]
        raise ConfigError(f"{TEACHER_KEY}.{err.key}", problem) from err


def _whole(weight: torch.Tensor) -> torch.Tensor:
    """A full copy of an FSDP2 parameter: gathered from the shards, or copied when FSDP has it
    unsharded right now (that storage is freed when FSDP reshards, so it is not kept)."""
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        return weight.full_tensor()
    return weight.detach().clone()


def _rng_untouched(device: torch.device) -> Any:
    """A context in which the teacher's random initialization (overwritten by its checkpoint)
    draws from a copy of the global RNG state."""
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _number(block: DictConfig, key: str, default: float) -> float:
    """``distillation.<key>`` as a float, through :func:`config_value`: a typo or a boolean
    (``kd_ratio: true``, which ``float()`` would read as 1.0) stops the run, naming the key."""
    return float(config_value(block.get(key, default), f"{CONFIG_KEY}.{key}", float))
