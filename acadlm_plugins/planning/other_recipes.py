"""Planning the rater, torchtune's stock SFT recipe and QuRating's selection.

* ``rater``: the backbone is built from ``backbone_dir``'s config.json at ``max_tokens + 1``
  positions with one head per criterion; a step trains ``batch x world x accumulation`` pairs of
  two excerpts each.
* ``sft`` (``full_finetune_distributed``): the stock recipe checks no keys, so only the
  components, the family layer, the lengths and the schedule are checked; steps are ``epochs x
  max_steps_per_epoch`` when that is set (the data decide otherwise).
* ``select`` trains nothing: its settings and budget are checked as the tool checks them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.planning import checks
from acadlm_plugins.planning.estimates import NOT_CHECKED, memory_estimate, run_dtype
from acadlm_plugins.planning.model_shape import build_on_meta, summarize
from acadlm_plugins.planning.results import TokenBudget, TrainingPlan
from acadlm_plugins.training.components import instantiate_component
from acadlm_plugins.training.linear_cross_entropy import (
    LinearCrossEntropyLoss,
    check_pairing,
    projection_key,
    root_parameter_count,
    sharded_alone_error,
)
from acadlm_plugins.training.run_checks import (
    STEP_INTERVAL_DEFAULTS,
    check_model_family,
    positive_int,
    step_interval,
)

CHUNKED_LOSS = "CEWithChunkedOutputLoss"


def plan_rater(plan: TrainingPlan, cfg: DictConfig) -> None:
    """QuRating stage 2: a decoder backbone plus one scalar head per criterion, on pairs."""
    from acadlm_plugins.qurating import CRITERIA
    from acadlm_plugins.qurating.rater import RaterModel, backbone_spec, check_pooling
    from acadlm_plugins.rater_recipe import criteria_names, export_setting

    checks.check_keys(cfg, "rater", None)
    plan.checked.append("known and required keys")
    steps = positive_int(cfg, "max_steps")
    batch = positive_int(cfg, "batch_size")
    accumulation = positive_int(cfg, "gradient_accumulation_steps", 1)
    max_tokens = positive_int(cfg, "max_tokens", 512)
    for key in STEP_INTERVAL_DEFAULTS:
        step_interval(cfg, key, steps)
    pooling = str(cfg.get("pooling", "last"))
    check_pooling(pooling)
    export_setting(cfg)
    backbone_dir = Path(str(cfg.backbone_dir)).expanduser()
    spec = backbone_spec(backbone_dir)  # any supported family, as the rater recipe builds it
    plan.checked += ["backbone config.json (family)",
                     "components: " + ", ".join(checks.check_components(cfg))]
    dtype = run_dtype(cfg, plan)
    criteria = criteria_names(cfg.get("criteria", None)) or list(CRITERIA)
    if not cfg.get("criteria", None):
        plan.notes.append(f"criteria: null trains every criterion in the judgments; counted "
                          f"here as QuRating's {len(CRITERIA)}.")
    model = build_on_meta(lambda: RaterModel(spec.build(max_seq_len=max_tokens + 1), criteria,
                                             pooling), dtype)
    plan.source = summarize(model)
    checks.check_optimizer(cfg, list(model.parameters()), world_size=plan.world_size)
    if checks.check_schedule(cfg, steps):
        plan.checked.append(f"lr_scheduler for {steps} steps")
    length = max_tokens + 1
    per_step = 2 * length * batch * accumulation * plan.world_size
    plan.budget = TokenBudget(length, batch, accumulation, plan.world_size, 2, per_step, steps,
                              "max_steps", steps * per_step, exact=False)
    plan.notes.append(f"a step trains {batch * accumulation * plan.world_size} pairs; tokens "
                      f"are an upper bound (excerpts shorter than {max_tokens} tokens + BOS are "
                      "padded to the longest in the batch). Epochs = max_steps x pairs per "
                      "step / confident training pairs (the recipe logs that count).")
    # No activation checkpointing in the rater, and no vocabulary projection (heads only).
    plan.memory = memory_estimate(cfg, plan, model, dtype, tokens=2 * batch * length,
                                  logit_positions=0, checkpointing=False)
    plan.not_checked = list(NOT_CHECKED)


def plan_sft(plan: TrainingPlan, cfg: DictConfig) -> None:
    """torchtune's full_finetune recipes: epochs of (at most) max_steps_per_epoch steps."""
    plan.checked.append("components: " + ", ".join(checks.check_components(cfg)))
    check_model_family(cfg)
    plan.checked.append("model family and checkpointer.model_type")
    plan.notes.append("torchtune's stock recipe checks no keys: components, the model family, "
                      "the lengths and the schedule are checked here.")
    batch = positive_int(cfg, "batch_size")
    accumulation = positive_int(cfg, "gradient_accumulation_steps", 1)
    epochs = positive_int(cfg, "epochs", 1)
    dtype = run_dtype(cfg, plan)
    model = build_on_meta(lambda: instantiate_component(cfg, "model"), dtype)
    plan.source = summarize(model)
    checks.check_optimizer(cfg, list(model.parameters()), world_size=plan.world_size)
    length = int((cfg.get("tokenizer", None) or {}).get("max_seq_len", None)
                 or plan.source.max_seq_len)
    if plan.source.max_seq_len is not None and length > plan.source.max_seq_len:
        raise ConfigError("tokenizer.max_seq_len", f"is {length}, above the model's "
                          f"{plan.source.max_seq_len} positions: the first long sample would "
                          "fail in the model's forward pass.", "build the model for at least "
                          "that length (`model.max_seq_len`), or shorten the samples.")
    packed = bool((cfg.get("dataset", None) or {}).get("packed", False))
    per_epoch = cfg.get("max_steps_per_epoch", None)
    steps = None if per_epoch is None else epochs * int(per_epoch)
    steps_from = ("epochs x max_steps_per_epoch (if the data fill them)" if steps
                  else "the data (an epoch is the dataset over the samples per step)")
    # torchtune's distributed recipe: data parallel over world_size // tensor_parallel_dim
    tensor_parallel = int(cfg.get("tensor_parallel_dim", 1) or 1)
    data_parallel = max(1, plan.world_size // tensor_parallel)
    if tensor_parallel > 1:
        plan.notes.append(f"tensor_parallel_dim {tensor_parallel}: {data_parallel} data-parallel "
                          "replicas; the memory lines count FSDP sharding over every GPU, not "
                          "the tensor-parallel split.")
    if cfg.get("fsdp_cpu_offload", False):
        plan.notes.append("fsdp_cpu_offload: the sharded weights, gradients and optimizer state "
                          "live in CPU memory; their GPU lines below are an upper bound.")
    per_step = length * batch * accumulation * data_parallel
    if steps is not None and checks.check_schedule(cfg, steps):
        plan.checked.append(f"lr_scheduler for {steps} steps")
    plan.budget = TokenBudget(length, batch, accumulation, data_parallel, 1, per_step, steps,
                              steps_from, None if steps is None else steps * per_step,
                              exact=packed)
    if not packed:
        plan.notes.append("dataset.packed is false: tokens per step are an upper bound "
                          "(tokenizer.max_seq_len per conversation).")
    loss = str((cfg.get("loss", None) or {}).get("_component_", ""))
    offloaded = bool(cfg.get("enable_activation_offloading", False))
    if offloaded:
        plan.notes.append("enable_activation_offloading: the checkpointed layer inputs live in "
                          "CPU memory, not counted on the GPU.")
    if cfg.get("optimizer_in_bwd", False):
        plan.notes.append("optimizer_in_bwd: gradients are freed layer by layer; the gradient "
                          "line is an upper bound.")
    tokens = batch * length
    project_in_loss = bool((cfg.get("model", None) or {}).get("project_in_loss", False))
    check_pairing(project_in_loss, loss)
    logit_positions, root_gathered = tokens, 0
    if project_in_loss:
        # LinearCrossEntropyLoss: one chunk of positions projected at a time, in the backward
        # pass too; under FSDP2 the root's weights stay gathered until the backward pass.
        chunk = LinearCrossEntropyLoss(
            chunk_tokens=(cfg.get("loss", None) or {}).get("chunk_tokens", 2048)).chunk_tokens
        logit_positions = batch * min(chunk, length)
        sharded_alone = {str(name) for name in (cfg.get("custom_sharded_layers", None) or [])}
        if plan.world_size > 1 and projection_key(model) in sharded_alone:
            raise sharded_alone_error(projection_key(model))
        if plan.world_size > 1:
            root = root_parameter_count(model) * (torch.finfo(dtype).bits // 8)
            root_gathered = root - root // plan.world_size
        plan.notes.append(f"loss: {loss.rsplit('.', 1)[-1]} projects {logit_positions:,} "
                          "positions onto the vocabulary at a time (model.project_in_loss).")
    plan.memory = memory_estimate(
        cfg, plan, model, dtype, tokens=tokens, logit_positions=logit_positions,
        checkpointing=bool(cfg.get("enable_activation_checkpointing", False)),
        # torchtune's chunked loss keeps the chunks and their float32 log-softmax, no copy
        logit_bytes_per_value=(torch.finfo(dtype).bits // 8 + 4
                               if loss.endswith(CHUNKED_LOSS) else None),
        offloaded=offloaded, root_gathered=root_gathered)
    plan.not_checked = list(NOT_CHECKED)


def plan_selection(plan: TrainingPlan, cfg: DictConfig) -> None:
    """QuRating stage 4 trains nothing: its settings and budget, checked as
    ``acadlm-qurating-select`` checks them before it reads the shards."""
    from acadlm_plugins.qurating.selection import NOISE_KEYS, SelectionConfig, parse_tau

    config = SelectionConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))
    tau = parse_tau(config.tau, bool(config.top_k))
    if config.noise_key not in NOISE_KEYS:
        raise ConfigError("noise_key", f"unknown value {config.noise_key!r}.",
                          f"use one of {list(NOISE_KEYS)}.")
    if (config.budget_tokens is None) == (config.budget_fraction is None):
        raise ConfigError("budget_tokens", "give exactly one of `budget_tokens` and "
                          "`budget_fraction`.", "e.g. `budget_tokens: 1000000`.")
    if config.budget_tokens is not None and int(config.budget_tokens) < 1:
        raise ConfigError("budget_tokens", f"must be >= 1, got {config.budget_tokens}.")
    if config.budget_fraction is not None and not 0 < float(config.budget_fraction) <= 1:
        raise ConfigError("budget_fraction", f"must be in (0, 1], got "
                          f"{config.budget_fraction}.")
    mode = "top_k" if config.top_k else ("uniform" if math.isinf(tau) else "sample")
    plan.selection = {"mode": mode, "tau": None if config.top_k else tau,
                      "criteria": dict(config.criteria), "budget_tokens": config.budget_tokens,
                      "budget_fraction": config.budget_fraction, "seed": config.seed,
                      "scores_dir": config.scores_dir, "output_dir": config.output_dir,
                      "uniform_output_dir": config.uniform_output_dir}
    plan.checked.append("selection keys, tau, budget")
    plan.not_checked = [("the annotation shards (criteria columns, corpus size against the "
                         "budget)")]
