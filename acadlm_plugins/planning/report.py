"""A :class:`~acadlm_plugins.planning.plan.TrainingPlan` as a table for people and as JSON for
scripts."""

from __future__ import annotations

import json

from acadlm_plugins.planning.model_shape import target_counts
from acadlm_plugins.planning.results import TrainingPlan
from acadlm_plugins.pruning.architecture import Architecture

GIB = 2**30
ACTIVATION_FORMULA = (
    "activations per micro-batch of t tokens on a rank: norm = h x (bytes + 8) + 4; per layer "
    "t x [2 x norm + (4·H·d + 4·I) x bytes + 4·H]; head t x norm; logits n x V x (bytes + 8); "
    "checkpointed: L x t x h x bytes + one layer + head + logits, else L x per layer + head + "
    "logits; plus, where the run has them, the KD loss's saved p x (D_t x bytes + 16) and the "
    "teacher's gathered V x D_t output weight, and the dense attention masks (an estimate: no "
    "kernel workspaces, FSDP buffers, CUDA context or fragmentation; see docs/planning.md)")


def plan_json(plan: TrainingPlan) -> str:
    """The plan as indented JSON (``acadlm-plan --json``)."""
    return json.dumps(plan.to_dict(), indent=2, default=str, ensure_ascii=False)


def format_plan(plan: TrainingPlan) -> str:
    """The plan as a readable table."""
    lines = [f"=== acadlm-plan: {plan.config} ===",
             f"recipe       {plan.recipe}   (from {plan.recipe_from})",
             f"processes    {plan.world_size}   (from {plan.world_size_from})"]
    if plan.dtype:
        lines.append(f"device       {plan.device}, {plan.dtype}")
    if plan.source is not None:
        lines += ["", *_shape_table(plan)]
    if plan.budget is not None:
        lines += ["", *_budget_lines(plan)]
    if plan.memory is not None:
        lines += ["", *_memory_lines(plan)]
    if plan.selection is not None:
        width = max(map(len, plan.selection), default=0) + 2
        lines += ["", "selection", *(f"  {k:<{width}}{v}" for k, v in plan.selection.items())]
    if plan.notes:
        lines += ["", "notes", *(f"  - {note}" for note in plan.notes)]
    lines += ["", "checked      " + "; ".join(plan.checked)]
    if plan.not_checked:
        lines.append("not checked  " + "; ".join(plan.not_checked))
    return "\n".join(lines)


def _shape_table(plan: TrainingPlan) -> list[str]:
    source = plan.source.architecture
    columns: list[tuple[str, Architecture, dict[str, int]]] = [
        ("source", source, {"total_params": plan.source.total_params,
                            "non_embedding_params": plan.source.non_embedding_params})]
    if plan.target is not None:
        columns.append(("target", plan.target, target_counts(plan.target)))
    if plan.teacher is not None:
        columns.append(("teacher", plan.teacher.architecture,
                        {"total_params": plan.teacher.total_params,
                         "non_embedding_params": plan.teacher.non_embedding_params}))
    rows = [
        ("layers", lambda a, c: a.num_layers),
        ("heads / KV heads", lambda a, c: f"{a.num_heads} / {a.num_kv_heads}"),
        ("hidden", lambda a, c: a.embed_dim),
        ("MLP", lambda a, c: a.intermediate_dim),
        ("head_dim", lambda a, c: a.head_dim),
        ("vocab", lambda a, c: a.vocab_size),
        ("tied embeddings", lambda a, c: "yes" if a.tie_word_embeddings else "no"),
        ("params, total", lambda a, c: _count(c["total_params"])),
        ("params, non-embedding", lambda a, c: _count(c["non_embedding_params"])),
    ]
    width = 26
    out = ["model" + " " * 19 + "".join(f"{name:>{width}}" for name, _, _ in columns)]
    for label, value in rows:
        out.append(f"  {label:<22}" + "".join(f"{value(a, c)!s:>{width}}"
                                               for _, a, c in columns))
    rope = plan.source.rope
    out.append(f"  {'RoPE':<22}{rope.describe() if rope else 'unknown module'}")
    if plan.source.max_seq_len:
        out.append(f"  {'built for':<22}{plan.source.max_seq_len:,} positions")
    return out


def _budget_lines(plan: TrainingPlan) -> list[str]:
    b = plan.budget
    pairs = " pairs x 2 sequences" if b.sequences_per_sample == 2 else ""
    bound = "" if b.exact else " (at most)"
    per_step = (f"  per step{bound:<14}{_count(b.tokens_per_step)} = {b.batch_size}{pairs} x "
                f"{b.sequence_length:,} tokens x {b.gradient_accumulation_steps} accumulation x "
                f"{b.data_parallel} data-parallel")
    lines = ["tokens", per_step]
    steps = "unknown" if b.steps is None else f"{b.steps:,}"
    lines.append(f"  {'steps':<22}{steps}   ({b.steps_from})")
    if b.total_tokens is not None:
        lines.append(f"  {'total' + bound:<22}{_count(b.total_tokens)}")
    return lines


def _memory_lines(plan: TrainingPlan) -> list[str]:
    m = plan.memory
    shards = f"FSDP over {m.world_size} ranks" if m.fsdp else "one process, nothing sharded"
    used = "checkpointed" if m.activation_checkpointing else "not checkpointed"
    held = m.weights_dtype or m.dtype
    rows: list[tuple[str, int]] = [(f"weights ({held})", m.weights),
                                   (f"gradients ({held})", m.gradients),
                                   ("optimizer state", m.optimizer_state)]
    if m.pruning_state:
        rows.append(("pruning gates + multipliers", m.pruning_state))
    if m.teacher_weights:
        rows.append((f"distillation teacher ({m.dtype})", m.teacher_weights))
    if m.teacher_gathered_weight:
        rows.append(("teacher output weight, gathered", m.teacher_gathered_weight))
    if m.root_gathered:
        rows.append(("embeddings + output, gathered", m.root_gathered))
    rows.append(("buffers (RoPE tables)", m.buffers))
    rows += [("activations, checkpointed", m.activations_checkpointed),
             ("activations, not checkpointed", m.activations_full)]
    if m.attention_mask_full:
        rows += [("attention masks, checkpointed", m.attention_mask_checkpointed),
                 ("attention masks, not checkpointed", m.attention_mask_full)]
    if m.distillation_loss:
        rows.append(("KD loss (saved for backward)", m.distillation_loss))
    where = "GPU" if str(plan.device).startswith("cuda") else f"process ({plan.device})"
    lines = [f"memory per {where} (estimate; {shards})"]
    lines += [f"  {label:<36}{_size(value):>12}" for label, value in rows]
    lines.append(f"  {'total (activations ' + used + ')':<36}{_size(m.total):>12}")
    lines.append(f"  optimizer: {m.optimizer}")
    lines.append(f"  {ACTIVATION_FORMULA}")
    return lines


def _size(value: int) -> str:
    return f"{value / GIB:.2f} GiB" if value >= GIB // 10 else f"{value / 2**20:.1f} MiB"


def _count(value: float | None) -> str:
    if value is None:
        return "-"
    value = int(value)
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix} ({value:,})"
    return f"{value:,}"

