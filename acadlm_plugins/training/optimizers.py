"""The optimizer of every recipe, from ``optimizer._component_``, checked before training.

Any ``torch.optim`` class works, and so do torchao's low-memory ones, by one line::

    optimizer:
      _component_: torchao.optim.AdamW8bit   # or AdamW4bit; torchao.optim.CPUOffloadOptimizer
      lr: 3.0e-4

``AdamW8bit`` / ``AdamW4bit`` keep both Adam moments in 8 / 4 bits with one scale per block of
256 / 128 values, which is a quarter / an eighth of AdamW's float32 state. Following
bitsandbytes, torchao does this only for tensors of at least 4096 values whose size the block
divides; the rest (norms, biases) keep float32 moments. Their update is compiled with
``torch.compile`` on first use (on CPU that needs a C++ compiler and takes a while once).

Checked here, each a ConfigError naming ``optimizer._component_`` (or the parameter), before
any step: torchao missing, the CPU-offload optimizer without a CUDA/XPU device or under FSDP,
parameters a low-bit optimizer cannot hold (integer, complex, quantized tensors), and a
low-bit optimizer none of whose parameters would actually get low-bit states.

The pruning plugin's gates and Lagrange multipliers never go through this optimizer: they keep
their own float32 AdamW (see ``acadlm_plugins/plugins/pruning.py``). They are a few thousand
values, so there is nothing to save, and the multipliers are trained by gradient *ascent*, where
a block-quantized second moment would distort exactly the small, sign-carrying updates that
hold the expected shape on its target.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.training.components import instantiate_component

FIELD = "optimizer._component_"
LOW_BIT = {"AdamW8bit": 256, "Adam8bit": 256, "AdamW4bit": 128, "Adam4bit": 128,
           "AdamWFp8": 256, "AdamFp8": 256}
CPU_OFFLOAD = "CPUOffloadOptimizer"
MIN_QUANTIZED_NUMEL = 4096  # torchao (like bitsandbytes) keeps smaller tensors in float32


def _torchao_class_name(component: str) -> str | None:
    """The class name when ``component`` is one of torchao's optimizers, else None."""
    if not component.startswith("torchao."):
        return None
    return component.rsplit(".", 1)[-1]


def gets_low_bit_state(param: torch.Tensor, block_size: int) -> bool:
    """Whether torchao gives ``param`` quantized moments (else float32 ones)."""
    local = param.to_local() if hasattr(param, "to_local") else param
    return local.numel() >= MIN_QUANTIZED_NUMEL and local.numel() % block_size == 0


def _parameters(groups: Iterable[Any]) -> list[tuple[int, torch.Tensor]]:
    params: list[tuple[int, torch.Tensor]] = []
    for index, group in enumerate(groups):
        items = group["params"] if isinstance(group, dict) else [group]
        params.extend((index, p) for p in items)
    return params


def check_optimizer(cfg: DictConfig, groups: list[Any], *, device: torch.device,
                    distributed: bool) -> None:
    """Raise ConfigError when ``cfg.optimizer`` cannot train ``groups`` here (see module doc)."""
    component = str((cfg.get("optimizer", None) or {}).get("_component_", ""))
    name = _torchao_class_name(component)
    if name is None:
        return
    try:
        import torchao.optim  # noqa: F401
    except Exception as err:  # an incompatible torchao raises more than ImportError
        raise ConfigError(FIELD, f"{component!r} needs torchao, which does not import "
                          f"({type(err).__name__}: {err}).",
                          "install the torchao version pinned by acadlm-plugins "
                          "(`pip install acadlm-plugins`), or use torch.optim.AdamW.") from err
    if name == CPU_OFFLOAD:
        if device.type not in ("cuda", "xpu"):
            raise ConfigError(FIELD, f"{component} moves optimizer states from a CUDA/XPU "
                              f"device to CPU memory; this run is on {device.type}, where they "
                              "already are.", "use torch.optim.AdamW, or torchao.optim.AdamW8bit "
                              "to shrink the states.")
        if distributed:
            raise ConfigError(FIELD, f"{component} supports single-device training only.",
                              "with several GPUs use torchao.optim.AdamW8bit/AdamW4bit, whose "
                              "states FSDP2 shards.")
        _check_cpu_offload_step(cfg, component)
        return
    block = LOW_BIT.get(name)
    if block is None:
        return
    params = _parameters(groups)
    for index, param in params:
        local = param.to_local() if hasattr(param, "to_local") else param
        if not local.is_floating_point():
            raise ConfigError(FIELD, f"{name} cannot train a {local.dtype} parameter (group "
                              f"{index}, shape {tuple(param.shape)}).",
                              "freeze it (requires_grad=False) or use torch.optim.AdamW.")
        if type(local) not in (torch.Tensor, torch.nn.Parameter):
            raise ConfigError(FIELD, f"{name} cannot train a {type(local).__name__} parameter "
                              f"(group {index}, shape {tuple(param.shape)}): torchao's low-bit "
                              "optimizers update plain or FSDP-sharded tensors.",
                              "train the unquantized model, or use torch.optim.AdamW.")
    if name.endswith(("8bit", "4bit")) and not any(gets_low_bit_state(p, block)
                                                   for _, p in params):
        raise ConfigError(FIELD, f"none of the {len(params)} parameters would get {name} "
                          f"states: torchao quantizes only tensors of >= {MIN_QUANTIZED_NUMEL} "
                          f"values that are a multiple of {block}, and keeps the rest in "
                          "float32, so this saves nothing.", "use torch.optim.AdamW.")


