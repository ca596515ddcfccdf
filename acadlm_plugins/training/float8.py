"""Float8 training (``torchao.float8``) on GPUs that have float8 matmuls.

``convert_to_float8_training`` swaps the model's ``nn.Linear`` layers for ``Float8Linear``:
weights stay in high precision, and each matmul casts its inputs to float8 with dynamic
scales. The matmuls need float8 tensor cores: NVIDIA compute capability 8.9 or newer (Ada,
Hopper, Blackwell). Anywhere else the run is refused before it starts, naming the config field,
rather than silently training in bf16 or failing in the first step.

Unchecked here: no session had such a GPU when this was written, so the conversion is tested
for its refusals and for the module swap only (on CPU, without running a float8 matmul).
"""

from __future__ import annotations

import torch
from torch import nn

from acadlm_plugins.errors import ConfigError

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
MIN_CAPABILITY = (8, 9)


def float8_unsupported_reason(device: torch.device) -> str | None:
    """Why float8 training cannot run on ``device`` (None: it can)."""
    if device.type != "cuda":
        return (f"float8 matmuls need an NVIDIA GPU of compute capability "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (Ada, Hopper); this run is on "
                f"{device.type}")
    if not torch.cuda.is_available():
        return "CUDA is not available in this process"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} has compute capability "
                f"{capability[0]}.{capability[1]}; float8 matmuls need "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+")
    return None


def check_float8(recipe: str, device: torch.device, *, field: str) -> None:
    """ConfigError naming ``field`` unless ``recipe`` is known and ``device`` runs float8."""
    if recipe not in RECIPES:
        raise ConfigError(field, f"unknown float8 recipe {recipe!r}.",
                          f"use one of {list(RECIPES)}, or null for bf16/fp32 training.")
    reason = float8_unsupported_reason(device)
    if reason:
        raise ConfigError(field, f"is {recipe!r}, but {reason}.",
                          "set it to null (train in bf16 on GPUs, fp32 on CPU).")


def _fits_float8(module: nn.Module, name: str) -> bool:
    # float8 matmuls need both dims divisible by 16; the output projection stays in high
    # precision (its logits feed the loss directly).
    return (isinstance(module, nn.Linear) and module.in_features % 16 == 0
            and module.out_features % 16 == 0 and name.split(".")[-1] != "output")


def convert_to_float8(model: nn.Module, recipe: str) -> int:
    """Swap the model's eligible linear layers for ``Float8Linear`` (in place, before FSDP2
    wraps the model); returns how many were swapped."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    config = Float8LinearConfig.from_recipe_name(recipe)
    convert_to_float8_training(model, config=config, module_filter_fn=_fits_float8)
    return sum(isinstance(m, Float8Linear) for m in model.modules())


__all__ = ["RECIPES", "check_float8", "convert_to_float8", "float8_unsupported_reason"]
