"""Planning the recipes built on the continued pre-training loop: ``prune``,
``continued_pretrain`` and ``long_context``.

The order follows the recipes': the long-context stage is read first (its θ, length and token
budget), then the step counts, the plugins' ``acadlm_configure`` checks, the known keys, the
family layer; the model (and a distillation teacher) is built on the meta device and checked
as the recipe checks it (sequence lengths, heads against the sequence-parallel degree, the
pruning target); steps come from ``max_steps`` or, for a stage without it, from
``long_context.token_budget`` through the recipe's own ``steps_for_budget``.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from acadlm_plugins._compat import component_from_path
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.planning import checks
from acadlm_plugins.planning.estimates import NOT_CHECKED, memory_estimate, run_dtype
from acadlm_plugins.planning.memory import (
    FLOAT32_BYTES,
    ActivationShape,
    activation_bytes,
    dense_mask_bytes,
)
from acadlm_plugins.planning.model_shape import build_on_meta, pruning_state_numel, summarize
from acadlm_plugins.planning.results import TokenBudget, TrainingPlan
from acadlm_plugins.pruning.architecture import resolve_target
from acadlm_plugins.training.components import instantiate_component
from acadlm_plugins.training.config_checks import checked_seed
from acadlm_plugins.training.run_checks import (
    STEP_INTERVAL_DEFAULTS,
    check_model_family,
    check_model_returns_logits,
    check_model_rope,
    check_output_outside_checkpoint,
    positive_int,
    step_interval,
)
from acadlm_plugins.training.runtime import mixed_precision_dtype

PRUNING_PLUGIN = "acadlm_plugins.plugins.pruning:PruningPlugin"
DISTILLATION_PLUGIN = "acadlm_plugins.plugins.distillation:DistillationPlugin"
TORCHAO_PLUGIN = "acadlm_plugins.plugins.torchao:TorchaoPlugin"
DYNAMIC_BATCH_LOADING_PLUGIN = (
    "acadlm_plugins.plugins.dynamic_batch_loading:DynamicBatchLoadingPlugin")


def plan_loop_recipe(plan: TrainingPlan, cfg: DictConfig) -> None:
    """Fill ``plan`` for a prune, continued_pretrain or long_context config."""
    from acadlm_plugins.continued_pretrain_recipe import ContinuedPretrainRecipe

    world = plan.world_size
    stage, sp_degree = _long_context_stage(cfg, world) if plan.recipe == "long_context" else (
        None, 1)
    if stage is not None:
        plan.checked.append("long_context block (lengths, θ, budget) and sequence_parallel")
    # Read before the plugins: dynamic batch loading fills in an unset evaluation interval.
    eval_given = cfg.get("eval_every_n_steps", None) is not None
    # the recipe's precision check, before the plugin checks set a float8 recipe aside
    mixed_precision_dtype(cfg, run_dtype(cfg, plan))
    pm, checked = check_loop_settings(cfg, plan.recipe, needs_max_steps=stage is None)
    plan.checked += checked
    batch = positive_int(cfg, "batch_size")
    accumulation = positive_int(cfg, "gradient_accumulation_steps", 1)
    dtype = run_dtype(cfg, plan)

    extra: dict[str, Any] = {}
    if stage is not None:
        extra = {"rope_base": stage.rope_base,
                 "max_seq_len": max(stage.max_seq_len, stage.source_max_positions)}
    model = build_on_meta(lambda: instantiate_component(cfg, "model", **extra), dtype)
    check_model_rope(cfg, model, rope_base=None if stage is None else stage.rope_base)
    check_model_returns_logits(model)
    plan.checked.append("the model's RoPE against the checkpoint's config.json")
    plan.source = summarize(model)
    # The recipe's own length check, on the meta model (it reads only `_model` and `_cfg`).
    ContinuedPretrainRecipe._check_sequence_length(SimpleNamespace(_model=model, _cfg=cfg))
    if stage is not None:
        from acadlm_plugins.long_context_recipe import check_sequence_parallel_lengths
        from acadlm_plugins.training.sequence_parallel import check_sequence_parallel

        check_sequence_parallel(model, sp_degree)
        check_sequence_parallel_lengths(cfg, stage, sp_degree)

    torchao = pm.get_plugin(TORCHAO_PLUGIN)
    if torchao is not None and torchao.scheme == "int4_weight_only":
        torchao.check_int4_export(model, cfg)  # the shapes are all it reads
        plan.checked.append("int4 group size against the exported model's linear widths")
    pruning = _enabled(pm, PRUNING_PLUGIN)
    pruning_numel = _plan_pruning(plan, pruning) if pruning is not None else 0
    teacher = _teacher(cfg, pm, model, dtype)
    if teacher is not None:
        plan.teacher = summarize(teacher)
        plan.checked.append("distillation teacher (built on meta, vocabulary)")
    checks.check_optimizer(cfg, [p for p in model.parameters() if p.requires_grad],
                           world_size=world)

    data_parallel = world // sp_degree
    length = stage.max_seq_len if stage is not None else _pack_length(cfg)
    per_step = length * batch * accumulation * data_parallel
    if stage is not None and cfg.get("max_steps", None) is None:
        from acadlm_plugins.long_context_recipe import steps_for_budget

        steps = steps_for_budget(stage, batch_size=batch, grad_accum=accumulation,
                                 data_parallel=data_parallel)
        steps_from = "long_context.token_budget / tokens per step, rounded up"
    else:
        steps, steps_from = int(cfg.max_steps), "max_steps"
    one_shot = pruning is not None and not pruning.trains_masks
    if one_shot:
        _note_one_shot(plan, pruning, length, str(cfg.get("device", "cpu") or "cpu"))
        steps, steps_from = 0, "pruning.method: importance (no training)"
    else:
        _note_evaluations(plan, cfg, pm, steps, eval_given=eval_given,
                          materializes=pruning is not None)
    if checks.check_schedule(cfg, steps):
        plan.checked.append(f"lr_scheduler for {steps} steps")
    plan.budget = TokenBudget(length, batch, accumulation, data_parallel, 1, per_step, steps,
                              steps_from, steps * per_step, exact=True)

    tokens = 0 if one_shot else batch * length // sp_degree
    chunk = stage.chunked_loss_tokens if stage is not None else 0
    logit_positions = batch * min(chunk, length // sp_degree) if chunk and tokens else tokens
    checkpointing = bool(cfg.get("enable_activation_checkpointing", False))
    attention_mask = (0, 0)
    if stage is not None and stage.attention == "mask":
        attention_mask = _dense_mask(plan, batch=batch, length=length, accumulation=accumulation,
                                     dtype=dtype)
    # Distillation runs only in the continued pre-training loop (no sequence parallelism): the
    # KD loss counts every position whose next-token label exists, at most.
    kd_positions = batch * (length - 1) if teacher is not None and tokens else 0
    plan.memory = memory_estimate(
        cfg, plan, model, dtype, tokens=tokens, logit_positions=logit_positions,
        checkpointing=checkpointing, teacher=teacher, pruning_numel=pruning_numel,
        trains=not one_shot, kd_positions=kd_positions, attention_mask=attention_mask)
    if one_shot:
        # No backward pass: the activations are those of one calibration batch's forward.
        forward = _calibration_forward_bytes(plan, pruning, length, dtype)
        plan.memory = replace(plan.memory, activations_checkpointed=forward,
                              activations_full=forward)
    plan.not_checked = list(NOT_CHECKED)


def check_loop_settings(cfg: DictConfig, recipe: str, *, needs_max_steps: bool = True
                        ) -> tuple[Any, list[str]]:
    """The refusals a loop recipe makes from its config alone, in the recipe's order: batch,
    accumulation and ``max_steps`` (unless ``needs_max_steps`` is False: a long-context stage
    may derive it from its budget), the plugins' ``acadlm_configure`` checks, the known and
    required keys, the step intervals (after the plugins, as the recipe reads them: dynamic
    batch loading sets the evaluation interval), the ``validation:`` block, every component's
    import path and arguments, and the family of an HF checkpoint folder that exists. No model
    is built and no weight or data file read, so a pipeline can check every stage's config
    before the first stage runs (recipes/sheared_llama/pipeline.py). Returns the plugin
    manager and what was checked, for the plan."""
    from acadlm_plugins.continued_pretrain_recipe import validation_settings

    checked_seed(cfg.get("seed", 0))
    batch = positive_int(cfg, "batch_size")
    positive_int(cfg, "gradient_accumulation_steps", 1)
    if needs_max_steps or cfg.get("max_steps", None) is not None:
        positive_int(cfg, "max_steps")
    pm = checks.configure_plugins(cfg, recipe)
    checks.check_keys(cfg, recipe, pm)
    # A long-context stage that derives max_steps from its budget reads them at 1 here.
    steps = int(cfg.get("max_steps", None) or 1)
    for key in STEP_INTERVAL_DEFAULTS:
        step_interval(cfg, key, steps)
    # The recipe's own check of the `validation:` block, made where its setup makes it.
    validation_settings(cfg, default_batch_size=batch, recipe=recipe)
    components = checks.check_components(cfg)
    check_model_family(cfg)
    check_output_outside_checkpoint(cfg)
    return pm, ["plugin blocks (acadlm_configure)", "known and required keys",
                "step intervals (" + ", ".join(STEP_INTERVAL_DEFAULTS) + ")",
                "validation block", "components: " + ", ".join(components),
                "model family and checkpointer.model_type"]


def evaluation_count(steps: int, interval: int) -> int:
    """Evaluations a fresh run of ``steps`` steps makes: at step 0, after every ``interval``-th
    step, and after the last one if that is not such a step (``runtime.is_due``)."""
    return 1 + steps // interval + (1 if steps % interval else 0)


def _note_evaluations(plan: TrainingPlan, cfg: DictConfig, pm: Any, steps: int, *,
                      eval_given: bool, materializes: bool) -> None:
    """Say how often the run evaluates and how many evaluations that makes (each is a pass
    over the validation packs), and when dynamic batch loading would never change the domain
    weights a step trains on (an update interval at or above the number of steps)."""
    interval = step_interval(cfg, "eval_every_n_steps", steps)
    loading = _enabled(pm, DYNAMIC_BATCH_LOADING_PLUGIN)
    if eval_given:
        source = "eval_every_n_steps"
    elif loading is not None:
        source = "eval_every_n_steps unset: dynamic_batch_loading.update_interval"
    else:
        source = "eval_every_n_steps unset: max_steps"
    after = (" and 2 after training (the masked and the materialized model)"
             if materializes else "")
    plan.notes.append(
        f"evaluation every {interval:,} steps ({source}): {evaluation_count(steps, interval):,} "
        f"evaluations of the validation packs in {steps:,} steps (at step 0, at every multiple "
        f"of {interval:,} and at the last step){after}.")
    if loading is None or (steps - 1) // loading.update_interval > 0:
        return
    when = ("no domain-weight update ever happens" if loading.update_interval > steps
            else "the only domain-weight update comes after the last step")
    plan.notes.append(
        f"dynamic_batch_loading.update_interval is {loading.update_interval:,} and the run has "
        f"{steps:,} steps: {when}, so every step trains on dataset.weights as given and dynamic "
        "batch loading changes nothing. Set update_interval below the number of steps "
        "(Sheared-LLaMA: 50 in 3,200 pruning steps), or disable it.")


def _long_context_stage(cfg: DictConfig, world: int) -> tuple[Any, int]:
    """The stage block and the sequence-parallel degree, read by the recipe's own functions
    (the source config.json is the only file they open)."""
    from acadlm_plugins.long_context_recipe import (
        read_stage,
        sequence_parallel_degree,
        source_model_config,
    )

    stage = read_stage(cfg, source_model_config(cfg))
    degree = sequence_parallel_degree(cfg, distributed=world > 1, world_size=world)
    if cfg.get("max_steps", None) is None and stage.token_budget is None:
        raise ConfigError("long_context.token_budget", "is needed when max_steps is not set.",
                          "give a token budget (or max_steps).")
    return stage, degree


def _pack_length(cfg: DictConfig) -> int:
    """``dataset.max_seq_len``, or the dataset builder's default when the config leaves it
    out (as ``config.instantiate`` would fill it in)."""
    value = cfg.dataset.get("max_seq_len", None)
    if value is None:
        builder = component_from_path(str(cfg.dataset._component_))
        parameter = inspect.signature(builder).parameters.get("max_seq_len")
        value = None if parameter is None else parameter.default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError("dataset.max_seq_len", f"is {value!r}; the packs need a length.",
                          "set dataset.max_seq_len to the pack length in tokens.")
    return value


def _dense_mask(plan: TrainingPlan, *, batch: int, length: int, accumulation: int,
                dtype: torch.dtype) -> tuple[int, int]:
    """``long_context.attention: mask``: the dense mask's bytes with and without activation
    checkpointing (``memory.dense_mask_bytes``), counted for a run on a device without
    FlexAttention. torchtune uses FlexAttention on every CUDA GPU of compute capability 7.5
    and above (``_SUPPORTS_FLEX_ATTENTION``), where the mask is a ``BlockMask``: for a CUDA run
    the note gives the figure an older GPU would add, and nothing is counted."""
    size = torch.finfo(dtype).bits // 8
    layers = plan.source.architecture.num_layers
    checkpointed, full = (
        dense_mask_bytes(batch=batch, seq_len=length, micro_batches=accumulation,
                         num_layers=layers, bytes_per_value=size, checkpointed=flag)
        for flag in (True, False))
    square = batch * length * length
    detail = (f"the boolean [b, S, S] mask of each of the step's {accumulation} micro-batches "
              f"({accumulation} x {square / 2**30:.2f} GiB, all on the device before the first "
              f"forward) and the additive copy of it that SDPA saves in every layer ({layers} x "
              f"{square * size / 2**30:.2f} GiB; with activation checkpointing one, the "
              f"recomputed layer's): {checkpointed / 2**30:.2f} GiB checkpointed, "
              f"{full / 2**30:.2f} GiB not")
    if torch.device(plan.device).type == "cuda":
        plan.notes.append(
            "long_context.attention: mask: on a GPU of compute capability 7.5 or above torchtune "
            "uses FlexAttention and the mask is a BlockMask, not counted; on an older GPU it "
            f"builds dense masks, which the total above leaves out: {detail}.")
        return 0, 0
    plan.notes.append(f"long_context.attention: mask on {plan.device} (no FlexAttention): the "
                      f"activations count the dense masks: {detail}.")
    return checkpointed, full


def _enabled(pm: Any, name: str) -> Any | None:
    plugin = pm.get_plugin(name)
    return plugin if plugin is not None and getattr(plugin, "enabled", False) else None


def _plan_pruning(plan: TrainingPlan, pruning: Any) -> int:
    """The target shape, refused as the pruning plugin refuses it; the number of values its
    own optimizers train (0 for one-shot importance pruning)."""
    plan.target = resolve_target(plan.source.architecture, pruning.target_spec,
                                 field="pruning.target")
    if plan.target == plan.source.architecture:
        raise ConfigError("pruning.target", "equals the source architecture: there is "
                          "nothing to prune.", "make at least one dimension smaller.")
    plan.checked.append("pruning target against the source shape")
    if not pruning.trains_masks:
        return 0
    plan.notes.append("the prune recipe materializes the pruned model on rank 0 in float32 "
                      f"CPU memory ({plan.source.total_params * 4 / 2**30:.1f} GiB for the "
                      "source copy) after training.")
    return pruning_state_numel(plan.source.architecture, plan.target,
                               droprate_init=pruning.droprate_init, seed=pruning.seed)


def _note_one_shot(plan: TrainingPlan, pruning: Any, length: int, device: str) -> None:
    """What ``PruneRecipe.one_shot_prune_and_export`` does instead of training: every rank
    scores importance on its own (sharded) model on the run's device, over all the calibration
    packs (the same on every rank); only the slicing, on a float32 copy of the gathered state,
    happens on rank 0's CPU, and rank 0 then measures both models' validation loss on its
    device, one model at a time."""
    total = plan.source.total_params
    calibration = pruning.calibration_sequences * length
    flops = 2 * total * calibration
    float32_gib = total * 4 / 2**30
    plan.notes.append(
        "pruning.method: importance trains nothing (max_steps is not used): every rank scores "
        f"importance on the run's own model on its device ({device}, {plan.dtype}, sums in "
        f"float64) over {pruning.calibration_sequences} calibration sequences in batches of "
        f"{pruning.calibration_batch_size} ({calibration:,} tokens, forward passes only, about "
        f"{flops:.1e} FLOPs on each rank); then rank 0 gathers the full state to its CPU, "
        f"rebuilds the model in float32 there ({float32_gib:.1f} GiB) and slices it, and "
        "measures the validation loss of the source and of the pruned model on its device, "
        f"one at a time in float32 (up to {float32_gib:.1f} GiB there beside its shard, not "
        "in the estimate above), then exports. The activations above are one calibration "
        "batch's forward pass without gradients (one layer's working set and the logits).")


def _calibration_forward_bytes(plan: TrainingPlan, pruning: Any, length: int,
                               dtype: torch.dtype) -> int:
    """Activation bytes of one importance forward pass on a rank (no gradients, so nothing is
    saved across layers): one layer's working set and the logits, which torchtune returns in
    the run's dtype and again in float32, for ``calibration.batch_size`` packs."""
    size = torch.finfo(dtype).bits // 8
    tokens = min(pruning.calibration_batch_size, pruning.calibration_sequences) * length
    shape = ActivationShape(tokens=tokens, logit_positions=tokens,
                            architecture=plan.source.architecture, bytes_per_value=size,
                            logit_bytes_per_value=size + FLOAT32_BYTES, offloaded=True)
    return activation_bytes(shape, checkpointed=True)