def _check_cpu_offload_step(cfg: DictConfig, component: str) -> None:
    """What ``CPUOffloadOptimizer`` cannot do in our loop: it copies each gradient to the host
    during backward and steps on that copy, so clipping the device gradients afterwards
    changes nothing it applies; and with ``offload_gradients`` it drops each micro-batch's
    device gradient after the copy, so the host keeps only the last micro-batch's."""
    if cfg.get("clip_grad_norm", None) is not None:
        raise ConfigError("clip_grad_norm", f"is {cfg.clip_grad_norm}, but {component} steps on "
                          "host copies of the gradients made during backward, before the recipe "
                          "clips: the clipping would not apply to any parameter it offloads.",
                          "set `clip_grad_norm: null`, or use torchao.optim.AdamW8bit/"
                          "AdamW4bit to shrink the states instead.")
    accumulation = int(cfg.get("gradient_accumulation_steps", 1) or 1)
    if accumulation > 1 and bool(cfg.optimizer.get("offload_gradients", False)):
        raise ConfigError("optimizer.offload_gradients", f"is true with "
                          f"gradient_accumulation_steps {accumulation}: {component} then frees "
                          "each micro-batch's gradient after copying it, so only the last "
                          "micro-batch's would be applied.",
                          "set `optimizer.offload_gradients: false`, or "
                          "`gradient_accumulation_steps: 1`.")


