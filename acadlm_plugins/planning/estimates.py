"""The pieces every planner shares: the run's dtype and its memory estimate."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import training

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.planning.memory import (
    FLOAT32_BYTES,
    PLUGIN_STATE_COPIES,
    ActivationShape,
    MemoryEstimate,
    activation_bytes,
    distillation_loss_bytes,
    optimizer_state,
    parameter_bytes,
    rope_table_bytes,
)
from acadlm_plugins.planning.results import TrainingPlan
from acadlm_plugins.training.runtime import mixed_precision_dtype

NOT_CHECKED = ("weight files (checkpointer.checkpoint_files)", "data files and the tokenizer",
               "the device and float8 support", "output_dir and log_dir being writable")


def run_dtype(cfg: DictConfig, plan: TrainingPlan) -> torch.dtype:
    """``cfg.dtype`` as torch parses it for the recipe (recorded on ``plan``)."""
    name = str(cfg.get("dtype", "fp32") or "fp32")
    try:
        dtype = training.get_dtype(name, device=torch.device("cpu"))
    except ValueError as err:
        raise ConfigError("dtype", str(err), "use bf16, fp32 or fp16.") from err
    plan.dtype = str(dtype).removeprefix("torch.")
    return dtype


def memory_estimate(cfg: DictConfig, plan: TrainingPlan, model: nn.Module, dtype: torch.dtype,
                    *, tokens: int, logit_positions: int, checkpointing: bool,
                    teacher: nn.Module | None = None, pruning_numel: int = 0,
                    trains: bool = True,
                    logit_bytes_per_value: int | None = None,
                    offloaded: bool = False, kd_positions: int = 0,
                    attention_mask: tuple[int, int] = (0, 0),
                    root_gathered: int = 0) -> MemoryEstimate:
    """The estimate of :mod:`acadlm_plugins.planning.memory` for this run, per GPU
    (``trains=False``: no gradients and no optimizer state). ``kd_positions``: the positions
    the KD loss counts at most (with a ``teacher``); ``attention_mask``: the dense mask's
    bytes with and without activation checkpointing; ``root_gathered``: bytes of weights kept
    gathered from the forward to the backward pass beyond their shard."""
    world = plan.world_size
    size = torch.finfo(dtype).bits // 8  # the math's: activations, the teacher
    # `mixed_precision: true`: weights, gradients and AdamW's moments in fp32 (the recipe's check)
    mixed = mixed_precision_dtype(cfg, dtype) is not None and trains
    held = FLOAT32_BYTES if mixed else size
    params = [p for p in model.parameters() if p.requires_grad] if trains else []
    state = optimizer_state(params, cfg.get("optimizer", None), world_size=world,
                            bytes_per_value=held)
    shape = ActivationShape(tokens=tokens, logit_positions=logit_positions,
                            architecture=plan.source.architecture, bytes_per_value=size,
                            logit_bytes_per_value=logit_bytes_per_value, offloaded=offloaded,
                            autocast=mixed and world == 1,
                            # only a rater computes no logits (n = 0): it has no projection
                            vocab_projection=logit_positions > 0)
    kd_loss, gathered = (0, 0) if teacher is None else distillation_bytes(
        teacher, tokens=tokens, counted_positions=kd_positions, world_size=world,
        bytes_per_value=size)
    return MemoryEstimate(
        world_size=world, fsdp=world > 1, dtype=plan.dtype or "float32",
        optimizer=state.description if trains else "none (no training step)",
        weights=parameter_bytes(model.parameters(), world_size=world, bytes_per_value=held),
        gradients=parameter_bytes(params, world_size=world, bytes_per_value=held),
        weights_dtype="float32" if mixed else "",
        optimizer_state=state.bytes,
        pruning_state=pruning_numel * FLOAT32_BYTES * PLUGIN_STATE_COPIES,
        teacher_weights=0 if teacher is None else parameter_bytes(
            teacher.parameters(), world_size=world, bytes_per_value=size),
        buffers=rope_table_bytes(model) + (0 if teacher is None else rope_table_bytes(teacher)),
        activations_checkpointed=activation_bytes(shape, checkpointed=True),
        activations_full=activation_bytes(shape, checkpointed=False),
        activation_checkpointing=checkpointing,
        distillation_loss=kd_loss, teacher_gathered_weight=gathered,
        attention_mask_checkpointed=attention_mask[0], attention_mask_full=attention_mask[1],
        root_gathered=root_gathered)


def distillation_bytes(teacher: nn.Module, *, tokens: int, counted_positions: int,
                       world_size: int, bytes_per_value: int) -> tuple[int, int]:
    """What a distillation teacher adds per micro-batch of ``tokens`` tokens on a rank (see
    :mod:`acadlm_plugins.planning.memory`): the KD loss's saved tensors, and the output
    projection that ``DistillationPlugin.teacher_outputs`` gathers whole under FSDP2 (on one
    rank the loss saves the parameter itself). A head that is no plain projection hands the
    loss its float32 logits over all ``tokens`` positions instead, and nothing is gathered."""
    from acadlm_plugins.plugins.distillation import vocab_size_of
    from acadlm_plugins.training.distillation_loss import output_projection_weight

    weight = output_projection_weight(teacher)
    if weight is None:
        teacher_saved, gathered = tokens * vocab_size_of(teacher) * FLOAT32_BYTES, 0
    else:
        vocab, dim = weight.shape
        teacher_saved = counted_positions * dim * bytes_per_value
        gathered = vocab * dim * bytes_per_value if world_size > 1 else 0
    return distillation_loss_bytes(counted_positions=counted_positions,
                                   teacher_saved=teacher_saved), gathered