def _teacher(cfg: DictConfig, pm: Any, student: nn.Module, dtype: torch.dtype
             ) -> nn.Module | None:
    """The distillation teacher on the meta device, refused as the plugin refuses it when its
    checkpoint's family, checkpointer model_type or RoPE is not what it builds, or its
    vocabulary is not the student's."""
    if _enabled(pm, DISTILLATION_PLUGIN) is None:
        return None
    from acadlm_plugins.plugins.distillation import TEACHER_KEY, vocab_size_of

    teacher_cfg = cfg.distillation.teacher
    check_model_family(teacher_cfg, prefix=f"{TEACHER_KEY}.")
    try:
        teacher = build_on_meta(lambda: instantiate_component(teacher_cfg, "model"), dtype)
    except ConfigError as err:
        problem = str(err).split("`: ", 1)[-1]
        raise ConfigError(f"{TEACHER_KEY}.{err.key}", problem) from err
    check_model_rope(teacher_cfg, teacher, prefix=f"{TEACHER_KEY}.")
    check_model_returns_logits(teacher, prefix=f"{TEACHER_KEY}.")
    if vocab_size_of(teacher) != vocab_size_of(student):
        raise ConfigError(f"{TEACHER_KEY}.model", f"has a vocabulary of {vocab_size_of(teacher)}"
                          f" words, the student {vocab_size_of(student)}; the KL compares the "
                          "two distributions word by word.",
                          "distil from a teacher that shares the student's tokenizer.")
    return teacher