def build_optimizer(cfg: DictConfig, groups: list[Any], *, device: torch.device,
                    distributed: bool) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``groups``, after :func:`check_optimizer`."""
    check_optimizer(cfg, groups, device=device, distributed=distributed)
    extra: dict[str, Any] = {}
    inner = cfg.optimizer.get("optimizer_class", None)
    if isinstance(inner, str):  # CPUOffloadOptimizer's base class, given as a dotted path
        from acadlm_plugins._compat import component_from_path

        extra["optimizer_class"] = component_from_path(inner)
    try:
        return instantiate_component(cfg, "optimizer", groups, **extra)
    except ConfigError:
        # already names its key (`optimizer._component_`, `optimizer.<argument>`) and the fix;
        # it is a ValueError too, which the wrapping below would bury in a second message
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError("optimizer", f"{cfg.optimizer._component_} rejected its arguments "
                          f"({err}).", "check the optimizer's keyword arguments.") from err


def _is_low_bit(tensor: Any) -> bool:
    """A torchao optimizer-state tensor (OptimState8bit, OptimState4bit, OptimStateFp8)."""
    return isinstance(tensor, torch.Tensor) and type(tensor).__module__.startswith("torchao.")


def _dequantized(value: Any) -> torch.Tensor | None:
    """A float32 copy of a low-bit state (keeping an FSDP2 placement), or None."""
    if hasattr(value, "to_local") and _is_low_bit(value.to_local()):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(value.to_local().dequantize(), value.device_mesh,
                                  value.placements, run_check=False, shape=value.shape,
                                  stride=value.stride())
    if _is_low_bit(value):
        return value.dequantize()
    return None


@contextlib.contextmanager
def float_states(optimizer: torch.optim.Optimizer) -> Iterator[int]:
    """Within the block, the optimizer's low-bit states are float32 copies (then put back).

    Gathering a full optimizer state dict under FSDP2 cannot handle torchao's state types, so
    distributed checkpoints store the moments in float32; :func:`requantize_states` turns them
    back into low-bit states on load. Yields how many states were swapped.
    """
    swapped = []
    for per_param in optimizer.state.values():
        for key, value in list(per_param.items()):
            dequantized = _dequantized(value)
            if dequantized is not None:
                swapped.append((per_param, key, value))
                per_param[key] = dequantized
    try:
        yield len(swapped)
    finally:
        for per_param, key, value in swapped:
            per_param[key] = value


def requantize_states(optimizer: torch.optim.Optimizer) -> int:
    """After loading float32 moments (a distributed checkpoint, or a previous stage trained with
    torch AdamW) into a torchao low-bit optimizer, give every tensor that gets low-bit states
    its quantized moments back; returns how many were converted. No-op for other optimizers."""
    block = getattr(optimizer, "block_size", None)
    if block is None or not hasattr(optimizer, "_new_buffer"):
        return 0
    converted = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param) or {}
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False),
                                ("max_exp_avg_sq", False)):
                value = state.get(key)
                if value is None:
                    continue
                local = value.to_local() if hasattr(value, "to_local") else value
                if type(local) is torch.Tensor and gets_low_bit_state(param, block):
                    fresh = optimizer._new_buffer(param, signed)
                    fresh.copy_(value)
                    state[key] = fresh
                    converted += 1
    return converted


def _local(tensor: Any) -> Any:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _same_low_bit_form(kept: torch.Tensor, loaded: torch.Tensor) -> bool:
    """Whether a loaded low-bit state already has the form the optimizer would give it."""
    return (type(kept) is type(loaded) and kept.shape == loaded.shape
            and getattr(kept, "block_size", None) == getattr(loaded, "block_size", None)
            and getattr(kept, "signed", None) == getattr(loaded, "signed", None))


def dequantize_states(optimizer: torch.optim.Optimizer) -> int:
    """The opposite of :func:`requantize_states`: after loading torchao low-bit moments
    (``OptimState8bit`` and the like, which single-process checkpoints keep as they are) into
    an optimizer that keeps that parameter's moments in another form -- torch's AdamW, a tensor
    torchao keeps in float32, another bit width or block size -- turn them back into plain
    tensors; returns how many were converted. A moment the optimizer keeps in exactly the
    loaded form stays as it is, so a resumed low-bit run stays bit-exact.

    Without this torch's AdamW fails on its first step (a low-bit state has no ``lerp_``). The
    plain moments get the parameter's dtype where the optimizer keeps plain moments (as torch's
    AdamW creates them) and float32 where it keeps another low-bit form, which
    :func:`requantize_states` then quantizes (:func:`match_loaded_states` does both)."""
    new_buffer = getattr(optimizer, "_new_buffer", None)
    converted = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param) or {}
            for key, value in list(state.items()):
                if not _is_low_bit(_local(value)):
                    continue
                kept = None if new_buffer is None else _local(new_buffer(param, key == "exp_avg"))
                if kept is not None and _same_low_bit_form(kept, _local(value)):
                    continue
                plain = _dequantized(value)
                state[key] = plain if _is_low_bit(kept) else plain.to(param.dtype)
                converted += 1
    return converted


def _keeps_tensor_lr(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is one of torchao's Adam optimizers (AdamW8bit, AdamW4bit,
    AdamWFp8, ...): they turn every group's ``lr`` into a float32 tensor when the group is
    added, and their step refuses a float one (``lr was changed to a non-Tensor object``)."""
    return type(optimizer).__module__.startswith("torchao.") and hasattr(optimizer, "_new_buffer")


