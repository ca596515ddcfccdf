"""What a dry run finds out: :class:`TrainingPlan` and its :class:`TokenBudget`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from acadlm_plugins.planning.memory import MemoryEstimate
from acadlm_plugins.planning.model_shape import ModelSummary, target_counts
from acadlm_plugins.pruning.architecture import Architecture


@dataclass(frozen=True)
class TokenBudget:
    """Tokens per optimizer step and over the run, as the recipe counts them."""

    sequence_length: int
    batch_size: int                 # per data-parallel rank and micro-batch (a rater: pairs)
    gradient_accumulation_steps: int
    data_parallel: int
    sequences_per_sample: int       # 2 for a rater (a pair), else 1
    tokens_per_step: int
    steps: int | None
    steps_from: str
    total_tokens: int | None
    exact: bool                     # False: an upper bound (unpacked or padded samples)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingPlan:
    """Everything the dry run found out (see :func:`acadlm_plugins.planning.plan_config`)."""

    config: str
    recipe: str
    recipe_from: str
    world_size: int
    world_size_from: str
    device: str | None = None
    dtype: str | None = None
    source: ModelSummary | None = None
    target: Architecture | None = None
    teacher: ModelSummary | None = None
    budget: TokenBudget | None = None
    memory: MemoryEstimate | None = None
    selection: dict[str, Any] | None = None
    checked: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config, "recipe": self.recipe, "recipe_from": self.recipe_from,
            "world_size": self.world_size, "world_size_from": self.world_size_from,
            "device": self.device, "dtype": self.dtype,
            "source": None if self.source is None else self.source.to_dict(),
            "target": None if self.target is None else {
                "architecture": self.target.to_dict(), **target_counts(self.target)},
            "teacher": None if self.teacher is None else self.teacher.to_dict(),
            "tokens": None if self.budget is None else self.budget.to_dict(),
            "memory_per_rank_bytes": None if self.memory is None else self.memory.to_dict(),
            "selection": self.selection, "checked": self.checked,
            "not_checked": self.not_checked, "notes": self.notes,
        }
