"""AdamW that keeps a float32 copy of every bf16 weight: mixed precision for stock recipes.

torchtune's stock recipes (``full_finetune_single_device``, ``full_finetune_distributed``) train
``dtype: bf16`` models in pure bf16: the weights *and* AdamW's moments are bf16, so an update
smaller than half a bf16 step of its weight (|w| / 256) is rounded away. At fine-tuning learning
rates that is most of them (``benchmarks/mixed_precision.py``: at lr 1e-5 one step changes 1.9%
of SmolLM2-135M's weight values). The papers' recipes do not lose them: Hugging Face's
``--bf16`` (ProLong's SFT) and Megatron's bf16 keep float32 weights and moments and compute in
bf16. Our own recipes do the same with ``mixed_precision: true``; a stock recipe has no such key,
but it takes any optimizer, so one line gives it the float32 update::

    optimizer:
      _component_: acadlm_plugins.training.master_weights.Float32MasterAdamW
      lr: 2.0e-5

Each bf16 parameter gets a float32 ``master`` copy in the optimizer state; the step runs
torch's own AdamW arithmetic (``torch.optim.adam.adam`` with decoupled weight decay) on the
master with the gradient in float32, and writes the master, rounded to bf16, back into the
parameter the model computes with. Float32 (and float64) parameters are their own master, so
on a float32 model this *is* ``torch.optim.AdamW``. The master and the moments are float32 in
the state dict and stay float32 when it is loaded (torch would cast them to the parameter's
dtype), so a resumed run continues the same float32 trajectory; under FSDP2 they are sharded
as the parameters are.

Cost: 4 bytes per parameter for the master and 4 more for the moments (12 bytes per bf16 value
instead of 4), as much as ``mixed_precision: true``. What it does not change: the gradients are
still computed and accumulated in bf16, and the forward pass uses the bf16 weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch.optim.adam import adam

from acadlm_plugins.errors import ConfigError

FIELD = "optimizer._component_"
# State entries kept in float32 for a parameter narrower than float32.
FLOAT32_STATE = ("master", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def narrower_than_float32(param: torch.Tensor) -> bool:
    """Whether ``param`` (bf16, fp16) gets a float32 master; float32 and float64 parameters
    are their own."""
    return torch.finfo(param.dtype).bits < 32


class Float32MasterAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose update is made in float32 on a float32 copy of each
    low-precision parameter, so small updates accumulate instead of rounding away."""

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None,
                 fused: bool | None = None) -> None:
        # `foreach` is accepted (torchtune configs set it) and has nothing to choose: the step
        # goes one parameter at a time so that one float32 gradient exists at once.
        if fused:
            raise ConfigError(
                "optimizer.fused", "Float32MasterAdamW has no fused kernel: it steps one "
                "parameter at a time in float32.", "remove `optimizer.fused` (or set it false).")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, foreach=False)
        for param in chain.from_iterable(group["params"] for group in self.param_groups):
            if not param.is_floating_point():
                raise ConfigError(
                    FIELD, f"Float32MasterAdamW trains floating-point parameters; one of dtype "
                    f"{param.dtype} was given.", "use torch.optim.AdamW for such parameters.")

    def _state_for(self, param: torch.Tensor, amsgrad: bool) -> dict[str, Any]:
        """The parameter's state, made on its first step: the float32 master (for a
        parameter narrower than float32) and moments of the master's dtype."""
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if narrower_than_float32(param):
                state["master"] = param.detach().to(torch.float32)
            reference = state.get("master", param)
            state["exp_avg"] = torch.zeros_like(reference, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(reference, memory_format=torch.preserve_format)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(
                    reference, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One AdamW step on the float32 masters; each low-precision parameter then holds its
        master rounded to the parameter's dtype."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("Float32MasterAdamW does not support sparse gradients")
                state = self._state_for(param, group["amsgrad"])
                master = state.get("master", param)
                # One parameter at a time: only one float32 gradient exists at once.
                adam([master], [param.grad.to(master.dtype)], [state["exp_avg"]],
                     [state["exp_avg_sq"]],
                     [state["max_exp_avg_sq"]] if group["amsgrad"] else [],
                     [state["step"]], foreach=False, capturable=False, differentiable=False,
                     fused=False, decoupled_weight_decay=True, amsgrad=group["amsgrad"],
                     beta1=beta1, beta2=beta2, lr=group["lr"],
                     weight_decay=group["weight_decay"], eps=group["eps"],
                     maximize=group["maximize"])
                if master is not param:
                    param.copy_(master)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, then put back the float32 masters and moments that torch's
        loader casts to each parameter's dtype."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        for saved_id, param in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if not saved or not narrower_than_float32(param):
                continue  # torch's cast to a float32 or float64 parameter's dtype is right
            state = self.state[param]
            for key in FLOAT32_STATE:
                if key in saved:
                    state[key] = saved[key].to(device=param.device, dtype=torch.float32)
            if "master" not in state:
                # A state saved by torch.optim.AdamW: the weights themselves are the best copy.
                state["master"] = param.detach().to(torch.float32)