def _inner_optimizers(optimizer: Any) -> list[Any]:
    """The optimizers that hold ``optimizer``'s param groups: itself, or for torchao's
    ``CPUOffloadOptimizer`` its per-parameter optimizers (of its ``optimizer_class``)."""
    inner = getattr(optimizer, "optim_dict", None)
    if inner is None:
        return [optimizer]
    return [*inner.values(), *([optimizer.d_opt] if optimizer.d_opt else [])]


def match_loaded_groups(optimizer: torch.optim.Optimizer) -> int:
    """After ``load_state_dict``, give each param group's ``lr`` the form this optimizer keeps
    it in; returns how many groups changed.

    ``load_state_dict`` puts the saved groups' values in as they were saved, so a checkpoint of
    torch's AdamW (float lr) resumed with torchao's AdamW8bit failed at its first step, and one
    of AdamW8bit (tensor lr) resumed with torch's AdamW would keep a tensor lr, which its
    foreach update does not take. torchao's optimizers get a float32 tensor (as their own
    ``add_param_group`` makes it); others a float, unless they were built with a tensor lr."""
    changed = 0
    for part in _inner_optimizers(optimizer):
        keeps_tensor = _keeps_tensor_lr(part)
        if not keeps_tensor and isinstance(getattr(part, "defaults", {}).get("lr"),
                                           torch.Tensor):
            continue
        for group in part.param_groups:
            lr = group.get("lr")
            if lr is None or isinstance(lr, torch.Tensor) == keeps_tensor:
                continue
            group["lr"] = (torch.tensor(float(lr), dtype=torch.float32) if keeps_tensor
                           else float(lr))
            changed += 1
    return changed


def match_loaded_states(optimizer: torch.optim.Optimizer) -> int:
    """After ``load_state_dict`` of moments saved by any of our optimizers (a previous stage, a
    checkpoint resumed with another optimizer): :func:`match_loaded_groups`, then
    :func:`dequantize_states` and :func:`requantize_states`, so every group value and moment
    has the form this optimizer updates. Returns how many moments changed form."""
    match_loaded_groups(optimizer)
    # CPUOffloadOptimizer keeps no `state` of its own: its per-parameter optimizers hold it
    return sum(dequantize_states(part) + requantize_states(part)
               for part in _inner_optimizers(optimizer))


def float_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A full optimizer state dict with its low-bit moments as float32 (the form our distributed
    checkpoints store), for ``training.load_from_full_optimizer_state_dict``, which shards plain
    tensors only; :func:`requantize_states` quantizes them again after the load."""
    states = {}
    for index, per_param in state_dict["state"].items():
        states[index] = {}
        for key, value in per_param.items():
            plain = _dequantized(value)
            states[index][key] = value if plain is None else plain
    return {**state_dict, "state": states}


def _nbytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    if type(tensor) is not torch.Tensor and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_nbytes(getattr(tensor, n)) for n in names)
    return tensor.numel() * tensor.element_size()


def state_bytes(state: Mapping[Any, Mapping[str, Any]]) -> dict[str, int]:
    """Bytes of per-parameter optimizer state (``optimizer.state``, or the ``"state"`` of a
    saved optimizer state dict), counting what quantized states really hold (codes and
    scales): ``{"total": ..., "low_bit": ..., "float": ...}``. Step counters are left out."""
    low_bit = plain = 0
    for per_param in state.values():
        for value in per_param.values():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            local = value.to_local() if hasattr(value, "to_local") else value
            if type(local) is torch.Tensor:
                plain += _nbytes(value)
            else:
                low_bit += _nbytes(value)
    return {"total": low_bit + plain, "low_bit": low_bit, "float": plain}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """:func:`state_bytes` of a live optimizer (CPU-offload: of its per-parameter optimizers)."""
    inner = getattr(optimizer, "optim_dict", None)
    if inner is None:
        return state_bytes(optimizer.state)
    totals = {"total": 0, "low_bit": 0, "float": 0}
    for part in [*inner.values(), *([optimizer.d_opt] if optimizer.d_opt else [])]:
        for key, value in state_bytes(part.state).items():
            totals[key] += value
    return totals


__all__ = ["build_optimizer", "check_optimizer", "dequantize_states", "float_state_dict",
           "float_states", "gets_low_bit_state", "match_loaded_groups",
           "match_loaded_states", "optimizer_state_bytes",
           "requantize_states", "state_bytes"]
